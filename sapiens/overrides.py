"""Command-line overrides shared by the entry points (``train.py``, ``python -m sapiens.predict``)."""

from __future__ import annotations

import re


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """Quote override values holding shard brace patterns (``{000000..009999}``), which Hydra's
    override grammar would otherwise read as a dict: ``data.train_shards=/d/{0..9}.tar`` works."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and re.search(r"\{\d+\.\.\d+\}", value) and value[:1] not in "'\"":
            arg = f"{key}='{value}'"
        out.append(arg)
    return out
