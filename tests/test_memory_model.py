"""The analytic memory model: parameter counts, ZeRO sharding arithmetic, activation estimate.

Counts are checked against the published backbone sizes and against the real backbone built on the
meta device; the activation formula against the tensors autograd actually saves for a tiny ViT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sapiens.memory_model import (
    PUBLISHED_BACKBONE_PARAMS,
    SAPIENS_SIZES,
    VitShape,
    activation_breakdown,
    activation_bytes_per_sample,
    count_parameters,
    count_parameters_of_model,
    main,
    zero_state_memory,
)
from sapiens.models.attention import fused_attention

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(SAPIENS_SIZES))
def test_counts_match_published_backbones(name):
    count = count_parameters(SAPIENS_SIZES[name], 1024, 1024, cls_token=True)
    published = PUBLISHED_BACKBONE_PARAMS[name]
    assert abs(count - published) / published < 0.005, (name, count, published)


@pytest.mark.parametrize(
    ("shape", "hw", "cls"),
    [
        (SAPIENS_SIZES["sapiens_0.3b"], (1024, 1024), True),
        (SAPIENS_SIZES["sapiens_2b"], (1024, 768), False),
        (VitShape("odd", 96, 3, 3, patch_size=8, mlp_ratio=2.5), (64, 40), False),
    ],
)
def test_formula_equals_built_model(shape, hw, cls):
    built = count_parameters_of_model(shape, *hw, cls_token=cls)
    if built is None:
        pytest.skip("sapiens.models.vit is not importable; nothing to compare against")
    assert built == count_parameters(shape, *hw, cls_token=cls)


def test_sizes_agree_with_model_configs():
    for name, shape in SAPIENS_SIZES.items():
        path = REPO / "conf" / "model" / f"{name}.yaml"
        if not path.is_file():
            pytest.skip(f"{path} not written yet")
        backbone = yaml.safe_load(path.read_text())["backbone"]
        assert backbone["embed_dim"] == shape.embed_dim, path
        assert backbone["depth"] == shape.depth, path
        assert backbone["num_heads"] == shape.num_heads, path
        assert backbone.get("patch_size", 16) == shape.patch_size, path


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
def test_zero_stages_shard_monotonically(gpus):
    params = count_parameters(SAPIENS_SIZES["sapiens_1b"], 1024, 768, cls_token=False)
    totals = [zero_state_memory(params, stage, gpus).total for stage in range(4)]
    assert totals[3] <= totals[2] <= totals[1] <= totals[0]
    # bf16 params + bf16 grads + fp32 master and two moments: 16 bytes per parameter unsharded.
    assert totals[0] == pytest.approx(16 * params)
    # Stage 3 shards everything: the GPUs together hold exactly one unsharded copy.
    assert totals[3] * gpus == pytest.approx(totals[0])
    if gpus == 1:
        assert len(set(totals)) == 1
    else:
        assert totals[3] < totals[2] < totals[1] < totals[0]


def test_zero_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stage"):
        zero_state_memory(10, 4, 8)
    with pytest.raises(ValueError, match="num_gpus"):
        zero_state_memory(10, 2, 0)


@pytest.mark.parametrize("name", list(SAPIENS_SIZES))
def test_checkpointing_reduces_activations(name):
    shape = SAPIENS_SIZES[name]
    full = activation_bytes_per_sample(shape, 1024, 768, checkpointing=False)
    ckpt = activation_bytes_per_sample(shape, 1024, 768, checkpointing=True)
    assert ckpt < full / 4  # only block inputs + one block: roughly 1/16 + 1/L of the total
    # Activations grow linearly with the number of tokens (no T x T attention matrix stored).
    bigger = activation_bytes_per_sample(shape, 2048, 768, checkpointing=False)
    assert bigger == pytest.approx(2 * full, rel=0.01)


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in ``model(x)``, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


@pytest.fixture
def fused_kernel():
    """The memory model counts the fused attention kernels that GPU training uses (no (N, N) scores kept);
    on CPU in bf16 short sequences are written out instead (``sapiens.models.attention``)."""
    with fused_attention():
        yield


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_autograd(checkpointing, fused_kernel):
    vit = pytest.importorskip("sapiens.models.vit", reason="backbone module not available")
    shape = VitShape("tiny", 64, 3, 4)
    height, width, batch = 64, 48, 2
    model = vit.VisionTransformer(
        img_size=(height, width),
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        pos_embed="learned",
        cls_token=False,
        grad_checkpointing=checkpointing,
    ).to(torch.bfloat16)
    x = torch.randn(batch, 3, height, width, dtype=torch.bfloat16)
    measured = _saved_activation_bytes(model.train(), x) / batch

    parts = activation_breakdown(shape, height, width)
    if checkpointing:
        # Forward keeps block inputs and the stem; one block's activations come back only while
        # it is recomputed in backward (not visible to the forward hooks).
        expected = parts["block_inputs"] + parts["stem"]
    else:
        expected = activation_bytes_per_sample(shape, height, width, checkpointing=False)
    assert measured == pytest.approx(expected, rel=0.03)


def test_cli_prints_a_table_per_size(capsys):
    main(["--gpus", "4", "--batch", "2", "--sizes", "sapiens_0.3b", "sapiens_2b"])
    out = capsys.readouterr().out
    assert out.count("| ZeRO stage |") == 2
    assert "### sapiens_0.3b" in out and "### sapiens_2b" in out and "sapiens_1b" not in out
    assert "4 GPU(s)" in out and "batch 2" in out
    with pytest.raises(SystemExit):
        main(["--sizes", "sapiens_9b"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sapiens2_activation_formula_matches_autograd(checkpointing, fused_kernel):
    """Sapiens2 (grouped blocks in the middle, RoPE, 9 prefix tokens): formula == autograd's saved bytes."""
    from sapiens.models.sapiens2 import Sapiens2

    shape = VitShape("tiny2", 64, 18, 4, family="sapiens2", num_kv_heads=2)  # blocks 8, 9 grouped
    height, width, batch = 64, 48, 2
    model = Sapiens2(img_size=(height, width), embed_dim=64, depth=18, num_heads=4, num_kv_heads=2,
                     grad_checkpointing=checkpointing)  # fmt: skip
    model = model.to(torch.bfloat16).train()
    measured = (
        _saved_activation_bytes(model, torch.randn(batch, 3, height, width, dtype=torch.bfloat16)) / batch
    )
    parts = activation_breakdown(shape, height, width)
    rope_tables = 2 * 12 * 16 * 2 / batch  # sin / cos (12 patches x head width 16, bf16), shared by the batch
    if checkpointing:
        expected = parts["block_inputs"] + parts["stem"]
    else:
        expected = activation_bytes_per_sample(shape, height, width, checkpointing=False) + rope_tables
    assert measured == pytest.approx(expected, rel=1e-6)
    assert count_parameters(shape, height, width, cls_token=False) == sum(
        p.numel() for p in model.parameters()
    )


