"""Published Sapiens2 checkpoint layouts: files built with the reference's key names and shapes load key by
key into our modules and give the same outputs; our own checkpoints export to .safetensors."""

import subprocess
import sys
from functools import partial

import pytest
import torch

from sapiens.checkpoints import (
    identify_checkpoint,
    load_backbone_state,
    load_head_state,
    read_checkpoint,
    to_published_layout,
    write_safetensors,
)
from sapiens.checkpoints.sapiens2 import published_backbone_shapes
from sapiens.lit.finetune import FinetuneModule
from sapiens.models.heads import DenseHead
from sapiens.models.heads_sapiens2 import NormalHead, PointmapHead, PoseHeatmapHead
from sapiens.models.sapiens2 import Sapiens2
from sapiens.models.vit import VisionTransformer
from sapiens.tasks.pointmap import PointmapTask
from tests.conftest import ROOT

# Published mhsa 8 / 8 at depth 18: blocks 8 and 9 are grouped, so the layout has both kinds of blocks.
SHAPE = {"embed_dim": 32, "depth": 18, "num_heads": 4}
SIZE = (64, 48)
POINTMAP_HEAD = partial(PointmapHead, upsample_channels=(16, 8, 8, 4), conv_channels=(4, 4, 2))
POINTMAP_HEAD = partial(POINTMAP_HEAD, scale_channels=(16, 8, 8), scale_strides=(2, 1, 1))
# Head key names and shapes transcribed from reference sapiens2.md section 2, at test widths.
HEADS = {
    "pose": (
        partial(PoseHeatmapHead, 32, 308, (16, 12), (8, 8, 4)),
        {"deconv_layers.0.weight": (32, 16, 4, 4), "deconv_layers.3.weight": (16, 12, 4, 4),
         "conv_layers.0.weight": (8, 12, 1, 1), "conv_layers.0.bias": (8,),
         "conv_layers.3.weight": (8, 8, 1, 1), "conv_layers.3.bias": (8,),
         "conv_layers.6.weight": (4, 8, 1, 1), "conv_layers.6.bias": (4,),
         "conv_pose.weight": (308, 4, 1, 1), "conv_pose.bias": (308,)},
    ),
    "seg": (
        partial(DenseHead, 32, 29, (16, 8, 8, 4), (4, 4), dropout=0.0),
        {**{f"deconv_layers.{i}.weight": s for i, s in ((0, (32, 16, 4, 4)), (3, (16, 8, 4, 4)),
                                                          (6, (8, 8, 4, 4)), (9, (8, 4, 4, 4)))},
         "conv_layers.0.weight": (4, 4, 1, 1), "conv_layers.0.bias": (4,),
         "conv_layers.3.weight": (4, 4, 1, 1), "conv_layers.3.bias": (4,),
         "conv_seg.weight": (29, 4, 1, 1), "conv_seg.bias": (29,)},
    ),
    "normal": (partial(NormalHead, 32, 3, (16, 8, 8, 4), (4, 4, 2)), None),
    "pointmap": (partial(POINTMAP_HEAD, 32, 3, SIZE), None),
}  # fmt: skip


