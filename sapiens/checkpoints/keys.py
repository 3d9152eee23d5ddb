"""Key renaming between published checkpoint layouts and ours: rules from ``(published, ours)`` pieces."""

from __future__ import annotations

import re

import torch

Rules = list[tuple[str, str]]


def _rule(src: str, dst: str) -> tuple[str, str]:
    """A ``(pattern, replacement)`` regex pair mapping key prefix ``src`` to ``dst`` ("{i}": block index)."""
    return "^" + re.escape(src).replace(r"\{i\}", r"(\d+)"), dst.replace("{i}", r"\1")


def rename_rules(pieces: list[tuple[str, str]]) -> tuple[Rules, Rules]:
    """(published -> ours, ours -> published) rules of a family's key pieces."""
    return [_rule(p, o) for p, o in pieces], [_rule(o, p) for p, o in pieces]


def rename_keys(state: dict[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(pattern, replacement)`` rule to each key; others are unchanged."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The sub-dict under the first of ``prefixes`` that any key starts with (prefix removed); ``state``
    when none does."""
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def num_blocks(state: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    """1 + the largest block index among keys ``<prefix><i>.*`` (0 when there is none)."""
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(found) + 1 if found else 0
