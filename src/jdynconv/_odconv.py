"""ODConv (Omni-Dimensional Dynamic Convolution, Li et al., ICLR 2022), once, for the linen and NNX modules.

The original is ``modules/odconv.py`` of OSVAI/ODConv (commit 0901cc1ccd75757b40420447db20603d30bd2f74),
``Attention`` and ``ODConv2d``. Four attentions come from one squeezed descriptor of the input::

    h       = relu(BatchNorm(mean over space of x @ W_fc))       (B, A), A = max(int(C_in * reduction), min_channels)
    channel = sigmoid((h @ W_c + b_c) / T)                        (B, C_in)      scales the input channels
    filter  = sigmoid((h @ W_f + b_f) / T)                        (B, F)         scales the output channels
    spatial = sigmoid((h @ W_s + b_s) / T)                        (B, prod(K))   scales the kernel taps
    expert  = softmax((h @ W_e + b_e) / T)                        (B, k)         mixes the k expert kernels

    out[b] = filter[b] * conv(channel[b] * x[b], spatial[b] * sum_n expert[b, n] * W_n)

with the original's skip rules (the attention is 1 and its head does not exist): ``filter`` for a depthwise
conv (``C_in == G == F``), ``spatial`` for a kernel of one tap (1x1; the original's ``kernel_size == 1``),
``expert`` for one expert. Generalised to 1-D and 3-D by taking the mean over every spatial axis and one
spatial weight per kernel tap (row-major, as the original's ``view(..., k, k)``). The temperature ``T`` is a
call argument that may be traced (the original keeps it as module state, set by ``update_temperature`` and
annealed 30 -> 1 by its ``get_temperature``, which is :func:`jdynconv.temperature_schedule`).

**Where the channel and filter attentions are applied.** Convolution is linear in its input and in its kernel,
so ``conv(c * x, W) == conv(x, c * W)`` with ``c`` broadcast along the kernel's input-channel axis, and
``f * conv(x, W) == conv(x, f * W)`` with ``f`` along its output axis: each may scale the activations (the
original's choice: "when using the latter method the models will run faster with less gpu memory cost", in
PyTorch, where the product ``spatial * expert * weight`` is a materialised ``(B, k, *W)`` tensor) or be folded
into the per-sample kernel. Here the kernel is already built per sample (mix, then scale the taps: one fused
elementwise pass over ``B * |W|``), so folding adds a factor to every element of that pass, while scaling the
activations costs a pass over ``B * P * C`` (P positions) forward and, backward, a reduction of that size plus
the conv's input gradient where nothing else needs it (a first layer). :func:`choose_placement`
(``attention_placement="auto"``) therefore folds an attention into the kernel when a per-sample kernel is being
built anyway and it has no more elements per sample than the activations the attention would scale (``|W| =
prod(K) * C_in / G * F`` against ``P_in * C_in`` for the channel attention, ``P_out * F`` for the filter
attention): large feature maps (early layers) fold, small ones with many channels (deep layers) scale the
activations. With one expert and a 1x1 kernel there is no per-sample kernel (the original's
``_forward_impl_pw1x``): one shared conv with both attentions on the activations. ``benchmarks/odconv.py`` times
both placements on both sides of the crossover (64 channels, 3x3, 4 experts at 32x32, 16x16 and 8x8;
``docs/results/odconv/odconv_cpu.md``): the crossover it finds is where the rule puts it for the forward
and for training steps that need the input's gradient (every layer but the first); a step that does not (a
first layer, the benchmark's ``train`` pass) favours folding a little further, down to 16x16 there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdynconv import _batch_norm, _checks, _gates
from jdynconv._dtypes import promote_dtype
from jdynconv._lowering import canonical
from jdynconv.functional import METHODS, conv_spec, mix_kernels, per_sample_conv

PLACEMENTS: tuple[str, ...] = ("auto", "kernel", "activations")


def attention_width(in_channels: int, reduction: float, min_channels: int) -> int:
    """The original's ``attention_channel = max(int(in_planes * reduction), min_channel)``."""
    return max(int(in_channels * reduction), min_channels)


