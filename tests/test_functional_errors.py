"""Bad input to per_sample_conv: each error names the argument, what was expected and what came."""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from jdynconv.functional import METHODS


def _x(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.ones(shape, dtype)


def _raises(error: type[Exception], fragments: list[str], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(error) as info:
        jdc.per_sample_conv(*args, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_seed_shapes_in_the_wrong_layout_name_the_mismatch() -> None:
    # The DESIGN.md example: kernels of batch 16 for inputs of batch 32.
    _raises(
        ValueError,
        ["`kernels` must have batch size 32", "(16, 8, 4, 1)"],
        _x(32, 4, 16),
        _x(16, 8, 4, 1),
        data_format="channels_first",
    )


@pytest.mark.parametrize(
    ("inputs_shape", "kernels_shape", "fragments"),
    [
        ((4, 16), (4, 1, 16, 8), ["`inputs` must have rank 3 or 4 or 5", "(4, 16)"]),
        ((2, 3, 4, 5, 6, 7), (2, 1, 1, 1, 1, 7, 8), ["`inputs` must have rank", "(2, 3, 4, 5, 6, 7)"]),
        ((2, 16, 4), (2, 1, 1, 4, 8), ["`kernels` must have rank 4", "(2, 1, 1, 4, 8)"]),
        ((2, 16, 4), (2, 3, 5, 8), ["`kernels` must have C_in // G = 4 // 1 = 4", "got 5", "(2, 3, 5, 8)"]),
        ((2, 16, 4), (2, 3, 2, 6), ["C_in // G = 4 // 1 = 4", "got 2"]),
    ],
)
def test_shape_errors(inputs_shape: tuple[int, ...], kernels_shape: tuple[int, ...], fragments: list[str]) -> None:
    _raises(ValueError, fragments, _x(*inputs_shape), _x(*kernels_shape))


def test_groups_errors() -> None:
    _raises(
        ValueError,
        ["`inputs` channels (=6)", "`feature_group_count` (=4)"],
        _x(2, 8, 6),
        _x(2, 3, 1, 8),
        feature_group_count=4,
    )
    _raises(
        ValueError, ["output channels (=5)", "(=2)", "(2, 3, 2, 5)"], _x(2, 8, 4), _x(2, 3, 2, 5), feature_group_count=2
    )
    _raises(
        ValueError,
        ["`feature_group_count` must be a positive int", "0"],
        _x(2, 8, 4),
        _x(2, 3, 4, 4),
        feature_group_count=0,
    )


def test_bias_errors() -> None:
    x, w = _x(2, 8, 4), _x(2, 3, 4, 6)
    _raises(ValueError, ["`bias` must have shape (2, 6)", "or (6,)", "got shape (3, 6)"], x, w, _x(3, 6))
    _raises(ValueError, ["`bias`", "got shape (5,)"], x, w, _x(5))
    _raises(TypeError, ["`bias` must have the dtype of `inputs` (float32)", "float16"], x, w, _x(6, dtype=np.float16))


def test_kernel_larger_than_padded_input() -> None:
    _raises(
        ValueError,
        ["kernel size (5,)", "larger than the padded input", "(3,)"],
        _x(2, 3, 1),
        _x(2, 5, 1, 1),
        padding="VALID",
    )
    _raises(
        ValueError, ["effective 9", "`kernel_dilation` (4,)"], _x(2, 8, 1), _x(2, 3, 1, 1), padding=0, kernel_dilation=4
    )


@pytest.mark.parametrize("name", ["strides", "kernel_dilation", "input_dilation"])
@pytest.mark.parametrize("bad", [0, -1, (1, 0)])
def test_non_positive_strides_and_dilations(name: str, bad: Any) -> None:
    _raises(
        ValueError,
        [f"`{name}` entries must be >= 1"],
        _x(2, 5, 5, 1),
        _x(2, 3, 3, 1, 1),
        padding="VALID",
        **{name: bad},
    )


def test_strides_of_the_wrong_length_or_type() -> None:
    _raises(
        ValueError,
        ["`strides` must have one entry per spatial dimension (2)", "(1, 1, 1)"],
        _x(2, 5, 5, 1),
        _x(2, 3, 3, 1, 1),
        strides=(1, 1, 1),
    )
    _raises(
        TypeError,
        ["`strides` must be an int or a sequence of 2 ints", "'2'"],
        _x(2, 5, 5, 1),
        _x(2, 3, 3, 1, 1),
        strides="2",
    )
    _raises(TypeError, ["`kernel_dilation`", "1.5"], _x(2, 5, 5, 1), _x(2, 3, 3, 1, 1), kernel_dilation=1.5)


@pytest.mark.parametrize(
    ("padding", "fragments"),
    [
        ("FULL", ["`padding` must be", '"SAME", "VALID", "CAUSAL"', "'FULL'"]),
        ((1, 2, 3), ["`padding` must be", "sequence of 2", "(1, 2, 3)"]),
        (((1, 2, 3), 1), ["bad entry (1, 2, 3)"]),
        (-1, ["`padding` must be non-negative", "(-1, -1)"]),
        ("CAUSAL", ['"CAUSAL" is only defined for 1-D', "2-D"]),
        (1.0, ["`padding` must be", "1.0"]),
    ],
)
def test_bad_padding(padding: Any, fragments: list[str]) -> None:
    _raises(ValueError, fragments, _x(2, 5, 5, 1), _x(2, 3, 3, 1, 1), padding=padding)


def test_string_padding_with_input_dilation_is_refused_like_lax() -> None:
    _raises(
        ValueError,
        ["`padding` 'SAME' is ambiguous with `input_dilation` (2,)"],
        _x(2, 5, 1),
        _x(2, 3, 1, 1),
        input_dilation=2,
    )


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_, np.complex64])
def test_non_float_dtypes(dtype: Any) -> None:
    _raises(
        TypeError,
        ["`inputs` must have a floating-point dtype", np.dtype(dtype).name],
        _x(2, 5, 1, dtype=dtype),
        _x(2, 3, 1, 1),
    )
    _raises(TypeError, ["`kernels` must have a floating-point dtype"], _x(2, 5, 1), _x(2, 3, 1, 1, dtype=dtype))


def test_mixed_float_dtypes() -> None:
    _raises(
        TypeError,
        ["`kernels` must have the dtype of `inputs` (float32)", "bfloat16"],
        _x(2, 5, 1),
        jnp.ones((2, 3, 1, 1), jnp.bfloat16),
    )


def test_unknown_method_and_data_format() -> None:
    _raises(ValueError, ["`method` must be one of", "'auto'", "'fft'"], _x(2, 5, 1), _x(2, 3, 1, 1), method="fft")
    _raises(
        ValueError,
        ["`data_format` must be one of", "'channels_first'", "'NCHW'"],
        _x(2, 5, 1),
        _x(2, 3, 1, 1),
        data_format="NCHW",
    )


def test_channels_first_errors_quote_the_pytorch_layout() -> None:
    with pytest.raises(ValueError, match=re.escape("(B, C_out, C_in // G, *kernel_size)")):
        jdc.per_sample_conv(_x(2, 4, 16), _x(2, 8, 4), data_format="channels_first")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bfloat16])
def test_preferred_element_type_must_be_a_float_no_narrower_than_the_inputs(dtype: Any) -> None:
    _raises(
        TypeError,
        ["`preferred_element_type` must be a floating-point dtype", "(float32)"],
        _x(2, 5, 3),
        _x(2, 1, 3, 4),
        preferred_element_type=dtype,
    )


def test_zero_kernel_size() -> None:
    _raises(
        ValueError,
        ["`kernels` must have every kernel size >= 1", "(2, 0, 2, 4)"],
        _x(2, 8, 2),
        _x(2, 0, 2, 4),
        padding="VALID",
    )


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_gives_an_empty_result(method: str) -> None:
    out = jdc.per_sample_conv(_x(0, 8, 2), _x(0, 3, 2, 4), strides=2, method=method)
    assert out.shape == (0, 4, 4)
