"""Inference for the Sapiens2 family: every layout is read without hand-set values (family, size, GQA,
task, label count, input size), predict writes the pointmap's XYZ and Z picture, exports match eager with
the bf16 RoPE and GQA inside, and a pretraining checkpoint is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.synthhumans import render_sample
from sapiens.checkpoints import write_safetensors
from sapiens.data.normalize import IMAGE_MEAN, IMAGE_STD, normalize_images
from sapiens.export import load_torch_export
from sapiens.model_spec import ModelSpecError
from sapiens.predict import Predictor
from sapiens.predict.pipeline import run_predict
from sapiens.task_model import load_task_model
from tests.checkpoint_factory import (
    SAPIENS2_SIZE,
    SAPIENS2_TASKS,
    make_sapiens2_module,
    sapiens2_published_state,
    save_ours,
    save_sapiens2_published,
)

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"pose": 308, "seg": 29, "normal": 3, "pointmap": 3}
LABELS = {"pose": "goliath308", "seg": "sapiens2_parts29"}


@pytest.fixture(scope="module")
def sapiens2_models(tmp_path_factory) -> dict:
    """task -> (module, our .ckpt, published .safetensors)."""
    folder = tmp_path_factory.mktemp("sapiens2_models")
    out = {}
    for i, task in enumerate(SAPIENS2_TASKS):
        module = make_sapiens2_module(task, seed=i)
        ours = save_ours(module, folder / f"{task}.ckpt")
        out[task] = (module, ours, save_sapiens2_published(module, folder / f"{task}.safetensors"))
    return out


def raw_outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@pytest.mark.parametrize("task", SAPIENS2_TASKS)
def test_every_layout_is_read_and_rebuilds_the_same_model(task, sapiens2_models, tmp_path):
    """Ours (metadata), published .safetensors and .pth (tensor shapes): same spec, same outputs."""
    module, ours, published = sapiens2_models[task]
    pth = save_sapiens2_published(module, tmp_path / f"{task}.pth")
    x = torch.randn(2, 3, *SAPIENS2_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = raw_outputs(module.task(module.backbone(x)))
    # Published files carry no input size: Sapiens2's is 1024x768; a tiny model is read at its own.
    for path in (ours, published, pth):
        model = load_task_model(path, overrides={"image_size": list(SAPIENS2_SIZE)})
        spec = model.spec
        assert spec.task == task and spec.model_name == "sapiens2_tiny" and spec.patch_padding == 0
        backbone = spec.backbone
        assert backbone["family"] == "sapiens2" and (backbone["num_heads"], backbone["num_kv_heads"]) == (
            4,
            2,
        )
        assert (backbone["mhsa_early"], backbone["mhsa_late"], backbone["num_register_tokens"]) == (1, 1, 8)
        if task in LABELS:
            assert spec.label_names() and len(spec.label_names()) == OUTPUTS[task]
            assert (spec.head.get("keypoint_set") or spec.head.get("class_list"))["name"] == LABELS[task]
        with torch.no_grad():
            got = raw_outputs(model(x))
        assert got[0].shape[1] == OUTPUTS[task]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if task != "pointmap":  # (its scale branch fixes the grid: next test)
        assert load_task_model(published).spec.image_size == (1024, 768)


def test_published_pointmap_file_needs_its_input_size_and_says_so(sapiens2_models):
    """The scale branch's Linear fixes the grid: the published 1024x768 does not fit a 64x48 model."""
    _, _, published = sapiens2_models["pointmap"]
    with pytest.raises(ModelSpecError, match=r"pointmap scale branch .* pass image_size=\[H,W\]"):
        load_task_model(published)


def test_a_pretraining_file_is_not_a_predict_input(sapiens2_models, tmp_path):
    module, _, _ = sapiens2_models["seg"]
    backbone_only = {k: v for k, v in sapiens2_published_state(module).items() if k.startswith("backbone.")}
    path = write_safetensors(
        {k[len("backbone.") :]: v for k, v in backbone_only.items()}, tmp_path / "p.safetensors"
    )
    with pytest.raises(ModelSpecError, match="holds no task head .* pretraining checkpoint"):
        Predictor(path, device="cpu")


