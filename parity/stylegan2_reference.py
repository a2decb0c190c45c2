"""A clean-room PyTorch reference of StyleGAN2's modulated convolution and its synthesis layers.

Apache-2.0, jdynconv's own. Written from the published equations and definitions below, not from NVIDIA's
code; ``parity/check_against_nvidia.py`` compares it with NVIDIA's stylegan2-ada-pytorch on a checkout the
user supplies (that code is under a non-commercial licence and is not part of this repository).

What each piece is written from:

* Modulation and demodulation: Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"
  (CVPR), section 2.2, eqs. 1-3: ``w'_ijk = s_i * w_ijk`` (input channel ``i``, output channel ``j``, tap
  ``k``) and ``w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk ** 2 + eps)`` with ``eps = 1e-8``. Two equal ways to
  run them: per-sample kernels in one grouped convolution, one group per sample (``fused_modconv=True``, the
  paper's implementation), or, as the section observes that modulating the weights equals scaling the input
  feature maps, the styles scaling the activations and eq. 3's factor (which depends on ``j`` only) scaling the
  output of one shared convolution (``fused_modconv=False``; equal by linearity).
* The noise input (per-pixel Gaussian noise, one channel broadcast over the channels, times a learned strength),
  the bias and the leaky ReLU of slope 0.2: the StyleGAN papers (Karras et al. 2019, section 2 and appendix C;
  2020, figure 2).
* Equalised learning rate (Karras et al. 2018, "Progressive Growing of GANs", section 4.1): weights drawn from
  N(0, 1) and scaled at run time by ``1 / sqrt(fan_in)``; the affine's learning-rate multiplier (Karras et al.
  2019, appendix C), stored weights divided by it and used times it; the affine's bias initialised to 1 (the
  same appendix). The activation's gain ``sqrt(2)`` for leaky ReLU (He et al. 2015's constant for rectifiers).
* ``conv_clamp``: the clamp of every convolution layer's output to ``[-clamp, clamp]`` (Karras et al. 2020,
  "Training Generative Adversarial Networks with Limited Data", its mixed-precision appendix).
* Resampling: the multirate signal-processing definition of ``upfirdn`` (up-sample by zero insertion, pad,
  FIR filter, down-sample by keeping every ``down``-th sample), with the binomial filter ``[1, 3, 3, 1]`` that
  StyleGAN uses (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"), normalised to sum 1 and
  times ``up ** 2`` after zero insertion so that a constant image stays constant. The padding arithmetic that
  aligns the filter with the pixel grid is derived in :func:`conv2d_resample`'s docstring.
* Interface: the constructor signatures, attribute names and parameter/buffer names of stylegan2-ada-pytorch's
  ``training/networks.py`` ``FullyConnectedLayer``, ``SynthesisLayer`` and ``ToRGBLayer``, so that their state
  dicts load here (and into ``jdynconv.interop``) unchanged; the ``resample_filter`` buffer is stored as there:
  1-D taps shorter than 8 become their normalised 2-D outer product, longer ones stay 1-D (separable).

Differences from NVIDIA's modules, by design: no CUDA kernels, gradient-fix ops or half-precision
pre-scaling (this is a float32/float64 CPU reference); ``activation`` is ``"lrelu"`` or ``"linear"``;
``SynthesisLayer.forward`` takes an extra keyword-only ``noise`` (the unscaled noise of ``noise_mode="random"``,
``(B, 1, resolution, resolution)``) so tests can give jdynconv and this reference the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPSILON = 1e-8
LRELU_SLOPE = 0.2
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": math.sqrt(2.0)}
# From this many taps on, 1-D taps are kept 1-D (separable) in the ``resample_filter`` buffer, as in the
# checkpoints of stylegan2-ada-pytorch; shorter ones are stored as their 2-D outer product.
SEPARABLE_MIN_TAPS = 8

PaddingLike = int | Sequence[int]


def setup_filter(taps: object, *, normalize: bool = True) -> torch.Tensor:
    """A FIR filter as a float32 tensor: 1-D taps become the 2-D filter ``outer(taps, taps)`` below
    ``SEPARABLE_MIN_TAPS`` taps and stay 1-D (applied along both axes) from there; a 2-D filter stays 2-D.
    With ``normalize``, divided by its sum (a 2-D filter sums to 1; a separable one's outer product does)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"`taps` must be 1-D or 2-D and not empty, got shape {tuple(f.shape)}.")
    if f.ndim == 1 and f.numel() < SEPARABLE_MIN_TAPS:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def _filter_2d(f: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``f`` as a 2-D ``(fh, fw)`` filter in ``like``'s dtype; None is the identity ``[[1]]``."""
    if f is None:
        return torch.ones((1, 1), dtype=like.dtype, device=like.device)
    f = f.to(like.dtype)
    return torch.outer(f, f) if f.ndim == 1 else f


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """``(fh, fw)``: a 1-D (separable) filter has its length along both axes."""
    if f is None:
        return 1, 1
    return (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[0], f.shape[1])


def _parse_padding(padding: PaddingLike) -> tuple[int, int, int, int]:
    """``(x0, x1, y0, y1)`` (left, right, top, bottom) from an int, ``(px, py)`` or ``(x0, x1, y0, y1)``."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    values = tuple(int(p) for p in padding)
    if len(values) == 2:
        return values[0], values[0], values[1], values[1]
    if len(values) == 4:
        return values  # type: ignore[return-value]
    raise ValueError(f"`padding` must be an int, (px, py) or (x0, x1, y0, y1), got {padding!r}.")


def _pad_or_crop(x: torch.Tensor, x0: int, x1: int, y0: int, y1: int) -> torch.Tensor:
    """Zero-pad ``(B, C, H, W)`` by the positive amounts and crop by the negative ones."""
    x = F.pad(x, (max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)))
    return x[:, :, max(-y0, 0) : x.shape[2] - max(-y1, 0), max(-x0, 0) : x.shape[3] - max(-x1, 0)]


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    *,
    up: int = 1,
    down: int = 1,
    padding: PaddingLike = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Up-sample, pad, FIR-filter, down-sample: ``(B, C, H, W)`` -> ``(B, C, H', W')``.

    1. Zero insertion: ``up - 1`` zeros after every pixel along each axis (``H * up`` rows).
    2. ``padding`` ``(x0, x1, y0, y1)`` zeros left, right, top, bottom (negative values crop).
    3. The filter ``f * gain`` (2-D, or 1-D along both axes) over the valid positions, channel by channel: a true
       convolution (the correlation with the flipped filter), or with ``flip_filter`` the correlation itself.
    4. Every ``down``-th pixel, from the first.

    Returns ``H' = (H * up + y0 + y1 - fh) // down + 1`` rows and likewise ``W'`` columns.
    """
    x0, x1, y0, y1 = _parse_padding(padding)
    batch, channels, height, width = x.shape
    if up > 1:
        x = F.pad(x.reshape(batch, channels, height, 1, width, 1), (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(batch, channels, height * up, width * up)
    x = _pad_or_crop(x, x0, x1, y0, y1)
    taps = _filter_2d(f, x) * gain
    if not flip_filter:
        taps = taps.flip([0, 1])
    x = F.conv2d(x, taps.expand(channels, 1, *taps.shape), groups=channels)
    return x[:, :, ::down, ::down]


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: PaddingLike = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> torch.Tensor:
    """A 2-D convolution with FIR up- or down-sampling: ``x (B, I, H, W)``, ``w (O, I // groups, kh, kw)``.

    Definition, per axis (``x0, x1`` along W, ``y0, y1`` along H): zero insertion by ``up``, padding by
    ``padding`` plus the filter's alignment padding ``(a, b)`` below, the filter ``f`` with gain ``up ** 2``
    (only when ``up > 1``), a valid correlation with ``w`` (with the kernel flipped, i.e. a true convolution,
    when not ``flip_weight``), then the filter ``f`` and every ``down``-th pixel (only when ``down > 1``).

    Alignment padding ``(a, b)``, derived for one axis and a filter of ``n`` taps. Index pixels by their centres.
    A valid true convolution after a left padding ``a`` centres output ``m``'s filter (tap ``(n - 1) / 2``) on
    index ``m + (n - 1) / 2 - a`` of the unpadded signal. Choose ``a`` so that this is where output pixel ``m``
    is, and ``b`` so that the output has exactly the intended length.

    * ``up``: input pixel ``i`` spans output pixels ``i * up .. i * up + up - 1`` (centre ``i * up + (up - 1) / 2``)
      but zero insertion puts it at index ``i * up``: index ``j`` lies at output position ``j + (up - 1) / 2``.
      Centring on output ``m``: ``m + (n - 1) / 2 - a + (up - 1) / 2 = m``, so ``a = (n + up - 2) / 2``, rounded
      up when not an integer: ``a = (n + up - 1) // 2``. ``up * H`` outputs from ``up * H`` samples need
      ``a + b = n - 1``: ``b = (n - up) // 2`` (the numerators ``n + up - 1`` and ``n - up`` sum to the odd
      ``2n - 1``, so their floors sum to ``n - 1``).
    * ``down``: output ``m`` is filtered index ``m * down`` and spans input pixels ``m * down .. m * down + down -
      1`` (centre ``m * down + (down - 1) / 2``). Centring: ``m * down + (n - 1) / 2 - a = m * down + (down - 1) /
      2``, so ``a = (n - down) / 2``, rounded up: ``a = (n - down + 1) // 2``. With ``b = (n - down) // 2``,
      ``a + b = n - down``: the filtered length is ``H - down + 1`` and every ``down``-th sample from the first
      gives ``ceil((H - down + 1) / down) = H // down`` outputs.

    Then ``padding = k // 2`` for an odd ``k x k`` kernel adds ``k - 1`` around a valid conv that removes
    ``k - 1``: ``up=2`` gives ``2H x 2W`` and ``down=2`` gives ``H/2 x W/2`` (even ``H, W``).

    Computed as the cheapest equal form (valid convolutions and filters commute, being linear and
    shift-invariant): ``up``: the transposed convolution with stride ``up`` (the zero insertion and the
    correlation in one), then the filter with its padding less ``k - 1`` before and ``k - up`` after (what the
    transposed convolution's full output already covers); ``down``: the padded filter, then the correlation with
    stride ``down``; both: the definition as written.
    """
    px0, px1, py0, py1 = _parse_padding(padding)
    fh, fw = _filter_size(f)
    out_channels, _, kh, kw = w.shape
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    w_corr = w if flip_weight else w.flip([2, 3])  # the kernel a plain correlation (F.conv2d) takes

    if up > 1 and down > 1:
        x = upfirdn2d(x, f, up=up, padding=(px0, px1, py0, py1), flip_filter=flip_filter, gain=up**2)
        x = F.conv2d(x, w_corr, groups=groups)
        return upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    if up > 1:
        # conv_transpose2d adds x[i] * K[t] at output i * up + t: the correlation of the zero-inserted input with
        # K flipped. Its weight layout is (I, O // groups, kh, kw).
        in_per_group = w.shape[1]
        transposed = w_corr.flip([2, 3]).reshape(groups, out_channels // groups, in_per_group, kh, kw)
        transposed = transposed.transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, kh, kw)
        x = F.conv_transpose2d(x, transposed, stride=up, groups=groups)
        pads = (px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up))
        return upfirdn2d(x, f, padding=pads, flip_filter=flip_filter, gain=up**2)
    if down > 1:
        x = upfirdn2d(x, f, padding=(px0, px1, py0, py1), flip_filter=flip_filter)
        return F.conv2d(x, w_corr, stride=down, groups=groups)
    return F.conv2d(_pad_or_crop(x, px0, px1, py0, py1), w_corr, groups=groups)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: PaddingLike = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """Modulated (and demodulated) convolution: ``x (B, I, H, W)``, ``weight (O, I, kh, kw)``, ``styles (B, I)``.

    Per sample ``b``: ``w_b = weight * styles[b]`` over the input channels (eq. 1); with ``demodulate``, each
    output channel of ``w_b`` divided by ``sqrt(sum over (I, kh, kw) of w_b ** 2 + 1e-8)`` (eq. 3); then
    :func:`conv2d_resample` with ``resample_filter`` (a :func:`setup_filter` result), ``up``, ``down``,
    ``padding`` and ``flip_weight``; then ``noise`` (broadcast to the output) is added.

    ``fused_modconv=True`` builds the per-sample kernels and runs one grouped convolution (group ``b`` is
    sample ``b``); ``False`` scales the activations by the styles, runs the shared ``weight`` and scales the
    output by the demodulation factors, which are computed as ``rsqrt(styles ** 2 @ sum_taps(weight ** 2).T +
    eps)``, the same sum regrouped.

    Returns ``(B, O, H', W')`` in ``x``'s dtype, ``H'`` as :func:`conv2d_resample`'s.
    """
    batch, in_channels, height, width = x.shape
    out_channels, kernel_in, kh, kw = weight.shape
    if kernel_in != in_channels or tuple(styles.shape) != (batch, in_channels):
        raise ValueError(
            f"Expected x (B, I, H, W), weight (O, I, kh, kw), styles (B, I); got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, styles {tuple(styles.shape)}."
        )
    resample = {"f": resample_filter, "up": up, "down": down, "padding": padding, "flip_weight": flip_weight}
    if fused_modconv:
        w = weight[None] * styles[:, None, :, None, None]  # (B, O, I, kh, kw)
        if demodulate:
            w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4)) + EPSILON)[:, :, None, None, None]
        w = w.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype)
        out = conv2d_resample(x.reshape(1, batch * in_channels, height, width), w, groups=batch, **resample)
        out = out.reshape(batch, out_channels, *out.shape[2:])
    else:
        out = conv2d_resample(x * styles.to(x.dtype)[:, :, None, None], weight.to(x.dtype), **resample)
        if demodulate:
            energy = weight.square().sum(dim=(2, 3))  # (O, I)
            factors = torch.rsqrt(styles.square() @ energy.t() + EPSILON)  # (B, O)
            out = out * factors.to(x.dtype)[:, :, None, None]
    if noise is not None:
        out = out + noise.to(out.dtype)
    return out


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``x + b`` (``b`` along dim 1), the activation (``"linear"`` or leaky ReLU of slope 0.2, ``"lrelu"``),
    times ``gain`` (default: the activation's, ``sqrt(2)`` for ``"lrelu"``), clamped to ``[-clamp, clamp]``.
    Returns ``x``'s shape."""
    if act not in ACTIVATION_GAINS:
        raise ValueError(f"`act` must be one of {tuple(ACTIVATION_GAINS)}, got {act!r}.")
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *(1,) * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    gain = ACTIVATION_GAINS[act] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class FullyConnectedLayer(torch.nn.Module):
    """A linear layer with an equalised learning rate: ``x @ (weight * weight_gain).T + bias * bias_gain``, then
    the activation; ``weight_gain = lr_multiplier / sqrt(in_features)``, ``bias_gain = lr_multiplier``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1,
        bias_init: float = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_GAINS:
            raise ValueError(f"`activation` must be one of {tuple(ACTIVATION_GAINS)}, got {activation!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.lr_multiplier = lr_multiplier
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_features)`` -> ``(B, out_features)``."""
        out = x @ (self.weight * self.weight_gain).to(x.dtype).t()
        bias = None if self.bias is None else self.bias * self.bias_gain
        return bias_act(out, bias, act=self.activation)


class SynthesisLayer(torch.nn.Module):
    """StyleGAN2's modulated 3x3 layer: affine of ``w`` -> styles, modulated and demodulated convolution (with
    ``up``-sampling), noise, bias, activation (times its gain), clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_GAINS:
            raise ValueError(f"`activation` must be one of {tuple(ACTIVATION_GAINS)}, got {activation!r}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATION_GAINS[activation]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        # Registered in the checkpoints' order: parameters weight, noise_strength, bias; buffers resample_filter,
        # noise_const.
        self.weight = torch.nn.Parameter(weight.to(memory_format=memory_format))
        if use_noise:
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1,
        *,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, in_channels, resolution // up, resolution // up)``, ``w (B, w_dim)`` ->
        ``(B, out_channels, resolution, resolution)``.

        ``noise_mode``: ``"random"`` (fresh ``torch.randn`` noise ``(B, 1, resolution, resolution)``, or the
        ``noise`` given), ``"const"`` (the ``noise_const`` buffer) or ``"none"``; the noise is scaled by
        ``noise_strength``. ``gain`` multiplies the activation's gain and the clamp.
        """
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"`noise_mode` must be 'random', 'const' or 'none', got {noise_mode!r}.")
        if noise is not None and (noise_mode != "random" or not self.use_noise):
            raise ValueError(
                f"`noise` is used only with noise_mode='random' and use_noise, got noise_mode={noise_mode!r} and "
                f"use_noise={self.use_noise}."
            )
        size = self.resolution // self.up
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.weight.shape[1], size, size):
            raise ValueError(f"`x` must have shape (B, {self.weight.shape[1]}, {size}, {size}), got {tuple(x.shape)}.")
        styles = self.affine(w)
        scaled_noise = None
        if self.use_noise and noise_mode == "random":
            if noise is None:
                noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            scaled_noise = noise * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            scaled_noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=scaled_noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=self.up == 1,  # a true convolution when up-sampling: the transposed conv takes weight as is
            fused_modconv=fused_modconv,
        )
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(torch.nn.Module):
    """StyleGAN2's output layer: modulated convolution without demodulation, the equalised-learning-rate gain
    ``1 / sqrt(in_channels * kernel_size ** 2)`` folded into the styles, bias, no activation, clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        self.weight = torch.nn.Parameter(weight.to(memory_format=memory_format))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        """``x (B, in_channels, H, W)``, ``w (B, w_dim)`` -> ``(B, out_channels, H - k + 1, W - k + 1)`` (no
        padding: ``(B, out_channels, H, W)`` for the 1x1 default)."""
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)
