"""The operators' product form for one channel and stride 1: W by diagonals (DIA).

A single-channel convolution with stride 1 whose output has the input's
spatial size (``'same'``-like padding) links output position ``i`` to input
position ``i + offset(t)`` through kernel tap ``t``, with one flat offset per
tap.  W is then the sum of one diagonal per tap: scipy's DIA format, which
stores the values only (8 bytes per float64 entry against 12 in CSR, plus
the explicit zeros where a tap falls into the padding, a few percent) and no
index at all.  Products are scipy's serial DIA kernel on row ranges, one per
thread.

When every dilated kernel extent is shorter than its dimension, the offsets
grow strictly with the tap number (row-major), so each row adds its entries
in the CSR matrix's column order: the products equal the CSR products bit
for bit, the explicit zeros adding exact zeros, for finite inputs.  (An
infinite or NaN input element would also reach, times zero, the rows whose
padding covers it: the operators send such vectors to the CSR matrix.)
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .. import _parallel, _sparsetools
from .._geometry import ConvGeometry, index_dtype
from .._parallel import even_ranges, run_parallel
from .._validation import cast_if_safe
from .base import ProductForm
from .csr import csr_product

__all__ = ["DiagonalForm", "build_diagonals", "dia_product", "dia_transposed_product"]


def build_diagonals(
    geom: ConvGeometry, weight: np.ndarray, *, transposed: bool, threads: int = 1
) -> sp.dia_array:
    """W (or W.T) of a geometry :func:`uses_diagonals` accepts, as a DIA matrix.

    Diagonal ``t`` holds tap ``t``'s weight at every column whose other end
    (the output position for W, the input position for W.T) is in range, and
    0 elsewhere.  Written in two steps: every diagonal filled with its weight
    (one pass, on ``threads`` threads), then, per dimension and tap index
    along it, the slab of columns that falls outside set to 0 (loops over
    ``sum(kernel_size)`` slabs, not over taps or positions).  For W.T the
    taps come in reverse order, so that the offsets still increase.
    """
    sizes, kernel, ndim = tuple(geom.input_size), tuple(geom.kernel_size), geom.ndim
    n, taps = math.prod(sizes), math.prod(kernel)
    flat_strides = [math.prod(sizes[d + 1:]) for d in range(ndim)]
    offsets = np.zeros(kernel, dtype=np.int64)
    data = np.empty((taps, n), dtype=weight.dtype)
    values = weight.reshape(taps, 1)

    def fill(rows):
        np.copyto(data[rows[0]:rows[1]], values[rows[0]:rows[1]])

    run_parallel(fill, even_ranges(taps, threads), threads if n * taps > 1 << 16 else 1)
    grid = data.reshape(kernel + sizes)
    for d in range(ndim):
        # input index = output index + shift, along dimension d
        shift = np.arange(kernel[d]) * geom.dilation[d] - geom.padding[d][0]
        offsets += (shift * flat_strides[d]).reshape([-1 if e == d else 1 for e in range(ndim)])
        # DIA values are indexed by column: valid where column - shift (W) or
        # column + shift (W.T) is a position of the other side.
        first_valid = np.clip(-shift if transposed else shift, 0, sizes[d])
        end_valid = np.clip(sizes[d] - shift if transposed else sizes[d] + shift, 0, sizes[d])
        for t in range(kernel[d]):
            slab: list[int | slice] = [slice(None)] * (2 * ndim)
            slab[d] = t
            slab[ndim + d] = slice(0, first_valid[t])
            grid[tuple(slab)] = 0
            slab[ndim + d] = slice(end_valid[t], None)
            grid[tuple(slab)] = 0
    offsets = offsets.reshape(-1)
    if transposed:
        offsets, data = -offsets[::-1], data[::-1]
    return sp.dia_array((np.ascontiguousarray(data), offsets), shape=(n, n))


def dia_product(matrix: sp.dia_array, x: np.ndarray, threads: int) -> np.ndarray:
    """``matrix @ x`` for a 1-D ``x`` or a 2-D block of columns, on ``threads`` threads.

    Each thread runs scipy's serial DIA kernel on its range of rows, so the
    result is bit for bit ``matrix @ x``.  A block of columns is multiplied
    column by column (scipy has no multi-vector DIA kernel).
    """
    return _column_by_column(matrix, x, threads, _dia_matvec_threaded, matrix.shape[0],
                             lambda v: matrix @ v)


def _column_by_column(matrix, x, threads, kernel, n_out, fallback):
    """``kernel`` (a threaded one-vector product) on a 1-D ``x`` or each column of a 2-D one.

    An ``x`` needing a wider dtype than the matrix (or no scipy kernel) goes
    to ``fallback``; small matrices run on one thread.
    """
    x = cast_if_safe(x, matrix.dtype)
    if x.dtype != matrix.dtype or _sparsetools.dia_matvec is None:
        return fallback(x)
    if matrix.data.size < _parallel.MIN_PARALLEL_NNZ:
        threads = 1
    if x.ndim == 2:
        # One contiguous row per column, both ways: the result comes back as
        # the transpose of a C-ordered array (a view, no copy).
        columns = np.ascontiguousarray(x.T)
        out = np.empty((x.shape[1], n_out), dtype=matrix.dtype)
        for column, result in zip(columns, out):
            kernel(matrix, column, threads, result)
        return out.T
    return kernel(matrix, np.ascontiguousarray(x), threads)


def _dia_matvec_threaded(matrix, x, threads, out=None):
    n_rows, n_cols = matrix.shape
    offsets = matrix.offsets
    length = matrix.data.shape[1]
    flat = matrix.data.reshape(-1)
    below = max(0, -int(offsets.min())) if len(offsets) else 0
    matvec = _sparsetools.dia_matvec
    if out is None:
        out = np.empty(n_rows, dtype=matrix.dtype)

    def multiply(rows):
        a, b = rows
        out[a:b] = 0  # the kernel adds into its output
        # Rows a..b as a problem of their own: shift the columns by ``skip``
        # (as far back as the lowest diagonal reaches), which moves every
        # offset up by ``a - skip`` and the start of each diagonal's values.
        skip = a - min(a, below)
        matvec(b - a, n_cols - skip, len(offsets), length,
                    (offsets + (a - skip)).astype(offsets.dtype), flat[skip:], x[skip:],
                    out[a:b])

    # (on this thread when threads <= 1)
    run_parallel(multiply, even_ranges(n_rows, threads), threads)
    return out


def dia_transposed_product(matrix: sp.dia_array, y: np.ndarray, threads: int) -> np.ndarray:
    """``matrix.T @ y`` on the DIA arrays of a square ``matrix``, for a 1-D or 2-D ``y``.

    Element ``j`` of the result is ``sum_d data[d, j] * y[j - offset[d]]``
    over the diagonals that reach it, summed from the last diagonal to the
    first: the order of scipy's DIA kernel on the transposed matrix (its
    diagonals are these, negated and reversed), so the result is bit for bit
    that product.  Each term is a slice of one stored diagonal times a
    shifted slice of ``y``, given to scipy's serial DIA kernel as a
    single-diagonal problem; threads take disjoint ranges of the output.
    A ``y`` needing a wider dtype than the matrix uses scipy's product on
    ``matrix.T`` (a copy of the diagonals).
    """
    return _column_by_column(matrix, y, threads, _dia_transposed_threaded, matrix.shape[1],
                             lambda v: matrix.T @ v)


def _dia_transposed_threaded(matrix, y, threads, out=None):
    n = matrix.shape[0]
    offsets = matrix.offsets.tolist()
    data = matrix.data
    matvec = _sparsetools.dia_matvec
    zero = np.zeros(1, dtype=matrix.offsets.dtype)  # one diagonal, offset 0: y += d * x
    if out is None:
        out = np.empty(n, dtype=matrix.dtype)

    def multiply(rows):
        # Each diagonal over the whole range, as scipy's kernel runs them (cutting
        # the range into cache-sized slices costs more in calls, 2x at 32 k).
        a, b = rows
        out[a:b] = 0  # the kernel adds into its output
        for d in range(len(offsets) - 1, -1, -1):
            off = offsets[d]
            lo, hi = max(a, off), min(b, n + off)  # j - off must be a row
            if lo < hi:
                matvec(hi - lo, hi - lo, 1, hi - lo, zero, data[d, lo:hi],
                       y[lo - off : hi - off], out[lo:hi])

    run_parallel(multiply, even_ranges(n, threads), threads)
    return out


def _is_batch(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1


def _all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite, in one pass without a temporary.

    The sum is finite when every element is, except when finite values
    overflow it: then this says ``False``, which only costs speed.
    """
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    return bool(np.isfinite(np.sum(x)))