def test_distill_memory_counts_the_heads_and_a_replicated_fp32_teacher():
    from sapiens.distill_memory import distill_memory, prototype_head_params
    from sapiens.models.distill_heads import DistillHeads, PrototypeHead

    head = PrototypeHead(96, prototypes=300, hidden_dim=40, bottleneck_dim=12, layers=3)
    assert prototype_head_params(96, 300, 40, 12, 3) == sum(p.numel() for p in head.parameters())
    one_layer = PrototypeHead(96, prototypes=30, bottleneck_dim=12, layers=1)
    assert prototype_head_params(96, 30, 40, 12, 1) == sum(p.numel() for p in one_layer.parameters())
    for shared in (True, False):
        heads = DistillHeads(96, 48, 300, 300, 40, 12, 3, shared=shared)
        trainable = sum(p.numel() for p in heads.parameters())
        mem = distill_memory(10_000, 96, 0, 1, 48, 300, 40, 12, 3, shared_head=shared)
        assert mem.head_states == 16 * trainable  # bf16 params + grads + fp32 AdamW states, unsharded
        teacher_heads = sum(p.numel() for m in {heads.cls_head, heads.patch_head} for p in m.parameters())
        assert mem.teacher == 4 * (10_000 + teacher_heads)
    # ZeRO shards the student heads, never the teacher
    stage3 = distill_memory(10_000, 96, 3, 8, 48, 300, 40, 12, 3)
    assert stage3.teacher == distill_memory(10_000, 96, 0, 1, 48, 300, 40, 12, 3).teacher
    assert stage3.head_states < distill_memory(10_000, 96, 0, 8, 48, 300, 40, 12, 3).head_states


def test_distill_report_cli(capsys):
    main(["--objective", "distill", "--gpus", "8", "--sizes", "sapiens_0.3b"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| sapiens_0.3b")]
    assert len(rows) == 4
    teacher_gib = float(rows[0].split("|")[5])
    assert teacher_gib == pytest.approx(4 * 0.33e9 / 1024**3, rel=0.05)  # backbone + DINOv2 head, fp32
