"""Collectives in an optimized HLO text (`compiled.as_text()`), for the tensor-parallel tests."""

from __future__ import annotations

import re

_OP = re.compile(r"\s(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
                 r"(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """[(op, result shapes)] of every collective instruction (an async op counted once, at its
    -start)."""
    found = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m:
            lhs = line.split("=", 1)[1] if "=" in line else line
            lhs = lhs[:lhs.find(m.group(1))]
            shapes = [tuple(int(d) for d in s.split(",") if d)
                      for s in re.findall(r"\w+\[([\d,]*)\]", lhs)]
            found.append((m.group(1), shapes))
    return found