def trunk_keys(prefix: str) -> set[str]:
    """input_conv, 4 upsample blocks, 3 conv blocks (reference: the normal / pointmap trunk)."""
    keys = {"input_conv.0.weight", "input_conv.0.bias"}
    keys |= {f"upsample_blocks.{i}.0.{p}" for i in range(4) for p in ("weight", "bias")}
    keys |= {f"conv_layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    return keys | {f"{prefix}.weight", f"{prefix}.bias"}


def model(seed: int) -> Sapiens2:
    torch.manual_seed(seed)
    m = Sapiens2(img_size=SIZE, **SHAPE).eval()
    for block in m.blocks:  # the 1e-4 layer-scale init would make attention weights invisible in the output
        block.attn.gamma.weight.data.uniform_(0.5, 1.5)
    return m


def published_file(tmp_path, task: str | None, fmt: str, seed: int = 0):
    """(path, backbone, head) of a file in the published layout of ``task`` (None: pretraining)."""
    backbone = model(seed)
    torch.manual_seed(seed + 1)
    head = HEADS[task][0]().eval() if task else None
    state = to_published_layout(backbone.state_dict(), "sapiens2")
    if head is not None:
        state = {**{f"backbone.{k}": v for k, v in state.items()}}
        state.update({f"decode_head.{k}": v for k, v in head.state_dict().items()})
    path = tmp_path / f"sapiens2_tiny_{task or 'pretrain'}.{fmt.split('-')[0]}"
    if fmt == "safetensors":
        write_safetensors(state, path)
    else:
        torch.save(
            {"pth-state_dict": {"state_dict": state}, "pth-model": {"model": state}, "bin": state}[fmt], path
        )
    return path, backbone, head


def test_our_layout_renames_to_exactly_the_published_keys():
    state = to_published_layout(model(0).state_dict(), "sapiens2")
    expected = published_backbone_shapes(**SHAPE)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert expected["blocks.8.attn.wk.weight"] == (16, 32) and expected["blocks.7.attn.wk.weight"] == (32, 32)
    big = Sapiens2(img_size=(128, 128), use_tokenizer=True, tokenizer_depth=2, **SHAPE)
    shapes = {k: tuple(v.shape) for k, v in to_published_layout(big.state_dict(), "sapiens2").items()}
    assert shapes == published_backbone_shapes(**SHAPE, tokenizer_depth=2)
    assert "tokenizer.blocks.1.ln2.weight" in shapes and "tokenizer.blocks.0.attn.q_norm.weight" not in shapes


@pytest.mark.parametrize("fmt", ["safetensors", "pth-state_dict", "pth-model", "bin"])
def test_pretraining_file_loads_and_matches(tmp_path, fmt):
    path, source, _ = published_file(tmp_path, None, fmt)
    target = model(seed=7)
    report = load_backbone_state(target, path, strict=True)
    assert report == {"missing": [], "unexpected": []}
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    info = identify_checkpoint(read_checkpoint(path))
    assert (info["family"], info["layout"], info["depth"], info["head"]) == (
        "sapiens2",
        "published",
        18,
        None,
    )


@pytest.mark.parametrize("task", sorted(HEADS))
def test_task_file_loads_and_matches(tmp_path, task):
    path, source, head = published_file(tmp_path, task, "safetensors" if task != "seg" else "pth-state_dict")
    state = read_checkpoint(path)
    head_state = {
        k.removeprefix("decode_head."): tuple(v.shape) for k, v in state.items() if "decode_head" in k
    }
    expected = HEADS[task][1] or trunk_keys(f"conv_{task}")
    if isinstance(expected, dict):
        assert head_state == expected
    else:
        assert expected <= set(head_state)
    target_backbone, target_head = model(seed=5), HEADS[task][0]().eval()
    assert load_backbone_state(target_backbone, path, strict=True) == {"missing": [], "unexpected": []}
    assert load_head_state(target_head, path) == sorted(head_state)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        ours, theirs = target_head(target_backbone(x)), head(source(x))
    pairs = zip(ours, theirs, strict=True) if task == "pointmap" else [(ours, theirs)]
    assert all(torch.equal(a, b) for a, b in pairs)
    info = identify_checkpoint(state)
    assert info["family"] == "sapiens2" and info["head"]["task"] == task


def test_finetune_module_initialises_from_a_published_pointmap_file(tmp_path):
    path, source, head = published_file(tmp_path, "pointmap", "safetensors")
    task = partial(PointmapTask, head=POINTMAP_HEAD)
    module = FinetuneModule(
        {"family": "sapiens2", **SHAPE}, task, image_size=SIZE, init_from=str(path)
    ).eval()
    for block in module.backbone.blocks:
        assert block.attn.gamma.weight.min() >= 0.5  # loaded, not the 1e-4 init
    assert module.init_report["missing"] == [] and len(module.init_report["head"]) == len(head.state_dict())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(module(x).points, head(source(x)).points)


def test_missing_unexpected_wrong_size_and_wrong_family_are_reported_by_name(tmp_path, caplog):
    path, _, _ = published_file(tmp_path, None, "safetensors")
    state = read_checkpoint(path)
    state.pop("blocks.3.attn.gamma.weight")
    state["blocks.3.ffn.gamma2.weight"] = torch.ones(32)
    caplog.set_level("INFO")
    report = load_backbone_state(model(1), state)
    assert report == {"missing": ["blocks.3.attn.gamma.weight"], "unexpected": ["blocks.3.ffn.gamma2.weight"]}
    assert "blocks.3.attn.gamma.weight" in caplog.text
    with pytest.raises(ValueError, match="missing backbone keys"):
        load_backbone_state(model(1), state, strict=True)
    wide = Sapiens2(img_size=SIZE, embed_dim=48, depth=18, num_heads=4)
    with pytest.raises(ValueError, match="wrong model size"):
        load_backbone_state(wide, path)
    vit = VisionTransformer(img_size=SIZE, embed_dim=32, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="holds a 'sapiens2' backbone, but the model is a 'vit' one"):
        load_backbone_state(vit, path)
    with pytest.raises(ValueError, match="holds a 'vit' backbone"):
        load_backbone_state(model(1), vit.state_dict())


def test_head_of_another_task_is_left_untouched_and_named(tmp_path, caplog):
    path, _, _ = published_file(tmp_path, "normal", "safetensors")
    caplog.set_level("INFO")
    seg = HEADS["seg"][0]()
    before = seg.conv_seg.weight.clone()
    assert load_head_state(seg, path) == []
    assert torch.equal(seg.conv_seg.weight, before)
    missing, unexpected = caplog.text.split("missing ")[1].split("; unexpected ")
    assert "'conv_seg.weight'" in missing and "'conv_normal.weight'" in unexpected.split("; other")[0]


def test_export_cli_writes_our_and_the_published_layout(tmp_path):
    """A fine-tuned Lightning checkpoint of ours -> .safetensors (ours and published), which load back."""
    task = partial(PointmapTask, head=POINTMAP_HEAD)
    module = FinetuneModule({"family": "sapiens2", **SHAPE}, task, image_size=SIZE).eval()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 3}, ckpt)
    for layout in ("ours", "published"):
        out = tmp_path / f"{layout}.safetensors"
        cmd = [sys.executable, "-m", "sapiens.checkpoints.export", str(ckpt), str(out), "--layout", layout]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        state = read_checkpoint(out)
        assert "backbone." + ("register_tokens" if layout == "ours" else "storage_tokens") in state
        head_prefix = "task.head." if layout == "ours" else "decode_head."
        assert head_prefix + "conv_pointmap.weight" in state
        fresh = FinetuneModule(
            {"family": "sapiens2", **SHAPE}, task, image_size=SIZE, init_from=str(out)
        ).eval()
        x = torch.randn(1, 3, *SIZE)
        with torch.no_grad():
            assert torch.equal(fresh(x).points, module(x).points)
    cmd = [sys.executable, "-m", "sapiens.checkpoints.export", str(tmp_path / "no.ckpt"), "x.safetensors"]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no.ckpt" in bad.stderr and "Traceback" not in bad.stderr
