"""Fine-tuning: each task learns on a fixed batch, published checkpoints load, end-to-end runs."""

import csv
from functools import partial

import numpy as np
import pytest
import torch

from data.synthhumans import render_sample
from sapiens.checkpoints import OURS_TO_PUBLISHED, rename_keys
from sapiens.data.dense_transform import DenseTransform
from sapiens.data.pose_transform import TopDownPoseTransform
from sapiens.lit.finetune import FinetuneModule
from sapiens.models.pos_embed import resize_pos_embed
from sapiens.models.vit import VisionTransformer
from sapiens.tasks.depth import DepthTask
from sapiens.tasks.normal import NormalTask
from sapiens.tasks.pose import PoseTask
from sapiens.tasks.segmentation import SegmentationTask
from tests.conftest import TINY_FINETUNE, run_train

BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 16}
SIZE = (64, 48)


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return out


def synth_samples(n: int = 4) -> list[dict]:
    return [render_sample(seed, height=128, width=96, max_people=1) for seed in range(n)]


def pose_batch() -> dict:
    transform = TopDownPoseTransform("coco17", input_size=SIZE, sigma=1.5, train=False)
    items = []
    for i, s in enumerate(synth_samples(6)):
        persons = [
            {
                "id": j,
                "bbox": np.asarray(p["bbox"], np.float32),
                "area": float(p["area"]),
                "iscrowd": 0,
                "keypoints": np.asarray(p["keypoints"], np.float32),
            }
            for j, p in enumerate(s["persons"])
        ]
        items += transform(
            {
                "image": s["image"],
                "key": str(i),
                "image_id": i + 1,
                "width": 96,
                "height": 128,
                "persons": persons,
            }
        )
    return collate(items)


def dense_batch(task: str) -> dict:
    transform = DenseTransform(task, input_size=SIZE, train=False)
    items = []
    for s in synth_samples():
        sample = {"image": s["image"], "key": "k", "mask": s["mask"] > 0}
        sample.update({"seg": s["seg"]} if task == "seg" else {task: s[task]})
        items.append(transform(sample))
    return collate([{k: v for k, v in it.items() if k != "key"} for it in items])


