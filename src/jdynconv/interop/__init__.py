"""PyTorch state dicts <-> Flax linen variables and NNX models, strictly and without importing torch.

torch is imported lazily, only to read ``.pt``/``.pth`` files or to convert torch tensors a caller
passes in; ``import jdynconv.interop`` works without it.

::

    from jdynconv import interop, linen

    # {"mlp.1.weight": (k, D), ...}
    state_dict = interop.load_state_dict("seed_model.safetensors")
    module = linen.BranchMixConv(features=32, kernel_size=3, num_branches=8, padding=1)
    variables = interop.torch_to_linen(module, state_dict)  # {"params", "batch_stats"}
    y = module.apply(variables, x_nhwc, use_running_average=True)  # (B, H, W, 32)
    state_dict = interop.linen_to_torch(module, variables)  # back, for load_state_dict

Layouts: conv ``(O, I // G, *K)`` <-> ``(*K, I // G, O)``; linear ``(out, in)`` <-> ``(in, out)``;
BatchNorm ``weight, bias, running_mean, running_var`` <-> ``scale, offset, mean, var``
(``num_batches_tracked`` ignored on load, exported as int64 0). Every conversion is strict: missing
keys, unexpected keys and shape mismatches are reported together in one :class:`StateDictError`.

Registered modules (linen and NNX): ``BranchMixConv`` (the :term:`seed model`), ``CondConv`` (timm's
``CondConv2d`` with its experts flattened, ``weight (k, F * C_in // G * prod(K))``, plus the routing
``nn.Linear`` as ``routing_fn``), ``DynamicConv`` (the Dynamic Convolution layout: ``weight (k, F,
C_in // G, *K)``, the attention's 1x1 convs ``attention.fc1``/``attention.fc2``) and ``ODConv`` (the original
``ODConv2d``'s names: ``weight (k, F, C_in // G, *K)``, ``attention.fc``, ``attention.bn``,
``attention.{channel,filter,spatial,kernel}_fc``); see :func:`cond_conv_rules`, :func:`dynamic_conv_rules` and
:func:`od_conv_rules`; ``ModulatedConv`` (NVIDIA's StyleGAN2 ``SynthesisLayer`` / ``ToRGBLayer``: ``weight``,
``affine.{weight,bias}``, ``bias``, ``noise_strength``, ``noise_const``, ``resample_filter``; see
:func:`modulated_conv_rules`); ``DeformConv`` (torchvision's ``DeformConv2d``: ``weight``, ``bias``; mmcv's
``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``: also ``conv_offset.{weight,bias}``; see
:func:`deform_conv_rules`) and ``DCNv3`` (InternImage's ``DCNv3_pytorch``: ``input_proj``, ``dw_conv.0``,
``dw_conv.1.1`` (LayerNorm) or ``dw_conv.1.0`` (BatchNorm2d), ``offset``, ``mask``, ``output_proj``,
``center_feature_scale_proj_{weight,bias}``; see :func:`dcnv3_rules`); ``Involution`` (d-li14's ``involution``:
``conv1.conv``, ``conv1.bn``, ``conv2.conv``; :func:`involution_rules`), ``LightweightConv`` and
``DynamicLightweightConv`` (fairseq's ``LightweightConv1dTBC``: ``weight``, ``bias``; ``DynamicConv1dTBC``:
``weight_linear``, ``conv_bias``; :func:`lightweight_conv_rules`, :func:`dynamic_lightweight_conv_rules`).
Others (your own models, built from :func:`conv_rules`, :func:`linear_rules`, :func:`batchnorm_rules` and the
rest) with :func:`register`.

:func:`from_torch` builds, from a PyTorch layer jdynconv knows (the seed model's block, timm's ``CondConv2d``,
Dynamic Convolution, ``ODConv2d``, StyleGAN2's ``SynthesisLayer``/``ToRGBLayer``, torchvision's
``DeformConv2d``, mmcv's ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``, InternImage's
``DCNv3_pytorch``/``DCNv3``, d-li14's ``involution``, fairseq's ``LightweightConv1dTBC`` and ``DynamicConv1dTBC``;
others with
:func:`register_torch_layer`), the jdynconv layer that computes the same function, with its weights.
:func:`rules_for` and :func:`under` compose a whole model's rules from its layers'; :func:`torch_names` names
gradients and optimizer moments by PyTorch keys.
"""