class DiagonalForm(ProductForm):
    """W (or W.T) of a single-channel, stride-1, same-size convolution as a DIA matrix.

    A block of several columns (``matmat``) runs on the canonical CSR
    instead, built on first use: scipy's multi-vector CSR kernel reads it
    once for all the columns, 1.5x faster per column than the DIA kernel
    column by column.  So does a vector with a NaN or infinity: the stored
    zeros of the diagonals would carry it, times zero, to rows that do not
    read it.  Either way the results are bit for bit the CSR products.
    """

    name = "diagonals"
    # No index arrays to share on refill (the diagonals are all values): the
    # base class's pattern (None) and refill (a build) apply.

    def __init__(self, matrix: sp.dia_array, transposed: bool, canonical, lean: bool = False):
        self.matrix = matrix
        self.transposed = transposed
        self._canonical = canonical
        # keep_transpose=False: a block of columns runs on the diagonals, column
        # by column, so that no CSR matrix is built for it.
        self.lean = lean

    @staticmethod
    def applies(geometry) -> bool:
        """One channel, stride 1, zeros padding, the output the input's size, and every
        dilated kernel shorter than its dimension (so that the offsets grow with the tap)."""
        geom = geometry
        return (
            geom.padding_mode == "zeros"
            and geom.in_channels == geom.out_channels == 1
            and all(s == 1 for s in geom.stride)
            and tuple(geom.input_size) == tuple(geom.output_size)
            and all((k - 1) * d < n
                    for k, d, n in zip(geom.kernel_size, geom.dilation, geom.input_size))
        )

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed, backward) -> int:
        n, taps = math.prod(geometry.input_size), math.prod(geometry.kernel_size)
        # scipy stores the offsets in the smallest index dtype for the shape.
        return taps * n * np.dtype(dtype).itemsize + taps * index_dtype(n).itemsize

    @classmethod
    def build(cls, geometry, weight, *, transposed, backward, threads, canonical, lean=False):
        matrix = build_diagonals(geometry, weight, transposed=transposed, threads=threads)
        return cls(matrix, transposed, canonical, lean)

    def multiply(self, x, threads):
        if (_is_batch(x) and not self.lean) or not _all_finite(x):
            return csr_product(self._canonical(), x, threads)
        return dia_product(self.matrix, x, threads)

    def multiply_transposed(self, y, threads):
        if not _all_finite(y):
            # the canonical CSR's transpose (scipy's serial CSC kernel), as the
            # default operators' W.T would: infinities reach only the rows that read them
            return self._canonical().T @ y
        return dia_transposed_product(self.matrix, y, threads)

    @property
    def nbytes(self) -> int:
        return int(self.matrix.data.nbytes + self.matrix.offsets.nbytes)

    def _arrays(self):
        return [self.matrix.data, self.matrix.offsets]
