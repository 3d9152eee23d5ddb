"""One model predict can call, whatever file it came from: a checkpoint (ours, published, ZeRO-converted),
an ONNX file (onnxruntime) or a ``torch.export`` archive.

A :class:`Runner` holds the model's :class:`~sapiens.model_spec.ModelSpec`, the task object that decodes
its outputs (shared with validation), and maps normalised images (B, 3, H, W) on its device to the raw
head output. Precision and ``torch.compile`` apply to the PyTorch formats.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from sapiens.data.normalize import normalize_images
from sapiens.export import load_torch_export, read_onnx_metadata, spec_from_metadata
from sapiens.model_spec import ModelSpec
from sapiens.models.regional_compile import compile_options, compile_regions
from sapiens.task_model import load_task_model

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu; or an explicit torch device string."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name}: CUDA is not available here (use device=auto or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Runner:
    """A loaded model.

    Attributes:
        spec: what the model is; task: its task object (``predict`` with the flip test, ``decode``,
        ``overlay``); device; kind: ``checkpoint``, ``onnx`` or ``torch_export``; path: the file.
    """

    def __init__(self, spec: ModelSpec, task, net, device: torch.device, kind: str, path: str, dtype=None):
        self.spec, self.task, self.net = spec, task, net
        self.device, self.kind, self.path, self.dtype = device, kind, str(path), dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> normalised float32 on the runner's device."""
        images = images.to(self.device, non_blocking=True)
        return normalize_images(images, self.spec.mean, self.spec.std)

    def __call__(self, images: torch.Tensor):
        """Normalised (B, 3, H, W) -> raw head output (float32 for the decoders): a tensor, or the task's
        ``output_type`` (e.g. the pointmap's points and scale) rebuilt from the tensors of any format."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.net(images)
        if isinstance(out, torch.Tensor):
            return out.float()
        return self.task.output_type(*(t.float() for t in out))

    @staticmethod
    def select(outputs, index: int):
        """Image ``index`` of a raw output (a tensor or a tuple of tensors), keeping the batch axis."""
        if isinstance(outputs, torch.Tensor):
            return outputs[index : index + 1]
        return type(outputs)(*(t[index : index + 1] for t in outputs))


def _onnx_net(path: str, device: torch.device):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(path, providers=providers)
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        outs = [torch.from_numpy(o).to(images.device) for o in session.run(None, {name: array})]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


def load_runner(
    path: str | Path,
    task: str | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    compile: bool | dict = False,
    flip_test: bool = True,
    overrides: dict | None = None,
) -> Runner:
    """Load any model file predict accepts (by suffix: ``.onnx``, ``.pt2``, else a checkpoint).

    Args:
        task: the task expected; a file holding another is a one-line error.
        device: ``auto`` or a torch device. ONNX runs through onnxruntime (CPU, or CUDA when its provider
            is installed); its inputs and outputs move through the CPU.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the PyTorch formats (ONNX stays fp32).
        compile: ``torch.compile`` the model's blocks and head (checkpoints only; the first batches are
            slow): :func:`sapiens.models.regional_compile.compile_regions`; a dict gives
            ``torch.compile`` options.
        flip_test: pose only: average with the mirrored crop (published setting).
        overrides: label space / recipe values for files that do not say (see ``read_model_spec``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision}: expected one of {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else select_device(device)
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".onnx", ".pt2"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if suffix == ".onnx":
            spec, net, kind = spec_from_metadata(read_onnx_metadata(path), path), _onnx_net(path, dev), "onnx"
            if precision != "fp32":
                log.warning(
                    "%s: ONNX runs in fp32 (precision=%s applies to PyTorch formats)", path, precision
                )
            dtype = None
        else:
            module, spec = load_torch_export(path)
            net, kind, dtype = module.to(dev), "torch_export", PRECISIONS[precision]
        if task is not None and spec.task != task:
            raise ValueError(f"{path} holds a {spec.task} model, not a {task} model")
        if compile:
            log.warning("%s: compile=true applies to checkpoints; the exported model runs as exported", path)
        task_module = spec.build_task(int(spec.backbone["embed_dim"]), flip_test=flip_test)
        return Runner(spec, task_module, net, dev, kind, path, dtype)
    model = load_task_model(path, task=task, overrides=overrides, flip_test=flip_test).to(dev)
    options = compile_options(compile)
    if options is not None:  # block by block, in place, as compile=true in training
        log.info("%s: torch.compile, block by block (the first batches compile and are slow)", path)
        compile_regions(model, **options)
    return Runner(model.spec, model.task, model, dev, "checkpoint", path, PRECISIONS[precision])
