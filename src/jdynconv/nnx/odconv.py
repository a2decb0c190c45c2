"""flax.nnx ODConv: the NNX twin of :class:`jdynconv.linen.ODConv`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _checks, _odconv
from jdynconv.linen._common import Dtype, Initializer, branch_bank_init, ones, zeros
from jdynconv.linen.odconv import kaiming_normal_fan_out
from jdynconv.nnx._common import nnx_layer_config


class ODConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.ODConv` (see it for the maths and every attribute): the same
    variables under the same names, ``nnx.Param`` and ``nnx.BatchStat``. The attention's BatchNorm follows
    ``model.train()`` / ``model.eval()`` (the ``use_running_average`` attribute).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      use_running_average: the attention BatchNorm's mode; ``model.train()`` sets it to False,
        ``model.eval()`` to True.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        num_experts: int = 4,
        *,
        reduction: float = 0.0625,
        min_channels: int = 16,
        temperature: float = 1.0,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        unbiased_running_var: bool = False,
        attention_placement: str = "auto",
        method: str = "auto",
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = kaiming_normal_fan_out,
        bias_init: Initializer = zeros,
        attention_kernel_init: Initializer = kaiming_normal_fan_out,
        attention_bias_init: Initializer = zeros,
        scale_init: Initializer = ones,
        offset_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        _odconv.check_config(
            features,
            num_experts,
            feature_group_count,
            reduction,
            min_channels,
            temperature,
            attention_placement,
            method,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            momentum=momentum,
            epsilon=epsilon,
        )
        layer = nnx_layer_config(
            in_features,
            features,
            kernel_size,
            num_experts,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            dtype=dtype,
            precision=precision,
            mixing="auto",
            method=method,
        )
        self.in_features = in_features
        self.use_running_average = use_running_average
        self.config = _odconv.ODConvConfig(
            features=features,
            kernel_size=layer.kernel_size,
            num_experts=num_experts,
            reduction=reduction,
            min_channels=min_channels,
            temperature=temperature,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            momentum=momentum,
            epsilon=epsilon,
            unbiased_running_var=unbiased_running_var,
            attention_placement=attention_placement,
            method=method,
            dtype=dtype,
            precision=precision,
            axis_name=axis_name,
        )
        width = _odconv.attention_width(in_features, reduction, min_channels)
        inits = {
            "kernel": branch_bank_init(kernel_init),
            "bias": bias_init,
            "attention_kernel": attention_kernel_init,
            "attention_bias": attention_bias_init,
            "scale": scale_init,
            "offset": offset_init,
        }
        shapes = _odconv.parameter_shapes(
            in_features, features, layer.kernel_size, num_experts, feature_group_count, width, use_bias
        )
        for name in _odconv.ODConvParams._fields:
            if name in shapes:
                shape, role = shapes[name]
                setattr(self, name, nnx.Param(inits[role](rngs.params(), shape, param_dtype)))
            else:
                setattr(self, name, None)
        self.mean = nnx.BatchStat(jnp.zeros((width,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((width,), jnp.float32))

    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Applies the layer: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        The other arguments are :meth:`jdynconv.linen.ODConv.__call__`'s.

        Args:
          use_running_average: the attention BatchNorm's mode for this call; None: the attribute.
        """
        inputs = _checks.as_array("inputs", inputs)
        num_spatial = len(self.config.kernel_size)
        _checks.check_layer_inputs(inputs, self.in_features, self.config.feature_group_count, num_spatial)
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        values = {name: getattr(self, name) for name in _odconv.ODConvParams._fields}
        params = _odconv.ODConvParams.of({name: value[...] for name, value in values.items() if value is not None})
        out, (new_mean, new_var) = _odconv.od_conv(
            self.config,
            inputs,
            self.config.temperature if temperature is None else temperature,
            params,
            self.mean[...],
            self.var[...],
            training=not use_running_average,
        )
        if not use_running_average:
            self.mean[...] = new_mean
            self.var[...] = new_var
        return out
