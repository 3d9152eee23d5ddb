"""Train a tiny DistillPretrainModule for a few steps on a fixed in-memory batch with N CPU processes.

    python tests/scripts/ddp_equivalence_distill.py DEVICES PER_DEVICE_BATCH OUT.pt

The global batch is always the same 8 samples (2 global views and 1 local view each). With 2 devices
an unshuffled distributed sampler gives rank r the samples r, r + 2, ...; the module seeds each sample's
mask by that global index, reduces the teacher centres over ranks, and DDP averages the gradients, so the
student, heads, teacher and centres must match the 1-process run. KoLeo is off: like DINOv2's, it is
computed per rank.
"""

import sys

import lightning as L
import torch
from few_step_trainer import few_step_trainer  # tests/scripts/ is sys.path[0]
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sapiens.lit.pretrain_distill import DistillPretrainModule


class FixedViews(Dataset):
    def __init__(self, n: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.views = [torch.randn(n, 3, 64, 48, generator=gen) for _ in range(2)]
        self.local = torch.randn(n, 3, 32, 32, generator=gen)

    def __len__(self) -> int:
        return self.local.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.views[0][i], "image_global1": self.views[1][i], "image_local0": self.local[i]}


class FixedData(L.LightningDataModule):
    """Rank r reads samples r, r + world, ... in order (Lightning's own sampler would shuffle them)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.data = batch, FixedViews()

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.batch, sampler=sampler)


def main(devices: int, batch: int, out: str) -> None:
    L.seed_everything(0)
    module = DistillPretrainModule(
        {  # a tiny Sapiens2 (registers, RoPE, a grouped-query block): the ViT is covered elsewhere
            "family": "sapiens2",
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "mhsa_early": 0,
            "mhsa_late": 1,
            "patch_size": 16,
            "num_register_tokens": 2,
        },
        image_size=(64, 48),
        mask_ratio=0.5,
        decoder={"dim": 24, "depth": 1, "heads": 4},
        heads={"prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16},
        teacher={"momentum_start": 0.9, "temp_warmup_steps": 2},
        loss_weights={"koleo": 0.0},
        freeze_prototypes_steps=1,
        optimizer={"lr": 1e-3, "weight_decay": 0.05},
        schedule={"kind": "constant"},
        batch_size=batch,
    )
    trainer = few_step_trainer(devices, use_distributed_sampler=False)
    trainer.fit(module, datamodule=FixedData(batch))
    if trainer.is_global_zero:
        state = {f"student.{k}": v.detach().clone() for k, v in module.state_dict().items()}
        state.update({f"teacher.{k}": v.detach().clone() for k, v in module.teacher.state_dict().items()})
        state.update({f"centers.{k}": v.detach().clone() for k, v in module.objective.state_dict().items()})
        torch.save(state, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
