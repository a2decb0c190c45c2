"""What a compiled XLA program moves between devices and how much memory it needs, read from the program.

Used by the SPMD tests (tests/spmd/) and by ``benchmarks/scaling.py``: the per-device program XLA compiled
for a sharded ``jax.jit`` is the ground truth of what each device computes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# Collectives that move data of the operands' shape between devices. all-reduce and reduce-scatter
# combine values (gradients, statistics) and are counted apart.
MOVING = ("all-gather", "all-to-all", "collective-permute")
REDUCING = ("all-reduce", "reduce-scatter")

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
# `name = f32[40,6,6,6,8]{...} all-gather(...)`, or a tuple-shaped result; async pairs count at their start.
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>\([^()]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(?P<op>" + "|".join(MOVING + REDUCING) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program: its kind and the arrays it produces."""

    op: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def bytes(self) -> int:
        return sum(_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in self.shapes)

    @property
    def largest(self) -> int:
        """Elements of the largest array it produces."""
        return max((math.prod(dims) for _, dims in self.shapes), default=0)


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives in an optimized HLO module's text (``jax.jit(f).lower(...).compile().as_text()``)."""
    found = []
    for match in _INSTRUCTION.finditer(hlo_text):
        shapes = tuple(
            (dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(match["shape"])
        )
        if match["shape"].startswith("(") and match["op"] in MOVING:
            # An async start's tuple holds the operand, then the result (then, for permutes, scratch
            # scalars): count the result only.
            shapes = shapes[1:2]
        found.append(Collective(match["op"], shapes))
    return found


def moved_bytes(compiled: Any) -> int:
    """Bytes produced by all-gather, all-to-all and collective-permute on each device."""
    return sum(c.bytes for c in collectives(compiled.as_text()) if c.op in MOVING)


def reduced_arrays(compiled: Any) -> list[Collective]:
    """The all-reduces and reduce-scatters of a compiled program."""
    return [c for c in collectives(compiled.as_text()) if c.op in REDUCING]


def temp_bytes(compiled: Any) -> int:
    """Per-device scratch memory XLA allocated for the program (``memory_analysis``)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)