from jdynconv.interop import _branch_mix as _branch_mix  # registers BranchMixConv
from jdynconv.interop import _deformable as _deformable  # registers DeformConv, DCNv3
from jdynconv.interop import _kernel_mix as _kernel_mix  # registers CondConv, DynamicConv
from jdynconv.interop import _modulated as _modulated  # registers ModulatedConv
from jdynconv.interop import _odconv as _odconv  # registers ODConv
from jdynconv.interop import _per_position as _per_position  # registers Involution and the fairseq layers
from jdynconv.interop._branch_mix import branch_mix_rules as branch_mix_rules
from jdynconv.interop._convert import Converter as Converter
from jdynconv.interop._convert import linen_to_torch as linen_to_torch
from jdynconv.interop._convert import nnx_to_torch as nnx_to_torch
from jdynconv.interop._convert import register as register
from jdynconv.interop._convert import torch_to_linen as torch_to_linen
from jdynconv.interop._convert import torch_to_nnx as torch_to_nnx
from jdynconv.interop._deformable import dcnv3_rules as dcnv3_rules
from jdynconv.interop._deformable import deform_conv_rules as deform_conv_rules
from jdynconv.interop._from_torch import TorchPort as TorchPort
from jdynconv.interop._from_torch import from_torch as from_torch
from jdynconv.interop._from_torch import known_torch_layers as known_torch_layers
from jdynconv.interop._from_torch import register_torch_layer as register_torch_layer
from jdynconv.interop._io import LoadError as LoadError
from jdynconv.interop._io import load_state_dict as load_state_dict
from jdynconv.interop._kernel_mix import ReshapedPermutation as ReshapedPermutation
from jdynconv.interop._kernel_mix import cond_conv_rules as cond_conv_rules
from jdynconv.interop._kernel_mix import dynamic_conv_rules as dynamic_conv_rules
from jdynconv.interop._modulated import modulated_conv_rules as modulated_conv_rules
from jdynconv.interop._odconv import od_conv_rules as od_conv_rules
from jdynconv.interop._per_position import dynamic_lightweight_conv_rules as dynamic_lightweight_conv_rules
from jdynconv.interop._per_position import involution_rules as involution_rules
from jdynconv.interop._per_position import lightweight_conv_rules as lightweight_conv_rules
from jdynconv.interop._prefix import rules_for as rules_for
from jdynconv.interop._prefix import torch_names as torch_names
from jdynconv.interop._prefix import under as under
from jdynconv.interop._rules import Dim as Dim
from jdynconv.interop._rules import Permutation as Permutation
from jdynconv.interop._rules import Rule as Rule
from jdynconv.interop._rules import StateDictError as StateDictError
from jdynconv.interop._rules import Target as Target
from jdynconv.interop._rules import batchnorm_rules as batchnorm_rules
from jdynconv.interop._rules import conv_layout as conv_layout
from jdynconv.interop._rules import conv_rules as conv_rules
from jdynconv.interop._rules import flax_from_torch as flax_from_torch
from jdynconv.interop._rules import linear_rules as linear_rules
from jdynconv.interop._rules import torch_from_flax as torch_from_flax

__all__ = [
    "Converter",
    "Dim",
    "LoadError",
    "Permutation",
    "ReshapedPermutation",
    "Rule",
    "StateDictError",
    "Target",
    "TorchPort",
    "batchnorm_rules",
    "branch_mix_rules",
    "cond_conv_rules",
    "conv_layout",
    "conv_rules",
    "dcnv3_rules",
    "deform_conv_rules",
    "dynamic_conv_rules",
    "flax_from_torch",
    "from_torch",
    "known_torch_layers",
    "linear_rules",
    "linen_to_torch",
    "load_state_dict",
    "modulated_conv_rules",
    "nnx_to_torch",
    "od_conv_rules",
    "register",
    "register_torch_layer",
    "rules_for",
    "torch_from_flax",
    "torch_names",
    "torch_to_linen",
    "torch_to_nnx",
    "under",
]
