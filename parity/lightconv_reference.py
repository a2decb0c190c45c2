"""PyTorch reference for fairseq's LightConv and DynamicConv (T x B x C modules), written out line by line.

Source: facebookresearch/fairseq at commit 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99 (2025-09-30):

* ``fairseq/modules/unfold.py``: ``unfold1d`` (last changed in a3bd67231713d645c343e5e4b2f615e6699224c1,
  2022-10-10, which added the argument annotations);
* ``fairseq/modules/lightweight_convolution.py``: ``LightweightConv1dTBC`` (last changed in
  a48f235636557b8d3bc4922a6fa90f3a0fa57955, 2020-10-18);
* ``fairseq/modules/dynamic_convolution.py``: ``Linear``, ``DynamicConv1dTBC`` (last changed in
  16538a0bff1b9f32e89aa915f2e8b57193f33109, 2022-10-11, which only added ``DynamicConv_scripatable``);
* ``fairseq/incremental_decoding_utils.py``: ``FairseqIncrementalState``, ``with_incremental_state``;
* ``fairseq/utils.py``: ``softmax``, ``get_incremental_state``, ``set_incremental_state``;
* ``fairseq/modules/fairseq_dropout.py``: ``FairseqDropout``, replaced here by ``MaskedDropout`` (below).

``LightweightConv1dTBC``, ``DynamicConv1dTBC`` and the helpers above are the same in fairseq v0.12.2
(4a388e64cd646ed7d7ad8de8fae55df2b8eea91d; its PyPI wheel holds these six files byte for byte).
Wu et al., "Pay Less Attention with Lightweight and Dynamic Convolutions", ICLR 2019.

Left out: the factories ``LightweightConv`` / ``DynamicConv`` (they try the CUDA layers ``LightconvLayer`` /
``DynamicconvLayer`` first), ``LightweightConv1d`` (B x C x T, "not used in the model") and
``DynamicConv_scripatable``. Every statement is the original's, in its order, with the original's names, so the
state dicts are the original's (``weight``, ``bias``; ``conv_bias``, ``weight_linear.weight``,
``weight_linear.bias``). The incremental-state utility is fairseq's own few lines, kept as they are rather than
replaced: a module gets a uuid at construction and keeps its buffer in the caller's dict under
``"<uuid>.input_buffer"``, so one dict serves many modules, each with its own entry; the buffer is the last
``K - 1`` inputs, (1, B, C, <= K - 1) (for DynamicConv with ``in_proj``, of the projected input), and
``reorder_incremental_state`` index-selects it along the batch. ``utils`` is a namespace holding ``softmax`` and the
two helpers, so the calls read ``utils.softmax(...)`` as in the original. The edits: ``MaskedDropout`` for
``FairseqDropout`` at the same two lines, and formatting and comments (a long string split in two, one comment
moved above its line). ``parity/check_against_fairseq.py`` holds this file to the original (its result:
``parity/results/lightconv_fairseq_check.txt``).

``MaskedDropout`` (the one intentional change): a test sets ``module.weight_dropout_module.mask`` to a tensor, or to
a callable taking the dropped tensor's shape (a tuple) and returning the mask, already scaled (kept ``1/(1-p)``,
dropped 0); ``forward`` then returns ``x * mask``, in train and eval mode alike. With no mask it is
``FairseqDropout``: ``F.dropout`` when ``p > 0`` and training (or ``apply_during_inference``), else ``x`` itself.
Where the dropout falls (``T*B*H`` rows are ordered ``(t * B + b) * H + h``; measured by running):

* LightConv, unfolded path: on the kernel already expanded per position and narrowed, (T*B*H, K, 1) (incremental:
  (B*H, k, 1), k the buffered length + 1), so the "shared" kernel gets a mask per (t, b, h, k);
* LightConv, expanded path: on the band matrix (B*H, T, T), entry [b*H + h, t, s] = tap ``s - t + P`` of output
  t (zeros off the band stay zero);
* DynamicConv, unfolded path: on (T*B*H, K') after the softmax, the causal narrowing (K' = T when K > T and
  P = K - 1, else K) and, incremental, the cut to the buffered length;
* DynamicConv, expanded path: on (T*B*H, K) after the softmax and *before* the causal narrowing (so a K > T causal
  case drops all K taps, and the unfolded path's mask is its last T columns); with ``renorm_padding`` and
  ``weight_softmax``, on the softmaxed band matrix (B*H, T, T); with ``renorm_padding`` and no ``weight_softmax``,
  nowhere (no weight dropout at all on that path).

Behaviour kept as the original has it (documented, not fixed; each one checked by running this file):

* The path: LightConv's ``forward`` takes the expanded path unless ``unfold=True`` or an ``incremental_state`` is
  given; DynamicConv's ``unfold=None`` means unfolded for T > 512 and expanded for T <= 512; an
  ``incremental_state`` forces the unfolded path in both.
* DynamicConv, causal (P = K - 1) with K > T and ``weight_softmax``: the unfolded path narrows the kernel logits to
  the last T taps *before* the softmax (a softmax over those T taps), the expanded path takes the softmax over all K
  and then narrows (the taps that would read before the sequence are dropped, not renormalised). The outputs
  differ (0.34 on unit-scale random data); with T >= K, or any other padding, the two paths agree. Incremental
  decoding takes the softmax over all K and keeps the last ``k`` taps (k inputs buffered so far), so it matches the
  expanded path, not the unfolded one. LightConv never narrows before its softmax: its two paths and incremental
  decoding agree.
* LightConv's softmax is ``utils.softmax``: computed in float32 and cast back (``type_as``), even in float64 (2e-8
  off a float64 softmax). DynamicConv's is ``F.softmax`` in the input's dtype.
* ``renorm_padding`` (DynamicConv) is implemented on the expanded path only (a softmax over the in-range taps, from
  a band matrix filled with -inf); the unfolded path without ``incremental_state`` raises a bare
  ``AssertionError``. Incremental decoding with it takes the softmax over the buffered taps, which matches the
  expanded path for P = K - 1.
* Incremental decoding is causal whatever ``padding_l`` is (the buffer holds past inputs only); it equals the
  full-sequence output only for P = K - 1. It takes one step (T = 1) a call.
* ``padding_l`` must be given (its default ``None`` fails in ``F.pad`` / ``narrow`` with a ``TypeError``). The
  expanded path needs 0 <= P <= K - 1 (else ``narrow`` raises ``RuntimeError``); ``unfold1d`` takes any P (a
  negative pad crops), always meaning zero padding, except that for K = 1 it ignores ``padding_l`` altogether.

fairseq's licence notice, kept as its MIT licence asks:

    MIT License

    Copyright (c) Facebook, Inc. and its affiliates.

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""

# ruff: noqa: UP004, UP006, UP032, UP035, UP037, UP045, RUF005
# (the original's spellings are kept: typing.Dict/Optional, ``(object)``, ``str.format``, a quoted annotation and
# tuple concatenation)

from __future__ import annotations

import types
import uuid
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FAIRSEQ_REPO = "https://github.com/facebookresearch/fairseq"
FAIRSEQ_COMMIT = "3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99"
FAIRSEQ_V0_12_2_COMMIT = "4a388e64cd646ed7d7ad8de8fae55df2b8eea91d"
LIGHTCONV_PATH = "fairseq/modules/lightweight_convolution.py"
DYNAMICCONV_PATH = "fairseq/modules/dynamic_convolution.py"
UNFOLD_PATH = "fairseq/modules/unfold.py"
DROPOUT_PATH = "fairseq/modules/fairseq_dropout.py"
INCREMENTAL_PATH = "fairseq/incremental_decoding_utils.py"
UTILS_PATH = "fairseq/utils.py"

__all__ = [
    "DynamicConv1dTBC",
    "FairseqIncrementalState",
    "LightweightConv1dTBC",
    "Linear",
    "MaskedDropout",
    "get_incremental_state",
    "set_incremental_state",
    "softmax",
    "unfold1d",
    "utils",
    "with_incremental_state",
]


# ---------------------------------------------------------------------------------------------------------------
# fairseq/utils.py: softmax, get_incremental_state, set_incremental_state (bound below as ``utils.*``)
# ---------------------------------------------------------------------------------------------------------------


def get_incremental_state(
    module: "MultiheadAttention",  # noqa: F821 (the original's annotation, a name only fairseq defines)
    incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
    key: str,
) -> Optional[Dict[str, Optional[Tensor]]]:
    """Helper for getting incremental state for an nn.Module."""
    return module.get_incremental_state(incremental_state, key)


def set_incremental_state(
    module: "MultiheadAttention",  # noqa: F821 (the original's annotation, a name only fairseq defines)
    incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
    key: str,
    value: Dict[str, Optional[Tensor]],
) -> Optional[Dict[str, Dict[str, Optional[Tensor]]]]:
    """Helper for setting incremental state for an nn.Module."""
    if incremental_state is not None:
        result = module.set_incremental_state(incremental_state, key, value)
        if result is not None:
            incremental_state = result
    return incremental_state


def softmax(x, dim: int, onnx_trace: bool = False):
    if onnx_trace:
        return F.softmax(x.float(), dim=dim)
    else:
        return F.softmax(x, dim=dim, dtype=torch.float32)


# The modules call these as ``utils.softmax`` etc. (``from fairseq import utils``); this namespace keeps those calls.
utils = types.SimpleNamespace(
    softmax=softmax, get_incremental_state=get_incremental_state, set_incremental_state=set_incremental_state
)


# ---------------------------------------------------------------------------------------------------------------
# fairseq/incremental_decoding_utils.py
# ---------------------------------------------------------------------------------------------------------------


class FairseqIncrementalState(object):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_incremental_state()

    def init_incremental_state(self):
        self._incremental_state_id = str(uuid.uuid4())

    def _get_full_incremental_state_key(self, key: str) -> str:
        return "{}.{}".format(self._incremental_state_id, key)

    def get_incremental_state(
        self,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
        key: str,
    ) -> Optional[Dict[str, Optional[Tensor]]]:
        """Helper for getting incremental state for an nn.Module."""
        full_key = self._get_full_incremental_state_key(key)
        if incremental_state is None or full_key not in incremental_state:
            return None
        return incremental_state[full_key]

    def set_incremental_state(
        self,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
        key: str,
        value: Dict[str, Optional[Tensor]],
    ) -> Optional[Dict[str, Dict[str, Optional[Tensor]]]]:
        """Helper for setting incremental state for an nn.Module."""
        if incremental_state is not None:
            full_key = self._get_full_incremental_state_key(key)
            incremental_state[full_key] = value
        return incremental_state


def with_incremental_state(cls):
    cls.__bases__ = (FairseqIncrementalState,) + tuple(b for b in cls.__bases__ if b != FairseqIncrementalState)
    return cls


# ---------------------------------------------------------------------------------------------------------------
# The one edit: FairseqDropout (fairseq/modules/fairseq_dropout.py) becomes MaskedDropout
# ---------------------------------------------------------------------------------------------------------------


class MaskedDropout(nn.Module):
    """``FairseqDropout`` with a dropout mask the caller supplies, so a test can share it with another implementation.

    ``mask`` (a plain attribute, not a buffer: the state dict is the original's) is ``None``, a tensor, or a
    callable taking the shape of the tensor being dropped and returning the mask. The mask is the whole dropout:
    it must already hold the inverted-dropout scale (kept entries ``1 / (1 - p)``, dropped ones 0). While a mask is
    set, ``forward`` returns ``x * mask`` in train and eval mode alike (the caller decides when to set it); with no
    mask, ``forward`` is ``FairseqDropout.forward``: ``F.dropout(x, p, training=True, inplace=inplace)`` when
    ``p > 0`` and training (or ``apply_during_inference``), else ``x`` itself.
    """

    def __init__(self, p, module_name=None):
        super().__init__()
        self.p = p
        self.module_name = module_name
        self.apply_during_inference = False
        self.mask = None

    def forward(self, x, inplace: bool = False):
        if self.mask is not None:
            mask = self.mask(tuple(x.shape)) if callable(self.mask) else self.mask
            return x * mask
        if self.p > 0 and (self.training or self.apply_during_inference):
            return F.dropout(x, p=self.p, training=True, inplace=inplace)
        else:
            return x


# ---------------------------------------------------------------------------------------------------------------
# fairseq/modules/unfold.py
# ---------------------------------------------------------------------------------------------------------------


def unfold1d(x, kernel_size: int, padding_l: int, pad_value: float = 0):
    """unfold T x B x C to T x B x C x K"""
    if kernel_size > 1:
        T, B, C = x.size()
        x = F.pad(x, (0, 0, 0, 0, padding_l, kernel_size - 1 - padding_l), value=pad_value)
        x = x.as_strided((T, B, C, kernel_size), (B * C, C, 1, B * C))
    else:
        x = x.unsqueeze(3)
    return x


# ---------------------------------------------------------------------------------------------------------------
# fairseq/modules/lightweight_convolution.py
# ---------------------------------------------------------------------------------------------------------------


@with_incremental_state
class LightweightConv1dTBC(nn.Module):
    """Lightweight Convolution assuming the input is TxBxC
    Args:
        input_size: # of channels of the input
        kernel_size: convolution channels
        padding_l: padding to the left when using "same" padding
        num_heads: number of heads used. The weight is of shape (num_heads, 1, kernel_size)
        weight_dropout: the drop rate of the DropConnect to drop the weight
        weight_softmax: normalize the weight with softmax before the convolution
        bias: use bias

    Shape:
        Input: TxBxC, i.e. (timesteps, batch_size, input_size)
        Output: TxBxC, i.e. (timesteps, batch_size, input_size)

    Attributes:
        weight: the learnable weights of the module of shape
            `(num_heads, 1, kernel_size)`
        bias:   the learnable bias of the module of shape `(input_size)`
    """

    def __init__(
        self,
        input_size,
        kernel_size=1,
        padding_l=None,
        num_heads=1,
        weight_dropout=0.0,
        weight_softmax=False,
        bias=False,
    ):
        super().__init__()
        self.input_size = input_size
        self.kernel_size = kernel_size
        self.padding_l = padding_l
        self.num_heads = num_heads
        self.weight_dropout_module = MaskedDropout(weight_dropout, module_name=self.__class__.__name__)
        self.weight_softmax = weight_softmax

        self.weight = nn.Parameter(torch.Tensor(num_heads, 1, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.Tensor(input_size))
        else:
            self.bias = None

        self.reset_parameters()
        self.onnx_trace = False

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.0)

    def forward(self, x, incremental_state=None, unfold=False):
        """Assuming the input, x, of the shape T x B x C and producing an output in the shape T x B x C
        args:
            x: Input of shape T x B x C, i.e. (timesteps, batch_size, input_size)
            incremental_state: A dict to keep the state
            unfold: unfold the input or not. If not, we use the matrix trick instead
        """
        unfold = unfold or (incremental_state is not None)

        if unfold:
            output = self._forward_unfolded(x, incremental_state)
        else:
            output = self._forward_expanded(x, incremental_state)

        if self.bias is not None:
            output = output + self.bias.view(1, 1, -1)
        return output

    def prepare_for_onnx_export_(self):
        self.onnx_trace = True

    def _forward_unfolded(self, x, incremental_state):
        """The conventional implementation of convolutions.
        Unfolding the input by having a window shifting to the right."""
        T, B, C = x.size()
        K, H = self.kernel_size, self.num_heads
        R = C // H
        assert R * H == C == self.input_size

        weight = self.weight.view(H, K)
        if incremental_state is not None:
            input_buffer = self._get_input_buffer(incremental_state)
            if input_buffer is None:
                input_buffer = x.new()
            x_unfold = torch.cat([input_buffer, x.unsqueeze(3)], dim=3)
            if self.kernel_size > 1:
                self._set_input_buffer(incremental_state, x_unfold[:, :, :, -self.kernel_size + 1 :])
            x_unfold = x_unfold.view(T * B * H, R, -1)
        else:
            # unfold the input: T x B x C --> T' x B x C x K
            x_unfold = unfold1d(x, self.kernel_size, self.padding_l, 0)
            x_unfold = x_unfold.view(T * B * H, R, K)

        if self.weight_softmax:
            weight = utils.softmax(weight, dim=1, onnx_trace=self.onnx_trace).type_as(weight)

        if incremental_state is not None:
            weight = weight[:, -x_unfold.size(2) :]
            K = weight.size(1)

        weight = weight.view(1, H, K).expand(T * B, H, K).contiguous().view(T * B * H, K, 1)

        weight = self.weight_dropout_module(weight)
        output = torch.bmm(x_unfold, weight)  # T*B*H x R x 1
        output = output.view(T, B, C)
        return output

    def _forward_expanded(self, x, incremental_state):
        """Turn the convolution filters into band matrices and do matrix multiplication.
        This is faster when the sequence is short, but less memory efficient.
        This is not used in the decoder during inference.
        """
        T, B, C = x.size()
        K, H = self.kernel_size, self.num_heads
        R = C // H
        assert R * H == C == self.input_size

        weight = self.weight.view(H, K)
        if self.weight_softmax:
            weight = utils.softmax(weight, dim=1, onnx_trace=self.onnx_trace).type_as(weight)
        weight = weight.view(1, H, K).expand(T * B, H, K).contiguous()
        weight = weight.view(T, B * H, K).transpose(0, 1)

        x = x.view(T, B * H, R).transpose(0, 1)
        P = self.padding_l
        if K > T and P == K - 1:
            weight = weight.narrow(2, K - T, T)
            K, P = T, T - 1
        # turn the convolution filters into band matrices
        weight_expanded = weight.new_zeros(B * H, T, T + K - 1, requires_grad=False)
        weight_expanded.as_strided((B * H, T, K), (T * (T + K - 1), T + K, 1)).copy_(weight)
        weight_expanded = weight_expanded.narrow(2, P, T)
        weight_expanded = self.weight_dropout_module(weight_expanded)

        output = torch.bmm(weight_expanded, x)
        output = output.transpose(0, 1).contiguous().view(T, B, C)
        return output

    def reorder_incremental_state(self, incremental_state, new_order):
        input_buffer = self._get_input_buffer(incremental_state)
        if input_buffer is not None:
            input_buffer = input_buffer.index_select(1, new_order)
            self._set_input_buffer(incremental_state, input_buffer)

    def _get_input_buffer(self, incremental_state):
        return utils.get_incremental_state(self, incremental_state, "input_buffer")

    def _set_input_buffer(self, incremental_state, new_buffer):
        return utils.set_incremental_state(self, incremental_state, "input_buffer", new_buffer)

    def extra_repr(self):
        s = "{}, kernel_size={}, padding_l={}, num_heads={}, weight_softmax={}, bias={}".format(
            self.input_size,
            self.kernel_size,
            self.padding_l,
            self.num_heads,
            self.weight_softmax,
            self.bias is not None,
        )
        if self.weight_dropout_module.p > 0.0:
            s += ", weight_dropout={}".format(self.weight_dropout_module.p)
        return s


# ---------------------------------------------------------------------------------------------------------------
# fairseq/modules/dynamic_convolution.py
# ---------------------------------------------------------------------------------------------------------------


def Linear(in_features, out_features, bias=True):
    m = nn.Linear(in_features, out_features, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.constant_(m.bias, 0.0)
    return m


@with_incremental_state
class DynamicConv1dTBC(nn.Module):
    """Dynamic lightweight convolution taking T x B x C inputs
    Args:
        input_size: # of channels of the input
        kernel_size: convolution channels
        padding_l: padding to the left when using "same" padding
        num_heads: number of heads used. The weight is of shape (num_heads, 1, kernel_size)
        weight_dropout: the drop rate of the DropConnect to drop the weight
        weight_softmax: normalize the weight with softmax before the convolution
        renorm_padding: re-normalize the filters to ignore the padded part (only the non-padding parts sum up to 1)
        bias: use bias
        conv_bias: bias of the convolution
        query_size: specified when feeding a different input as the query
        in_proj: project the input and generate the filter together

    Shape:
        Input: TxBxC, i.e. (timesteps, batch_size, input_size)
        Output: TxBxC, i.e. (timesteps, batch_size, input_size)

    Attributes:
        weight: the learnable weights of the module of shape
            `(num_heads, 1, kernel_size)`
        bias:   the learnable bias of the module of shape `(input_size)`
    """

    def __init__(
        self,
        input_size,
        kernel_size=1,
        padding_l=None,
        num_heads=1,
        weight_dropout=0.0,
        weight_softmax=False,
        renorm_padding=False,
        bias=False,
        conv_bias=False,
        query_size=None,
        in_proj=False,
    ):
        super().__init__()
        self.input_size = input_size
        self.query_size = input_size if query_size is None else query_size
        self.kernel_size = kernel_size
        self.padding_l = padding_l
        self.num_heads = num_heads
        self.weight_dropout_module = MaskedDropout(weight_dropout, module_name=self.__class__.__name__)
        self.weight_softmax = weight_softmax
        self.renorm_padding = renorm_padding

        if in_proj:
            self.weight_linear = Linear(self.input_size, self.input_size + num_heads * kernel_size * 1)
        else:
            self.weight_linear = Linear(self.query_size, num_heads * kernel_size * 1, bias=bias)
        if conv_bias:
            self.conv_bias = nn.Parameter(torch.Tensor(input_size))
        else:
            self.conv_bias = None
        self.reset_parameters()

    @property
    def in_proj(self):
        return self.weight_linear.out_features == self.input_size + self.num_heads * self.kernel_size

    def reset_parameters(self):
        self.weight_linear.reset_parameters()
        if self.conv_bias is not None:
            nn.init.constant_(self.conv_bias, 0.0)

    def forward(self, x, incremental_state=None, query=None, unfold=None):
        """Assuming the input, x, of the shape T x B x C and producing an output in the shape T x B x C
        args:
            x: Input of shape T x B x C, i.e. (timesteps, batch_size, input_size)
            incremental_state: A dict to keep the state
            unfold: unfold the input or not. If not, we use the matrix trick instead
            query: use the specified query to predict the conv filters
        """
        # use unfold mode as default for long sequence to save memory
        unfold = x.size(0) > 512 if unfold is None else unfold
        unfold = unfold or (incremental_state is not None)
        assert query is None or not self.in_proj

        if query is None:
            query = x
        if unfold:
            output = self._forward_unfolded(x, incremental_state, query)
        else:
            output = self._forward_expanded(x, incremental_state, query)

        if self.conv_bias is not None:
            output = output + self.conv_bias.view(1, 1, -1)
        return output

    def _forward_unfolded(self, x, incremental_state, query):
        """The conventional implementation of convolutions.
        Unfolding the input by having a window shifting to the right."""
        T, B, C = x.size()
        K, H = self.kernel_size, self.num_heads
        R = C // H
        assert R * H == C == self.input_size

        if self.in_proj:
            proj = self.weight_linear(x)
            x = proj.narrow(2, 0, self.input_size).contiguous()
            weight = proj.narrow(2, self.input_size, H * K).contiguous().view(T * B * H, -1)
        else:
            weight = self.weight_linear(query).view(T * B * H, -1)

        # renorm_padding is only implemented in _forward_expanded
        assert not self.renorm_padding or incremental_state is not None

        if incremental_state is not None:
            input_buffer = self._get_input_buffer(incremental_state)
            if input_buffer is None:
                input_buffer = x.new()
            x_unfold = torch.cat([input_buffer, x.unsqueeze(3)], dim=3)
            if self.kernel_size > 1:
                self._set_input_buffer(incremental_state, x_unfold[:, :, :, -self.kernel_size + 1 :])
            x_unfold = x_unfold.view(T * B * H, R, -1)
        else:
            padding_l = self.padding_l
            if K > T and padding_l == K - 1:
                weight = weight.narrow(1, K - T, T)
                K, padding_l = T, T - 1
            # unfold the input: T x B x C --> T' x B x C x K
            x_unfold = unfold1d(x, K, padding_l, 0)
            x_unfold = x_unfold.view(T * B * H, R, K)

        if self.weight_softmax and not self.renorm_padding:
            weight = F.softmax(weight, dim=1)
        weight = weight.narrow(1, 0, K)

        if incremental_state is not None:
            weight = weight[:, -x_unfold.size(2) :]
            K = weight.size(1)

        if self.weight_softmax and self.renorm_padding:
            weight = F.softmax(weight, dim=1)

        weight = self.weight_dropout_module(weight, inplace=False)

        output = torch.bmm(x_unfold, weight.unsqueeze(2))  # T*B*H x R x 1
        output = output.view(T, B, C)
        return output

    def _forward_expanded(self, x, incremental_stat, query):
        """Turn the convolution filters into band matrices and do matrix multiplication.
        This is faster when the sequence is short, but less memory efficient.
        This is not used in the decoder during inference.
        """
        T, B, C = x.size()
        K, H = self.kernel_size, self.num_heads
        R = C // H
        assert R * H == C == self.input_size
        if self.in_proj:
            proj = self.weight_linear(x)
            x = proj.narrow(2, 0, self.input_size).contiguous()
            weight = proj.narrow(2, self.input_size, H * K).contiguous().view(T * B * H, -1)
        else:
            weight = self.weight_linear(query).view(T * B * H, -1)

        if not self.renorm_padding:
            if self.weight_softmax:
                weight = F.softmax(weight, dim=1)
            weight = self.weight_dropout_module(weight, inplace=False)
        weight = weight.narrow(1, 0, K).contiguous()
        weight = weight.view(T, B * H, K).transpose(0, 1)

        x = x.view(T, B * H, R).transpose(0, 1)
        if self.weight_softmax and self.renorm_padding:
            # turn the convolution filters into band matrices
            weight_expanded = weight.new(B * H, T, T + K - 1).fill_(float("-inf"))
            weight_expanded.as_strided((B * H, T, K), (T * (T + K - 1), T + K, 1)).copy_(weight)
            weight_expanded = weight_expanded.narrow(2, self.padding_l, T)
            # normalize the weight over valid positions like self-attention
            weight_expanded = F.softmax(weight_expanded, dim=2)
            weight_expanded = self.weight_dropout_module(weight_expanded, inplace=False)
        else:
            P = self.padding_l
            # For efficiency, we cut the kernel size and reduce the padding when the kernel is larger than the length
            if K > T and P == K - 1:
                weight = weight.narrow(2, K - T, T)
                K, P = T, T - 1
            # turn the convolution filters into band matrices
            weight_expanded = weight.new_zeros(B * H, T, T + K - 1, requires_grad=False)
            weight_expanded.as_strided((B * H, T, K), (T * (T + K - 1), T + K, 1)).copy_(weight)
            weight_expanded = weight_expanded.narrow(2, P, T)  # B*H x T x T
        output = torch.bmm(weight_expanded, x)
        output = output.transpose(0, 1).contiguous().view(T, B, C)
        return output

    def reorder_incremental_state(self, incremental_state, new_order):
        input_buffer = self._get_input_buffer(incremental_state)
        if input_buffer is not None:
            input_buffer = input_buffer.index_select(1, new_order)
            self._set_input_buffer(incremental_state, input_buffer)

    def _get_input_buffer(self, incremental_state):
        return utils.get_incremental_state(self, incremental_state, "input_buffer")

    def _set_input_buffer(self, incremental_state, new_buffer):
        return utils.set_incremental_state(self, incremental_state, "input_buffer", new_buffer)

    def extra_repr(self):
        s = (
            "{}, kernel_size={}, padding_l={}, num_heads={}, weight_softmax={}, conv_bias={}, renorm_padding={}, "
            "in_proj={}"
        ).format(
            self.input_size,
            self.kernel_size,
            self.padding_l,
            self.num_heads,
            self.weight_softmax,
            self.conv_bias is not None,
            self.renorm_padding,
            self.in_proj,
        )

        if self.query_size != self.input_size:
            s += ", query_size={}".format(self.query_size)
        if self.weight_dropout_module.p > 0.0:
            s += ", weight_dropout={}".format(self.weight_dropout_module.p)
        return s
