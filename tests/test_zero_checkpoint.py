"""ZeRO checkpoint -> fp32 file, checked against REAL DeepSpeed checkpoints made on CPU.

The checkpoints are written by a genuine ``deepspeed.initialize`` engine (gloo backend, fp32, ZeRO
stage 2 or 3, 1 or 2 ranks) in child processes (this file run as a script), so the test process
never initialises torch.distributed. Each child also saves the engine's own (gathered) weights
as the reference the converted file must reproduce exactly.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
lightning = pytest.importorskip("lightning")

REPO = Path(__file__).resolve().parents[1]
CHILD_DONE = "zero checkpoint written"  # the last line a child rank prints before it exits


class TinyLit(lightning.LightningModule):
    """A LightningModule shaped like ours: a backbone-ish stack plus a persistent buffer."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.GELU())
        self.head = nn.Linear(width, 4)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)) * self.scale


def _make_checkpoint(out: str, stage: int, rank: int, world: int, port: int, tag: str | None):
    """Child process: train a few ZeRO steps on CPU and save a checkpoint plus reference weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    import deepspeed
    import deepspeed.ops

    # Skip the ~35 s JIT build of DeepSpeed's CPU shared-memory all-reduce kernel: gloo does the
    # communication here and the kernel changes nothing about what is saved.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = TinyLit()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4 * world,
        # torch_adam: the plain torch AdamW (DeepSpeed's fused Adam needs CUDA).
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = engine(torch.randn(4, 8, generator=gen)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    # What Lightning's DeepSpeedStrategy passes as client state (minus state_dict/optimizer).
    client = {
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": lightning.__version__,
        "hyper_parameters": dict(model.hparams),
    }
    engine.save_checkpoint(out, client_state=client, tag=tag)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        trained = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        torch.save({"trained": trained, "initial": initial}, Path(out) / "reference.pt")
    torch.distributed.barrier()
    print(CHILD_DONE, flush=True)
    # Leave without the interpreter's teardown. In one CI run a rank aborted with "terminate called
    # without an active exception", the message of a C++ thread (gloo's or DeepSpeed's) still
    # joinable when static objects are destroyed at exit. The barrier above already guarantees
    # both ranks finished saving; CHILD_DONE lets the test tell an early abort from a late one.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_zero_checkpoint(out: Path, stage: int, world: int = 1, tag: str | None = None) -> dict:
    """Run ``world`` child ranks that write a ZeRO checkpoint into ``out``; return the reference."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, str(out), str(stage), str(world), str(port)]
    cmd += ["--tag", tag] if tag else []
    procs = [
        subprocess.Popen(
            [*cmd, "--rank", str(r)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed to write the ZeRO checkpoint:\n{log[-4000:]}"
        assert CHILD_DONE in log, f"rank {r} exited before the end:\n{log[-4000:]}"
    return torch.load(out / "reference.pt")


def _assert_matches(converted: dict, reference: dict) -> None:
    state = converted["state_dict"]
    trained = reference["trained"]
    assert set(state) == set(trained)
    for key, value in trained.items():
        assert state[key].dtype == torch.float32, key
        assert state[key].shape == value.shape, key
        assert torch.equal(state[key], value), f"{key} differs from the engine's fp32 weights"
    # The optimizer really moved the weights: the file is not just the initial model.
    assert not torch.equal(state["head.weight"], reference["initial"]["head.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), [(2, 2), (3, 2)])
def test_converts_sharded_zero_checkpoint(tmp_path, stage, world):
    from sapiens.zero_to_fp32 import convert_zero_checkpoint

    ckpt = tmp_path / "zero"
    reference = make_zero_checkpoint(ckpt, stage, world)
    assert (ckpt / "latest").is_file()
    assert len(list(ckpt.glob("*/*optim_states.pt"))) == world  # one shard per rank

    out = convert_zero_checkpoint(ckpt, tmp_path / "sub" / "fp32.ckpt")
    converted = torch.load(out, weights_only=False)
    _assert_matches(converted, reference)
    assert converted["zero_conversion"]["zero_stage"] == stage
    assert "optimizer" not in converted and "ds_config" not in converted
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


@pytest.mark.slow
def test_lightning_layout_loads_with_load_from_checkpoint(tmp_path):
    """Lightning saves tag 'checkpoint' inside an '*.ckpt' directory; the file loads back."""
    from sapiens.zero_to_fp32 import convert_zero_checkpoint, main

    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    reference = make_zero_checkpoint(ckpt, stage=2, world=1, tag="checkpoint")
    assert (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").is_file()

    # The tag directory itself is accepted too, and the CLI writes the same tensors.
    from_tag_dir = convert_zero_checkpoint(ckpt / "checkpoint", tmp_path / "a.ckpt")
    main([str(ckpt), str(tmp_path / "b.ckpt")])
    for path in (from_tag_dir, tmp_path / "b.ckpt"):
        converted = torch.load(path, weights_only=False)
        _assert_matches(converted, reference)
        assert converted["global_step"] == 3
        assert converted["zero_conversion"]["tag"] == "checkpoint"

    restored = TinyLit.load_from_checkpoint(tmp_path / "b.ckpt", map_location="cpu")
    assert restored.hparams.width == 16
    for key, value in reference["trained"].items():
        assert torch.equal(restored.state_dict()[key], value)


def test_rejects_non_checkpoint_directories(tmp_path):
    from sapiens.zero_to_fp32 import convert_zero_checkpoint, resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no 'latest' file"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("global_step7")
    with pytest.raises(FileNotFoundError, match="global_step7"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "global_step7").mkdir()
    with pytest.raises(ValueError, match="model-state file"):
        convert_zero_checkpoint(tmp_path, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, capsys):
    """A model-state file holding an object whose unpickling runs code: refused, code never run."""
    from sapiens.zero_to_fp32 import convert_zero_checkpoint, main
    from tests.faults import RunsCode

    marker = tmp_path / "code_ran"
    tag = tmp_path / "zero" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "zero" / "latest").write_text("global_step1")
    state = {"module": {"w": torch.zeros(2)}, "buffer_names": [], "param_shapes": [], "x": RunsCode(marker)}
    torch.save(state, tag / "mp_rank_00_model_states.pt", pickle_protocol=2)
    with pytest.raises(ValueError, match="could run arbitrary code.*--trust-checkpoint"):
        convert_zero_checkpoint(tmp_path / "zero", tmp_path / "out.pt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "zero"), str(tmp_path / "out.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mp_rank_00_model_states.pt" in err[0] and "weights_only=False" not in err[0]
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--trust-checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(("trainer", "stage"), [("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)])
def test_trainer_configs_build_deepspeed_strategies(trainer, stage):
    """conf/trainer/deepspeed_stage_{2,3}.yaml -> a DeepSpeedStrategy with that ZeRO config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy

    overrides = [f"trainer={trainer}", "trainer.strategy.reduce_bucket_size=5e8"]
    if stage == 3:
        overrides += ["trainer.strategy.offload_optimizer=true"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["reduce_bucket_size"] == 500_000_000
    assert isinstance(zero["allgather_bucket_size"], int)
    assert ("offload_optimizer" in zero) == (stage == 3)
    assert "offload_param" not in zero


def test_deepspeed_strategy_rejects_inconsistent_settings():
    from sapiens.deepspeed_config import build_deepspeed_strategy

    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        build_deepspeed_strategy(stage=0)
    with pytest.raises(ValueError, match="needs stage 3"):
        build_deepspeed_strategy(stage=2, offload_parameters=True)
    strategy = build_deepspeed_strategy(stage=3, offload_parameters=True)
    assert strategy.config["zero_optimization"]["offload_param"]["device"] == "cpu"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a ZeRO checkpoint (test helper)")
    parser.add_argument("out")
    parser.add_argument("stage", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--tag", default=None)
    a = parser.parse_args()
    _make_checkpoint(a.out, a.stage, a.rank, a.world, a.port, a.tag)
