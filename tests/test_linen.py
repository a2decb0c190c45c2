"""jdynconv.linen.BranchMixConv against a branch-by-branch float64 reference, plus its guarantees."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdynconv import _branch_mix
from jdynconv._lowering import im2col
from jdynconv.linen import BranchMixConv
from tests import reference
from tests.helpers import F32_RTOL, assert_close


def _randomise(variables: dict[str, Any], seed: int) -> dict[str, Any]:
    """Non-trivial values everywhere (scale != 1, offset != 0, running stats not at init)."""
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.standard_normal(leaf.shape) * 0.5, leaf.dtype) for leaf in leaves]
    out = jax.tree.unflatten(treedef, new)
    out["batch_stats"]["var"] = jnp.abs(out["batch_stats"]["var"]) + 0.5
    return out


def _shapes(module: nn.Module, x: Any, **kwargs: Any) -> dict[str, Any]:
    """The shapes and dtypes of ``module.init``'s variables, traced and not run: for tests that replace
    every value (:func:`_randomise`), where an eager init compiled each initializer op on its own."""
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **kwargs), x)


def _init(module: nn.Module, x: Any, **kwargs: Any) -> dict[str, Any]:
    """``module.init`` compiled as one program (run eagerly, it compiled every initializer op on its own)."""
    return jax.jit(lambda x: module.init(jax.random.key(0), x, **kwargs))(x)


def _numpy_params(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, np.float64) for name, value in variables["params"].items()}


CONFIGS = [
    # (spatial, in_features, attributes, geometry)
    ((6, 6), 3, {"features": 4, "kernel_size": 3, "num_branches": 3}, reference.Geometry.simple(2, padding=1)),
    (
        (7,),
        4,
        {"features": 6, "kernel_size": 3, "num_branches": 2, "strides": 2, "padding": 1, "feature_group_count": 2},
        reference.Geometry.simple(1, padding=1, stride=2, groups=2),
    ),
    (
        (3, 4, 4),
        2,
        {"features": 2, "kernel_size": (1, 3, 3), "num_branches": 4, "padding": "VALID", "use_bias": False},
        reference.Geometry.simple(3),
    ),
]


# Every lowering of the branches: one conv over the batch, cache-sized chunks of the batch, a scan
# over the branches.
LOWERINGS = [{"method": "fused"}, {"method": "chunked"}, {"remat": True}]
LOWERING_IDS = ["fused", "chunked", "remat"]


@pytest.mark.parametrize("lowering", LOWERINGS, ids=LOWERING_IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("spatial", "in_features", "attributes", "geometry"), CONFIGS)
def test_matches_branch_by_branch_reference(
    spatial, in_features, attributes, geometry, training: bool, lowering: dict
) -> None:
    x = np.random.default_rng(0).standard_normal((5, *spatial, in_features)).astype(np.float32)
    module = BranchMixConv(**attributes, **lowering)
    variables = _randomise(_shapes(module, x, use_running_average=True), seed=1)
    out, updates = jax.jit(lambda v, x: module.apply(v, x, use_running_average=not training, mutable=["batch_stats"]))(
        variables, x
    )
    stats = variables["batch_stats"]
    expected, batch_mean, batch_var = reference.branch_mix(
        x, _numpy_params(variables), np.asarray(stats["mean"]), np.asarray(stats["var"]), geometry, training=training
    )
    assert_close(out, expected, F32_RTOL, "output")
    if training:
        # Flax momentum 0.9 == PyTorch momentum 0.1; the default keeps Flax's biased variance.
        assert_close(updates["batch_stats"]["mean"], 0.9 * stats["mean"] + 0.1 * batch_mean, F32_RTOL, "mean")
        assert_close(updates["batch_stats"]["var"], 0.9 * stats["var"] + 0.1 * batch_var, F32_RTOL, "var")
    else:
        assert_close(updates["batch_stats"]["mean"], stats["mean"], 0.0, "mean unchanged in eval")


def test_unbiased_running_var_is_pytorchs() -> None:
    x = np.random.default_rng(2).standard_normal((4, 5, 5, 2)).astype(np.float32)
    module = BranchMixConv(features=3, kernel_size=3, num_branches=2, unbiased_running_var=True)
    variables = _init(module, x, use_running_average=False)
    _, updates = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
        variables, x
    )
    _, _, batch_var = reference.branch_mix(
        x,
        _numpy_params(variables),
        np.zeros((2, 3)),
        np.ones((2, 3)),
        reference.Geometry.simple(2, padding=1),
        training=True,
    )
    count = 4 * 5 * 5
    assert_close(updates["batch_stats"]["var"], 0.9 + 0.1 * batch_var * count / (count - 1), F32_RTOL)


def test_init_does_not_update_running_stats() -> None:
    x = np.ones((2, 4, 4, 1), np.float32) * np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    variables = _init(BranchMixConv(2, 3, 2), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros((2, 2)))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones((2, 2)))


@pytest.mark.parametrize(
    ("gate", "gate_input", "temperature"),
    [("softmax", "flatten", 4.0), ("sigmoid", "mean", 1.0), ("identity", "mean", 1.0), ("softmax", "mean", 0.5)],
)
def test_gate_options(gate: str, gate_input: str, temperature: float) -> None:
    x = np.random.default_rng(3).standard_normal((3, 5, 5, 2)).astype(np.float32)
    module = BranchMixConv(3, 3, 4, gate_activation=gate, gate_input=gate_input)
    variables = _randomise(_shapes(module, x, use_running_average=True), seed=4)
    out = jax.jit(lambda v, x, t: module.apply(v, x, use_running_average=True, temperature=t))(
        variables, x, temperature
    )
    stats = variables["batch_stats"]
    expected, _, _ = reference.branch_mix(
        x,
        _numpy_params(variables),
        np.asarray(stats["mean"]),
        np.asarray(stats["var"]),
        reference.Geometry.simple(2, padding=1),
        training=False,
        gate=gate,
        gate_input=gate_input,
        temperature=temperature,
    )
    assert_close(out, expected, F32_RTOL)
    if gate_input == "mean":
        # A pooled gate accepts any spatial size (traced for the output's shape; nothing needs computing).
        other_size = jax.eval_shape(
            lambda v, x: module.apply(v, x, use_running_average=True), variables, np.ones((3, 9, 7, 2), np.float32)
        )
        assert other_size.shape == (3, 9, 7, 3)


def test_callable_gate_and_given_gate_weights() -> None:
    x = np.random.default_rng(5).standard_normal((3, 4, 4, 2)).astype(np.float32)
    module = BranchMixConv(3, 3, 2, gate_activation=jnp.tanh)
    variables = _randomise(_shapes(module, x, use_running_average=True), seed=6)
    weights = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])

    @jax.jit
    def outputs(variables: dict[str, Any], x: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
        out = module.apply(variables, x, use_running_average=True, gate_weights=weights)
        only_first = BranchMixConv(3, 3, 2).apply(
            variables, x, use_running_average=True, gate_weights=jnp.tile(jnp.asarray([[1.0, 0.0]]), (3, 1))
        )
        only_second = BranchMixConv(3, 3, 2).apply(
            variables, x, use_running_average=True, gate_weights=jnp.tile(jnp.asarray([[0.0, 1.0]]), (3, 1))
        )
        return out, only_first, only_second

    out, only_first, only_second = outputs(variables, x)
    assert_close(out[0], only_first[0], F32_RTOL)
    assert_close(out[1], only_second[1], F32_RTOL)
    assert_close(out[2], 0.5 * (only_first[2] + only_second[2]), F32_RTOL)


def _train_step(module: BranchMixConv):
    tx = optax.sgd(0.1, momentum=0.9)

    def loss_fn(params, batch_stats, x):
        out, updates = module.apply(
            {"params": params, "batch_stats": batch_stats}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.mean(out**2), updates["batch_stats"]

    def step(params, batch_stats, opt_state, x):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return tx, step


def _count_equations(jaxpr: jax.extend.core.Jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    count += _count_equations(item.jaxpr)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    count += _count_equations(item)
    return count


def _step_program(k: int, **lowering: Any):
    """A training step of a k-branch layer and the shapes and dtypes of its arguments (what tracing and
    lowering need; nothing is run)."""
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    module = BranchMixConv(features=8, kernel_size=3, num_branches=k, **lowering)
    variables = _shapes(module, x, use_running_average=False)
    tx, step = _train_step(module)
    args = (variables["params"], variables["batch_stats"], jax.eval_shape(tx.init, variables["params"]), x)
    return step, args


@pytest.mark.parametrize("lowering", LOWERINGS, ids=LOWERING_IDS)
def test_training_step_program_size_is_flat_in_k(lowering: dict) -> None:
    sizes = {
        k: _count_equations(jax.make_jaxpr(step)(*args).jaxpr)
        for k in (2, 32)
        for step, args in [_step_program(k, **lowering)]
    }
    assert sizes[2] == sizes[32], sizes


def test_remat_keeps_training_memory_flat_in_k() -> None:
    def temp_bytes(k: int, **lowering: Any) -> int:
        step, args = _step_program(k, **lowering)
        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    with_remat = {k: temp_bytes(k, remat=True) for k in (2, 32)}
    assert with_remat[32] <= 2 * with_remat[2], with_remat
    # And the check can fail: the fused form keeps the k branch activations for the backward pass.
    without = {k: temp_bytes(k, method="fused") for k in (2, 32)}
    assert without[32] > 2 * without[2], without


def _force_chunks_of_two(monkeypatch: pytest.MonkeyPatch, bytes_per_sample: int) -> None:
    """Make ``method="chunked"`` split a small test batch into chunks of 2 samples."""
    monkeypatch.setattr(im2col, "_CHUNK_BYTES", 2 * bytes_per_sample)


@pytest.mark.parametrize("lowering", LOWERINGS[1:], ids=LOWERING_IDS[1:])
def test_lowerings_give_the_fused_gradients(lowering: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 samples in chunks of 2, 2 and 1: gradients summed across chunks and a partial last chunk.
    x = jnp.asarray(np.random.default_rng(10).standard_normal((5, 6, 6, 2)), jnp.float32)
    _force_chunks_of_two(monkeypatch, 36 * 9 * 2 * 4)  # the im2col patches are the larger here
    grads = {}
    for name, attributes in (("fused", {"method": "fused"}), ("other", lowering)):
        module = BranchMixConv(4, 3, 3, feature_group_count=2, **attributes)
        variables = _randomise(_shapes(module, x, use_running_average=False), seed=11)

        def loss(params, x, module=module, variables=variables):
            out, _ = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(out))

        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    params_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["fused"][0]))
    for (path, fused), other in zip(
        jax.tree.leaves_with_path(grads["fused"]), jax.tree.leaves(grads["other"]), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if name == "[0]['bias']":
            # BatchNorm subtracts the batch mean, so the conv bias's gradient is zero up to rounding, in
            # both: compare with the size of the other parameters' gradients.
            assert float(jnp.max(jnp.abs(other))) <= 1e-5 * params_scale, name
            assert float(jnp.max(jnp.abs(fused))) <= 1e-5 * params_scale, name
        else:
            assert_close(other, fused, 1e-5, name)


def test_bfloat16_training_gradients_chunked_match_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 compute: the chunked gradients add up across chunks in float32, as the fused ones do,
    so both stay as close to the float32 gradients."""
    x = jnp.asarray(np.random.default_rng(12).standard_normal((8, 6, 6, 3)), jnp.float32)
    _force_chunks_of_two(monkeypatch, 36 * 4 * 8 * 4)
    grads = {}
    for name, attributes in (
        ("float32", {"method": "fused"}),
        ("fused", {"method": "fused", "dtype": jnp.bfloat16}),
        ("chunked", {"method": "chunked", "dtype": jnp.bfloat16}),
    ):
        module = BranchMixConv(8, 3, 4, use_bias=False, **attributes)
        variables = _randomise(_shapes(module, x, use_running_average=False), seed=13)

        def loss(params, module=module, variables=variables):
            out, _ = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))

        # Compiled, as a training step is (op by op, every operation compiled on its own: 10 s of CPU).
        # Measured: chunked/fused error ratio at most 1.0 per leaf, against the bound's 1.5.
        grads[name] = jax.jit(jax.grad(loss))(variables["params"])
    for path, exact in jax.tree.leaves_with_path(grads["float32"]):
        name = jax.tree_util.keystr(path)
        scale = float(jnp.max(jnp.abs(exact)))
        fused_error = float(jnp.max(jnp.abs(_leaf(grads["fused"], path) - exact)))
        chunked_error = float(jnp.max(jnp.abs(_leaf(grads["chunked"], path) - exact)))
        assert fused_error <= 1e-1 * scale, name  # bfloat16 has 8 bits of mantissa
        assert chunked_error <= max(1.5 * fused_error, 4e-3 * scale), (name, chunked_error, fused_error)


