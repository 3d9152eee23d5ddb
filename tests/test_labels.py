"""Label spaces load from YAML, are self-consistent, and bad files fail with clear messages."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from sapiens.labels import available_label_spaces, load_class_list, load_keypoint_set

EXPECTED = {
    "coco17": (17, 19),
    "body_foot23": (23, 25),
    "coco_wholebody133": (133, 65),
    "goliath308": (308, 65),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_keypoint_sets_are_consistent(name):
    kset = load_keypoint_set(name)
    k, links = EXPECTED[name]
    assert kset.num_keypoints == k == len(set(kset.names))
    assert kset.sigmas.shape == (k,) and kset.sigmas.dtype == np.float32
    assert np.all(kset.sigmas > 0)
    assert len(kset.skeleton) == links == kset.link_colors.shape[0]
    assert kset.colors.shape == (k, 3)
    # flip_index is an involution that maps left_* names to right_* names
    assert np.array_equal(kset.flip_index[kset.flip_index], np.arange(k))
    for i, j in enumerate(kset.flip_index):
        if kset.names[i].startswith("left_"):
            assert kset.names[j] == "right_" + kset.names[i][len("left_") :]
    for a, b in kset.skeleton:
        assert 0 <= a < k and 0 <= b < k
    assert name in available_label_spaces()


def test_coco17_facts():
    kset = load_keypoint_set("coco17")
    assert kset.names[0] == "nose" and kset.names[16] == "right_ankle"
    assert kset.sigmas[0] == pytest.approx(0.026) and kset.sigmas[15] == pytest.approx(0.089)
    assert kset.flip_index[kset.index("left_eye")] == kset.index("right_eye")
    assert kset.flip_index[0] == 0


def test_body_foot23_is_the_wholebody_prefix():
    wb, bf = load_keypoint_set("coco_wholebody133"), load_keypoint_set("body_foot23")
    assert bf.names == wb.names[:23]
    np.testing.assert_array_equal(bf.sigmas, wb.sigmas[:23])
    assert bf.names[17:] == [
        "left_big_toe",
        "left_small_toe",
        "left_heel",
        "right_big_toe",
        "right_small_toe",
        "right_heel",
    ]
    assert np.array_equal(bf.flip_index, wb.flip_index[:23])


def test_goliath_index_order_and_sigmas():
    g = load_keypoint_set("goliath308")
    assert g.names[41] == "right_wrist" and g.names[62] == "left_wrist" and g.names[69] == "neck"
    assert g.names[9] == "left_hip"
    face = g.groups["face"]
    assert len(face) == 238 and face.min() == 70 and face.max() == 307
    np.testing.assert_allclose(g.sigmas[face], 0.010)
    assert int((g.flip_index != np.arange(308)).sum()) == 292
    assert not any(n.startswith("teeth") for n in g.names)
    assert g.sigmas[g.index("neck")] == pytest.approx(0.079)


def test_goliath_parts28_class_list():
    c = load_class_list("goliath_parts28")
    assert c.num_classes == 28 and c.names[0] == "Background" and c.names[27] == "Tongue"
    assert c.palette.shape == (28, 3) and c.palette.dtype == np.uint8
    assert tuple(c.palette[14]) == (255, 0, 0)
    assert np.array_equal(c.flip_index[c.flip_index], np.arange(28))
    for a, b in c.swap_pairs:
        assert c.names[a].replace("Left", "Right") == c.names[b]
    assert c.flip_index[4] == 13 and c.flip_index[21] == 21


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


GOOD = {
    "name": "tiny3",
    "names": ["head", "left_hand", "right_hand"],
    "sigmas": [0.05, 0.04, 0.04],
    "flip_pairs": [["left_hand", "right_hand"]],
    "skeleton": [[0, 1], ["head", "right_hand"]],
}


def test_user_yaml_by_path(tmp_path):
    kset = load_keypoint_set(_write(tmp_path, GOOD))
    assert kset.name == "tiny3" and list(kset.flip_index) == [0, 2, 1]
    assert kset.skeleton == [(0, 1), (0, 2)]
    assert kset.colors.shape == (3, 3)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"sigmas": [0.05, 0.04]}, "sigmas"),
        ({"names": ["head", "head", "right_hand"]}, "names"),
        ({"flip_pairs": [["left_hand", "right_hand"], ["head", "left_hand"]]}, "flip_pairs"),
        ({"skeleton": [["head", "tail"]]}, "skeleton"),
        ({"colors": [[1, 2, 3]]}, "colors"),
        ({"num_keypoints": 4}, "num_keypoints"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path, change, key):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(ValueError, match=key) as err:
        load_keypoint_set(path)
    assert str(path) in str(err.value)


def test_missing_sigmas_and_unknown_name(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "sigmas"}
    with pytest.raises(ValueError, match="sigmas"):
        load_keypoint_set(_write(tmp_path, data))
    with pytest.raises(FileNotFoundError, match="coco17"):
        load_keypoint_set("no_such_set")
    with pytest.raises(FileNotFoundError):
        load_keypoint_set(tmp_path / "missing.yaml")
