"""Every rule that chooses by platform chooses for the platform the program is lowered for.

Exported from this CPU host for CUDA or TPU (``jax.export``), a program must hold the accelerator's choice;
exported or compiled for CPU, the CPU's. The choices are told apart in the exported StableHLO:

* ``per_sample_conv``'s ``auto`` (and everything built on it): on an accelerator the batch is folded into
  the groups of one convolution (``feature_group_count = B * G``); the CPU's lowerings (im2col's matmuls,
  a conv per sample, depthwise multiply-adds) never fold it. B = 5 and G is never a multiple of 5, so a
  ``feature_group_count`` divisible by 5 is the folded conv.
* kernel mixing's ``mixing="auto"`` at k = 2: mixed outputs on CPU (one shared conv), mixed kernels
  elsewhere (the per-sample conv, folded on an accelerator).
* BranchMixConv's ``method="auto"``: ``chunked`` on CPU (a loop over chunks of the batch), ``fused`` elsewhere
  (no loop).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from jdynconv import _kernel_mix, linen
from jdynconv._lowering import im2col
from tests.helpers import F32_RTOL, assert_close, equations

BATCH = 5
PLATFORMS = ["cuda", "tpu", "cpu"]


def _array(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _module_text(fn: Any, args: tuple[Any, ...], platforms: list[str]) -> str:
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def _folded_convs(text: str) -> list[int]:
    """The ``feature_group_count`` of every convolution that folds the batch into its groups."""
    return [int(g) for g in re.findall(r"feature_group_count = (\d+)", text) if int(g) % BATCH == 0]


def _value_and_grads(fn: Any, argnums: tuple[int, ...]) -> Any:
    return jax.value_and_grad(lambda *args: jnp.sum(fn(*args) ** 2), argnums=argnums)


def _training_step(module: nn.Module, inputs: jax.Array, *call_args: Any, **call_kwargs: Any) -> tuple[Any, tuple]:
    """``(params, inputs) -> ((loss, updated state), grads)``: value_and_grad of a loss with batch_stats
    mutable, and its arguments."""
    variables = module.init(jax.random.key(0), inputs, *call_args, **call_kwargs)
    params = variables["params"]
    state = {name: value for name, value in variables.items() if name != "params"}

    def step(params: Any, inputs: jax.Array) -> Any:
        def loss(params: Any) -> tuple[jax.Array, Any]:
            out, updates = module.apply(
                {"params": params, **state}, inputs, *call_args, mutable=["batch_stats"], **call_kwargs
            )
            return jnp.sum(out**2), updates

        return jax.value_and_grad(loss, has_aux=True)(params)

    return step, (params, inputs)


def _params_in(jaxpr: Any, primitive: str) -> list[dict[str, Any]]:
    """The parameters of every ``primitive`` equation in ``jaxpr`` and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn.params)
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    found += _params_in(getattr(item, "jaxpr", item), primitive)
    return found


def _forward(module: nn.Module, inputs: jax.Array) -> tuple[Any, tuple]:
    variables = module.init(jax.random.key(0), inputs)
    return module.apply, (variables, inputs)


def _functions() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """The public functions whose programs go through a platform rule, differentiated w.r.t. every array."""
    return {
        "per_sample_conv": (
            _value_and_grads(lambda x, w: jdc.per_sample_conv(x, w, feature_group_count=2), (0, 1)),
            (_array(BATCH, 12, 12, 4), _array(BATCH, 3, 3, 2, 6, seed=1)),
        ),
        "per_sample_conv_channels_first": (
            _value_and_grads(lambda x, w: jdc.per_sample_conv(x, w, data_format="channels_first"), (0, 1)),
            (_array(BATCH, 4, 16), _array(BATCH, 8, 4, 3, seed=1)),
        ),
        "per_sample_conv_transpose": (
            _value_and_grads(lambda x, w: jdc.per_sample_conv_transpose(x, w, strides=2), (0, 1)),
            (_array(BATCH, 6, 6, 3), _array(BATCH, 3, 3, 4, 3, seed=1)),
        ),
        "modulated_conv": (
            _value_and_grads(lambda x, k, s: jdc.modulated_conv(x, k, s, padding=1), (0, 1, 2)),
            (_array(BATCH, 20, 20, 3), _array(3, 3, 3, 4, seed=1), _array(BATCH, 3, seed=2)),
        ),
    }


def _layers() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    x = _array(BATCH, 20, 20, 4)
    return {
        "CondConv": _training_step(linen.CondConv(features=6, kernel_size=3, num_experts=2), x),
        "DynamicConv": _training_step(linen.DynamicConv(features=6, kernel_size=3, num_experts=4), x),
        "ODConv": _training_step(linen.ODConv(features=6, kernel_size=3), x, use_running_average=False),
        "ModulatedConv": _training_step(linen.ModulatedConv(features=6, kernel_size=3), x, _array(BATCH, 8, seed=3)),
    }


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ["per_sample_conv", "per_sample_conv_channels_first", "per_sample_conv_transpose"])
def test_per_sample_conv_lowered_for_the_export_platform(name: str, platform: str) -> None:
    fn, args = _functions()[name]
    folded = _folded_convs(_module_text(fn, args, [platform]))
    assert bool(folded) is (platform != "cpu"), folded


