"""Draws ``docs/layers/deformable_positions.png``: where a 3x3 deformable convolution samples, for one output
position, with and without offsets (the formula of :func:`jdynconv.deform_conv`).

Run from the repository root (needs matplotlib, the ``examples`` extra)::

    python docs/deformable_positions.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

OUT = Path(__file__).parent / "layers" / "deformable_positions.png"


def sampling_positions(output: tuple[int, int], offsets: np.ndarray, *, stride=1, pad=1, dilation=1) -> np.ndarray:
    """``(9, 2)`` ``(y, x)`` positions: ``o * stride - pad + k * dilation + offset`` for each tap of a 3x3 kernel,
    taps row-major, ``offsets`` ``(9, 2)`` as ``(dy, dx)`` (deform_conv's layout for one group)."""
    taps = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), axis=-1).reshape(9, 2)
    return np.asarray(output) * stride - pad + taps * dilation + offsets


def main() -> None:
    rng = np.random.default_rng(3)
    output = (3, 3)
    regular = sampling_positions(output, np.zeros((9, 2)))
    deformed = sampling_positions(output, rng.normal(scale=0.8, size=(9, 2)))
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    ax.set_xticks(np.arange(-0.5, 7, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, 7, 1), minor=True)
    ax.grid(which="minor", color="0.85")
    ax.tick_params(which="both", length=0)
    ax.set_xlim(-0.5, 6.5)
    ax.set_ylim(6.5, -0.5)  # rows down, as an image
    ax.set_aspect("equal")
    ax.scatter(regular[:, 1], regular[:, 0], s=60, facecolors="none", edgecolors="0.4", label="regular grid")
    ax.scatter(deformed[:, 1], deformed[:, 0], s=40, color="tab:red", label="grid + offsets")
    for start, end in zip(regular, deformed, strict=True):
        ax.annotate("", end[::-1], start[::-1], arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 0.8})
    ax.scatter([output[1]], [output[0]], marker="x", s=60, color="black", label="output position (stride 1)")
    ax.set_xlabel("x (pixel centres at integers)")
    ax.set_ylabel("y")
    ax.legend(loc="lower left", fontsize=7, framealpha=0.9)
    ax.set_title("3x3 deformable conv, one output position", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT, metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