def _scan_carry_count(params: dict[str, Any]) -> int:
    """How many of a ``scan`` equation's results are its loop carry (they come first, then the stacked ys).

    jax 0.10 states it as ``num_carry``; jax 0.12 gives the results' structure as ``ft_out``, a flat tree
    that unpacks into ``(carry, ys)`` and whose ``len`` is its number of leaves.
    """
    if "num_carry" in params:
        return params["num_carry"]
    carry, _ = params["ft_out"].unpack()
    return len(carry)


def _scan_carries(jaxpr: jax.extend.core.Jaxpr) -> list[Any]:
    """The avals of every ``scan``'s loop carry in ``jaxpr``, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found += [var.aval for var in eqn.outvars[: _scan_carry_count(eqn.params)]]
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _scan_carries(inner)
    return found


def test_bfloat16_chunked_gradients_accumulate_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward loop over chunks carries the parameter gradients in float32 (bfloat16 sums over
    hundreds of chunks lost ~2x accuracy against the fused form's single reduction)."""
    x = jnp.ones((8, 6, 6, 3), jnp.float32)
    _force_chunks_of_two(monkeypatch, 36 * 4 * 8 * 4)
    module = BranchMixConv(8, 3, 4, method="chunked", dtype=jnp.bfloat16)
    # What is checked is the traced program, not values: the variables' shapes and dtypes suffice, and
    # nothing is compiled (an eager init compiled every op of the chunked forward, most of this test's time).
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, use_running_average=False))

    def loss(params, batch_stats):
        out, _ = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(out.astype(jnp.float32))

    carries = _scan_carries(jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"]).jaxpr)
    assert any(aval.shape == (3, 3, 3, 32) for aval in carries), carries  # the kernel gradient is carried
    assert all(aval.dtype == jnp.float32 for aval in carries), carries


def _leaf(tree: Any, path: Any) -> jax.Array:
    return next(leaf for p, leaf in jax.tree.leaves_with_path(tree) if p == path).astype(jnp.float32)


def test_choose_method() -> None:
    assert _branch_mix.choose_method("auto", False, "cpu") is _branch_mix.branch_mix_chunked
    assert _branch_mix.choose_method("auto", False, "gpu") is _branch_mix.branch_mix
    assert _branch_mix.choose_method("auto", False, "tpu") is _branch_mix.branch_mix
    assert _branch_mix.choose_method("fused", False, "cpu") is _branch_mix.branch_mix
    assert _branch_mix.choose_method("chunked", False, "gpu") is _branch_mix.branch_mix_chunked
    assert _branch_mix.choose_method("auto", True, "cpu") is _branch_mix.branch_mix_rematerialised


@pytest.mark.parametrize("lowering", LOWERINGS, ids=LOWERING_IDS)
def test_empty_batch_in_training_keeps_the_running_statistics(lowering: dict) -> None:
    # An empty batch has no statistics to learn from (PyTorch's BatchNorm leaves them too).
    module = BranchMixConv(4, 3, 2, gate_input="mean", **lowering)
    variables = _init(module, jnp.ones((2, 6, 6, 2)), use_running_average=True)
    out, updates = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
        variables, jnp.ones((0, 6, 6, 2))
    )
    assert out.shape == (0, 6, 6, 4)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("lowering", LOWERINGS, ids=LOWERING_IDS)
