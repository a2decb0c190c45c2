"""Ties ``parity/lightconv_reference.py`` (fairseq's LightConv and DynamicConv, TBC) to their definition, in float64.

``parity/check_against_fairseq.py`` holds the reference to fairseq's own modules; these tests hold it to the
definition written independently with NumPy. For input ``x`` of shape (T, B, C), H heads and R = C / H channels
a head, kernel K and left padding P:

    y[t, b, c] = sum_k w[t, b, h(c), k] * x[t + k - P, b, c]     (zero outside 0 <= t + k - P < T),  h(c) = c // R

* LightConv: ``w[t, b, h, k] = weight[h, 0, k]`` (``softmax`` over k with ``weight_softmax``), the same everywhere;
* DynamicConv: ``w[t, b, h, k] = z[t, b, h * K + k]`` with ``z = query @ W.T + b`` (``in_proj``: ``z`` is the last
  H K features of ``x @ W.T + b``, and the convolved input is the first C), ``softmax`` over k with
  ``weight_softmax``; with ``renorm_padding`` the softmax runs over the valid taps only (the others are 0);
* the weight dropout is a mask ``M[t, b, h, k]`` multiplied into ``w`` after the softmax;
* ``bias`` (LightConv) / ``conv_bias`` (DynamicConv) is added per channel.

The one documented departure: DynamicConv's unfolded path, causal (P = K - 1) with K > T, narrows the kernel to
its last T taps *before* the softmax, so its softmax runs over taps ``k >= K - T`` only (the expanded path and
incremental decoding take the softmax over all K taps and then drop the taps that fall before the sequence).

LightConv's softmax is fairseq's ``utils.softmax`` (computed in float32 and cast back), so those cases compare at
1e-6; everything else at 1e-12.
"""

from __future__ import annotations

import unittest.mock
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from .lightconv_reference import DynamicConv1dTBC, LightweightConv1dTBC, MaskedDropout, unfold1d

