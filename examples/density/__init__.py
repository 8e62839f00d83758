"""Exact-likelihood density estimation with autoflow: Glow on 8x8 digits, a 2-D two-moons flow.

Both flows are built only from autoflow primitives (:func:`autoflow.glow.glow`,
:class:`autoflow.split.Split`, :class:`autoflow.flow.Flow`) and trained with the memory-saving
engine. Run ``python -m examples.density digits`` or ``python -m examples.density moons``
(``--help`` for options); each finishes in a few minutes on 2 CPU cores and writes a PNG under
``runs/density/``.
"""