def test_empty_batch_in_eval_mode(lowering: dict) -> None:
    module = BranchMixConv(4, 3, 2, gate_input="mean", **lowering)
    variables = _init(module, jnp.ones((2, 6, 6, 2)), use_running_average=True)
    out = jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))(variables, jnp.ones((0, 6, 6, 2)))
    assert out.shape == (0, 6, 6, 4)


@pytest.mark.parametrize("training", [True, False])
def test_chunked_with_a_partial_last_chunk(monkeypatch: pytest.MonkeyPatch, training: bool) -> None:
    """Chunks of 2 samples over a batch of 5 (the last chunk is a single sample): the batch statistics
    and the output are still the whole batch's."""
    spatial, in_features, attributes, geometry = CONFIGS[0]
    x = np.random.default_rng(3).standard_normal((5, *spatial, in_features)).astype(np.float32)
    module = BranchMixConv(**attributes, method="chunked")
    variables = _randomise(_shapes(module, x, use_running_average=True), seed=4)
    per_sample = int(np.prod(spatial)) * attributes["num_branches"] * attributes["features"] * 4
    _force_chunks_of_two(monkeypatch, per_sample)  # branch outputs (36 * 12) outweigh the patches (36 * 27)
    assert im2col.chunk_size(5, per_sample) == 2
    out, updates = jax.jit(lambda v, x: module.apply(v, x, use_running_average=not training, mutable=["batch_stats"]))(
        variables, x
    )
    stats = variables["batch_stats"]
    expected, batch_mean, batch_var = reference.branch_mix(
        x, _numpy_params(variables), np.asarray(stats["mean"]), np.asarray(stats["var"]), geometry, training=training
    )
    assert_close(out, expected, F32_RTOL, "output")
    if training:
        assert_close(updates["batch_stats"]["mean"], 0.9 * stats["mean"] + 0.1 * batch_mean, F32_RTOL, "mean")
        assert_close(updates["batch_stats"]["var"], 0.9 * stats["var"] + 0.1 * batch_var, F32_RTOL, "var")


