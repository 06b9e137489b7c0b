"""The CSR product form: the canonical matrix itself, threaded over row blocks.

Used where neither dense channel blocks nor diagonals apply (reflect,
replicate and circular padding, depthwise and strided single-channel
layers).  A product is scipy's own serial CSR kernel (which releases the
GIL) on row blocks balanced by nnz, each writing its slice of the output, so
every output row is computed by exactly the code, and in exactly the order,
of ``matrix @ x``.

The backward form (the transpose an operator's ``rmatvec`` reads) numbers
its columns position-major: each row then reads every channel of a few
neighbouring positions, where the channel-major transpose reads one element
from each of ``C`` distant planes (as many memory streams as channels; 2x
slower on a 3->64 layer).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp

from .. import _parallel, _sparsetools
from .._build import build, refill
from .._geometry import matrix_size
from .._parallel import balanced_ranges, run_parallel
from .._validation import cast_if_safe
from .base import ProductForm, to_position_major

__all__ = ["CsrForm", "csr_product"]


def csr_product(matrix: sp.csr_array, x: np.ndarray, threads: int) -> np.ndarray:
    """``matrix @ x`` for a 1-D or 2-D ``x``, on ``threads`` threads.

    Bit-for-bit equal to scipy's serial product.  Falls back to that product
    (one thread) when ``x`` needs a wider dtype than the matrix (e.g. a
    float32 matrix times a float64 vector), since the values would otherwise
    have to be converted.
    """
    x = cast_if_safe(x, matrix.dtype)
    matvec, matvecs = _sparsetools.csr_matvec, _sparsetools.csr_matvecs
    if (
        threads <= 1
        or x.dtype != matrix.dtype
        or matrix.nnz < _parallel.MIN_PARALLEL_NNZ
        or matvec is None
        or matvecs is None
    ):
        return matrix @ x
    x = np.ascontiguousarray(x)
    # np.empty, zeroed by each thread on its own rows: the pages are touched
    # in parallel (np.zeros would fault them in one by one inside the kernel,
    # and without numpy's huge-page hint).
    out = np.empty((matrix.shape[0],) + x.shape[1:], dtype=matrix.dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    n_cols = matrix.shape[1]

    if x.ndim == 1:

        def multiply(rows):
            a, b = rows
            out[a:b] = 0  # the kernel adds into its output
            matvec(b - a, n_cols, indptr[a : b + 1], indices, data, x, out[a:b])

    else:
        n_vecs = x.shape[1]
        flat_x = x.ravel()

        def multiply(rows):
            a, b = rows
            out[a:b] = 0
            matvecs(b - a, n_cols, n_vecs, indptr[a : b + 1], indices, data, flat_x,
                    out[a:b].ravel())

    run_parallel(multiply, balanced_ranges(indptr, threads), threads)
    return out


def _column_channels(geometry, transposed: bool) -> int:
    """Channels of the columns of W (its input) or of W.T (W's output)."""
    return geometry.out_channels if transposed else geometry.in_channels


class CsrForm(ProductForm):
    """A CSR matrix, its columns channel-major, or position-major with ``channels > 1``."""

    name = "csr"
    # The backward form numbers its columns position-major; the transposed
    # operator's forward form is the canonical W.T, so the two differ.
    shared_with_transpose = False

    def __init__(self, matrix: sp.csr_array, transposed: bool, channels: int = 1):
        self.matrix = matrix
        self.transposed = transposed
        self.channels = channels  # > 1: columns numbered (position, channel)

    @staticmethod
    def applies(geometry) -> bool:
        return True  # any geometry

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed, backward) -> int:
        return matrix_size(geometry, dtype, transposed).nbytes  # the same in either numbering

    @classmethod
    def build(cls, geometry, weight, *, transposed, backward, threads, canonical):
        channels = _column_channels(geometry, transposed) if backward else 1
        if channels == 1:  # position-major is the canonical order: share the canonical CSR
            return cls(canonical(), transposed)
        matrix = build(geometry, weight, transposed=transposed, threads=threads,
                       channels_last=True)
        return cls(matrix, transposed, channels)

    @property
    def pattern(self):
        if self.channels == 1:
            return None  # the canonical CSR: the operator refills it
        m = self.matrix
        return SimpleNamespace(indices=m.indices, indptr=m.indptr, shape=m.shape)

    @classmethod
    def refill(cls, pattern, geometry, weight, *, transposed, backward, threads, canonical):
        if pattern is None:
            return cls.build(geometry, weight, transposed=transposed, backward=backward,
                             threads=threads, canonical=canonical)
        matrix = refill(geometry, weight, pattern, transposed=transposed, threads=threads,
                        channels_last=True)
        return cls(matrix, transposed, _column_channels(geometry, transposed))

    def multiply(self, x, threads):
        return csr_product(self.matrix, to_position_major(x, self.channels), threads)
