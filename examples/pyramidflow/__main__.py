"""``python -m examples.pyramidflow``: see :mod:`examples.pyramidflow.cli`."""

from .cli import main

if __name__ == "__main__":  # pytest's doctest collection imports this module too
    raise SystemExit(main())
