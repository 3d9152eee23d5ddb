"""ONNX and torch.export: outputs equal eager within 1e-4 at batch 1 and 3, metadata inside, predict runs
both, and a .pt2 from another torch release is refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthhumans import render_sample
from sapiens.export import ExportError, export_onnx, export_torch, load_torch_export, read_onnx_metadata
from sapiens.predict import Predictor
from sapiens.task_model import load_task_model
from tests.checkpoint_factory import SIZE, TASKS, make_module, save_ours, save_published

ROOT = Path(__file__).resolve().parents[1]
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """task -> (checkpoint, model, .onnx, .pt2), exported once for the module."""
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for task in TASKS:
        ckpt = save_published(make_module(task, seed=7), folder / f"{task}.pth")
        model = load_task_model(ckpt)
        out[task] = (
            ckpt,
            model,
            export_onnx(model, folder / f"{task}.onnx"),
            export_torch(model, folder / f"{task}.pt2"),
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_exports_match_eager_at_batch_1_and_3(task, exported):
    _, model, onnx_path, pt2_path = exported[task]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program, spec = load_torch_export(pt2_path)
    assert {**spec.to_dict(), "source": ""} == {**model.spec.to_dict(), "source": ""}
    for batch in (1, 3):
        x = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager = model(x)
            from_pt2 = program(x)
        from_onnx = session.run(None, {"images": x.numpy()})[0]
        assert from_onnx.shape == tuple(eager.shape) and eager.abs().max() > 1e-2
        np.testing.assert_allclose(from_onnx, eager.numpy(), atol=1e-4, rtol=0)
        torch.testing.assert_close(from_pt2, eager, atol=1e-4, rtol=0)


def test_onnx_carries_opset_metadata_and_a_baked_position_table(exported):
    import onnx

    _, model, onnx_path, _ = exported["pose"]
    proto = onnx.load(str(onnx_path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in proto.graph.node}
    assert "Resize" not in ops  # no interpolation of the position table (nor anything else) in the graph
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    meta = read_onnx_metadata(onnx_path)
    spec = json.loads(meta["sapiens_model"])
    assert meta["torch_version"] == torch.__version__ and meta["format"] == "onnx"
    assert spec["task"] == "pose" and spec["head"]["keypoint_set"]["name"] == "coco17"
    assert spec["mean"] == list(model.spec.mean) and spec["image_size"] == list(SIZE)


@pytest.mark.parametrize("task", ["pose", "seg"])
def test_predict_runs_both_exported_formats(task, exported):
    ckpt, _, onnx_path, pt2_path = exported[task]
    image = render_sample(11, height=128, width=96, max_people=1)["image"]
    reference = Predictor(ckpt, device="cpu")(image)[task]
    for path in (onnx_path, pt2_path):
        predictor = Predictor(path, device="cpu")
        assert predictor.runners[task].kind == ("onnx" if path.suffix == ".onnx" else "torch_export")
        result = predictor(image)[task]
        if task == "seg":
            assert (result.labels == reference.labels).mean() > 0.999
        else:
            np.testing.assert_allclose(result.keypoints, reference.keypoints, atol=0.05)
            np.testing.assert_allclose(result.keypoint_scores, reference.keypoint_scores, atol=1e-4)


def test_pt2_from_another_torch_release_is_refused(exported, tmp_path):
    _, _, _, pt2_path = exported["depth"]
    forged = tmp_path / "old.pt2"
    with zipfile.ZipFile(pt2_path) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("extra/sapiens_meta.json"):
                meta = json.loads(data)
                meta["torch_version"] = "2.3.0+cu121"
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    with pytest.raises(ExportError) as err:
        load_torch_export(forged)
    message = str(err.value)
    assert "old.pt2" in message and "2.3.0" in message and "re-export" in message and "\n" not in message
    with pytest.raises(ExportError, match="opset >= 17"):
        export_onnx(exported["depth"][1], tmp_path / "x.onnx", opset=13)


def test_export_cli(tmp_path):
    ckpt = save_ours(make_module("normal"), tmp_path / "normal.ckpt")
    out = tmp_path / "normal.pt2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sapiens.export",
            f"checkpoint={ckpt}",
            "format=torch_export",
            f"output={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_torch_export(out)[1].task == "normal"
    bad = subprocess.run(
        [sys.executable, "-m", "sapiens.export", f"checkpoint={ckpt}", "format=tflite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: format=tflite")


@pytest.mark.slow
def test_onnx_external_data_loads_and_matches(exported, tmp_path):
    """Weights beside the graph (what models over 2 GiB get) still run, with the metadata readable."""
    _, model, _, _ = exported["normal"]
    path = export_onnx(model, tmp_path / "normal.onnx", external_data=True)
    sidecars = [p for p in tmp_path.iterdir() if p != path]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sidecars and path.stat().st_size < weights / 2 <= sum(p.stat().st_size for p in sidecars)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], model(x).numpy(), atol=1e-4)
    assert read_onnx_metadata(path)["format"] == "onnx"
