"""The library's own exception types: every bad input raises one of these.

The checks behind them follow one convention throughout the library:

* a state is a floating-point tensor (an integer or bool tensor is refused with
  ``"<Module> expected a floating-point input, received <dtype>"``);
* a switch is a bool, checked strictly (``InvConv1x1(volume_norm=...)``,
  ``make_conditioner(bias=...)``, ``Sequential(memory_saving=...)``): a string such as
  ``"none"`` or ``"no"`` is refused with a :class:`SwitchError`, never read as True;
* a choice among modes is a mode string, with None for "off" (a coupling's ``volume_norm``
  is ``None``, ``"channel"`` or ``"spatial"``);
* counts are ints, never bools (``check_int``); scales are finite positive numbers.

Every message names the module, what it expected and what it received.
"""

__all__ = ["AutoflowError", "ShapeError", "NotBijectiveError", "EngineError", "SwitchError"]


class AutoflowError(ValueError):
    """Base class of every error raised by autoflow for invalid input or use."""


class ShapeError(AutoflowError):
    """A state has the wrong rank, channel count or spatial size for a module."""


class NotBijectiveError(AutoflowError):
    """A log-likelihood was requested through a module that is not a bijection."""


class EngineError(AutoflowError, RuntimeError):
    """The memory-saving engine was used in a way it cannot support."""


class SwitchError(AutoflowError, TypeError):
    """An on/off option received something other than a bool.

    Also a ``TypeError``: the value has the wrong type, and ``"no"`` must not read as True.
    """
