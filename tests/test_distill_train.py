"""task=pretrain_distill through the real trainers: train.py on SynthHumans (health signals, exact resume,
fine-tuning from the teacher or the student), 2-process DDP against 1 process, and the EMA teacher under a
real DeepSpeed ZeRO-3 engine."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from data.synthhumans import render_sample
from sapiens.lit.finetune import FinetuneModule
from sapiens.model_spec import ModelSpecError
from sapiens.predict import Predictor
from sapiens.tasks.depth import DepthTask
from tests.conftest import ROOT, TINY, TINY_FINETUNE, overridden, run_train

pytestmark = pytest.mark.slow

DISTILL_TINY = overridden(
    [o for o in TINY if not o.startswith("experiment=")],
    "experiment=pretrain_distill_demo",
    "task.heads.prototypes=64",
    "task.heads.hidden_dim=32",
    "task.heads.bottleneck_dim=16",
    "task.train_transform.local_crops=1",
    "task.train_transform.local_size=[32,32]",
    "task.freeze_prototypes_steps=2",
    "data.batch_size=6",
    "trainer.max_steps=10",
    "logger=csv",
    "callbacks.checkpoint.every_n_train_steps=5",
    "callbacks.checkpoint.save_top_k=-1",
    "task.callbacks.reconstruction.every_n_steps=5",
)
HEALTH = (
    "train/loss",
    "train/loss_mae",
    "train/loss_cls",
    "train/loss_patch",
    "train/loss_koleo",
    "distill/cls_entropy",
    "distill/cls_kl_center",
    "distill/patch_entropy",
    "distill/patch_kl_center",
    "distill/momentum",
    "distill/teacher_temp",
    "distill/collapsed",
    "train/lr",
    "val/loss",
)


def column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


@pytest.fixture(scope="module")
def distill_run(synth_root, tmp_path_factory) -> Path:
    """10 steps of the tiny distillation recipe on SynthHumans, checkpoints at steps 5 and 10."""
    out = tmp_path_factory.mktemp("distill_runs")
    run_train([*DISTILL_TINY, f"data.root={synth_root}", f"paths.output_dir={out}", "run_name=straight"])
    return out / "pretrain_distill" / "straight"


def test_tiny_run_logs_health_signals_and_checkpoints_student_teacher_and_schedules(distill_run):
    for key in HEALTH:
        values = column(distill_run, key)
        assert values and all(torch.isfinite(torch.tensor(values))), key
    momentum = column(distill_run, "distill/momentum")
    assert momentum[0] == pytest.approx(0.992) and momentum == sorted(momentum)  # cosine to 1
    assert len(column(distill_run, "train/loss")) == 10
    ckpt = torch.load(distill_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10
    assert any(k.startswith("model.encoder.") for k in ckpt["state_dict"])  # student
    assert any(k.startswith("heads.cls_head.") for k in ckpt["state_dict"])
    assert not any("teacher" in k for k in ckpt["state_dict"])  # the teacher is not a child module
    assert {"backbone.cls_token", "cls_head.prototypes"} <= set(ckpt["teacher"])
    teacher, student = (
        ckpt["teacher"]["backbone.blocks.0.attn.qkv.weight"],
        ckpt["state_dict"]["model.encoder.blocks.0.attn.qkv.weight"],
    )
    assert not torch.equal(teacher, student)  # the EMA lags the student
    assert ckpt["distill"]["schedules"]["step"] == 10 and ckpt["distill"]["schedules"]["momentum"] == 1.0
    assert set(ckpt["distill"]["centers"]) == {"cls_centering.center", "patch_centering.center"}
    assert len(list((distill_run / "reconstructions").glob("step_*.png"))) == 2
    log = (distill_run / "train.rank0.log").read_text()
    assert "self-distillation: 10 steps; EMA momentum 0.992 -> 1" in log


def test_resume_reproduces_student_teacher_centres_and_schedules(distill_run, synth_root, tmp_path):
    resumed = tmp_path / "pretrain_distill" / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(distill_run / "checkpoints" / "step_0000005.ckpt", resumed / "checkpoints" / "last.ckpt")
    run_train([*DISTILL_TINY, f"data.root={synth_root}", f"paths.output_dir={tmp_path}", "run_name=resumed"])
    a = torch.load(distill_run / "checkpoints" / "step_0000010.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "step_0000010.ckpt", map_location="cpu", weights_only=False)
    for section in ("state_dict", "teacher"):
        for key, value in a[section].items():
            torch.testing.assert_close(b[section][key], value, atol=1e-6, rtol=0, msg=f"{section}.{key}")
    for key, value in a["distill"]["centers"].items():
        torch.testing.assert_close(b["distill"]["centers"][key], value, atol=1e-6, rtol=0)
    assert a["distill"]["schedules"] == b["distill"]["schedules"]
    assert min(column(resumed, "step")) >= 5


def test_finetuning_initialises_from_the_teacher_by_default_or_the_student(distill_run):
    ckpt = distill_run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    backbone = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16}
    for weights, expected in (
        ("teacher", state["teacher"]["backbone.blocks.1.mlp.fc1.weight"]),
        ("student", state["state_dict"]["model.encoder.blocks.1.mlp.fc1.weight"]),
    ):
        module = FinetuneModule(
            backbone, partial(DepthTask), image_size=(64, 48), init_from=str(ckpt), init_weights=weights
        )
        assert torch.equal(module.backbone.blocks[1].mlp.fc1.weight, expected), weights
        assert module.init_report["missing"] == []
    with pytest.raises(ValueError, match="task.init_weights"):
        FinetuneModule(backbone, partial(DepthTask), image_size=(64, 48), init_weights="ema")


def test_finetune_through_train_py_starts_from_the_teacher(distill_run, synth_root, tmp_path):
    ckpt = distill_run / "checkpoints" / "last.ckpt"
    proc = run_train(
        overridden(
            ["experiment=seg_demo", *TINY_FINETUNE],
            "trainer.max_steps=1",
            "trainer.limit_val_batches=1",
            "validate_after_fit=false",
            f"data.root={synth_root}",
            f"paths.output_dir={tmp_path}",
            f"task.init_from={ckpt}",
            "run_name=ft",
        )
    )
    out = proc.stdout + proc.stderr
    assert "using its EMA teacher's weights" in out and "loaded 29 backbone tensors" in out
    # The fine-tuned model is a predict input; the distillation checkpoint itself (no task head) is not.
    image = render_sample(0, height=128, width=96, max_people=1)["image"]
    finetuned = tmp_path / "seg" / "ft" / "checkpoints" / "last.ckpt"
    assert Predictor(finetuned, device="cpu")(image).seg is not None
    with pytest.raises(ModelSpecError, match=r"holds no task head \(a pretraining checkpoint\?\)"):
        Predictor(ckpt, device="cpu")


def _run_ranks(script: str, args_per_rank: list[list[str]], timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in args_per_rank
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


def test_two_process_ddp_matches_one_process_student_teacher_and_centres(tmp_path):
    """Sapiens2 family here (the other tests use the ViT): masks seeded per sample, centres reduced over
    ranks, gradients averaged -> the same weights as one process with the whole batch."""
    script = "tests/scripts/ddp_equivalence_distill.py"
    _run_ranks(script, [["1", "8", str(tmp_path / "one.pt")]])
    _run_ranks(script, [["2", "4", str(tmp_path / "two.pt")]])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two)
    groups = {k.split(".")[0] for k in one}
    assert groups == {"student", "teacher", "centers"}
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert any("register_tokens" in k for k in one)


def test_ema_teacher_follows_a_zero3_partitioned_student(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _run_ranks("tests/scripts/zero3_ema.py", [[str(tmp_path), str(r), "2", str(port)] for r in range(2)])
    result = torch.load(tmp_path / "result.pt")
    assert result["partitioned"], "ZeRO-3 did not partition the student: the test would prove nothing"
    for key, value in result["reference"].items():
        torch.testing.assert_close(result["teacher"][key], value, atol=1e-6, rtol=0, msg=key)
        assert not torch.equal(result["teacher"][key], result["student"][key])
    # the consolidated fp32 file keeps the teacher entry, and fine-tuning initialisation reads it
    from sapiens.checkpoints import read_checkpoint
    from sapiens.zero_to_fp32 import convert_zero_checkpoint

    converted = convert_zero_checkpoint(tmp_path / "zero", tmp_path / "fp32.ckpt")
    teacher = read_checkpoint(converted)  # weights="teacher" by default
    assert set(teacher) == set(result["teacher"])
    for key, value in result["teacher"].items():
        assert torch.equal(teacher[key].float(), value), key
    student = read_checkpoint(converted, weights="student")
    torch.testing.assert_close(student["0.weight"], result["student"]["backbone.0.weight"])


def test_frozen_probe_reads_teacher_and_student_and_prints_baselines(distill_run, synth_root, tmp_path):
    from experiments.frozen_probe import main

    ckpt = distill_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "probe.md"
    argv = ["--data-root", str(synth_root), "--model", "vit_tiny", "--image-size", "64", "48"]
    results = main(
        [*argv, "--ckpt", f"distill={ckpt}", "--ckpt", "random=none", "--epochs", "1", "--out", str(out)]
    )
    assert set(results) == {(n, t) for n in ("distill", "random") for t in ("seg", "depth")}
    for (_, task), values in results.items():
        assert len(values) == 1 and (0 <= values[0] <= 1 if task == "seg" else values[0] > 0)
    table = out.read_text()
    assert "| distill |" in table and "| random |" in table and "| trivial baseline |" in table
