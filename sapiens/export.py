"""Export a fine-tuned model to ONNX or ``torch.export``, with everything predict needs stored inside.

    python -m sapiens.export checkpoint=FILE format=onnx|torch_export output=PATH [opset=18] [task=...]

The graph maps normalised RGB images ``images`` (B, 3, H, W) float32 to the head's raw output
``outputs`` (pose heatmaps, seg logits, depth, normals; the pointmap has two: canonical ``points`` and
``scale``); the batch is dynamic, H x W is the model's input
size, at which the position table is baked (no interpolation in the graph). Decoding stays outside the
graph (``python -m sapiens.predict checkpoint=PATH`` runs both formats), but its parameters travel
inside the file: ONNX ``metadata_props`` and a ``.pt2`` extra file hold ``sapiens_model`` (the
:class:`~sapiens.model_spec.ModelSpec` as JSON: task, label space, input size, mean / std, ...),
``torch_version`` and ``format``.

ONNX: opset >= 17 (``torch.onnx.export(dynamo=True)``), weights as external data above 2 GiB
(``PATH.data`` beside the file). ``.pt2`` archives only load in the torch release that wrote them,
so the release is stamped and another one is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sapiens.model_spec import ModelSpec, ModelSpecError
from sapiens.models.rope import RopePositionEmbedding, bf16_as_float32
from sapiens.task_model import TaskModel, load_task_model

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}
META_FILE = "sapiens_meta.json"  # the extra file of a .pt2 archive
MIN_OPSET = 17
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit for one ONNX file
INPUT_NAME, OUTPUT_NAME = "images", "outputs"


class ExportError(ValueError):
    """An exported file that cannot be written or read (one line, naming the file)."""


def metadata(model: TaskModel, fmt: str) -> dict[str, str]:
    """String metadata stored in an exported file."""
    return {
        "sapiens_model": json.dumps(model.spec.to_dict()),
        "torch_version": torch.__version__,
        "format": fmt,
        "input": f"{INPUT_NAME}: (batch, 3, {model.spec.image_size[0]}, {model.spec.image_size[1]}) float32, "
        "RGB normalised with mean / std of sapiens_model",
        "output": f"{', '.join(output_names(model))}: raw {model.spec.task} head output",
    }


def output_names(model: TaskModel) -> list[str]:
    """Graph output names: ``outputs``, or the fields of a task's multi-tensor output (pointmap: ``points``,
    ``scale``)."""
    fields = getattr(model.task.output_type, "_fields", None)
    return list(fields) if fields else [OUTPUT_NAME]


def _example(model: TaskModel, batch: int = 2) -> tuple[torch.Tensor, dict]:
    # A batch of 2 keeps the exporter from specialising the batch size to 1.
    h, w = model.spec.image_size
    return torch.zeros(batch, 3, h, w), {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}}


def _bf16_rope(model: torch.nn.Module):
    """Sapiens2's published RoPE computes in bf16, which onnxruntime's CPU kernels lack: the graph gets the
    same values from float32 ops rounded to bf16 (:func:`sapiens.models.rope.bf16_as_float32`)."""
    if any(isinstance(m, RopePositionEmbedding) and m.dtype == torch.bfloat16 for m in model.modules()):
        return bf16_as_float32()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_export():
    """The exporters warn about torchvision ops and pytree internals; nothing for users to act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Graph(torch.nn.Module):
    """What is exported: the model under the input name ``images``."""

    def __init__(self, model: TaskModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(images)
        return out if isinstance(out, torch.Tensor) else tuple(out)  # a plain tuple: no pytree class inside


def export_onnx(
    model: TaskModel, path: str | Path, opset: int = 18, external_data: bool | None = None
) -> Path:
    """Write ``model`` as ONNX (dynamic batch, metadata inside); returns the path.

    ``external_data``: weights in ``<path>.data`` beside the graph; None = when they exceed 2 GiB (the
    protobuf limit of one file, 0.6B fp32 and up)."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset={opset}: ONNX export needs opset >= {MIN_OPSET} (attention, LayerNorm)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example, dims = _example(model)
    with _quiet_export(), _bf16_rope(model):
        program = torch.onnx.export(
            _Graph(model).eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=output_names(model),
            dynamic_shapes=dims,
            opset_version=opset,
            verbose=False,
        )
    for key, value in metadata(model, "onnx").items():
        program.model.metadata_props[key] = value
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external_data)
    return path


def export_torch(model: TaskModel, path: str | Path) -> Path:
    """Write ``model`` as a ``torch.export`` archive (dynamic batch, metadata as an extra file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example, dims = _example(model)
    with _quiet_export(), _bf16_rope(model):
        program = torch.export.export(_Graph(model).eval(), (example,), dynamic_shapes=dims)
    torch.export.save(
        program, str(path), extra_files={META_FILE: json.dumps(metadata(model, "torch_export"))}
    )
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ExportError(f"cannot read ONNX file {path}: {err}") from None
    return {p.key: p.value for p in proto.metadata_props}


def spec_from_metadata(meta: dict[str, str], path: str | Path) -> ModelSpec:
    """The model spec stored in an exported file's metadata."""
    if "sapiens_model" not in meta:
        raise ExportError(f"{path} was not exported by sapiens.export (no sapiens_model metadata)")
    return ModelSpec.from_dict(json.loads(meta["sapiens_model"]), source=f"{meta.get('format')} metadata")


def _release(version: str) -> str:
    return version.split("+")[0]


def load_torch_export(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """(callable module, spec) of a ``.pt2`` archive written by :func:`export_torch`.

    Raises:
        ExportError: not such an archive, or written by another torch release.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            stamped = next((n for n in archive.namelist() if n.endswith(f"extra/{META_FILE}")), None)
            meta = json.loads(archive.read(stamped)) if stamped else {}
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise ExportError(f"cannot read {path}: {err}") from None
    written = meta.get("torch_version")
    if written is None:
        raise ExportError(f"{path} was not exported by sapiens.export (no {META_FILE} inside)")
    if _release(written) != _release(torch.__version__):
        raise ExportError(
            f"{path} was exported with torch {written} and this is torch {torch.__version__}: .pt2 archives "
            "only load in the torch release that wrote them; re-export it here (python -m sapiens.export "
            "... format=torch_export) or use format=onnx"
        )
    try:
        with _quiet_export():
            program = torch.export.load(str(path))
    except Exception as err:
        raise ExportError(f"cannot load {path}: {err}") from None
    return program.module(), spec_from_metadata(meta, path)


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    output: str | Path | None = None,
    task: str | None = None,
    opset: int = 18,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Load ``checkpoint`` (any format predict reads) and export it; returns the written path."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
    model = load_task_model(checkpoint, task=task, overrides=overrides)
    output = Path(output) if output else Path(checkpoint).with_suffix(FORMATS[fmt])
    if fmt == "onnx":
        return export_onnx(model, output, opset)
    return export_torch(model, output)


CLI_KEYS = {"checkpoint": None, "format": "onnx", "output": None, "task": None, "opset": 18}
OVERRIDE_KEYS = ("keypoint_set", "class_list", "patch_padding", "image_size", "num_heads")


def main(argv: list[str] | None = None) -> int:
    """``python -m sapiens.export key=value ...`` (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        bad = [a for a in args if "=" not in a]
        if bad:
            raise ExportError(f"expected key=value arguments, got {bad[0]!r}")
        given = OmegaConf.to_container(OmegaConf.from_dotlist(args))
        unknown = sorted(set(given) - set(CLI_KEYS) - set(OVERRIDE_KEYS))
        if unknown:
            raise ExportError(
                f"unknown key {unknown[0]!r}; expected {', '.join([*CLI_KEYS, *OVERRIDE_KEYS])}"
            )
        cfg = {**CLI_KEYS, **given}
        if not cfg["checkpoint"]:
            raise ExportError("checkpoint=FILE is required")
        path = export_checkpoint(
            cfg["checkpoint"],
            cfg["format"],
            cfg["output"],
            cfg["task"],
            int(cfg["opset"]),
            {k: given[k] for k in OVERRIDE_KEYS if k in given},
        )
    except (ExportError, ModelSpecError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
