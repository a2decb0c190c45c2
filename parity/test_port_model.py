"""The multi-layer porting example (``examples/port_model.py``): equal logits and gradients.

A PyTorch network with a conv stem, timm's ``CondConv2d``, ``ODConv2d``, a Dynamic Convolution layer, pooling
and a ``Linear`` head, its state dict loaded into a Flax model of jdynconv layers through prefix rules. Each
difference is held to parity's ``RTOL`` of its reference's largest magnitude (as ``conftest.py``'s absolute
term; for the gradients, each parameter's own largest gradient, since they are far below 1 and a wrong layout
or convention would be of their own size).
"""

from __future__ import annotations

import jax
import port_model
import pytest

from parity.conftest import RTOL


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    with (
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
        jax.default_matmul_precision("highest"),
    ):
        return port_model.run()


def test_logits_are_equal(results: dict[str, float]) -> None:
    assert results["logits_max_abs_diff"] <= RTOL * max(1.0, results["logits_max_abs"])


def test_gradients_named_back_in_torch_terms_are_equal(results: dict[str, float]) -> None:
    names = [key.removesuffix(" max_abs_diff") for key in results if key.startswith("grad ") and "diff" in key]
    assert {"grad cond.weight", "grad od.attention.fc.weight", "grad dynamic.weight", "grad head.weight"} <= set(names)
    for name in names:
        scale = results[f"{name} max_abs"]
        assert scale > 0, name
        assert results[f"{name} max_abs_diff"] <= RTOL * scale, name
