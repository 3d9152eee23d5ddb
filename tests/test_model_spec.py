"""Everything a model needs is read from its file: ours, published ``.pth`` and ZeRO-converted layouts."""

from __future__ import annotations

import pytest
import torch
import yaml

from sapiens.checkpoints import OURS_TO_PUBLISHED, rename_keys
from sapiens.labels import load_class_list, load_keypoint_set
from sapiens.model_spec import ModelSpecError
from sapiens.models.vit import VisionTransformer
from sapiens.task_model import load_task_model
from tests.checkpoint_factory import (
    BACKBONE,
    PADDING,
    SIZE,
    TASKS,
    make_module,
    published_state,
    save_ours,
    save_published,
    save_zero_converted,
)

SAVERS = {"ours": save_ours, "published": save_published, "zero": save_zero_converted}


@pytest.mark.parametrize("layout", sorted(SAVERS))
@pytest.mark.parametrize("task", TASKS)
def test_model_rebuilt_from_the_file_alone(task, layout, tmp_path):
    module = make_module(task)
    path = SAVERS[layout](module, tmp_path / f"{task}.pth")
    model = load_task_model(path)
    spec = model.spec
    assert spec.task == task and spec.image_size == SIZE and spec.patch_padding == PADDING[task]
    assert (
        spec.backbone["embed_dim"] == 64 and spec.backbone["depth"] == 2 and spec.backbone["num_heads"] == 4
    )
    assert spec.model_name == "vit_tiny"  # width and depth matched to conf/model
    if task == "pose":
        assert spec.keypoint_set.names == load_keypoint_set("coco17").names
    if task == "seg":
        assert spec.class_list.names == load_class_list("goliath_parts28").names
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), module(x))


def test_published_file_of_another_task_is_a_one_line_error(tmp_path):
    path = save_published(make_module("seg"), tmp_path / "sapiens_0.3b_goliath_seg.pth")
    with pytest.raises(ModelSpecError) as err:
        load_task_model(path, task="pose")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "holds a seg model" in message
    with pytest.raises(ModelSpecError, match="unknown|not a task"):
        load_task_model(path, task="keypoints")


def test_pretraining_checkpoint_has_no_head(tmp_path):
    vit = VisionTransformer(img_size=(128, 128), **{k: v for k, v in BACKBONE.items() if k != "family"})
    path = tmp_path / "sapiens_tiny_epoch_1_clean.pth"
    torch.save(rename_keys(vit.state_dict(), OURS_TO_PUBLISHED), path)
    with pytest.raises(ModelSpecError, match="no task head"):
        load_task_model(path)


def test_unreadable_and_missing_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(ValueError) as err:
        load_task_model(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_task_model(tmp_path / "nowhere.pth")


def test_keypoint_count_without_a_built_in_set_needs_a_label_file(tmp_path):
    """A published head with 5 keypoints: no built-in set fits; a user YAML given as override does."""
    module = make_module("pose")
    state = published_state(module)
    state["head.final_layer.weight"] = state["head.final_layer.weight"][:5]
    state["head.final_layer.bias"] = state["head.final_layer.bias"][:5]
    path = tmp_path / "five.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    with pytest.raises(ModelSpecError, match="5 keypoints.*keypoint_set="):
        load_task_model(path)
    coco = load_keypoint_set("coco17").to_dict()
    five = {
        "name": "face5",
        "names": coco["names"][:5],
        "sigmas": coco["sigmas"][:5],
        "flip_pairs": [[1, 2], [3, 4]],
    }
    labels = tmp_path / "face5.yaml"
    labels.write_text(yaml.safe_dump(five))
    model = load_task_model(path, overrides={"keypoint_set": str(labels)})
    assert model.spec.keypoint_set.names == five["names"]
    assert model.task.kset.flip_index.tolist() == [0, 2, 1, 4, 3]
    with pytest.raises(ModelSpecError, match="predicts 5 keypoints but keypoint_set 'coco17' has 17"):
        load_task_model(path, overrides={"keypoint_set": "coco17"})


def test_label_space_travels_inside_our_checkpoints(tmp_path):
    """A run's own keypoint file is embedded: the checkpoint loads after the YAML is gone."""
    coco = load_keypoint_set("coco17").to_dict()
    labels = tmp_path / "my_set.yaml"
    labels.write_text(yaml.safe_dump({**coco, "name": "my_set"}))
    from functools import partial

    from sapiens.lit.finetune import FinetuneModule
    from sapiens.tasks.pose import PoseTask

    head = partial(PoseTask, keypoint_set=str(labels), deconv_channels=(32, 32), conv_channels=(32, 32))
    module = FinetuneModule(BACKBONE, head, image_size=SIZE, patch_padding=2)
    path = save_ours(module, tmp_path / "mine.ckpt")
    labels.unlink()
    model = load_task_model(path)
    assert model.spec.keypoint_set.name == "my_set" and model.spec.head["sigma"] == 6.0
