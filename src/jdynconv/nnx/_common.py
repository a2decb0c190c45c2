"""What several NNX families share: the kernel size and kernel-mixing configuration an NNX layer fixes at
construction, before it sees an input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jdynconv import _checks, _kernel_mix


def spatial_kernel_size(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """One int per spatial dim (1 to 3): an NNX layer creates its kernel before it sees an input's rank."""
    if _checks.is_int(kernel_size):
        raise ValueError(
            f"`kernel_size` {kernel_size!r} is an int, but an NNX layer creates its kernel before seeing an input: "
            "pass one int per spatial dim, e.g. (3, 3)."
        )
    kernel_size = _checks.canonicalize_ints(tuple(kernel_size), len(tuple(kernel_size)), "kernel_size")
    if not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"`kernel_size` must have 1 to 3 spatial dims, got {kernel_size!r}.")
    return kernel_size


def nnx_layer_config(
    in_features: int,
    features: int,
    kernel_size: int | Sequence[int],
    num_experts: int | None,
    *,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    feature_group_count: int,
    dtype: Any,
    precision: Any,
    mixing: str,
    method: str,
    input_dilation: Any = 1,
    ratio: float | None = None,
) -> _kernel_mix.LayerConfig:
    _kernel_mix.check_layer(
        features,
        num_experts,
        feature_group_count,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        input_dilation=input_dilation,
        ratio=ratio,
    )
    _kernel_mix.check_mixing(mixing, method)
    if not _checks.is_int(in_features) or in_features < 1 or in_features % feature_group_count:
        raise ValueError(
            f"`in_features` must be a positive int divisible by `feature_group_count` (={feature_group_count}), "
            f"got {in_features!r}."
        )
    kernel_size = spatial_kernel_size(kernel_size)
    return _kernel_mix.LayerConfig(
        features=features,
        kernel_size=kernel_size,
        num_experts=num_experts,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
        dtype=dtype,
        precision=precision,
        mixing=mixing,
        method=method,
        input_dilation=input_dilation,
    )
