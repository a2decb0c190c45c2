"""flax.nnx modules: thin wrappers over jdynconv's functional core (same names and maths as ``linen``)."""

# One module per layer family, named as its linen twin's in jdynconv.linen (branch_mix, kernel_mix, odconv,
# modulated, deformable, per_position); what several families share in _common. A family's layers are
# re-exported here and listed in __all__.
from jdynconv.nnx.branch_mix import BranchMixConv as BranchMixConv
from jdynconv.nnx.deformable import DCNv3 as DCNv3
from jdynconv.nnx.deformable import DeformConv as DeformConv
from jdynconv.nnx.kernel_mix import CondConv as CondConv
from jdynconv.nnx.kernel_mix import DynamicConv as DynamicConv
from jdynconv.nnx.kernel_mix import PerSampleConv as PerSampleConv
from jdynconv.nnx.modulated import ModulatedConv as ModulatedConv
from jdynconv.nnx.modulated import NoiseConst as NoiseConst
from jdynconv.nnx.odconv import ODConv as ODConv
from jdynconv.nnx.per_position import DynamicLightweightConv as DynamicLightweightConv
from jdynconv.nnx.per_position import Involution as Involution
from jdynconv.nnx.per_position import LightweightConv as LightweightConv

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
    "NoiseConst",
    "ODConv",
    "PerSampleConv",
]
