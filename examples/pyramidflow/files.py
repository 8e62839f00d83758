"""Writing files whole or not at all: through a temporary file and a rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_text_atomically"]


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` on a hidden file beside ``path``, then rename it to ``path``.

    ``os.replace`` is atomic on one file system, so a reader (or a run interrupted mid-write)
    sees the old file or the new one, never half of one.

    Raises:
        OSError: Naming ``path``, if the folder or the file cannot be written; the partial
            file is removed.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed open as RuntimeError
        partial.unlink(missing_ok=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise OSError(f"cannot write '{path}': {reason}") from error
    return path


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (see :func:`write_atomically`)."""
    return write_atomically(path, lambda partial: partial.write_text(text))
