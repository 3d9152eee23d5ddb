"""The pretraining study (`python -m experiments.study --smoke`): runs for every init (MAE,
self-distillation, random), table, statistics and curves; the report's arithmetic on synthetic metrics."""

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from experiments.baselines import baseline_metrics
from experiments.demo import BASELINE_FIT_BATCHES, last_value
from experiments.study import (
    ARMS,
    DATA_PHASE,
    DEFAULT,
    INITS,
    PHASE_WALLS,
    QUICK,
    SMOKE,
    STUDY_HEADS,
    finetune_args,
)
from experiments.study_report import (
    FINDINGS_MARKER,
    MAIN_METRICS,
    Comparison,
    StudyRun,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
# The smoke study in these tests: seg only (pose fine-tunes of the study run in
# tests/test_sapiens2_train.py), every init, both arms, two seeds: 2 pretrainings and 12 fine-tunes.
TASKS = ("seg",)
TRIVIAL_INTRO = "What a model scores without learning anything"  # the trivial baselines' table follows
PRETRAIN_DIRS = {"mae": Path("pretrain") / "mae", "distill": Path("pretrain_distill") / "distill"}


def run_smoke(out_dir: Path, runs_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = ["-m", "experiments.study", "--smoke", "--tasks", *TASKS, "--out-dir", str(out_dir),
           "--runs-dir", str(runs_dir)]  # fmt: skip
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """Run the smoke study once in a subprocess; returns (out_dir, runs_dir)."""
    base = tmp_path_factory.mktemp("study")
    out_dir, runs_dir = base / "out", base / "runs"
    done = run_smoke(out_dir, runs_dir, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir, runs_dir


def table(readme: str, heading: str = "## Pretraining") -> list[dict[str, str]]:
    """The first Markdown table before ``heading`` as one dict (header -> cell) per row; a repeated header
    (the second "in std") is prefixed with the column before it ("ahead of mae in std")."""
    lines = [line for line in readme.split(heading)[0].splitlines() if line.startswith("|")]
    if not lines:
        return []
    header: list[str] = []
    for cell in (c.strip() for c in lines[0].strip("|").split("|")):
        header.append(f"{header[-1]} {cell}" if cell in header else cell)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def summary(readme: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """(arm, task, init) -> the main table's row."""
    end = TRIVIAL_INTRO if TRIVIAL_INTRO in readme else "## Pretraining"  # the trivial table is optional
    return {(r["arm"], r["task"], r["init"]): r for r in table(readme, end)}


@pytest.mark.slow
def test_smoke_study_pretrains_each_objective_and_fine_tunes_every_init_from_its_checkpoint(smoke_study):
    out_dir, runs_dir = smoke_study
    mae = yaml.safe_load((runs_dir / PRETRAIN_DIRS["mae"] / "config.yaml").read_text())
    distill = yaml.safe_load((runs_dir / PRETRAIN_DIRS["distill"] / "config.yaml").read_text())
    assert (mae["task"]["name"], distill["task"]["name"]) == ("pretrain", "pretrain_distill")
    for key in ("train_shards", "val_shards"):  # the same pool
        assert mae["data"][key] == distill["data"][key]
    assert mae["trainer"]["max_steps"] == distill["trainer"]["max_steps"] == SMOKE.pretrain_steps
    assert mae["model"] == distill["model"] and distill["model"]["name"] == "vit_tiny"
    # Data decoded in process (workers would take the model's cores); the two pretrainings share the
    # machine, one thread each.
    for cfg in (mae, distill):
        assert (cfg["data"]["num_workers"], cfg["cpu_threads"]) == (0, 1)
    # the teacher's health is logged (the smoke study logs every step)
    assert last_value(runs_dir / PRETRAIN_DIRS["distill"], "distill/cls_kl_center") is not None
    ckpts = {i: str(runs_dir / d / "checkpoints" / "last.ckpt") for i, d in PRETRAIN_DIRS.items()}
    for arm in ARMS:
        for task in TASKS:
            for init in INITS:
                for seed in SMOKE.seeds:
                    run_dir = runs_dir / task / f"{arm}_{init}_s{seed}"
                    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
                    assert cfg["task"]["init_from"] == ckpts.get(init)
                    assert cfg["task"]["init_weights"] == "teacher"
                    assert cfg["task"]["freeze_backbone"] is (arm == "frozen")
                    assert cfg["seed"] == seed
                    assert (cfg["data"]["num_workers"], cfg["cpu_threads"]) == (0, 1)  # two at a time
                    assert last_value(run_dir, MAIN_METRICS[task][0]) is not None
                    # fine-tuned on the labelled subset, validated on the pool's validation split
                    assert "/labelled/shards/" in cfg["data"]["train_shards"]
                    assert "/pool/shards/" in cfg["data"]["val_shards"]
                    log = (runs_dir / "logs" / f"{task}_{arm}_{init}_s{seed}.log").read_text()
                    assert ("using its EMA teacher's weights" in log) is (init == "distill")


@pytest.mark.slow
def test_smoke_study_table_compares_each_pretraining_with_random_and_distill_with_mae(smoke_study):
    out_dir, runs_dir = smoke_study
    readme = (out_dir / "README.md").read_text()
    rows = summary(readme)
    assert set(rows) == {(a, t, i) for a in ARMS for t in TASKS for i in INITS}
    for (arm, task, init), row in rows.items():
        column = MAIN_METRICS[task][0]
        values = {
            i: [last_value(runs_dir / task / f"{arm}_{i}_s{s}", column) for s in SMOKE.seeds] for i in INITS
        }
        shown_mean, shown_std = (float(v) for v in row["mean ± std"].split("±"))
        expected = Comparison.stats(values[init])
        assert shown_mean == pytest.approx(expected[0], abs=1e-4)
        assert shown_std == pytest.approx(expected[1], abs=1e-4)
        vs_random = Comparison(arm, task, values[init], values["random"], init)
        assert (row["ahead of random"] == "") is (init == "random")
        if init != "random":
            assert float(row["ahead of random"]) == pytest.approx(vs_random.gain, abs=1e-4)
            assert row["> 2 std"] == ("yes" if vs_random.separated else "no")
        assert (row["ahead of mae"] == "") is (init != "distill")
        if init == "distill":
            vs_mae = Comparison(arm, task, values["distill"], values["mae"], "distill", "mae")
            assert float(row["ahead of mae"]) == pytest.approx(vs_mae.gain, abs=1e-4)
    # The trivial baselines, scored like a model on the study's validation set, under the main table.
    trivial = {r["task"]: r for r in table(readme.split(TRIVIAL_INTRO)[1], "![validation curves]")}
    assert set(trivial) == set(TASKS)
    expected = baseline_metrics(runs_dir / "seg" / "full_mae_s0", max_batches=BASELINE_FIT_BATCHES)
    assert float(trivial["seg"]["value"]) == pytest.approx(expected["mIoU"], abs=1e-4)
    assert trivial["seg"]["trivial baseline"] == "the most frequent class"
    pretraining = {r["init"]: r for r in table(readme.split("## Pretraining")[1], "![")}
    assert set(pretraining) == {"mae", "distill"}
    for init, row in pretraining.items():
        expected = last_value(runs_dir / PRETRAIN_DIRS[init], "val/loss")
        assert float(row["final val/loss"]) == pytest.approx(expected, abs=1e-4)
    assert pretraining["distill"]["teacher: cls entropy, KL to centre"].endswith(
        f"{last_value(runs_dir / PRETRAIN_DIRS['distill'], 'distill/cls_kl_center'):.4f}"
    )
    assert "python -m experiments.study --smoke" in readme and "model `vit_tiny`" in readme
    assert "git commit:" in readme and "CPU cores (nproc): " in readme
    assert "| MAE pretraining |" in readme and "| MAE + self-distillation pretraining |" in readme
    for name in ("curves.png", "pretrain_loss.png", "mae_reconstructions.png", "distill_reconstructions.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_keeps_hand_written_findings(smoke_study):
    out_dir, runs_dir = smoke_study
    readme = out_dir / "README.md"
    readme.write_text(readme.read_text() + "\nMasking 50% did not help either.\n")
    done = run_smoke(out_dir, runs_dir, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reusing the finished run" in done.stdout and "$ train.py" not in done.stdout
    text = readme.read_text()
    # A phase whose runs were all reused keeps the wall time it took when they ran, under one name per
    # phase whatever an invocation runs (a study grown task by task sums every invocation's time).
    timings = json.loads((runs_dir / "timings.json").read_text())
    walls = timings[PHASE_WALLS]
    assert set(walls) == {DATA_PHASE, "fine-tune, full arm", "fine-tune, frozen arm"}
    fine_tunes = [v["wall"] for k, v in timings.items() if k.startswith("seg/full_")]
    assert walls["fine-tune, full arm"] >= sum(fine_tunes) / SMOKE.jobs
    full_arm = next(line for line in text.splitlines() if line.startswith("| fine-tune, full arm"))
    assert float(full_arm.split("|")[2]) == pytest.approx(walls["fine-tune, full arm"] / 60, abs=0.06)
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


def write_metrics(run_dir: Path, columns: dict[str, list[float]], every: int = 50) -> None:
    """A CSVLogger-style ``metrics.csv``: one row per logged step, one column per key."""
    run_dir.mkdir(parents=True, exist_ok=True)
    length = max(len(v) for v in columns.values())
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", *columns])
        writer.writeheader()
        for i in range(length):
            cells = {k: v[i] for k, v in columns.items() if i < len(v)}
            writer.writerow({"epoch": i, "step": (i + 1) * every, **cells})


# Final validation metric per (arm, task, init), three seeds. seg: higher is better; depth: lower.
SYNTHETIC = {
    ("full", "seg", "random"): [0.40, 0.41, 0.42],
    ("full", "seg", "mae"): [0.50, 0.52, 0.54],
    ("full", "seg", "distill"): [0.53, 0.54, 0.55],
    ("full", "depth", "random"): [0.30, 0.30, 0.31],
    ("full", "depth", "mae"): [0.20, 0.21, 0.22],
    ("full", "depth", "distill"): [0.25, 0.26, 0.27],
}


def synthetic_study(root: Path, inits: tuple[str, ...]) -> tuple[list[StudyRun], dict[str, Path]]:
    """Runs and pretraining directories with ``metrics.csv`` files of the SYNTHETIC finals."""
    runs = []
    for (arm, task, init), values in SYNTHETIC.items():
        if init not in inits:
            continue
        for seed, value in enumerate(values):
            run = StudyRun(task, arm, init, seed, root / task / f"{arm}_{init}_s{seed}")
            column = MAIN_METRICS[task][0]
            write_metrics(run.run_dir, {column: [value * 0.5, value], "val/loss": [1.0, 0.9]})
            runs.append(run)
    pretrain_dirs = {}
    pretrain = {
        "mae": {"train/loss": [0.9, 0.7, 0.6, 0.5], "val/loss": [0.8, 0.55]},
        "distill": {
            "train/loss": [14.0, 12.0, 11.0, 10.5],
            "train/loss_mae": [0.9, 0.72, 0.62, 0.52],
            "val/loss": [0.81, 0.5625],
            "distill/cls_entropy": [6.9, 6.5, 6.2, 6.0],
            "distill/cls_kl_center": [0.001, 0.05, 0.1, 0.125],
        },
    }
    for init in inits:
        if init in pretrain:
            pretrain_dirs[init] = root / f"pretrain_{init}"
            write_metrics(pretrain_dirs[init], pretrain[init], every=25)
            (pretrain_dirs[init] / "reconstructions").mkdir()
            fig = plt.figure(figsize=(1, 1))
            fig.savefig(pretrain_dirs[init] / "reconstructions" / "step_0000100.png")
            plt.close(fig)
    return runs, pretrain_dirs


def test_report_of_synthetic_metrics_compares_each_pretraining_with_random_and_distill_with_mae(tmp_path):
    runs, pretrain_dirs = synthetic_study(tmp_path / "runs", INITS)
    readme = write_report(tmp_path / "out", runs, pretrain_dirs, {}, SMOKE, "cmd").read_text()
    lines = readme.split("## Pretraining")[0].splitlines()
    # seg (higher is better): mae 0.52 +- 0.02 and distill 0.54 +- 0.01 against random 0.41 +- 0.01;
    # distill - mae = 0.02 in units of the larger std (0.02) = 1.0
    assert "| full | seg | mIoU | random | 0.4100 ± 0.0100 |  |  |  |  |  |" in lines
    assert "| full | seg | mIoU | mae | 0.5200 ± 0.0200 | +0.1100 | +5.5 | yes |  |  |" in lines
    assert (
        "| full | seg | mIoU | distill | 0.5400 ± 0.0100 | +0.1300 | +13.0 | yes | +0.0200 | +1.0 |" in lines
    )
    # depth (lower is better): distill is 0.05 behind MAE, 5 std
    depth = [line for line in lines if line.startswith("| full | depth |")]
    assert [line.split("|")[4].strip() for line in depth] == ["random", "mae", "distill"]
    assert depth[2].endswith("| 0.2600 ± 0.0100 | +0.0433 | +4.3 | yes | -0.0500 | -5.0 |")
    pretraining = readme.split("## Pretraining")[1]
    assert "| mae | MAE | `experiment=pretrain_demo` | 3 | 0.5500 |  |" in pretraining.splitlines()
    assert (
        "| distill | MAE + self-distillation | `experiment=pretrain_distill_demo` | 3 | 0.5625 "
        "| 6.000 nats, 0.1250 |" in pretraining
    )
    assert "- fine-tuning: `experiment=<task>_demo` recipes, 2 steps of batch 4," in readme
    longer_probes = replace(SMOKE, frozen_steps=5)
    readme = write_report(tmp_path / "out", runs, pretrain_dirs, {}, longer_probes, "cmd").read_text()
    assert "recipes, 2 steps (the frozen arm 5) of batch 4," in readme
    for name in ("mae_reconstructions.png", "distill_reconstructions.png", "pretrain_loss.png", "curves.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in readme


def test_report_without_the_distillation_arm_has_no_distill_rows_or_columns(tmp_path):
    """``--inits mae random``: the MAE-vs-random table of before."""
    runs, pretrain_dirs = synthetic_study(tmp_path / "runs", ("mae", "random"))
    readme = write_report(tmp_path / "out", runs, pretrain_dirs, {}, SMOKE, "cmd").read_text()
    rows = summary(readme)
    assert {i for _, _, i in rows} == {"mae", "random"} and "ahead of mae" not in readme
    assert rows[("full", "seg", "mae")]["in std"] == "+5.5"
    assert "| mae | MAE | `experiment=pretrain_demo` | 3 | 0.5500 |" in readme.splitlines()
    assert "distill" not in readme.split("## Reproduce")[0]
    assert not (tmp_path / "out" / "distill_reconstructions.png").exists()


def test_report_of_a_partial_study_lists_missing_runs(tmp_path):
    runs = [StudyRun("seg", "full", i, 0, tmp_path / "seg" / f"full_{i}_s0") for i in INITS]
    pretrain_dirs = {
        "mae": tmp_path / "pretrain" / "mae",
        "distill": tmp_path / "pretrain_distill" / "distill",
    }
    readme = write_report(tmp_path / "out", runs, pretrain_dirs, {}, SMOKE, "cmd")
    text = readme.read_text()
    assert "| full | seg | mae | 0 | val/mIoU | missing |" in text
    assert "| full | seg | distill | 0 | val/mIoU | missing |" in text
    assert "| distill | MAE + self-distillation | `experiment=pretrain_distill_demo` | 3 | missing |" in text
    assert summary(text) == {}


def test_default_and_quick_use_the_demo_recipe_and_study_heads_pin_the_16_pixel_heads(tmp_path):
    data = {"labelled": tmp_path / "labelled", "pool": tmp_path / "pool"}
    run = StudyRun("seg", "full", "mae", 0, tmp_path / "seg" / "full_mae_s0")
    for budget in (DEFAULT, QUICK):  # the demo's 8-pixel recipe, its presets' heads
        args = finetune_args(budget, data, run, None)
        assert "model=vit_small_p8" in args and "task.init_from=null" in args
        assert not [o for o in args if o.startswith("task.task_head.")]
        assert f"trainer.max_steps={budget.finetune_steps}" in args
    assert QUICK.finetune_steps < DEFAULT.finetune_steps and set(QUICK.tasks) == {"seg", "pose"}
    # The probes train twice as long as the full fine-tunes.
    frozen = StudyRun("seg", "frozen", "mae", 0, tmp_path / "seg" / "frozen_mae_s0")
    frozen_args = finetune_args(DEFAULT, data, frozen, None)
    assert (
        f"trainer.max_steps={DEFAULT.frozen_steps}" in frozen_args
        and "task.freeze_backbone=true" in frozen_args
    )
    assert DEFAULT.steps("frozen") > DEFAULT.steps("full") == DEFAULT.finetune_steps
    assert QUICK.steps("frozen") == 2 * QUICK.steps("full") == 2 * QUICK.finetune_steps
    patch16 = replace(QUICK, model="vit_small", study_heads=True)  # --model vit_small --heads study
    pinned = finetune_args(patch16, data, run, tmp_path / "last.ckpt")
    assert "model=vit_small" in pinned
    assert all(o in pinned for o in STUDY_HEADS["seg"])
