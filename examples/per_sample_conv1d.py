"""Batchwise conv1d: a different kernel for every batch element, without a Python loop.

The question: x has shape (32, 4, 16) (batch, in channels, length) and ``F.conv1d(x, w)`` works with
w of shape (8, 4, 1); how to use a different kernel per sample, w of shape (32, 8, 4, 1)? The answer
given in PyTorch is ``torch.einsum('bin,boin->bon', x, w)``, which holds for kernel size 1 only.

``jdynconv.per_sample_conv`` takes those PyTorch-layout arrays as they are
(``data_format="channels_first"``) and handles any kernel size, stride, padding, dilation and groups.

Run: ``python examples/per_sample_conv1d.py`` (PyTorch is optional; without it that check is skipped).
"""

from __future__ import annotations

import jax
import numpy as np

import jdynconv as jdc

# float32 relative tolerance; HIGHEST precision below keeps GPUs from using TF32 (~1e-3) by default.
RTOL = 1e-5


def check(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    """Prints the max abs difference; raises if it exceeds RTOL times the largest expected magnitude."""
    diff = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    tolerance = RTOL * max(1.0, float(np.max(np.abs(expected))))
    print(f"  {name}: max abs diff {diff:.2e} -> {'OK' if diff <= tolerance else 'MISMATCH'}")
    if diff > tolerance:
        raise AssertionError(f"{name}: max abs diff {diff:.3g} > tolerance {tolerance:.3g}")


def main() -> None:
    try:  # optional: only needed for the comparisons with PyTorch
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4, 16), dtype=np.float32)  # (batch, in channels, length)
    w = rng.standard_normal((32, 8, 4, 1), dtype=np.float32)  # (batch, out, in, kernel size)

    # Hyper-parameters are static: each setting compiles once, then runs as one XLA program.
    conv = jax.jit(jdc.per_sample_conv, static_argnames=("strides", "padding", "data_format", "precision"))
    highest = jax.lax.Precision.HIGHEST

    print("Kernel size 1, the question's shapes:")
    y = np.asarray(conv(x, w, padding="VALID", data_format="channels_first", precision=highest))
    print(f"  per_sample_conv{x.shape, w.shape} -> {y.shape}")
    check("vs numpy einsum('bin,boin->bon')", y, np.einsum("bin,boin->bon", x, w))
    if torch is None:
        print("PyTorch is not installed: skipping the PyTorch comparisons.")
        return
    seed_answer = torch.einsum("bin,boin->bon", torch.tensor(x), torch.tensor(w))
    check("vs torch.einsum('bin,boin->bon')", y, seed_answer.numpy())

    print("Kernel size 3, stride 2, padding 1 (the einsum no longer applies):")
    w3 = rng.standard_normal((32, 8, 4, 3), dtype=np.float32)
    y3 = np.asarray(conv(x, w3, strides=2, padding=1, data_format="channels_first", precision=highest))
    print(f"  per_sample_conv{x.shape, w3.shape} -> {y3.shape}")
    # PyTorch's way: fold the batch into channels and run one conv with one group per sample.
    batch, in_channels, length = x.shape
    out_channels = w3.shape[1]
    folded = torch.nn.functional.conv1d(
        torch.tensor(x).reshape(1, batch * in_channels, length),
        torch.tensor(w3).reshape(batch * out_channels, in_channels, 3),
        stride=2,
        padding=1,
        groups=batch,
    )
    check("vs torch grouped conv1d (groups=32)", y3, folded.reshape(batch, out_channels, -1).numpy())


if __name__ == "__main__":
    main()