B, H, R = 2, 2, 3
C = H * R


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread, as ``test_kernel_mix.py``: at these tiny shapes intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _softmax(z: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis, over the entries where ``valid`` (the others 0)."""
    valid = np.ones(z.shape, dtype=bool) if valid is None else np.broadcast_to(valid, z.shape)
    e = np.where(valid, np.exp(z - np.where(valid, z, -np.inf).max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


def _valid(t_len: int, kernel: int, pad: int) -> np.ndarray:
    """(T, 1, 1, K): tap k of output t reads an input inside the sequence."""
    s = np.arange(t_len)[:, None] + np.arange(kernel)[None, :] - pad
    return ((s >= 0) & (s < t_len))[:, None, None, :]


def _conv(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """The definition: ``x`` (T, B, C), ``w`` (T, B, H, K)."""
    t_len, _, channels = x.shape
    heads, kernel = w.shape[2:]
    y = np.zeros_like(x)
    for t in range(t_len):
        for k in range(kernel):
            s = t + k - pad
            if 0 <= s < t_len:
                y[t] += np.repeat(w[t, :, :, k], channels // heads, axis=1) * x[s]
    return y


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module


def _np(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().numpy()


def _assert_close(got: torch.Tensor, want: np.ndarray, tol: float) -> None:
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pad_of", [lambda k: 0, lambda k: k // 2, lambda k: k - 1, lambda k: k, lambda k: -1])
def test_unfold1d_matches_definition(kernel: int, pad_of: object) -> None:
    pad = pad_of(kernel)  # type: ignore[operator]
    x = np.random.default_rng(kernel).standard_normal((5, B, C))
    got = unfold1d(torch.from_numpy(x), kernel, pad, 0).numpy()
    want = np.zeros((5, B, C, kernel))
    for t, k in np.ndindex(5, kernel):
        if 0 <= t + k - pad < 5:
            want[t, :, :, k] = x[t + k - pad]
    if kernel == 1:  # unfold1d ignores padding_l for K = 1 (no padding at all)
        want = x[..., None]
    np.testing.assert_array_equal(got, want)


# (K, P, T): T below and above K; causal (K - 1), centre, other left paddings
SHAPES = [(1, 0, 4), (2, 1, 5), (3, 1, 5), (3, 2, 2), (4, 3, 6), (4, 0, 3), (7, 6, 4), (7, 3, 4), (7, 2, 9)]


@pytest.mark.parametrize(("kernel", "pad", "t_len"), SHAPES)
@pytest.mark.parametrize("weight_softmax", [False, True])
@pytest.mark.parametrize("unfold", [False, True])
def test_lightweight_matches_definition(kernel: int, pad: int, t_len: int, weight_softmax: bool, unfold: bool) -> None:
    module = _randomised(LightweightConv1dTBC(C, kernel, pad, H, weight_softmax=weight_softmax, bias=True), kernel)
    x = torch.randn(t_len, B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(t_len))
    got = module(x, unfold=unfold)
    weight = _np(module.weight)[:, 0, :]  # (H, K)
    if weight_softmax:
        weight = _softmax(weight)
    want = _conv(x.numpy(), np.broadcast_to(weight, (t_len, B, H, kernel)), pad) + _np(module.bias)
    _assert_close(got, want, 1e-6 if weight_softmax else 1e-12)


def _dynamic_weights(module: DynamicConv1dTBC, x: np.ndarray, query: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(x, z)``: the convolved input and the kernel logits (T, B, H, K), from the module's parameters."""
    t_len, kernel = x.shape[0], module.kernel_size
    lin_w, lin_b = _np(module.weight_linear.weight), _np(module.weight_linear.bias)
    src = x if query is None else query
    proj = src @ lin_w.T + (0.0 if lin_b is None else lin_b)
    if module.in_proj:
        return proj[..., :C], proj[..., C:].reshape(t_len, B, H, kernel)
    return x, proj.reshape(t_len, B, H, kernel)


CONFIGS = [  # weight_softmax, in_proj, query_size, bias, conv_bias
    (False, False, None, False, False),
    (True, False, None, True, True),
    (True, True, None, True, False),
    (False, True, None, True, True),
    (True, False, 5, True, True),
]


@pytest.mark.parametrize(("kernel", "pad", "t_len"), SHAPES)
@pytest.mark.parametrize(("weight_softmax", "in_proj", "query_size", "bias", "conv_bias"), CONFIGS)
@pytest.mark.parametrize("unfold", [False, True])
def test_dynamic_matches_definition(
    kernel: int, pad: int, t_len: int, weight_softmax: bool, in_proj: bool, query_size: int | None, bias: bool,
    conv_bias: bool, unfold: bool,
) -> None:  # fmt: skip
    module = DynamicConv1dTBC(
        C, kernel, pad, H, weight_softmax=weight_softmax, bias=bias, conv_bias=conv_bias, query_size=query_size,
        in_proj=in_proj,
    )  # fmt: skip
    module = _randomised(module, kernel)
    generator = torch.Generator().manual_seed(t_len)
    x = torch.randn(t_len, B, C, dtype=torch.float64, generator=generator)
    query = None if query_size is None else torch.randn(t_len, B, query_size, dtype=torch.float64, generator=generator)
    got = module(x, query=query, unfold=unfold)
    xc, z = _dynamic_weights(module, x.numpy(), None if query is None else query.numpy())
    if weight_softmax and unfold and kernel > t_len and pad == kernel - 1:
        # the unfolded path narrows the kernel to its last T taps before the softmax
        w = _softmax(z, np.arange(kernel) >= kernel - t_len)
    elif weight_softmax:
        w = _softmax(z)
    else:
        w = z
    want = _conv(xc, w, pad) + (0.0 if module.conv_bias is None else _np(module.conv_bias))
    _assert_close(got, want, 1e-12)


@pytest.mark.parametrize(("kernel", "pad", "t_len"), [(3, 1, 5), (4, 3, 2), (7, 2, 5), (7, 6, 9), (2, 0, 3)])
def test_dynamic_renorm_padding(kernel: int, pad: int, t_len: int) -> None:
    """Expanded path: softmax over the valid taps only; the unfolded path (not incremental) refuses it."""
    module = _randomised(DynamicConv1dTBC(C, kernel, pad, H, weight_softmax=True, renorm_padding=True), kernel)
    x = torch.randn(t_len, B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = module(x)
    xc, z = _dynamic_weights(module, x.numpy(), None)
    _assert_close(got, _conv(xc, _softmax(z, _valid(t_len, kernel, pad)), pad), 1e-12)
    with pytest.raises(AssertionError):
        module(x, unfold=True)
    # renorm_padding without weight_softmax: the plain convolution, and no weight dropout on the expanded path
    plain = _randomised(DynamicConv1dTBC(C, kernel, pad, H, weight_dropout=0.5, renorm_padding=True), kernel)
    plain.weight_dropout_module.mask = lambda shape: pytest.fail(f"dropout called with {shape}")
    _assert_close(plain.train()(x), _conv(xc, z, pad), 1e-12)


@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize(("weight_softmax", "renorm_padding"), [(False, False), (True, False), (True, True)])
def test_incremental_decoding_is_the_causal_convolution(
    kernel: int, weight_softmax: bool, renorm_padding: bool
) -> None:
    """One step at a time: causal (P = K - 1) whatever ``padding_l``; softmax over all K taps (renorm: valid ones)."""
    t_len = 5  # below and above K = 7
    x = torch.randn(t_len, B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(kernel))
    light = _randomised(LightweightConv1dTBC(C, kernel, 0, H, weight_softmax=weight_softmax, bias=True), 3)
    dynamic = _randomised(
        DynamicConv1dTBC(C, kernel, 0, H, weight_softmax=weight_softmax, renorm_padding=renorm_padding, bias=True),
        kernel,
    )  # fmt: skip
    got = {}
    for name, module in (("light", light), ("dynamic", dynamic)):
        state: dict[str, object] = {}
        got[name] = torch.cat([module(x[t : t + 1], incremental_state=state) for t in range(t_len)])
        assert len(state) == (kernel > 1)  # one buffer a module, keyed by its id: "<uuid>.input_buffer"
        if kernel > 1:
            ((key, buffer),) = state.items()
            assert key == f"{module._incremental_state_id}.input_buffer"
            kept = min(t_len, kernel - 1)  # the last K - 1 inputs, (1, B, C, K - 1)
            assert torch.equal(buffer, x[t_len - kept :].permute(1, 2, 0).unsqueeze(0))
    weight = _np(light.weight)[:, 0, :]
    weight = _softmax(weight) if weight_softmax else weight
    want = _conv(x.numpy(), np.broadcast_to(weight, (t_len, B, H, kernel)), kernel - 1) + _np(light.bias)
    _assert_close(got["light"], want, 1e-6 if weight_softmax else 1e-12)
    xc, z = _dynamic_weights(dynamic, x.numpy(), None)
    valid = _valid(t_len, kernel, kernel - 1) if renorm_padding else None  # renorm: softmax over the valid taps
    w = _softmax(z, valid) if weight_softmax else z
    _assert_close(got["dynamic"], _conv(xc, w, kernel - 1), 1e-12)


def test_reorder_incremental_state() -> None:
    module = _randomised(DynamicConv1dTBC(C, 3, 2, H, weight_softmax=True), 0)
    x = torch.randn(4, B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    order = torch.tensor([1, 0])
    state: dict[str, object] = {}
    steps = [module(x[t : t + 1], incremental_state=state) for t in range(2)]
    module.reorder_incremental_state(state, order)
    steps += [module(x[t : t + 1, order], incremental_state=state) for t in range(2, 4)]
    want = module(x[:, order])  # expanded path, causal
    _assert_close(torch.cat(steps[2:]), _np(want[2:]), 1e-12)


@pytest.mark.parametrize(("kernel", "pad", "t_len"), [(3, 1, 5), (4, 3, 6), (7, 6, 4), (7, 2, 4)])
@pytest.mark.parametrize("unfold", [False, True])
def test_weight_dropout_mask(kernel: int, pad: int, t_len: int, unfold: bool) -> None:
    """One mask M[t, b, h, k], laid out as each path drops: the result is the definition with ``w * M``."""
    rng = np.random.default_rng(kernel)
    p = 0.25
    mask = (rng.random((t_len, B, H, kernel)) >= p) / (1 - p)
    x = torch.from_numpy(rng.standard_normal((t_len, B, C)))
    causal_cut = kernel > t_len and pad == kernel - 1

    def band() -> torch.Tensor:  # (B*H, T, T): entry [b H + h, t, s] drops tap s - t + P of output t
        out = np.zeros((B * H, t_len, t_len))
        for t, s in np.ndindex(t_len, t_len):
            if 0 <= s - t + pad < kernel:
                out[:, t, s] = mask[t, :, :, s - t + pad].reshape(B * H)
        return torch.from_numpy(out)

    light = _randomised(LightweightConv1dTBC(C, kernel, pad, H, weight_dropout=p), kernel).train()
    shapes: list[tuple[int, ...]] = []
    light_mask = torch.from_numpy(mask.reshape(t_len * B * H, kernel, 1)) if unfold else band()
    light.weight_dropout_module.mask = lambda shape: shapes.append(shape) or light_mask
    got = light(x, unfold=unfold)
    assert shapes == [tuple(light_mask.shape)]
    weight = _np(light.weight)[:, 0, :] * mask
    _assert_close(got, _conv(x.numpy(), weight, pad), 1e-12)

    dynamic = _randomised(DynamicConv1dTBC(C, kernel, pad, H, weight_dropout=p, bias=True), kernel).train()
    dyn_mask = mask.reshape(t_len * B * H, kernel)
    if unfold and causal_cut:  # the unfolded path drops the narrowed kernel: its last T taps
        dyn_mask = dyn_mask[:, kernel - t_len :]
    dynamic.weight_dropout_module.mask = torch.from_numpy(dyn_mask)
    got = dynamic(x, unfold=unfold)
    xc, z = _dynamic_weights(dynamic, x.numpy(), None)
    _assert_close(got, _conv(xc, z * mask, pad), 1e-12)


def test_masked_dropout_without_a_mask_is_fairseq_dropout() -> None:
    x = torch.ones(200, 50, dtype=torch.float64)
    dropout = MaskedDropout(0.5)
    assert dropout.eval()(x) is x  # eval: the identity
    assert MaskedDropout(0.0).train()(x) is x  # p = 0: the identity in training too
    torch.manual_seed(0)
    dropped = dropout.train()(x)  # inverted dropout: 0 or 1 / (1 - p)
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert abs((dropped == 0).double().mean().item() - 0.5) < 0.02
    dropout.mask = torch.full((200, 50), 3.0, dtype=torch.float64)
    assert torch.equal(dropout.eval()(x), dropout.mask)  # a set mask applies in eval mode too
    assert list(DynamicConv1dTBC(C, 3, 2, H, weight_dropout=0.5).state_dict()) == ["weight_linear.weight"]


def test_path_choice_and_state_dict() -> None:
    light = LightweightConv1dTBC(C, 3, 1, H, bias=True)
    dynamic = DynamicConv1dTBC(C, 3, 1, H, bias=True, conv_bias=True)
    assert list(light.state_dict()) == ["weight", "bias"]
    assert list(dynamic.state_dict()) == ["conv_bias", "weight_linear.weight", "weight_linear.bias"]
    assert list(DynamicConv1dTBC(C, 3, 1, H, in_proj=True).state_dict()) == [
        "weight_linear.weight", "weight_linear.bias",
    ]  # fmt: skip
    incremental = (1, {"incremental_state": {}}, True)
    for module, cases in (
        (light, [(4, {}, False), (4, {"unfold": True}, True), incremental]),
        (dynamic, [(512, {}, False), (513, {}, True), (513, {"unfold": False}, False), incremental]),
    ):
        for t_len, kwargs, unfolded in cases:
            with unittest.mock.patch.object(type(module), "_forward_unfolded", autospec=True) as fake:
                fake.return_value = torch.zeros(t_len, 1, C)
                with unittest.mock.patch.object(type(module), "_forward_expanded", autospec=True) as fake_expanded:
                    fake_expanded.return_value = torch.zeros(t_len, 1, C)
                    module(torch.zeros(t_len, 1, C), **kwargs)
            assert (fake.called, fake_expanded.called) == (unfolded, not unfolded), (type(module), t_len, kwargs)
