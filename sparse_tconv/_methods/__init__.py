"""The solve methods of :func:`sparse_tconv.solvers.tikhonov`, one module each, and their registry.

:data:`METHODS` maps ``method=`` to its class; :data:`AUTO_ORDER` is what
``method='auto'`` walks (the first that applies wins; the last applies to
every operator).  A new method is a :class:`~.base.Method` subclass in a
module beside these, and one line in each.
"""

from __future__ import annotations

from .base import Method, Problem, Residual, pcg
from .cg import CG
from .fft import FFT

__all__ = ["AUTO_ORDER", "METHODS", "Method", "Problem", "Residual", "auto", "pcg"]

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FFT, CG)}
"""Every method by its name, in the order error messages list them."""

AUTO_ORDER: list[type[Method]] = [
    FFT,  # W circulant: exact, no iterations
    CG,   # anything else
]


def auto(op, regulariser: str = "identity") -> type[Method]:
    """The first entry of :data:`AUTO_ORDER` that applies to ``op`` and solves with
    ``regulariser`` (:attr:`Method.regularisers`)."""
    return next(cls for cls in AUTO_ORDER
                if regulariser in cls.regularisers and cls.auto_applies(op))
