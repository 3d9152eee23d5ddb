"""DeepSpeed ZeRO-2 / ZeRO-3 (a real engine on CPU, gloo) with the pieces this project adds around it:

- regionally compiled blocks train under ZeRO (ZeRO-3 gathers parameters in hooks that torch.compile
  runs eagerly) and the engine saves the eager model's keys;
- the non-finite guard's device-side skip reaches through DeepSpeed's optimizer wrapper: with
  ``found_inf`` set on the fused torch AdamW that ZeRO steps, the weights do not move.

Lightning's DeepSpeedStrategy itself needs CUDA; ``experiments.benchmarks.gpu_checks`` runs ZeRO-2/3
with ``compile=true`` through train.py on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

REPO = Path(__file__).resolve().parents[1]


def _child(out: str, stage: int, port: int) -> None:
    """Child process: one rank, a tiny MAE with compiled regions, three ZeRO steps, then a skipped one."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    import deepspeed
    import deepspeed.ops

    from sapiens.lit.base import SapiensModule
    from sapiens.models.mae import MaskedAutoencoder
    from sapiens.models.regional_compile import compile_regions
    from sapiens.models.vit import VisionTransformer

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35 s JIT build (gloo here)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = MaskedAutoencoder(VisionTransformer((32, 32), embed_dim=32, depth=2, num_heads=2), 16, 1, 2)
    keys = list(model.state_dict())
    regions = compile_regions(model, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    engine, ds_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def weights() -> torch.Tensor:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            return torch.cat([p.detach().float().flatten().clone() for p in engine.module.parameters()])

    start = weights()
    for _ in range(3):
        loss, _, _ = engine(images)
        engine.backward(loss)
        engine.step()
    trained = weights()
    # What SapiensModule.guard_loss does on a non-finite step: found_inf on the torch optimizer that
    # the ZeRO wrapper steps, found the way SapiensModule finds it.
    inner = SapiensModule.unwrap_optimizer(ds_optimizer)
    inner.found_inf = torch.ones(())
    loss, _, _ = engine(images)
    engine.backward(loss)
    engine.step()
    del inner.found_inf
    skipped = weights()
    engine.save_checkpoint(out, tag="t")
    states = next((Path(out) / "t").glob("*model_states.pt"))  # ZeRO-3 prefixes the rank
    saved = torch.load(states, map_location="cpu", weights_only=False)
    result = {
        "regions": regions,
        "keys_equal": list(saved["module"]) == keys,
        "orig_mod": any("_orig_mod" in k for k in saved["module"]),
        "inner_is_fused_adamw": type(inner).__name__ == "AdamW" and bool(inner.defaults.get("fused")),
        "trained_moved": float((trained - start).abs().max()),
        "skip_moved": float((skipped - trained).abs().max()),
        "loss_finite": bool(torch.isfinite(loss)),
    }
    Path(out, "result.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_compiled_regions_and_device_side_skip(tmp_path, stage):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(stage), str(port)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["regions"]) == 3  # two encoder blocks, one decoder block
    assert result["keys_equal"] and not result["orig_mod"]
    assert result["inner_is_fused_adamw"] and result["loss_finite"]
    assert result["trained_moved"] > 1e-4  # ZeRO really trained the compiled model
    assert result["skip_moved"] == 0.0  # and the found_inf step changed nothing


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ZeRO + compile child process (test helper)")
    parser.add_argument("out")
    parser.add_argument("stage", type=int)
    parser.add_argument("port", type=int)
    a = parser.parse_args()
    _child(a.out, a.stage, a.port)
