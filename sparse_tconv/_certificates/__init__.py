"""The norm certificates of :func:`sparse_tconv.spectral.norm_bounds`, in the order it runs them.

Each entry narrows the interval of the run when it applies (see
:class:`.base.Certificate`); a new certificate is a module beside these and
one line here, at the place in the order where it is worth its cost.
"""

from __future__ import annotations

from .band import Band
from .base import Certificate, Interval
from .border import Border
from .dense import DenseSVD
from .embedding import CirculantEmbedding, MoreGrids
from .inertia import Inertia
from .lanczos import Lanczos

__all__ = ["CERTIFICATES", "Certificate", "Interval"]

CERTIFICATES: tuple[Certificate, ...] = (
    CirculantEmbedding(),  # upper, and the start vector of:
    Lanczos(),             # lower
    MoreGrids(),           # upper, zero and circular padding
    Lanczos(),             # lower again, towards the tighter upper bound
    Band(),                # upper, by a banded Cholesky: zero padding, small grids
    Border(),              # upper, by a banded Cholesky: reflect and replicate
    Inertia(),             # upper, by a sparse LDL^H
    DenseSVD(),            # both, small matrices
)
