"""flax.linen ODConv: kernels scaled per sample along taps, input and output channels and experts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _checks, _odconv
from jdynconv.linen._common import Dtype, Initializer, branch_bank_init, check_inputs_against_bank, ones, zeros

# ODConv's initialisation (OSVAI/ODConv modules/odconv.py): ``kaiming_normal_(mode="fan_out",
# nonlinearity="relu")`` for every expert kernel and the attention's 1x1 convs, i.e. N(0, 2 / fan_out),
# untruncated; fan_out = C_out * prod(K) in both layouts.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ODConv(nn.Module):
    """ODConv (Li et al., ICLR 2022): kernels scaled per sample along taps, input and output channels and experts.

    The maths (``jdynconv._odconv``, after OSVAI/ODConv ``modules/odconv.py``)::

        h = relu(BatchNorm(mean over space of x @ attention_kernel))        (B, A)
        channel, filter, spatial = sigmoid(Dense_c, Dense_f, Dense_s of h / temperature)
        expert = softmax(Dense_e(h) / temperature)
        out[b] = filter[b] * conv(channel[b] * x[b],
                                  spatial[b] * sum_n expert[b, n] * kernel[n])  (+ bias)

    with ``A = max(int(C_in * reduction), min_channels)``. Skipped as in the original (no head, attention 1):
    ``filter`` for a depthwise conv (``C_in == feature_group_count == features``), ``spatial`` for a one-tap
    kernel, ``expert`` for ``num_experts == 1``. N-d (1-D/2-D/3-D) from the input's rank. The temperature is
    a call argument that may be traced (anneal it with :func:`jdynconv.temperature_schedule`, e.g. 30 -> 1 as
    the original's training script), or the ``temperature`` attribute when not given.

    Variables: ``params``: ``kernel (k, *kernel_size, C_in // G, features)``, ``bias (features,)`` (if
    ``use_bias``; the original has none), ``attention_kernel (C_in, A)``, ``scale``, ``offset`` ``(A,)``
    (the attention's BatchNorm), ``channel_kernel (A, C_in)``, ``channel_bias (C_in,)``, ``filter_kernel
    (A, features)``, ``filter_bias (features,)``, ``spatial_kernel (A, prod(kernel_size))``, ``spatial_bias
    (prod(kernel_size),)``, ``expert_kernel (A, k)``, ``expert_bias (k,)``; ``batch_stats``: ``mean``,
    ``var`` ``(A,)``.

    Attributes:
      features: output channels.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      num_experts: k >= 1 expert kernels (the original's ``kernel_num``, default 4).
      reduction: the attention's width is ``max(int(C_in * reduction), min_channels)`` (the original's
        default 0.0625).
      min_channels: the attention's smallest width (the original's default 16).
      temperature: the default of the call's ``temperature``; positive.
      strides: an int or one int per spatial dim (as ``flax.linen.Conv``).
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one
        ``(low, high)`` per spatial dim (as ``flax.linen.Conv``).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether the conv has a bias (the original has none).
      momentum: the attention BatchNorm's, in Flax's convention (PyTorch's ``momentum=0.1`` is 0.9).
      epsilon: the attention BatchNorm's, added to the variance.
      use_running_average: the attention BatchNorm's mode; may instead be given at call time.
      unbiased_running_var: update the running variance with the unbiased batch variance, as PyTorch does.
      attention_placement: ``"auto"``, ``"kernel"`` or ``"activations"``: where the channel and filter
        attentions are applied (same result; see ``jdynconv._odconv``).
      method: the per-sample conv's lowering, as :func:`jdynconv.per_sample_conv`'s.
      axis_name: as :class:`BranchMixConv`'s: the mesh axis (or axes) the batch is split over inside
        ``jax.shard_map``, for the attention BatchNorm's statistics.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      kernel_init: each expert's kernel (default: the original's kaiming normal, fan out).
      bias_init: the conv bias's initialiser.
      attention_kernel_init: the attention Dense layers' kernel initialiser (default: the original's).
      attention_bias_init: the attention Dense layers' bias initialiser.
      scale_init: the attention BatchNorm scale's initialiser.
      offset_init: the attention BatchNorm offset's initialiser.
    """

    features: int
    kernel_size: int | Sequence[int]
    num_experts: int = 4
    reduction: float = 0.0625
    min_channels: int = 16
    temperature: float = 1.0
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_running_average: bool | None = None
    unbiased_running_var: bool = False
    attention_placement: str = "auto"
    method: str = "auto"
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = zeros
    attention_kernel_init: Initializer = kaiming_normal_fan_out
    attention_bias_init: Initializer = zeros
    scale_init: Initializer = ones
    offset_init: Initializer = zeros

    def __post_init__(self) -> None:
        _odconv.check_config(  # at construction: every attribute error names the attribute
            self.features,
            self.num_experts,
            self.feature_group_count,
            self.reduction,
            self.min_channels,
            self.temperature,
            self.attention_placement,
            self.method,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            momentum=self.momentum,
            epsilon=self.epsilon,
        )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          temperature: positive; divides every attention logit. None: the ``temperature`` attribute. A traced
            value is the caller's to keep positive (checked when concrete).
          use_running_average: the attention's BatchNorm mode, if not set as an attribute.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        inputs = _checks.as_array("inputs", inputs)
        check_inputs_against_bank(self, inputs)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        kernel_size = _checks.canonicalize_ints(self.kernel_size, inputs.ndim - 2, "kernel_size")
        in_channels = inputs.shape[-1]
        width = _odconv.attention_width(in_channels, self.reduction, self.min_channels)
        inits = {
            "kernel": branch_bank_init(self.kernel_init),
            "bias": self.bias_init,
            "attention_kernel": self.attention_kernel_init,
            "attention_bias": self.attention_bias_init,
            "scale": self.scale_init,
            "offset": self.offset_init,
        }
        shapes = _odconv.parameter_shapes(
            in_channels, self.features, kernel_size, self.num_experts, self.feature_group_count, width, self.use_bias
        )
        params = {
            name: self.param(name, inits[role], shape, self.param_dtype) for name, (shape, role) in shapes.items()
        }
        mean = self.variable("batch_stats", "mean", jnp.zeros, (width,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (width,), jnp.float32)
        out, (new_mean, new_var) = _odconv.od_conv(
            self._config(kernel_size),
            inputs,
            self.temperature if temperature is None else temperature,
            _odconv.ODConvParams.of(params),
            mean.value,
            var.value,
            training=not use_running_average,
        )
        if not use_running_average and not self.is_initializing():
            mean.value, var.value = new_mean, new_var
        return out

    def _config(self, kernel_size: tuple[int, ...]) -> _odconv.ODConvConfig:
        return _odconv.ODConvConfig(
            features=self.features,
            kernel_size=kernel_size,
            num_experts=self.num_experts,
            reduction=self.reduction,
            min_channels=self.min_channels,
            temperature=self.temperature,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            momentum=self.momentum,
            epsilon=self.epsilon,
            unbiased_running_var=self.unbiased_running_var,
            attention_placement=self.attention_placement,
            method=self.method,
            dtype=self.dtype,
            precision=self.precision,
            # As flax.linen.BatchNorm: no collective while initialising, which runs outside the shard_map.
            axis_name=None if self.is_initializing() else self.axis_name,
        )
