"""autoflow: invertible building blocks, honest log-dets and memory-saving training."""

from .base import InvertibleModule, Reconstruction, State, require_bijective
from .errors import AutoflowError, EngineError, NotBijectiveError, ShapeError

__version__ = "0.1.0"

__all__ = [
    "AutoflowError",
    "EngineError",
    "InvertibleModule",
    "NotBijectiveError",
    "Reconstruction",
    "ShapeError",
    "State",
    "require_bijective",
]
