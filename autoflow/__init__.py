"""autoflow: invertible building blocks, honest log-dets and memory-saving training."""

from .actnorm import ActNorm
from .base import InvertibleModule, Reconstruction, State, require_bijective
from .conv1x1 import InvConv1x1, LiftingConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, SplineCoupling
from .elementwise import AdditiveTransform, AffineTransform, ElementwiseTransform
from .errors import AutoflowError, EngineError, NotBijectiveError, ShapeError, SwitchError
from .flow import DistributionBase, Flow, StandardNormal
from .glow import glow
from .masked_coupling import MaskedCoupling, checkerboard_mask
from .on_first import OnFirst
from .permute import Permute
from .pyramid import LaplacianPyramid
from .pyramid_coupling import DualPyramidCoupling, PyramidCoupling
from .reshape import HaarDownsample, Squeeze
from .sequential import Sequential
from .spline import SplineTransform
from .split import Split
from .volume_norm import VolumeNorm

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AdditiveTransform",
    "AffineCoupling",
    "AffineTransform",
    "AutoflowError",
    "Coupling",
    "DistributionBase",
    "DualPyramidCoupling",
    "ElementwiseTransform",
    "EngineError",
    "Flow",
    "HaarDownsample",
    "InvConv1x1",
    "InvertibleModule",
    "LaplacianPyramid",
    "LiftingConv1x1",
    "MaskedCoupling",
    "NotBijectiveError",
    "OnFirst",
    "Permute",
    "PyramidCoupling",
    "Reconstruction",
    "Sequential",
    "ShapeError",
    "SplineCoupling",
    "SplineTransform",
    "Split",
    "Squeeze",
    "StandardNormal",
    "SwitchError",
    "State",
    "VolumeNorm",
    "checkerboard_mask",
    "glow",
    "require_bijective",
]
