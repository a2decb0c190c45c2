"""``_batch_parallel``: without a mesh the function runs as it is (the multi-device behaviour is tested on
forced host devices in tests/spmd/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jdynconv as jdc
from jdynconv._lowering import batch_parallel, im2col
from tests.helpers import equations


def test_without_a_mesh_the_program_is_the_lowering_itself() -> None:
    x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((4, 3, 3, 3, 5))
    assert batch_parallel.batch_axes(x)[1] == ()
    assert not equations("shard_map", lambda x, w: jdc.per_sample_conv(x, w), x, w)
    wrapped = jax.make_jaxpr(lambda x, w: jdc.per_sample_conv(x, w, method="im2col"))(x, w)
    direct = jax.make_jaxpr(
        lambda x, w: jdc.functional._in_layout(
            im2col.conv_im2col_method,
            False,
            jdc.functional.conv_spec(
                (8, 8), (3, 3), strides=1, padding="SAME", kernel_dilation=1, input_dilation=1, feature_group_count=1
            ),
        )(x, w)
    )(x, w)
    assert str(wrapped) == str(direct)
