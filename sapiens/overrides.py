"""Command-line overrides as the shell delivers them, made into what the user meant (shared by the
entry points: ``train.py``, ``python -m sapiens.predict``).

Two shell habits would otherwise go wrong silently:
- a brace pattern passed through quotes, ``data.train_shards='/d/{000000..000127}.tar'``, reaches
  Hydra as ``/d/{000000..000127}.tar``, which Hydra's grammar would read as a dict;
- the same pattern *unquoted* is expanded by bash into one ``data.train_shards=/d/000000.tar``
  argument per shard, and Hydra keeps only the last one: the run would train on 1 shard of 128.
Repeated values of a shard key (``data.*_shards``) are therefore joined into one list; any other key
given twice with different values is an error, since it is impossible to tell which one was meant.
"""

from __future__ import annotations

import re

SHARD_KEY = re.compile(r"^data\.\w*shards$")
BRACE_PATTERN = re.compile(r"\{\d+\.\.\d+\}")


class RepeatedOverrideError(ValueError):
    """A key given several times with different values, which cannot be taken as a list."""


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def merge_repeated_overrides(args: list[str], list_keys: re.Pattern | None = SHARD_KEY) -> list[str]:
    """Overrides with repeated keys resolved: a key matching ``list_keys`` given several times becomes
    one ``key=['v1','v2',...]`` override (in the order given) at the place of its first occurrence;
    identical repeats of any other key collapse into one.

    Raises:
        RepeatedOverrideError: any other key is given several times with different values.
    """
    values: dict[str, list[str]] = {}
    for arg in args:
        if _is_override(arg):
            key, _, value = arg.partition("=")
            values.setdefault(key.lstrip("+"), []).append(value)
    out, done = [], set()
    for arg in args:
        if not _is_override(arg):
            out.append(arg)
            continue
        raw_key, _, _ = arg.partition("=")
        key = raw_key.lstrip("+")
        given = values[key]
        if key in done:
            continue
        done.add(key)
        if len(given) == 1 or len(set(given)) == 1:
            out.append(arg)
        elif list_keys is not None and list_keys.match(key) and not any(v.startswith("[") for v in given):
            out.append(f"{raw_key}=[{','.join(_quoted(v.strip(chr(39) + chr(34))) for v in given)}]")
        else:
            shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
            raise RepeatedOverrideError(
                f"config key '{key}' is given {len(given)} times ({shown}); give it once. An unquoted "
                "{a,b} or {0..9} pattern expanded by the shell? Quote the value."
            )
    return out


def quote_brace_patterns(args: list[str]) -> list[str]:
    """Quote override values holding shard brace patterns (``{000000..009999}``), which Hydra's
    override grammar would otherwise read as a dict: ``data.train_shards=/d/{0..9}.tar`` works."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and BRACE_PATTERN.search(value) and value[:1] not in "'\"[":
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def prepare_overrides(argv: list[str], list_keys: re.Pattern | None = SHARD_KEY) -> list[str]:
    """``sys.argv`` with repeated overrides merged (``list_keys``: the keys that take repeats as a
    list) and brace patterns quoted (argv[0] kept)."""
    return argv[:1] + quote_brace_patterns(merge_repeated_overrides(argv[1:], list_keys))
