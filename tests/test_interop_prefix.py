"""``interop.under``, ``interop.rules_for`` and ``interop.torch_names``, without torch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jl
from jdynconv import nnx as jn

X = jnp.ones((2, 6, 6, 4))


def _branch_mix() -> tuple[jl.BranchMixConv, dict]:
    block = jl.BranchMixConv(features=4, kernel_size=3, num_branches=2, padding=1)
    return block, jax.jit(lambda key: block.init(key, X, use_running_average=True))(jax.random.key(0))


def test_under_moves_keys_and_targets() -> None:
    block, variables = _branch_mix()
    rules = interop.rules_for(block, variables)
    moved = interop.under("encoder.block", ("encoder", "block"), rules)
    assert [rule.torch_key for rule in moved] == [f"encoder.block.{rule.torch_key}" for rule in rules]
    by_key = {rule.torch_key: rule for rule in moved}
    assert by_key["encoder.block.convs.1.0.weight"].target == interop.Target(
        ("params", "encoder", "block", "kernel"), 1
    )
    assert by_key["encoder.block.convs.0.1.running_var"].target.key == ("batch_stats", "encoder", "block", "var")
    assert by_key["encoder.block.convs.0.1.num_batches_tracked"].target is None
    assert interop.under("", (), rules) == rules
    assert interop.under("b", "block", rules)[0].target.key == ("params", "block", "gate_kernel")


def test_rules_for_a_linen_layer_from_variables_or_a_state_dict() -> None:
    block, variables = _branch_mix()
    from_variables = interop.rules_for(block, variables)
    from_state_dict = interop.rules_for(block, state_dict=interop.linen_to_torch(block, variables))
    assert from_variables == from_state_dict
    with pytest.raises(TypeError, match=r"`variables` \(or `state_dict`\) is required for a linen module"):
        interop.rules_for(block)
    with pytest.raises(TypeError, match="`state_dict` must not be given with `variables`"):
        interop.rules_for(block, variables, state_dict={})


def test_rules_for_an_nnx_model_needs_no_shapes() -> None:
    model = nnx.eval_shape(lambda: jn.DynamicConv(4, 6, (3, 3), 2, rngs=nnx.Rngs(0)))
    keys = [rule.torch_key for rule in interop.rules_for(model)]
    assert keys == ["attention.fc1.weight", "attention.fc2.weight", "attention.fc2.bias", "weight", "bias"]


class _Net(nn.Module):
    """A stem conv, two jdynconv layers passed in as attributes, a Dense head."""

    block: jl.BranchMixConv
    dynamic: jl.DynamicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = self.block(x, use_running_average=True)
        x = self.dynamic(x)
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _net_rules(net: _Net, variables: dict) -> list[interop.Rule]:
    def sub(name: str) -> dict:
        return {collection: tree[name] for collection, tree in variables.items() if name in tree}

    def target(*path: str) -> interop.Target:
        return interop.Target(("params", *path))

    return [
        *interop.conv_rules(
            "stem", kernel=target("stem", "kernel"), bias=target("stem", "bias"), features=4,
            in_features_per_group=4, kernel_size=(3, 3),
        ),
        *interop.under("features.0", "block", interop.rules_for(net.block, sub("block"))),
        *interop.under("features.1", "dynamic", interop.rules_for(net.dynamic, sub("dynamic"))),
        *interop.linear_rules("head", kernel=target("head", "kernel"), bias=target("head", "bias"), in_features=6,
                              features=3),
    ]  # fmt: skip


def test_a_model_composed_of_layer_rules_round_trips() -> None:
    block, _ = _branch_mix()
    net = _Net(block=block, dynamic=jl.DynamicConv(6, 3, num_experts=2))
    variables = jax.jit(net.init)(jax.random.key(1), X)
    rules = _net_rules(net, variables)
    state_dict = interop.torch_from_flax(rules, variables)
    assert "features.0.convs.1.1.running_mean" in state_dict
    assert state_dict["features.1.weight"].shape == (2, 6, 4, 3, 3)
    back = interop.flax_from_torch(rules, state_dict, dtype=lambda key: jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_torch_names_of_linen_gradients_leave_out_running_statistics() -> None:
    block, variables = _branch_mix()
    grads = jax.jit(jax.grad(lambda p: block.apply({**variables, "params": p}, X, use_running_average=True).sum()))(
        variables["params"]
    )
    named = interop.torch_names(block, grads)
    full = interop.linen_to_torch(block, {**variables, "params": grads})
    assert sorted(named) == sorted(key for key in full if not key.split(".")[-1].startswith(("running", "num_")))
    for key, value in named.items():
        np.testing.assert_array_equal(value, full[key], err_msg=key)
    assert named["convs.0.0.weight"].shape == (4, 4, 3, 3)  # PyTorch's (O, I, kh, kw)


def test_torch_names_of_a_whole_model_from_its_rules() -> None:
    block, _ = _branch_mix()
    net = _Net(block=block, dynamic=jl.DynamicConv(6, 3, num_experts=2))
    variables = jax.jit(net.init)(jax.random.key(1), X)
    named = interop.torch_names(_net_rules(net, variables), variables["params"])
    assert "features.0.convs.0.1.running_var" not in named
    np.testing.assert_array_equal(named["head.weight"], np.asarray(variables["params"]["head"]["kernel"]).T)


def test_torch_names_of_nnx_gradients() -> None:
    model = nnx.eval_shape(lambda: jn.ODConv(4, 6, (3, 3), 2, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda leaf: jnp.ones(leaf.shape, leaf.dtype), nnx.state(model))
    nnx.update(model, state)
    model.eval()
    grads = nnx.jit(nnx.grad(lambda m: m(X).sum()))(model)
    named = interop.torch_names(model, grads)
    assert "attention.bn.running_mean" not in named
    assert named["weight"].shape == (2, 6, 4, 3, 3)
    np.testing.assert_array_equal(named["attention.bn.weight"], np.asarray(grads["scale"][...]))
