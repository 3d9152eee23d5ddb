"""Train a tiny pose FinetuneModule for a few steps on a fixed in-memory batch with N CPU processes.

    python tests/scripts/ddp_equivalence.py DEVICES PER_DEVICE_BATCH OUT.pt

The global batch is always the same 8 samples: with 2 devices Lightning's DistributedSampler gives each rank
half of them, and DDP averages the gradients, so the weights must match the 1-process run.
"""

import sys
from functools import partial

import lightning as L
import torch
from few_step_trainer import few_step_trainer  # tests/scripts/ is sys.path[0]
from torch.utils.data import DataLoader, Dataset

from sapiens.lit.finetune import FinetuneModule
from sapiens.tasks.pose import PoseTask


class FixedPoseData(Dataset):
    def __init__(self, n: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 64, 48, generator=gen)
        self.heatmaps = torch.rand(n, 17, 16, 12, generator=gen)
        self.weights = (torch.rand(n, 17, generator=gen) > 0.3).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "heatmaps": self.heatmaps[i], "target_weight": self.weights[i]}


def main(devices: int, batch: int, out: str) -> None:
    L.seed_everything(0)
    head = partial(PoseTask, deconv_channels=(16, 16), conv_channels=(16, 16), sigma=1.0)
    module = FinetuneModule(
        {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16},
        head,
        image_size=(64, 48),
        optimizer={"lr": 1e-3, "weight_decay": 0.1, "layer_decay": 0.85},
        schedule={"kind": "constant"},
        batch_size=batch,
        num_pictures=0,
    )
    trainer = few_step_trainer(devices)
    trainer.fit(module, DataLoader(FixedPoseData(), batch_size=batch, shuffle=False))
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
