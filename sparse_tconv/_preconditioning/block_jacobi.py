"""The block-Jacobi construction: the diagonal blocks of ``W^H W``, from the matrix.

No transform: one ``m x m`` block per position (``m`` the channels per
group), for one channel the squared column norms (Jacobi).  It applies to
any geometry, and so is 'auto''s last resort.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from .._preconditioners import (
    _gram_side,
    _PositionBasis,
    _regularised_inverse,
    _shifted_inverse,
    _total_shift,
    gram_diagonal,
)
from .base import Construction, Operator, Pieces
from .gradient import gradient_diagonal

__all__ = ["BlockJacobi"]


class BlockJacobi(Construction):
    """The ``m x m`` diagonal blocks of ``W^H W`` at every position, inverted."""

    name: ClassVar[str] = "block_jacobi"
    regularisers: ClassVar[tuple[str, ...]] = ("identity", "gradient")

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Always: the fallback that ends 'auto''s list."""
        return True

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        return _block_jacobi(op, damp, boost, regulariser == "gradient")


def _block_jacobi(op, damp: float, boost: float, gradient: bool = False):
    """The ``m x m`` diagonal blocks of ``W^H W`` at every position, from the matrix.

    With ``gradient``, those of ``W^H W + damp^2 D^H D``: ``D^H D`` is diagonal on
    each channel's positions' diagonal (it couples no channels).
    """
    channels, size = _gram_side(op)
    groups = op.convolution.geometry.groups
    m, positions = channels // groups, math.prod(size)
    H = np.zeros((groups, positions, m, m), dtype=np.result_type(op.dtype, np.float64))
    if m == 1:
        H[:, :, 0, 0] = gram_diagonal(op).reshape(groups, positions)
    else:
        # Rows (c, i) of W^T are the columns of W: the blocks are their inner products.
        T = op.transpose_matrix
        rows = [T[c * positions:(c + 1) * positions] for c in range(channels)]
        for g in range(groups):
            for a in range(m):
                for b in range(a, m):
                    left, right = rows[g * m + a], rows[g * m + b]
                    value = np.asarray(left.conj().multiply(right).sum(axis=1)).ravel()
                    H[g, :, a, b] = value
                    H[g, :, b, a] = np.conj(value)
    basis = _PositionBasis(channels, groups, size)
    H = H.reshape(groups, *size, m, m)
    if not gradient:
        return basis, _shifted_inverse(H, damp, boost)[0], None
    shift = _total_shift(H, 0.0, boost)  # no damp^2 I in these equations
    extra = (damp * damp) * gradient_diagonal(channels, size).reshape(groups, m, *size)
    index = np.arange(m)
    H = H.astype(np.result_type(H.dtype, np.float64), copy=True)
    H[..., index, index] += np.moveaxis(extra, 1, -1)
    return basis, _regularised_inverse(H, shift), None
