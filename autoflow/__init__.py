"""autoflow: invertible building blocks, honest log-dets and memory-saving training."""

from .base import InvertibleModule, Reconstruction, State, require_bijective
from .errors import AutoflowError, EngineError, NotBijectiveError, ShapeError
from .sequential import Sequential

__version__ = "0.1.0"

__all__ = [
    "AutoflowError",
    "EngineError",
    "InvertibleModule",
    "NotBijectiveError",
    "Reconstruction",
    "Sequential",
    "ShapeError",
    "State",
    "require_bijective",
]
