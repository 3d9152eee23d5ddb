"""Shard specs -> lists of shard URLs (brace patterns, lists, ``.txt`` files, folders, remote URLs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import braceexpand

__all__ = ["REMOTE_PREFIXES", "expand_shards"]

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")


def _expand_one(spec: str, base: Path | None) -> list[str]:
    spec = spec.strip()
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec)) if not spec.startswith("pipe:") else [spec]
    path = Path(spec.removeprefix("file:")).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        urls = []
        for line in lines:
            if line and not line.startswith("#"):
                urls.extend(_expand_one(line, path.parent))
        return urls
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    return list(braceexpand.braceexpand(str(path)))


def expand_shards(spec: str | Sequence[str], check_local: bool = True) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    Accepted: a brace pattern (``/data/shard-{000000..000099}.tar``); several specs joined by
    ``::`` or given as a list; a ``.txt`` file with one spec per line (``#`` comments; relative
    paths are relative to the file's folder); a folder (all ``*.tar`` in it); ``http(s)://``,
    ``s3://``... URLs (braces expanded) and ``pipe:`` commands, passed through unchecked.

    Raises:
        ValueError: the spec expands to no shard at all.
        FileNotFoundError: local shards are missing (says which pattern, how many, first few).
    """
    specs = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for one in specs:
        if not isinstance(one, (str, os.PathLike)):
            raise ValueError(f"shard spec entries must be strings, got {type(one).__name__}")
        expanded = _expand_one(str(one), None)
        if not expanded:
            raise ValueError(f"shard spec {str(one)!r} matches no shard (empty list file/folder?)")
        if check_local:
            local = [u.removeprefix("file:") for u in expanded if not u.startswith(REMOTE_PREFIXES)]
            missing = [u for u in local if not os.path.isfile(u)]
            if missing:
                raise FileNotFoundError(
                    f"shard spec {str(one)!r}: {len(missing)} of {len(expanded)} shards are "
                    f"missing, e.g. {missing[:3]}"
                )
        urls.extend(expanded)
    if not urls:
        raise ValueError(f"shard spec {spec!r} is empty")
    return urls
