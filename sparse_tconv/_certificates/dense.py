"""A small matrix's norm, exactly, by a dense SVD with its rounding bounded."""

from __future__ import annotations

from .. import _bounds
from .base import Certificate, Interval

__all__ = ["DenseSVD"]


class DenseSVD(Certificate):
    """Both bounds from the dense matrix's SVD, where the matrix is small enough."""

    name = "dense SVD"

    def applies(self, run: Interval) -> bool:
        return run.open

    def tighten(self, run: Interval) -> None:
        dense = _bounds.dense_interval(run.structure)
        if dense is not None:
            run.lower, run.upper = max(run.lower, dense.lower), min(run.upper, dense.upper)
