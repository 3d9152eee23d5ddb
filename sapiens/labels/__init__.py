"""Label spaces as data: keypoint sets and segmentation class lists stored as YAML files.

Built-in files live next to this module (``coco17``, ``body_foot23``, ``coco_wholebody133``,
``goliath308`` keypoint sets; ``goliath_parts28`` class list). A user adds a label space by passing
the path of their own YAML file with the same keys instead of a built-in name.

Keypoint-set YAML keys: ``name``, ``names`` (index order), ``sigmas`` (one per keypoint),
``colors`` (RGB per keypoint, optional), ``flip_pairs`` (name or index pairs; unlisted keypoints
mirror onto themselves), ``skeleton`` (name or index pairs), ``link_colors`` (RGB per link,
optional), ``groups`` (optional mapping group -> names or indices; ``upper_body``/``lower_body``
drive the half-body augmentation), ``num_keypoints`` (optional cross-check).

Class-list YAML keys: ``name``, ``names`` (class-id order), ``palette`` (RGB per class),
``swap_pairs`` (id or name pairs exchanged by a horizontal flip).

Both loaders also take the same keys as a mapping (``to_dict()`` of a loaded label space), which is
how checkpoints and exported models carry their label space with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "ClassList",
    "KeypointSet",
    "available_label_spaces",
    "load_class_list",
    "load_keypoint_set",
]

LABELS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class KeypointSet:
    """A keypoint label space.

    Attributes:
        name: set name (e.g. ``"coco17"``).
        names: K keypoint names in index order.
        flip_index: int64 (K,); ``flip_index[k]`` is the index of keypoint k's mirror image.
        skeleton: links as (i, j) index pairs.
        sigmas: float32 (K,) OKS sigmas.
        colors: uint8 (K, 3) RGB per keypoint.
        link_colors: uint8 (L, 3) RGB per skeleton link.
        groups: group name -> int64 index array (e.g. ``upper_body``, ``face``).
        source: path of the YAML file it was read from.
    """

    name: str
    names: list[str]
    flip_index: np.ndarray
    skeleton: list[tuple[int, int]]
    sigmas: np.ndarray
    colors: np.ndarray
    link_colors: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def num_keypoints(self) -> int:
        """Number of keypoints K."""
        return len(self.names)

    def index(self, name: str) -> int:
        """Index of the keypoint called ``name`` (ValueError naming the set if unknown)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"keypoint set '{self.name}' has no keypoint named '{name}'") from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML keys of this set as plain Python values; ``load_keypoint_set`` reads it back."""
        return {
            "name": self.name,
            "names": list(self.names),
            "sigmas": [float(s) for s in self.sigmas],
            "colors": self.colors.tolist(),
            "flip_pairs": _pairs_of(self.flip_index),
            "skeleton": [[int(a), int(b)] for a, b in self.skeleton],
            "link_colors": self.link_colors.tolist(),
            "groups": {g: idx.tolist() for g, idx in self.groups.items()},
        }


@dataclass(frozen=True)
class ClassList:
    """A segmentation class list.

    Attributes:
        name: list name (e.g. ``"goliath_parts28"``).
        names: C class names in class-id order.
        palette: uint8 (C, 3) RGB colour per class.
        swap_pairs: (a, b) class-id pairs exchanged by a horizontal flip.
        flip_index: int64 (C,); ``flip_index[c]`` is the class id that c becomes after a flip.
        source: path of the YAML file it was read from.
    """

    name: str
    names: list[str]
    palette: np.ndarray
    swap_pairs: list[tuple[int, int]]
    flip_index: np.ndarray
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes C (background included)."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """The YAML keys of this list as plain Python values; ``load_class_list`` reads it back."""
        return {
            "name": self.name,
            "names": list(self.names),
            "palette": self.palette.tolist(),
            "swap_pairs": [[int(a), int(b)] for a, b in self.swap_pairs],
        }


def _pairs_of(flip_index: np.ndarray) -> list[list[int]]:
    """Mirror permutation -> the (a, b) pairs with a < b it swaps."""
    return [[int(a), int(b)] for a, b in enumerate(flip_index) if a < b]


def available_label_spaces() -> list[str]:
    """Names of the built-in label-space YAML files (without extension)."""
    return sorted(p.stem for p in LABELS_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    """Map a built-in name or a file path to an existing YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise FileNotFoundError(f"label file '{candidate}' does not exist")
        return candidate
    builtin = LABELS_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise FileNotFoundError(
            f"unknown label space '{name_or_path}': expected one of {available_label_spaces()} "
            "or a path to a .yaml file"
        )
    return builtin


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def _require(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ValueError(f"{path}: missing required key '{key}'")
    return data[key]


def _check_names(names: Any, path: Path) -> list[str]:
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: key 'names' must be a non-empty list of strings")
    names = [str(n) for n in names]
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:
        raise ValueError(f"{path}: key 'names' has duplicate entries {dupes}")
    return names


def _to_index(item: Any, names: list[str], path: Path, key: str) -> int:
    """Accept a name or an integer index; return the index."""
    if isinstance(item, bool):
        raise ValueError(f"{path}: key '{key}' has boolean entry {item!r}")
    if isinstance(item, int):
        if not 0 <= item < len(names):
            raise ValueError(f"{path}: key '{key}' index {item} out of range 0..{len(names) - 1}")
        return item
    if isinstance(item, str) and item in names:
        return names.index(item)
    raise ValueError(f"{path}: key '{key}' refers to unknown entry {item!r}")


def _pairs(raw: Any, names: list[str], path: Path, key: str) -> list[tuple[int, int]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: key '{key}' must be a list of pairs")
    pairs = []
    for item in raw:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{path}: key '{key}' entry {item!r} is not a pair")
        pairs.append((_to_index(item[0], names, path, key), _to_index(item[1], names, path, key)))
    return pairs


def _flip_index(pairs: list[tuple[int, int]], n: int, path: Path, key: str) -> np.ndarray:
    """Build the mirror permutation; each index may appear in at most one pair."""
    flip = np.arange(n, dtype=np.int64)
    used: set[int] = set()
    for a, b in pairs:
        if a == b:
            raise ValueError(f"{path}: key '{key}' pairs entry {a} with itself")
        for i in (a, b):
            if i in used:
                raise ValueError(
                    f"{path}: key '{key}' lists entry {i} in more than one pair "
                    "(flip pairs must be symmetric and one-to-one)"
                )
            used.add(i)
        flip[a], flip[b] = b, a
    return flip


def _colors(raw: Any, count: int, path: Path, key: str) -> np.ndarray:
    """RGB colours (count, 3) uint8; missing key -> a neutral grey for every entry."""
    if raw is None:
        return np.full((count, 3), 128, dtype=np.uint8)
    if count == 0 and len(raw) == 0:  # no skeleton, no link colours
        return np.zeros((0, 3), np.uint8)
    arr = np.asarray(raw)
    if arr.shape != (count, 3) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: key '{key}' must be {count} RGB triples, got shape {np.shape(raw)}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{path}: key '{key}' values must lie in 0..255")
    return arr.astype(np.uint8)


def _source(name_or_path: str | Path | Mapping) -> tuple[Path, dict[str, Any]]:
    """(path used in error messages, YAML data) of a built-in name, a file or a mapping."""
    if isinstance(name_or_path, Mapping):
        data = dict(name_or_path)
        return Path(f"<embedded label space {data.get('name', '?')}>"), data
    path = _resolve(name_or_path)
    return path, _read_yaml(path)


def load_keypoint_set(name_or_path: str | Path | Mapping) -> KeypointSet:
    """Load and validate a keypoint set.

    Args:
        name_or_path: built-in name (``coco17``, ``body_foot23``, ``coco_wholebody133``,
            ``goliath308``), the path of a YAML file with the same keys, or those keys as a mapping
            (e.g. ``KeypointSet.to_dict()`` stored in a checkpoint).

    Returns:
        KeypointSet with ``flip_index`` (K,) int64 and ``sigmas`` (K,) float32.

    Raises:
        FileNotFoundError: unknown name / missing file.
        ValueError: invalid content, naming the file and the key at fault.
    """
    path, data = _source(name_or_path)
    names = _check_names(_require(data, "names", path), path)
    k = len(names)
    if "num_keypoints" in data and int(data["num_keypoints"]) != k:
        raise ValueError(
            f"{path}: key 'num_keypoints' is {data['num_keypoints']} but 'names' has {k} entries"
        )
    raw_sigmas = _require(data, "sigmas", path)
    try:
        sigmas = np.asarray(raw_sigmas, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: key 'sigmas' must be a list of numbers") from None
    if sigmas.shape != (k,):
        raise ValueError(f"{path}: key 'sigmas' has {sigmas.size} entries, expected {k} (names)")
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise ValueError(f"{path}: key 'sigmas' must be positive finite numbers")
    flip_pairs = _pairs(data.get("flip_pairs"), names, path, "flip_pairs")
    skeleton = _pairs(data.get("skeleton"), names, path, "skeleton")
    groups_raw = data.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise ValueError(f"{path}: key 'groups' must map group names to lists")
    groups = {
        str(g): np.asarray([_to_index(i, names, path, f"groups.{g}") for i in members], dtype=np.int64)
        for g, members in groups_raw.items()
    }
    return KeypointSet(
        name=str(data.get("name", path.stem)),
        names=names,
        flip_index=_flip_index(flip_pairs, k, path, "flip_pairs"),
        skeleton=skeleton,
        sigmas=sigmas,
        colors=_colors(data.get("colors"), k, path, "colors"),
        link_colors=_colors(data.get("link_colors"), len(skeleton), path, "link_colors"),
        groups=groups,
        source=str(path),
    )


def load_class_list(name_or_path: str | Path | Mapping) -> ClassList:
    """Load and validate a segmentation class list.

    Args:
        name_or_path: built-in name (``goliath_parts28``), the path of a YAML file, or its keys as a
            mapping (``ClassList.to_dict()``).

    Returns:
        ClassList with ``palette`` (C, 3) uint8 and ``flip_index`` (C,) int64.

    Raises:
        FileNotFoundError: unknown name / missing file.
        ValueError: invalid content, naming the file and the key at fault.
    """
    path, data = _source(name_or_path)
    names = _check_names(_require(data, "names", path), path)
    palette = _colors(_require(data, "palette", path), len(names), path, "palette")
    swap_pairs = _pairs(data.get("swap_pairs"), names, path, "swap_pairs")
    return ClassList(
        name=str(data.get("name", path.stem)),
        names=names,
        palette=palette,
        swap_pairs=swap_pairs,
        flip_index=_flip_index(swap_pairs, len(names), path, "swap_pairs"),
        source=str(path),
    )