def test_training_steps_reduce_the_loss_under_jit() -> None:
    module = BranchMixConv(features=8, kernel_size=3, num_branches=3)
    variables = _init(module, jnp.ones((8, 16, 16, 3)), use_running_average=False)
    tx, step = _train_step(module)
    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    x = jnp.asarray(np.random.default_rng(7).standard_normal((8, 16, 16, 3)), jnp.float32)
    jitted = jax.jit(step)
    losses = []
    for _ in range(5):
        params, batch_stats, opt_state, loss = jitted(params, batch_stats, opt_state, x)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_bfloat16_compute_dtype() -> None:
    x = np.random.default_rng(8).standard_normal((2, 6, 6, 3)).astype(np.float32)
    module = BranchMixConv(4, 3, 2, dtype=jnp.bfloat16)
    variables = _randomise(_shapes(module, x, use_running_average=True), seed=9)
    out = module.apply(variables, x, use_running_average=True)
    assert out.dtype == jnp.bfloat16
    assert variables["params"]["kernel"].dtype == jnp.float32
    reference_out = BranchMixConv(4, 3, 2).apply(variables, x, use_running_average=True)
    assert_close(out, reference_out, 5e-2)


def test_use_running_average_attribute_or_call_argument() -> None:
    x = np.ones((2, 4, 4, 1), np.float32)
    module = BranchMixConv(2, 3, 2)
    variables = _init(module, x, use_running_average=True)
    with pytest.raises(ValueError, match="use_running_average"):
        module.apply(variables, x)
    fixed = BranchMixConv(2, 3, 2, use_running_average=True)
    # One program computes both (each its own computation in it): the two calls must give the same values.
    both = jax.jit(lambda v, x: (fixed.apply(v, x), module.apply(v, x, use_running_average=True)))(variables, x)
    np.testing.assert_array_equal(*both)


