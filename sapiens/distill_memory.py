"""Per-GPU memory of self-distillation pretraining (``task=pretrain_distill``) beyond MAE's, per ZeRO stage.

``python -m sapiens.memory_model --objective distill [--gpus 8] [--sizes ...]`` prints the table. Formulas
(the backbone's own model states are :mod:`sapiens.memory_model`'s):

    student heads   H trainable parameters, sharded like the backbone (16 H bytes at stage 0):
                    prototype head D h + h + (n - 2)(h^2 + h) + h b + b + K b (MLP of n layers, hidden h,
                    bottleneck b, K prototypes; DINOv2: 2048 / 256 / 65536, n = 3) + the patch predictor
                    Dd D + D (+ a second prototype head when the patch head is not shared)
    EMA teacher     4 (P + H_t) bytes: an fp32 copy of the backbone and prototype heads on EVERY GPU,
                    at every ZeRO stage (kept out of DeepSpeed so that bf16 rounding cannot stall the
                    EMA; see sapiens/models/ema_teacher.py)
    activations     the student encoder runs on each of the G global views (masked, as MAE) and on the
                    local views: about G times MAE's activations plus the local crops'; the teacher
                    keeps none (no autograd), only one block's working set while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sapiens.memory_model import FP32_BYTES, SAPIENS_SIZES, _gib, count_parameters, zero_state_memory


def prototype_head_params(
    in_dim: int, prototypes: int = 65536, hidden: int = 2048, bottleneck: int = 256, layers: int = 3
) -> int:
    """Parameters of one DINO-style prototype head (``sapiens.models.distill_heads.PrototypeHead``)."""
    if layers == 1:
        mlp = in_dim * bottleneck + bottleneck
    else:
        mlp = in_dim * hidden + hidden + (layers - 2) * (hidden * hidden + hidden) + hidden * bottleneck
        mlp += bottleneck
    return mlp + prototypes * bottleneck


@dataclass(frozen=True)
class DistillMemory:
    """Bytes per GPU of self-distillation pretraining beyond the backbone's model states."""

    head_states: float  # student heads: params + grads + AdamW states at the given ZeRO stage
    teacher: float  # fp32 EMA copy of backbone + prototype heads, replicated on every GPU


def distill_memory(
    backbone_params: int,
    embed_dim: int,
    stage: int,
    num_gpus: int,
    decoder_dim: int = 512,
    prototypes: int = 65536,
    hidden: int = 2048,
    bottleneck: int = 256,
    layers: int = 3,
    shared_head: bool = True,
) -> DistillMemory:
    """The extra memory of ``task=pretrain_distill`` per GPU (formulas in the module docstring)."""
    head = prototype_head_params(embed_dim, prototypes, hidden, bottleneck, layers)
    teacher_heads = head if shared_head else 2 * head
    student_heads = teacher_heads + decoder_dim * embed_dim + embed_dim
    return DistillMemory(
        head_states=zero_state_memory(student_heads, stage, num_gpus).total,
        teacher=FP32_BYTES * (backbone_params + teacher_heads),
    )


def distill_report(gpus: int = 8, sizes: list[str] | None = None) -> str:
    """Markdown table: model states of MAE vs MAE + self-distillation per ZeRO stage, GiB per GPU."""
    names = sizes or list(SAPIENS_SIZES)
    lines = [
        f"## Self-distillation pretraining: extra memory per GPU (GiB), {gpus} GPU(s), DINOv2 heads "
        "(65536 prototypes, hidden 2048, bottleneck 256, shared), 1024x1024 pretraining layout",
        "",
        "Model states only (activations: about G = 2 times MAE's, see the module docstring); the MAE "
        "decoder is not counted in either column.",
        "",
        "| model | ZeRO stage | MAE backbone states | + student heads | + EMA teacher (fp32) | total "
        "| x MAE |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        shape = SAPIENS_SIZES[name]
        params = count_parameters(shape, 1024, 1024, cls_token=True)
        for stage in range(4):
            base = zero_state_memory(params, stage, gpus).total
            extra = distill_memory(params, shape.embed_dim, stage, gpus)
            total = base + extra.head_states + extra.teacher
            lines.append(
                f"| {name} | {stage} | {_gib(base)} | {_gib(extra.head_states)} | {_gib(extra.teacher)} | "
                f"{_gib(total)} | {total / base:.2f} |"
            )
    return "\n".join(lines) + "\n"
