"""autoflow: invertible building blocks, honest log-dets and memory-saving training."""

from .actnorm import ActNorm
from .base import InvertibleModule, Reconstruction, State, require_bijective
from .conv1x1 import InvConv1x1, LiftingConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, Coupling
from .errors import AutoflowError, EngineError, NotBijectiveError, ShapeError
from .permute import Permute
from .pyramid import LaplacianPyramid
from .pyramid_coupling import DualPyramidCoupling, PyramidCoupling
from .reshape import HaarDownsample, Squeeze
from .sequential import Sequential
from .volume_norm import VolumeNorm

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "AutoflowError",
    "Coupling",
    "DualPyramidCoupling",
    "EngineError",
    "HaarDownsample",
    "InvConv1x1",
    "InvertibleModule",
    "LaplacianPyramid",
    "LiftingConv1x1",
    "NotBijectiveError",
    "Permute",
    "PyramidCoupling",
    "Reconstruction",
    "Sequential",
    "ShapeError",
    "Squeeze",
    "State",
    "VolumeNorm",
    "require_bijective",
]