@pytest.mark.parametrize("platform", PLATFORMS)
def test_modulated_conv_lowered_for_the_export_platform(platform: str) -> None:
    fn, args = _functions()["modulated_conv"]
    folded = _folded_convs(_module_text(fn, args, [platform]))
    assert bool(folded) is (platform != "cpu"), folded


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ["CondConv", "DynamicConv", "ODConv", "ModulatedConv"])
def test_layer_training_step_lowered_for_the_export_platform(name: str, platform: str) -> None:
    """CondConv at k = 2 also checks the mixing rule: on CPU it mixes outputs and has no per-sample conv."""
    step, args = _layers()[name]
    folded = _folded_convs(_module_text(step, args, [platform]))
    assert bool(folded) is (platform != "cpu"), folded


def test_condconv_mixing_rule_differs_by_platform() -> None:
    """The CondConv case above tells the platforms apart only if the rule does at its shape."""
    assert _kernel_mix.choose_mixing("cpu", 2, BATCH, 400) == "mix_outputs"
    assert _kernel_mix.choose_mixing("default", 2, BATCH, 400) == "mix_kernels"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_branch_mix_lowered_for_the_export_platform(platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``chunked`` (a loop over chunks) on CPU, ``fused`` (no loop) elsewhere; chunks made small so that a
    small batch is chunked at all."""
    monkeypatch.setattr(im2col, "_CHUNK_BYTES", 1)
    module = linen.BranchMixConv(features=4, kernel_size=3, num_branches=2, gate_input="mean")
    step, args = _training_step(module, _array(8, 6, 6, 3), use_running_average=False)
    text = _module_text(step, args, [platform])
    assert ("stablehlo.while" in text) is (platform == "cpu")


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (jdc.mix_kernels, (_array(3, 3, 3, 4, 6), _array(BATCH, 3, seed=1))),
        (jdc.mix_outputs, (_array(BATCH, 3, 4, 4, 6), _array(BATCH, 3, seed=1))),
    ],
    ids=["mix_kernels", "mix_outputs"],
)
def test_functions_without_a_rule_export_without_a_switch(fn: Any, args: tuple[Any, ...]) -> None:
    """No platform rule, so nothing staged out per platform: the same program for every platform."""
    step = _value_and_grads(fn, (0, 1))
    assert not equations("cond", step, *args)
    for platforms in (["cuda"], ["tpu"], ["cpu", "cuda"]):
        _module_text(step, args, platforms)


def test_multi_platform_export_runs_on_cpu() -> None:
    """Exported for CPU and CUDA at once, the module holds both lowerings behind a switch on the platform,
    and called here it runs the CPU's and computes what ``jit`` does."""
    fn, args = _functions()["per_sample_conv"]
    exported = jax.export.export(jax.jit(fn), platforms=["cpu", "cuda"])(*args)
    assert _folded_convs(exported.mlir_module())
    (value, grads), (expected_value, expected_grads) = exported.call(*args), jax.jit(fn)(*args)
    assert_close(value, expected_value, F32_RTOL, "loss")
    for got, expected in zip(grads, expected_grads, strict=True):
        assert_close(got, expected, F32_RTOL, "gradient")


def test_cpu_compiled_program_has_no_switch() -> None:
    """Compiled for CPU, only the CPU's choice is left: XLA sees no conditional."""
    step, args = _layers()["CondConv"]
    assert "conditional(" not in jax.jit(step).lower(*args).compile().as_text()


def test_a_rule_inside_a_branch_takes_its_platform() -> None:
    """CondConv at k = 2 switches once, on its mixing: the per-sample conv inside the accelerator's branch
    takes the accelerator's lowering rather than switching again."""
    fn, args = _forward(linen.CondConv(features=6, kernel_size=3, num_experts=2), _array(BATCH, 20, 20, 4))
    assert len(equations("cond", fn, *args)) == 1


def test_one_choice_traces_one_branch() -> None:
    """Where every platform chooses the same (kernel mixing at k = 4 mixes kernels everywhere), there is no
    switch on the mixing, only per_sample_conv's own (between two lowerings, not two mixings)."""
    fn, args = _forward(linen.DynamicConv(features=6, kernel_size=3, num_experts=4), _array(BATCH, 20, 20, 4))
    (switch,) = equations("cond", fn, *args)
    folded = [
        [p["feature_group_count"] % BATCH == 0 for p in _params_in(branch.jaxpr, "conv_general_dilated")]
        for branch in switch.params["branches"]
    ]
    assert [any(branch) for branch in folded] == [False, True], folded
