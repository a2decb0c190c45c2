"""flax.linen modules: thin wrappers over jdynconv's functional core (same names and maths as ``nnx``)."""

# One module per layer family, as Flax keeps linear.py and normalization.py apart: branch_mix, kernel_mix, odconv,
# modulated, deformable, per_position; what several families share in _common. A family's layers are
# re-exported here and listed in __all__, and its NNX twins live in the module of the same name in jdynconv.nnx.
from jdynconv.linen._common import Dtype as Dtype
from jdynconv.linen._common import Initializer as Initializer
from jdynconv.linen._common import branch_bank_init as branch_bank_init
from jdynconv.linen._common import default_kernel_init as default_kernel_init
from jdynconv.linen._common import ones as ones
from jdynconv.linen._common import zeros as zeros
from jdynconv.linen.branch_mix import BranchMixConv as BranchMixConv
from jdynconv.linen.deformable import DCNv3 as DCNv3
from jdynconv.linen.deformable import DeformConv as DeformConv
from jdynconv.linen.deformable import exact_gelu as exact_gelu
from jdynconv.linen.kernel_mix import CondConv as CondConv
from jdynconv.linen.kernel_mix import DynamicConv as DynamicConv
from jdynconv.linen.kernel_mix import PerSampleConv as PerSampleConv
from jdynconv.linen.modulated import ModulatedConv as ModulatedConv
from jdynconv.linen.modulated import standard_normal as standard_normal
from jdynconv.linen.odconv import ODConv as ODConv
from jdynconv.linen.odconv import kaiming_normal_fan_out as kaiming_normal_fan_out
from jdynconv.linen.per_position import DynamicLightweightConv as DynamicLightweightConv
from jdynconv.linen.per_position import Involution as Involution
from jdynconv.linen.per_position import LightweightConv as LightweightConv

__all__ = [
    "BranchMixConv",
    "CondConv",
    "DCNv3",
    "DeformConv",
    "DynamicConv",
    "DynamicLightweightConv",
    "Involution",
    "LightweightConv",
    "ModulatedConv",
    "ODConv",
    "PerSampleConv",
]
