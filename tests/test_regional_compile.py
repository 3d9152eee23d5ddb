"""Regional compilation: which regions, unchanged checkpoint keys, same numbers, config errors.

These use torch.compile's ``eager`` backend (dynamo tracing, no code generation) so that they take
seconds; tests/test_compile_e2e.py trains through train.py with the default inductor backend.
"""

from functools import partial

import pytest
import torch

from sapiens.lit.finetune import FinetuneModule
from sapiens.lit.pretrain import MAEPretrainModule
from sapiens.models.regional_compile import compile_options, compile_regions, find_regions, is_compiled
from sapiens.models.vit import VisionTransformer
from sapiens.tasks.pose import PoseTask
from sapiens.tasks.segmentation import SegmentationTask
from tests.test_configs import compose_cfg

BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16}
SIZE = (64, 48)


def _mae() -> MAEPretrainModule:
    return MAEPretrainModule(BACKBONE, image_size=SIZE, decoder={"dim": 32, "depth": 1, "heads": 4})


def _pose() -> FinetuneModule:
    head = partial(PoseTask, keypoint_set="coco17", deconv_channels=(16, 16), conv_channels=(16,))
    return FinetuneModule(BACKBONE, head, image_size=SIZE, patch_padding=2)


def test_regions_are_blocks_decoder_blocks_and_heads():
    assert find_regions(_mae()) == [
        "model.encoder.blocks.0",
        "model.encoder.blocks.1",
        "model.decoder.decoder_blocks.0",
    ]
    assert find_regions(_pose()) == ["backbone.blocks.0", "backbone.blocks.1", "task.head"]
    seg = FinetuneModule(BACKBONE, partial(SegmentationTask, deconv_channels=(8,), conv_channels=(8,)), SIZE)
    assert find_regions(seg)[-1] == "task.head"
    # a bare backbone (what a predict tool holds) works the same
    assert find_regions(VisionTransformer(SIZE, embed_dim=32, depth=3, num_heads=2)) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]


@pytest.mark.parametrize(("checkpointing", "dtype"), [(False, None), (True, None), (False, torch.bfloat16)])
def test_compiled_model_keeps_its_keys_and_numbers(checkpointing, dtype):
    """Same loss and gradients as eager, with activation checkpointing and under bf16 autocast."""
    torch.manual_seed(0)
    eager = _mae()
    eager.backbone.set_grad_checkpointing(checkpointing)
    compiled = _mae()
    compiled.load_state_dict(eager.state_dict())
    compiled.backbone.set_grad_checkpointing(checkpointing)
    regions = compile_regions(compiled, backend="aot_eager" if dtype else "eager")
    assert len(regions) == 3 and is_compiled(compiled) and not is_compiled(eager)
    # checkpoints: the same keys, loadable both ways, no `_orig_mod.` prefix
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    eager.load_state_dict(compiled.state_dict(), strict=True)
    images = torch.randn(2, 3, *SIZE)
    losses = []
    for module in (eager, compiled):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = module.model(images, generator=torch.Generator().manual_seed(1))
        loss.backward()
        losses.append(loss.detach())
    tol = 1e-6 if dtype is None else 2e-2  # bf16: rounding may differ between eager and traced ops
    assert torch.allclose(losses[0], losses[1], atol=tol)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5 if dtype is None else 5e-2), name
    assert compile_regions(compiled, backend="eager") == regions  # a second call changes nothing


def test_compile_option_values():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options("max-autotune") == {"mode": "max-autotune"}
    assert compile_options({"backend": "aot_eager", "dynamic": False}) == {
        "backend": "aot_eager",
        "dynamic": False,
    }
    with pytest.raises(ValueError, match="unknown torch.compile option"):
        compile_options({"modee": "x"})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compile=3", "config key 'compile': expected true, false, a mode string or a mapping"),
        ("+compile.fullgrap=true", "config key 'compile': unknown torch.compile option"),
        ("float32_matmul_precision=fast", "config key 'float32_matmul_precision': expected highest"),
    ],
)
def test_bad_compile_config_is_one_clear_line(override, message):
    from sapiens.config import ConfigError, validate_config

    overrides = [override] if not override.startswith("+") else ["compile={mode: default}", override]
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


def test_predict_runner_compiles_blocks_and_head_in_place(tmp_path):
    """predict's ``compile=true`` is the same regional compilation, with the same outputs."""
    from sapiens.predict.runners import load_runner
    from tests.checkpoint_factory import make_module, save_ours

    ckpt = save_ours(make_module("pose"), tmp_path / "pose.ckpt")
    eager = load_runner(ckpt, device="cpu")
    compiled = load_runner(ckpt, device="cpu", compile={"backend": "eager"})
    assert is_compiled(compiled.net) and not is_compiled(eager.net)
    assert find_regions(compiled.net) == ["backbone.blocks.0", "backbone.blocks.1", "task.head"]
    images = torch.randn(2, 3, *SIZE)
    torch.testing.assert_close(compiled(images), eager(images))