@pytest.mark.parametrize(
    ("build", "x", "kwargs", "error", "fragments"),
    [
        (
            functools.partial(BranchMixConv, 2, 3, 2),
            np.ones((4, 4), np.float32),
            {},
            ValueError,
            ["`inputs` must have rank 3, 4 or 5", "(4, 4)"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 0),
            np.ones((2, 4, 4, 1), np.float32),
            {},
            ValueError,
            ["`num_branches` must be a positive int, got 0"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2, method="loop"),
            np.ones((2, 4, 4, 1), np.float32),
            {},
            ValueError,
            ["`method` must be one of ('auto', 'fused', 'chunked'), got 'loop'"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2, remat=True, method="fused"),
            np.ones((2, 4, 4, 1), np.float32),
            {},
            ValueError,
            ["`remat=True` runs its own lowering", "leave `method` at \"auto\", got 'fused'"],
        ),
        (
            functools.partial(BranchMixConv, 3, 3, 2, feature_group_count=2),
            np.ones((2, 4, 2), np.float32),
            {},
            ValueError,
            ["`features` (=3)", "(=2)"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2, feature_group_count=2),
            np.ones((2, 4, 3), np.float32),
            {},
            ValueError,
            ["`inputs` channels (=3)"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2, gate_input="max"),
            np.ones((2, 4, 1), np.float32),
            {},
            ValueError,
            ["`gate_input` must be one of", "'max'"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2, gate_activation="relu"),
            np.ones((2, 4, 1), np.float32),
            {},
            ValueError,
            ["`gate_activation`", "'relu'"],
        ),
        (
            functools.partial(BranchMixConv, 2, (3, 3), 2),
            np.ones((2, 4, 1), np.float32),
            {},
            ValueError,
            ["`kernel_size` must have one entry per spatial dimension (1)"],
        ),
        (
            functools.partial(BranchMixConv, 2, 3, 2),
            np.ones((2, 4, 4, 1), np.float32),
            {"gate_weights": jnp.ones((2, 3))},
            ValueError,
            ["`gate_weights` must have shape (2, 2) (batch, num_branches), got shape (2, 3)"],
        ),
    ],
)
def test_bad_input(
    build: Callable[[], nn.Module], x: np.ndarray, kwargs: dict, error: type, fragments: list[str]
) -> None:
    # Attribute errors come at construction, input errors at the call: both inside the check.
    with pytest.raises(error) as info:
        build().init(jax.random.key(0), x, use_running_average=True, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_flatten_gate_names_the_size_it_was_built_for() -> None:
    module = BranchMixConv(2, 3, 2)
    variables = _shapes(module, np.ones((2, 8, 8, 3), np.float32), use_running_average=True)
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\) give 48 gate features.*built for 192"):
        module.apply(variables, np.ones((2, 4, 4, 3), np.float32), use_running_average=True)


def test_softmax_gate_temperature_is_checked_and_cast() -> None:
    x = np.ones((2, 5, 5, 3), np.float32)
    module = BranchMixConv(4, 3, 2, gate_activation="softmax", dtype=jnp.bfloat16)
    variables = _init(module, x, use_running_average=True)
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got 0\.0"):
        module.apply(variables, x, use_running_average=True, temperature=0.0)
    # A float32 schedule value with a bfloat16 computation dtype (strict promotion is on in tests).
    out = module.apply(variables, x, use_running_average=True, temperature=jnp.float32(4.0))
    assert out.dtype == jnp.bfloat16


def test_numpy_integer_attributes_are_accepted() -> None:
    module = BranchMixConv(features=np.int64(4), kernel_size=3, num_branches=np.int32(2))
    variables = _shapes(module, np.ones((2, 5, 5, 3), np.float32), use_running_average=True)
    assert variables["params"]["kernel"].shape == (2, 3, 3, 3, 4)
