"""One rank of the ZeRO-3 EMA-teacher check: a real DeepSpeed ZeRO-3 engine on CPU (gloo).

    python tests/scripts/zero3_ema.py OUT_DIR RANK WORLD PORT

The student's parameters are partitioned over the ranks; :meth:`EMATeacher.update` must gather them to
update the full fp32 teacher. The reference EMA is computed from the fully gathered student weights. Rank 0
writes ``OUT_DIR/result.pt``: the teacher, the reference, and whether the parameters were partitioned. The
engine also saves a ZeRO checkpoint in ``OUT_DIR/zero`` with the teacher in its client state, as Lightning
does with the ``teacher`` entry of ``DistillPretrainModule.on_save_checkpoint``.
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn

from sapiens.models.ema_teacher import EMATeacher


def main(out: str, rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo does the communication
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    teacher = EMATeacher({"backbone": student})
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4 * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
    }
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=config)
    partitioned = all(p.numel() == 0 and p.ds_numel > 0 for p in engine.module.parameters())
    gen = torch.Generator().manual_seed(rank)
    for step in range(3):
        loss = engine(torch.randn(4, 8, generator=gen)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        momentum = 0.5 + 0.1 * step
        teacher.update({"backbone": engine.module}, momentum)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            full = {
                f"backbone.{k}": v.detach().clone().float() for k, v in engine.module.state_dict().items()
            }
        for key in reference:
            reference[key] = momentum * reference[key] + (1 - momentum) * full[key]
    engine.save_checkpoint(
        str(Path(out) / "zero"), client_state={"teacher": teacher.state_dict()}, tag="checkpoint"
    )
    if rank == 0:
        torch.save(
            {
                "teacher": teacher.state_dict(),
                "reference": reference,
                "partitioned": partitioned,
                "student": full,
            },
            Path(out) / "result.pt",
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
