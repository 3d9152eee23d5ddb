"""The pretraining study (`python -m experiments.study --quick`): table, curves and numbers from runs."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.study import (
    FINDINGS_MARKER,
    MAIN_METRICS,
    QUICK,
    StudyRun,
    metric_summary,
    parse_variant,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
INITS = ("mae", "random")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """Run the whole quick study once in a subprocess; returns (out_dir, runs_dir)."""
    base = tmp_path_factory.mktemp("study")
    out_dir, runs_dir = base / "out", base / "runs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.study",
            "--quick",
            "--out-dir",
            str(out_dir),
            "--runs-dir",
            str(runs_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir, runs_dir


def table_rows(readme: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(task, init) -> (metric column, best, final, final val/loss) from the README's table."""
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in MAIN_METRICS:
            key = (cells[0], cells[2])
            assert key not in rows, f"two rows for {key}"
            rows[key] = (cells[1], cells[3], cells[4], cells[5])
    return rows


def column_values(path: Path, column: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def test_quick_study_writes_one_row_per_task_and_init_from_metrics_csv(quick_study):
    out_dir, runs_dir = quick_study
    readme = (out_dir / "README.md").read_text()
    rows = table_rows(readme)
    assert set(rows) == {(t, i) for t in MAIN_METRICS for i in INITS}
    for (task, init), (column, best, final, val_loss) in rows.items():
        expected_column, _, higher = MAIN_METRICS[task]
        assert column == expected_column
        values = column_values(runs_dir / task / init / "metrics.csv", column)
        assert values, f"{task}/{init} logged no {column}"
        assert float(final) == pytest.approx(values[-1], abs=1e-4)
        assert float(best) == pytest.approx(max(values) if higher else min(values), abs=1e-4)
        losses = column_values(runs_dir / task / init / "metrics.csv", "val/loss")
        assert float(val_loss) == pytest.approx(losses[-1], abs=1e-4)
    # the MAE runs really started from the pretraining checkpoint, the random ones did not
    for task in MAIN_METRICS:
        mae_cfg = (runs_dir / task / "mae" / "config.yaml").read_text()
        assert str(runs_dir / "pretrain" / "mae" / "checkpoints" / "last.ckpt") in mae_cfg
        assert "init_from: null" in (runs_dir / task / "random" / "config.yaml").read_text()
    assert "python -m experiments.study --quick" in readme
    assert "git commit:" in readme and "torch:" in readme and "CPU cores (nproc): " in readme
    assert "| pretrain mae |" in readme


def test_quick_study_draws_small_loss_curve_pngs(quick_study):
    out_dir, _ = quick_study
    for name in ("finetune_loss.png", "pretrain_loss.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) < 300_000


def test_rewriting_the_report_keeps_hand_written_findings(quick_study, tmp_path):
    out_dir, runs_dir = quick_study
    runs = [StudyRun(t, i, runs_dir / t / i, True, 1.0) for t in MAIN_METRICS for i in INITS]
    runs.append(StudyRun("pretrain", "mae", runs_dir / "pretrain" / "mae", True, 1.0))
    readme = write_report(tmp_path, runs, {"total": 2.0}, QUICK, "cmd", list(MAIN_METRICS))
    readme.write_text(readme.read_text() + "\nMasking 50% did not help either.\n")
    write_report(tmp_path, runs, {"total": 3.0}, QUICK, "cmd", list(MAIN_METRICS))
    text = readme.read_text()
    assert text.count(FINDINGS_MARKER) == 1
    assert text.rstrip().endswith("Masking 50% did not help either.")
    assert set(table_rows(text)) == {(t, i) for t in MAIN_METRICS for i in INITS}


def test_metric_summary_best_and_final(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/rmse\n0,9,1.0,\n0,49,,0.30\n1,99,,0.20\n1,99,,0.25\n"
    )
    assert metric_summary(tmp_path, "val/rmse", higher_is_better=False) == (0.20, 0.25)
    assert metric_summary(tmp_path, "val/rmse", higher_is_better=True) == (0.30, 0.25)
    assert metric_summary(tmp_path, "val/AP", higher_is_better=True) is None
    assert metric_summary(tmp_path / "absent", "val/rmse", higher_is_better=False) is None


def test_parse_variant():
    assert parse_variant("mask50=task.mask_ratio=0.5") == ("mask50", ["task.mask_ratio=0.5"])
    assert parse_variant("long=trainer.max_steps=9,task.mask_ratio=0.9") == (
        "long",
        ["trainer.max_steps=9", "task.mask_ratio=0.9"],
    )
    for bad in ("mask50", "=task.mask_ratio=0.5", "bad-name=x=1", "x="):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


@pytest.mark.parametrize("arm", ["mae", "distill"])
def test_each_pretraining_arm_composes_with_the_study_budget(arm, tmp_path):
    """``--pretrain mae distill``: every arm's train.py arguments make a valid config of its objective."""
    from experiments.study import PRETRAIN_ARMS, common_overrides, pretrain_args
    from sapiens.config import validate_config
    from tests.test_configs import compose_cfg

    experiment, task_name = PRETRAIN_ARMS[arm]
    args = pretrain_args(
        QUICK, arm, [*common_overrides(QUICK, tmp_path, tmp_path), *QUICK.pretrain_extra], experiment
    )
    cfg = compose_cfg(args)
    validate_config(cfg)
    assert cfg.task.name == task_name and cfg.trainer.max_steps == QUICK.pretrain_steps