TASKS = {
    "pose": (
        partial(PoseTask, keypoint_set="coco17", deconv_channels=(32, 32), conv_channels=(32, 32), sigma=1.5),
        pose_batch,
    ),
    "seg": (
        partial(SegmentationTask, deconv_channels=(32,) * 3, conv_channels=(32,) * 3),
        lambda: dense_batch("seg"),
    ),
    "depth": (
        partial(DepthTask, deconv_channels=(16,) * 4, conv_channels=(16, 16)),
        lambda: dense_batch("depth"),
    ),
    "normal": (
        partial(NormalTask, deconv_channels=(32,) * 3, conv_channels=(32,) * 3),
        lambda: dense_batch("normal"),
    ),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_step_lowers_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    task_head, make_batch = TASKS[name]
    module = FinetuneModule(BACKBONE, task_head, image_size=SIZE)
    # The transforms emit uint8 images; the module normalises them after the device transfer.
    batch = module.on_after_batch_transfer(make_batch(), 0)
    assert batch["image"].dtype == torch.float32
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = module.task.loss(module(batch["image"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name", sorted(TASKS))
def test_metrics_update_and_compute(name):
    task_head, make_batch = TASKS[name]
    module = FinetuneModule(BACKBONE, task_head, image_size=SIZE).eval()
    batch = module.on_after_batch_transfer(make_batch(), 0)
    if name == "pose":  # the metric needs the GT of every image
        for i, s in enumerate(synth_samples(6)):
            module.task.metric.add_ground_truth(
                {
                    "image_id": i + 1,
                    "width": 96,
                    "height": 128,
                    "persons": [
                        {"bbox": p["bbox"], "area": p["area"], "keypoints": np.asarray(p["keypoints"])}
                        for p in s["persons"]
                    ],
                }
            )
    with torch.no_grad():
        outputs = module.task.predict(module, batch)
    module.task.update_metrics(outputs, batch)
    metrics = module.task.compute_metrics()
    main = {"pose": "AP", "seg": "mIoU", "depth": "rmse", "normal": "mean_angular_error"}[name]
    assert main in metrics and np.isfinite(metrics[main])
    picture = module.task.render(batch, outputs, 2)
    assert picture.ndim == 3 and picture.dtype == np.uint8


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    task_head, make_batch = TASKS["seg"]
    module = FinetuneModule(BACKBONE, task_head, image_size=SIZE, freeze_backbone=True)
    module.train()  # what Lightning calls after each validation
    assert not module.backbone.training and module.task.head.training
    assert not any(p.requires_grad for p in module.backbone.parameters())
    batch = module.on_after_batch_transfer(make_batch(), 0)
    module.task.loss(module(batch["image"]), batch).backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    assert all(p.grad is not None for p in module.task.head.parameters() if p.requires_grad)


def published_clean_state(model: VisionTransformer) -> dict:
    """A checkpoint laid out like ``sapiens_*_clean.pth`` (reference section 5) for ``model``'s shape."""
    state = rename_keys(model.state_dict(), OURS_TO_PUBLISHED)
    keys = set(state)
    assert {
        "patch_embed.projection.weight",
        "layers.0.ln1.weight",
        "layers.1.ffn.layers.0.0.weight",
        "layers.1.ffn.layers.1.bias",
        "layers.0.attn.qkv.weight",
        "ln1.weight",
        "cls_token",
    } <= keys
    return state


def test_published_pretraining_checkpoint_initialises_the_backbone(tmp_path):
    """Flat published keys, a (1, 1+8*8, C) sin-cos table with cls row -> our fine-tuning backbone."""
    pre = VisionTransformer(img_size=(128, 128), **BACKBONE)  # 8x8 grid like Sapiens' 64x64
    state = published_clean_state(pre)
    assert state["pos_embed"].shape == (1, 65, 64)
    path = tmp_path / "sapiens_tiny_epoch_1_clean.pth"
    torch.save(state, path)
    module = FinetuneModule(BACKBONE, TASKS["seg"][0], image_size=SIZE, init_from=str(path))
    assert module.init_report == {"missing": [], "unexpected": ["cls_token"], "head": []}
    bb = module.backbone
    assert torch.equal(bb.blocks[1].mlp.fc1.weight, state["layers.1.ffn.layers.0.0.weight"])
    assert torch.equal(bb.norm.bias, state["ln1.bias"])
    expected = resize_pos_embed(state["pos_embed"][:, 1:], (4, 3), old_hw=(8, 8))
    assert torch.allclose(bb.pos_embed, expected)


def test_published_finetuned_checkpoint_and_wrong_size(tmp_path):
    src = VisionTransformer(img_size=SIZE, pos_embed="learned", cls_token=False, **BACKBONE)
    state = {f"backbone.{k}": v for k, v in published_clean_state_no_cls(src).items()}
    head = TASKS["depth"][0](in_channels=64, image_size=SIZE).head
    state.update({f"decode_head.{k}": v + 1 for k, v in head.state_dict().items()})  # published head names
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    module = FinetuneModule(BACKBONE, TASKS["depth"][0], image_size=SIZE, init_from=str(path))
    assert module.init_report["missing"] == [] and module.init_report["unexpected"] == []
    assert "conv_seg.weight" in module.init_report["head"]
    assert torch.equal(module.task.head.conv_seg.weight, state["decode_head.conv_seg.weight"])
    with pytest.raises(ValueError, match="wrong model size"):
        FinetuneModule(
            {**BACKBONE, "embed_dim": 128}, TASKS["depth"][0], image_size=SIZE, init_from=str(path)
        )
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        FinetuneModule(BACKBONE, TASKS["depth"][0], image_size=SIZE, init_from=str(tmp_path / "nowhere.pth"))


def published_clean_state_no_cls(model: VisionTransformer) -> dict:
    return rename_keys(model.state_dict(), OURS_TO_PUBLISHED)


def best_value(run_dir, column):
    with open(run_dir / "metrics.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,metric,precision",
    [
        ("pose", "val/AP", "32-true"),
        ("seg", "val/mIoU", "bf16-mixed"),  # what `make demo` uses on CPUs with native bf16
        ("depth", "val/rmse", "32-true"),
        ("normal", "val/mean_angular_error", "bf16-mixed"),
    ],
)
def test_finetune_end_to_end_from_pretraining(task, metric, precision, synth_root, pretrained_ckpt, tmp_path):
    run_train(
        [
            f"experiment={task}_demo",
            f"trainer.precision={precision}",
            *TINY_FINETUNE,
            f"data.root={synth_root}",
            f"paths.output_dir={tmp_path}",
            "run_name=ft",
            f"task.init_from={pretrained_ckpt}",
            # vit_tiny has 16-pixel patches: two stride-2 blocks for stride-4 heatmaps (pose_demo has one)
            *(["task.task_head.deconv_channels=[32,32]"] if task == "pose" else []),
        ]
    )
    run_dir = tmp_path / task / "ft"
    assert len(best_value(run_dir, metric)) >= 2  # validated after each nominal epoch
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    if task == "seg":
        assert "Face_Neck" in (run_dir / "val_report.md").read_text()
    assert sorted(p.name for p in (run_dir / "predictions").glob("*.png"))
    log = (run_dir / "train.rank0.log").read_text()
    assert "loaded 29 backbone tensors" in log
    if task == "pose":
        assert (run_dir / "keypoint_results.json").exists()


@pytest.mark.slow
def test_frozen_backbone_run_trains_the_head_only_and_resumes(synth_root, pretrained_ckpt, tmp_path):
    """task.freeze_backbone=true through train.py: the checkpoint's backbone is the pretrained one
    bit for bit, the optimizer holds the head's parameters only, and the run resumes from it."""
    args = [
        "experiment=seg_demo",
        *TINY_FINETUNE,
        f"data.root={synth_root}",
        f"paths.output_dir={tmp_path}",
        "run_name=frozen",
        f"task.init_from={pretrained_ckpt}",
        "task.freeze_backbone=true",
    ]
    run_train(args)
    run_dir = tmp_path / "seg" / "frozen"
    assert "backbone frozen" in (run_dir / "train.rank0.log").read_text()
    reference = FinetuneModule(BACKBONE, TASKS["seg"][0], image_size=SIZE, init_from=str(pretrained_ckpt))
    pretrained = reference.backbone.state_dict()

    def check(ckpt):
        state = ckpt["state_dict"]
        for name, value in pretrained.items():
            assert torch.equal(state[f"backbone.{name}"], value), name
        head = [k for k in state if k.startswith("task.head.")]
        optimizer_params = [i for g in ckpt["optimizer_states"][0]["param_groups"] for i in g["params"]]
        assert len(optimizer_params) == len(head)
        moments = ckpt["optimizer_states"][0]["state"]
        assert len(moments) == len(head) and all(m["exp_avg"].abs().sum() > 0 for m in moments.values())

    check(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False))
    longer = [a for a in args if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=12"]
    run_train(longer)  # same run directory: resumes from last.ckpt
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 12
    check(resumed)
