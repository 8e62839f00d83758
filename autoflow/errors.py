"""The library's own exception types: every bad input raises one of these."""

__all__ = ["AutoflowError", "ShapeError", "NotBijectiveError", "EngineError"]


class AutoflowError(ValueError):
    """Base class of every error raised by autoflow for invalid input or use."""


class ShapeError(AutoflowError):
    """A state has the wrong rank, channel count or spatial size for a module."""


class NotBijectiveError(AutoflowError):
    """A log-likelihood was requested through a module that is not a bijection."""


class EngineError(AutoflowError, RuntimeError):
    """The memory-saving engine was used in a way it cannot support."""
