"""autoflow: invertible building blocks, honest log-dets and memory-saving training."""

from .actnorm import ActNorm
from .base import InvertibleModule, Reconstruction, State, require_bijective
from .conv1x1 import InvConv1x1, LiftingConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, Coupling
from .errors import AutoflowError, EngineError, NotBijectiveError, ShapeError, SwitchError
from .flow import DistributionBase, Flow, StandardNormal
from .glow import glow
from .on_first import OnFirst
from .permute import Permute
from .pyramid import LaplacianPyramid
from .pyramid_coupling import DualPyramidCoupling, PyramidCoupling
from .reshape import HaarDownsample, Squeeze
from .sequential import Sequential
from .split import Split
from .volume_norm import VolumeNorm

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "AutoflowError",
    "Coupling",
    "DistributionBase",
    "DualPyramidCoupling",
    "EngineError",
    "Flow",
    "HaarDownsample",
    "InvConv1x1",
    "InvertibleModule",
    "LaplacianPyramid",
    "LiftingConv1x1",
    "NotBijectiveError",
    "OnFirst",
    "Permute",
    "PyramidCoupling",
    "Reconstruction",
    "Sequential",
    "ShapeError",
    "Split",
    "Squeeze",
    "StandardNormal",
    "SwitchError",
    "State",
    "VolumeNorm",
    "glow",
    "require_bijective",
]