def has_filter_attention(in_channels: int, features: int, feature_group_count: int) -> bool:
    """False for a depthwise conv (``C_in == G == F``), as the original's ``func_filter = self.skip``."""
    return not in_channels == feature_group_count == features


def has_spatial_attention(kernel_size: tuple[int, ...]) -> bool:
    """False for a kernel of one tap (the original's ``kernel_size == 1``)."""
    return math.prod(kernel_size) > 1


def has_expert_attention(num_experts: int) -> bool:
    """False for one expert (the original's ``kernel_num == 1``)."""
    return num_experts > 1


def choose_placement(kernel_elements: int, activation_elements: int) -> str:
    """The ``attention_placement="auto"`` rule for one attention, per sample, when a per-sample kernel is built.

    Folding into the kernel costs one factor in the kernel's elementwise pass (``kernel_elements`` multiplies
    per sample); scaling the activations costs ``activation_elements`` multiplies forward and a reduction of
    that size backward. The smaller wins; a tie folds (one pass fewer).
    """
    return "kernel" if kernel_elements <= activation_elements else "activations"


def parameter_shapes(
    in_channels: int,
    features: int,
    kernel_size: tuple[int, ...],
    num_experts: int,
    feature_group_count: int,
    width: int,
    use_bias: bool,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every parameter of a layer, in creation order: ``name -> (shape, role)``; the heads of skipped attentions
    are absent. The role names the initialiser: ``"kernel"`` (the expert bank, each expert its own draw),
    ``"bias"``, ``"attention_kernel"``, ``"attention_bias"``, ``"scale"``, ``"offset"``."""
    shapes = {"kernel": ((num_experts, *kernel_size, in_channels // feature_group_count, features), "kernel")}
    if use_bias:
        shapes["bias"] = ((features,), "bias")
    shapes["attention_kernel"] = ((in_channels, width), "attention_kernel")
    shapes["scale"] = ((width,), "scale")
    shapes["offset"] = ((width,), "offset")
    heads = {"channel": in_channels}
    if has_filter_attention(in_channels, features, feature_group_count):
        heads["filter"] = features
    if has_spatial_attention(kernel_size):
        heads["spatial"] = math.prod(kernel_size)
    if has_expert_attention(num_experts):
        heads["expert"] = num_experts
    for head, size in heads.items():
        shapes[f"{head}_kernel"] = ((width, size), "attention_kernel")
        shapes[f"{head}_bias"] = ((size,), "attention_bias")
    return shapes


class ODConvParams(NamedTuple):
    """An ODConv layer's parameters (Flax layout, :func:`parameter_shapes`); skipped heads and bias are None.

    ``kernel (k, *K, C_in // G, F)``, ``bias (F,)``, ``attention_kernel (C_in, A)``, ``scale``/``offset``
    ``(A,)`` (the attention's BatchNorm), ``channel_kernel (A, C_in)``, ``channel_bias (C_in,)``,
    ``filter_kernel (A, F)``, ``filter_bias (F,)``, ``spatial_kernel (A, prod(K))``, ``spatial_bias
    (prod(K),)``, ``expert_kernel (A, k)``, ``expert_bias (k,)``.
    """

    kernel: jax.Array
    bias: jax.Array | None
    attention_kernel: jax.Array
    scale: jax.Array
    offset: jax.Array
    channel_kernel: jax.Array
    channel_bias: jax.Array
    filter_kernel: jax.Array | None
    filter_bias: jax.Array | None
    spatial_kernel: jax.Array | None
    spatial_bias: jax.Array | None
    expert_kernel: jax.Array | None
    expert_bias: jax.Array | None

    @classmethod
    def of(cls, values: dict[str, jax.Array]) -> ODConvParams:
        return cls(**{name: values.get(name) for name in cls._fields})


class Attentions(NamedTuple):
    """``channel (B, C_in)``, ``filter (B, F)``, ``spatial (B, prod(K))``, ``expert (B, k)``; None where skipped."""

    channel: jax.Array
    filter: jax.Array | None
    spatial: jax.Array | None
    expert: jax.Array | None


@dataclasses.dataclass(frozen=True)
class ODConvConfig:
    """The attributes of the linen and NNX ``ODConv`` that the maths needs."""

    features: int
    kernel_size: Any
    num_experts: int
    reduction: float
    min_channels: int
    temperature: float
    strides: Any
    padding: Any
    kernel_dilation: Any
    feature_group_count: int
    momentum: float
    epsilon: float
    unbiased_running_var: bool
    attention_placement: str
    method: str
    dtype: Any
    precision: Any
    axis_name: str | tuple[str, ...] | None = None

    @property
    def norm(self) -> _batch_norm.NormConfig:
        return _batch_norm.NormConfig(self.momentum, self.epsilon, self.unbiased_running_var, self.axis_name)


def check_config(
    features: Any,
    num_experts: Any,
    feature_group_count: Any,
    reduction: Any,
    min_channels: Any,
    temperature: Any,
    attention_placement: Any,
    method: Any,
    *,
    kernel_size: Any = 1,
    strides: Any = 1,
    padding: Any = "VALID",
    kernel_dilation: Any = 1,
    momentum: Any = 0.9,
    epsilon: Any = 1e-5,
) -> None:
    """Validates the attributes that do not depend on the inputs, at construction; every error names the
    attribute."""
    _checks.check_conv_attributes(
        features=features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
    )
    _checks.check_positive_int("num_experts", num_experts)
    _checks.check_positive_int("min_channels", min_channels)
    _checks.check_batch_norm_attributes(momentum, epsilon)
    _checks.check_positive_number("reduction", reduction)
    _checks.check_temperature(temperature)
    if attention_placement not in PLACEMENTS:
        raise ValueError(f"`attention_placement` must be one of {PLACEMENTS}, got {attention_placement!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision: Any) -> jax.Array:
    out = jnp.matmul(x, kernel, precision=precision)
    return out if bias is None else out + bias[None, :]


def attentions(
    config: ODConvConfig,
    inputs: jax.Array,
    temperature: Any,
    params: ODConvParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
) -> tuple[Attentions, tuple[jax.Array, jax.Array]]:
    """The original's ``Attention.forward`` on channels-last ``inputs (B, *spatial, C_in)``.

    Returns the four attentions (None where skipped) and the BatchNorm's new running ``(mean, var)``
    (unchanged unless ``training``). Everything is per sample but the BatchNorm's batch statistics, whose
    ``(A,)`` sums are the only values combined over the batch (an all-reduce under a batch-sharded ``jit``,
    ``axis_name`` inside ``shard_map``).
    """
    pooled, *heads = promote_dtype(
        (
            _gates.spatial_mean(inputs),
            params.attention_kernel,
            params.scale,
            params.offset,
            params.channel_kernel,
            params.channel_bias,
            params.filter_kernel,
            params.filter_bias,
            params.spatial_kernel,
            params.spatial_bias,
            params.expert_kernel,
            params.expert_bias,
        ),
        dtype=config.dtype,
    )
    fc, scale, offset, channel_w, channel_b, filter_w, filter_b, spatial_w, spatial_b, expert_w, expert_b = heads
    hidden = _dense(pooled, fc, None, config.precision)
    hidden, stats = _batch_norm.batch_norm(hidden, scale, offset, mean, var, training=training, norm=config.norm)
    hidden = jax.nn.relu(hidden)
    temperature = jnp.asarray(temperature, hidden.dtype)

    def head(kernel: jax.Array | None, bias: jax.Array | None, activation: Any) -> jax.Array | None:
        if kernel is None:
            return None
        return activation(_dense(hidden, kernel, bias, config.precision) / temperature)

    softmax = lambda logits: jax.nn.softmax(logits, axis=-1)  # noqa: E731
    found = Attentions(
        channel=head(channel_w, channel_b, jax.nn.sigmoid),
        filter=head(filter_w, filter_b, jax.nn.sigmoid),
        spatial=head(spatial_w, spatial_b, jax.nn.sigmoid),
        expert=head(expert_w, expert_b, softmax),
    )
    return found, stats


def _channel_factor(channel: jax.Array, groups: int, features: int, kernel_rank: int) -> jax.Array:
    """``channel (B, C_in)`` as a factor of kernels ``(B, *K, C_in // G, F)``: output ``o`` of group ``g`` reads
    input channels ``g * C_in / G + i``, so ``factor[b, ..., i, o] = channel[b, (o // (F / G)) * C_in / G + i]``."""
    batch, in_channels = channel.shape
    per_group = channel.reshape(batch, groups, in_channels // groups)
    factor = jnp.repeat(jnp.swapaxes(per_group, 1, 2), features // groups, axis=2)  # (B, C_in // G, F)
    return factor.reshape(batch, *(1,) * kernel_rank, in_channels // groups, features)


def od_conv(
    config: ODConvConfig,
    inputs: jax.Array,
    temperature: Any,
    params: ODConvParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """ODConv on channels-last ``inputs (B, *spatial, C_in)``: ``(B, *out_spatial, F)`` and the new running stats.

    The convolution is :func:`jdynconv.per_sample_conv` (batch-parallel under SPMD), or XLA's shared-kernel
    conv where no kernel depends on the sample (one expert, one tap, attentions on the activations), which XLA
    partitions over the batch itself.
    """
    _checks.check_temperature(temperature)
    # An empty batch has no statistics to normalise by or learn from: its (empty) output is the running
    # statistics' and they stay as they were, as PyTorch's BatchNorm does for a batch of size 0.
    training = training and inputs.shape[0] > 0
    found, stats = attentions(config, inputs, temperature, params, mean, var, training=training)
    inputs, bank, bias, channel, filter_, spatial, expert = promote_dtype(
        (inputs, params.kernel, params.bias, *found), dtype=config.dtype
    )
    batch, *spatial_shape, in_channels = inputs.shape
    _, *kernel_size, group_in, features = bank.shape
    groups = config.feature_group_count
    spec = conv_spec(
        spatial_shape,
        kernel_size,
        strides=config.strides,
        padding=config.padding,
        kernel_dilation=config.kernel_dilation,
        input_dilation=1,
        feature_group_count=groups,
        precision=config.precision,
    )
    out_positions = math.prod(canonical.output_spatial_shape(spatial_shape, kernel_size, spec))
    per_sample_kernel = spatial is not None or expert is not None or config.attention_placement == "kernel"
    kernel_elements = math.prod(kernel_size) * group_in * features
    channel_on_kernel = filter_on_kernel = per_sample_kernel and config.attention_placement == "kernel"
    if per_sample_kernel and config.attention_placement == "auto":
        channel_on_kernel = choose_placement(kernel_elements, math.prod(spatial_shape) * in_channels) == "kernel"
        filter_on_kernel = choose_placement(kernel_elements, out_positions * features) == "kernel"
    filter_on_kernel = filter_on_kernel and filter_ is not None

    num_spatial = len(spatial_shape)
    if not channel_on_kernel:
        inputs = inputs * channel.reshape(batch, *(1,) * num_spatial, in_channels)
    if per_sample_kernel:
        kernels = bank[:1] if expert is None else mix_kernels(bank, expert, precision=config.precision)
        if spatial is not None:
            kernels = kernels * spatial.reshape(batch, *kernel_size, 1, 1)
        if channel_on_kernel:
            kernels = kernels * _channel_factor(channel, groups, features, num_spatial)
        if filter_on_kernel:
            kernels = kernels * filter_.reshape(batch, *(1,) * num_spatial, 1, features)
        out = per_sample_conv(
            inputs,
            kernels,
            strides=spec.strides,
            padding=spec.pads,
            kernel_dilation=spec.kernel_dilation,
            feature_group_count=groups,
            precision=config.precision,
            method=config.method,
        )
    else:
        out = canonical.shared_conv(inputs, bank[0], spec, groups)
    if filter_ is not None and not filter_on_kernel:
        out = out * filter_.reshape(batch, *(1,) * num_spatial, features)
    if bias is not None:
        out = out + bias.reshape(*(1,) * (num_spatial + 1), features)
    return out, stats
