"""The pretraining study (`python -m experiments.study --smoke`): runs, table, statistics and curves."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.study import ARMS, INITS, SMOKE
from experiments.study_report import (
    FINDINGS_MARKER,
    MAIN_METRICS,
    Comparison,
    StudyRun,
    final,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(out_dir: Path, runs_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = ["-m", "experiments.study", "--smoke", "--out-dir", str(out_dir), "--runs-dir", str(runs_dir)]
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """Run the whole smoke study once in a subprocess; returns (out_dir, runs_dir)."""
    base = tmp_path_factory.mktemp("study")
    out_dir, runs_dir = base / "out", base / "runs"
    done = run_smoke(out_dir, runs_dir, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir, runs_dir


def summary_rows(readme: str) -> dict[tuple[str, str], list[str]]:
    """(arm, task) -> cells of the README's main table."""
    rows = {}
    for line in readme.split("## Pretraining")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ARMS:
            rows[(cells[0], cells[1])] = cells
    return rows


def test_smoke_study_runs_every_arm_init_and_seed_from_the_right_checkpoint(smoke_study):
    out_dir, runs_dir = smoke_study
    ckpt = str(runs_dir / "pretrain" / "mae" / "checkpoints" / "last.ckpt")
    for arm in ARMS:
        for task in SMOKE.tasks:
            for init in INITS:
                for seed in SMOKE.seeds:
                    run_dir = runs_dir / task / f"{arm}_{init}_s{seed}"
                    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
                    assert cfg["task"]["init_from"] == (ckpt if init == "mae" else None)
                    assert cfg["task"]["freeze_backbone"] is (arm == "frozen")
                    assert cfg["seed"] == seed
                    assert final(run_dir, MAIN_METRICS[task][0]) is not None
                    # fine-tuned on the labelled subset, validated on the pool's validation split
                    assert "/labelled/shards/" in cfg["data"]["train_shards"]
                    assert "/pool/shards/" in cfg["data"]["val_shards"]


def test_smoke_study_table_reports_mean_and_std_over_seeds_from_metrics_csv(smoke_study):
    out_dir, runs_dir = smoke_study
    readme = (out_dir / "README.md").read_text()
    rows = summary_rows(readme)
    assert set(rows) == {(a, t) for a in ARMS for t in SMOKE.tasks}
    for (arm, task), cells in rows.items():
        column = MAIN_METRICS[task][0]
        for init, cell in (("mae", cells[3]), ("random", cells[4])):
            values = [final(runs_dir / task / f"{arm}_{init}_s{s}", column) for s in SMOKE.seeds]
            expected = Comparison(arm, task, values, values).stats(values)
            shown_mean, shown_std = (float(v) for v in cell.split("±"))
            assert shown_mean == pytest.approx(expected[0], abs=1e-4)
            assert shown_std == pytest.approx(expected[1], abs=1e-4)
    assert "python -m experiments.study --smoke" in readme
    assert "git commit:" in readme and "CPU cores (nproc): " in readme
    for name in ("curves.png", "pretrain_loss.png", "mae_reconstructions.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000


def test_rerun_reuses_finished_runs_and_keeps_hand_written_findings(smoke_study):
    out_dir, runs_dir = smoke_study
    readme = out_dir / "README.md"
    readme.write_text(readme.read_text() + "\nMasking 50% did not help either.\n")
    done = run_smoke(out_dir, runs_dir, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reusing the finished run" in done.stdout and "$ train.py" not in done.stdout
    text = readme.read_text()
    assert text.count(FINDINGS_MARKER) == 1
    assert text.rstrip().endswith("Masking 50% did not help either.")


def test_separation_counts_standard_deviations_in_the_direction_of_better():
    # mIoU: higher is better; MAE ahead by 0.1 with a larger std of 0.02 -> 5 std
    seg = Comparison("frozen", "seg", [0.50, 0.52, 0.54], [0.40, 0.41, 0.42])
    assert seg.gain == pytest.approx(0.11) and seg.separation == pytest.approx(0.11 / 0.02)
    assert seg.separated
    # depth RMSE: lower is better, so a lower MAE mean is a positive gain
    depth = Comparison("full", "depth", [0.20, 0.21, 0.22], [0.30, 0.30, 0.31])
    assert depth.gain == pytest.approx(0.3033 - 0.21, abs=1e-4) and depth.separated
    # within noise: gain below two standard deviations
    close = Comparison("full", "normal", [30.0, 31.0, 29.0], [30.5, 31.5, 29.5])
    assert close.gain == pytest.approx(0.5) and not close.separated
    # a single seed has no standard deviation: never called separated
    assert not Comparison("full", "seg", [0.9], [0.1]).separated


def test_report_of_a_partial_study_lists_missing_runs(tmp_path):
    runs = [StudyRun("seg", "full", i, 0, tmp_path / "seg" / f"full_{i}_s0") for i in INITS]
    readme = write_report(tmp_path / "out", runs, tmp_path / "pretrain", {}, SMOKE, "cmd")
    text = readme.read_text()
    assert "| full | seg | mae | 0 | val/mIoU | missing |" in text
    assert summary_rows(text) == {}