def test_pointmap_predict_writes_metric_xyz_and_a_z_picture(sapiens2_models, tmp_path):
    """seg + pointmap in one pass: XYZ / s at the source size, NaN outside the seg foreground, as float16;
    its Z is the metric depth validation scores (task.metric_depth)."""
    pointmap = sapiens2_models["pointmap"]
    image = render_sample(5, height=128, width=96, max_people=1)["image"]
    seg = make_sapiens2_module("seg", seed=1)
    x = cv2.resize(image, SAPIENS2_SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    x = normalize_images(torch.from_numpy(x[None]).permute(0, 3, 1, 2), IMAGE_MEAN, IMAGE_STD)
    with torch.no_grad():  # background (class 0) on about half the pixels
        logits = seg.task(seg.backbone(x))[0]
        seg.task.head.conv_seg.bias[0] += (logits[1:].max(0).values - logits[0]).median()
    seg = (seg, save_ours(seg, tmp_path / "seg.ckpt"))
    source = tmp_path / "in" / "a.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cfg = {
        "source": str(source),
        "checkpoint": [str(seg[1]), str(pointmap[1])],
        "output_dir": str(tmp_path / "out"),
        "progress": False,
    }
    meta = run_predict(cfg)
    assert meta["images_written"] == 1 and set(meta["models"]) == {"seg", "pointmap"}
    xyz = np.load(tmp_path / "out" / "pointmap" / "a.npy")
    assert xyz.dtype == np.float16 and xyz.shape == (128, 96, 3)
    predictor = Predictor([seg[1], pointmap[1]], device="cpu")
    pred = predictor(image)
    foreground = pred.seg.foreground
    assert 0 < foreground.sum() < foreground.size
    assert np.isnan(xyz[~foreground]).all() and np.isfinite(xyz[foreground]).all()
    np.testing.assert_allclose(
        xyz[foreground], pred.pointmap.points.transpose(1, 2, 0)[foreground], rtol=1e-3, atol=1e-6
    )
    module = pointmap[0]
    x = predictor.runners["pointmap"].normalize(
        torch.from_numpy(
            cv2.resize(image, SAPIENS2_SIZE[::-1], interpolation=cv2.INTER_LINEAR)[None]
        ).permute(0, 3, 1, 2)
    )
    with torch.no_grad():
        depth = module.task.metric_depth(module.task(module.backbone(x)), (128, 96))[0].numpy()
    np.testing.assert_allclose(pred.pointmap.depth, depth, rtol=1e-4, atol=1e-5)
    picture = cv2.imread(str(tmp_path / "out" / "vis" / "a.jpg"))
    assert picture.shape == (128, 3 * 96 + 2 * 4, 3)  # image | seg | pointmap Z
    panel = predictor.render(image, pred)[:, -96:]
    assert not np.array_equal(panel[foreground], image[foreground])  # Z colours over the foreground
    np.testing.assert_array_equal(panel[~foreground], image[~foreground])


@pytest.mark.slow
def test_pointmap_exports_match_eager_with_bf16_rope_and_gqa(sapiens2_models, tmp_path):
    """ONNX and torch.export of a Sapiens2 pointmap model (bf16 RoPE, grouped KV heads, two outputs) equal
    eager at batch 1 and 3; predict runs the ONNX file to the checkpoint's result."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    from sapiens.export import export_onnx, export_torch

    _, ckpt, _ = sapiens2_models["pointmap"]
    model = load_task_model(ckpt)
    onnx_path, pt2_path = export_onnx(model, tmp_path / "p.onnx"), export_torch(model, tmp_path / "p.pt2")
    proto = onnx.load(str(onnx_path))
    assert [o.name for o in proto.graph.output] == ["points", "scale"]
    assert not {"Sin", "Cos"} & {node.op_type for node in proto.graph.node}  # RoPE tables baked as constants
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program, _ = load_torch_export(pt2_path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, *SAPIENS2_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager, from_pt2 = raw_outputs(model(x)), raw_outputs(program(x))
        from_onnx = session.run(None, {"images": x.numpy()})
        for e, o, p in zip(eager, from_onnx, from_pt2, strict=True):
            assert e.abs().max() > 1e-2
            np.testing.assert_allclose(o, e.numpy(), atol=1e-4, rtol=0)
            torch.testing.assert_close(p, e, atol=1e-4, rtol=0)
    image = render_sample(6, height=128, width=96, max_people=1)["image"]
    want = Predictor(ckpt, device="cpu")(image).pointmap.points
    for exported in (onnx_path, pt2_path):
        got = Predictor(exported, device="cpu")(image).pointmap.points
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_export_cli_on_a_published_sapiens2_file(sapiens2_models, tmp_path):
    """``python -m sapiens.export`` on a published .safetensors pose file (spec from its shapes)."""
    _, _, published = sapiens2_models["pose"]
    out = tmp_path / "pose.pt2"
    cmd = [sys.executable, "-m", "sapiens.export", f"checkpoint={published}", "format=torch_export",
           f"output={out}", "image_size=[64,48]"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, spec = load_torch_export(out)
    assert spec.task == "pose" and spec.backbone["family"] == "sapiens2" and spec.image_size == (64, 48)
