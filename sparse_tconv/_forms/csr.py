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

The transposed product on the canonical matrix itself (``keep_transpose=False``,
:func:`csr_transposed_product`) is scipy's serial CSC kernel (a scatter,
``W.T @ y``) on parts of the rows: each part, one range of output positions
in every output channel, writes the input positions near its own, so parts
that do not meet run at once, phase by phase.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp

from .. import _parallel, _sparsetools
from .._build import build, refill
from .._geometry import matrix_size
from .._parallel import (
    balanced_ranges,
    disjoint_phases,
    even_ranges,
    run_parallel,
    run_phases,
)
from .._validation import cast_if_safe
from .base import ProductForm, Role, from_position_major, to_position_major

__all__ = ["CsrForm", "csr_product", "csr_transposed_product", "RowParts", "row_parts"]


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


@dataclasses.dataclass(frozen=True)
class RowParts:
    """How :func:`csr_transposed_product` cuts a channel-major CSR matrix, fixed by its pattern.

    ``parts[k]`` lists the row ranges of part ``k``: one range of positions
    in every row channel; ``phases`` deal the parts into groups that write
    disjoint outputs.
    """

    parts: list[list[tuple[int, int]]]
    phases: list[list[int]]


def row_parts(matrix: sp.csr_array, row_channels: int, col_channels: int,
              n_parts: int) -> RowParts:
    """The parts and phases of the scatter ``matrix.T @ y`` (one pass over the indices).

    Rows and columns are channel-major, ``row_channels`` and
    ``col_channels`` channels.  A part's outputs are the columns at the
    positions its entries reach, in every channel: its span is the range of
    those positions (all of them where circular padding wraps round).
    """
    n_rows, n_cols = matrix.shape
    row_positions, col_positions = n_rows // row_channels, n_cols // col_channels
    indptr, indices = matrix.indptr, matrix.indices
    parts, spans = [], []
    for a, b in even_ranges(row_positions, n_parts):
        rows = [(o * row_positions + a, o * row_positions + b) for o in range(row_channels)]
        lo, hi = col_positions, 0
        for ra, rb in rows:
            cols = indices[indptr[ra]:indptr[rb]]
            if len(cols):
                positions = cols % col_positions if col_channels > 1 else cols
                lo, hi = min(lo, int(positions.min())), max(hi, int(positions.max()) + 1)
        parts.append(rows)
        # the span in column numbers of channel 0: parts that meet in one channel meet in all
        spans.append((lo, hi))
    return RowParts(parts, disjoint_phases(spans))


def csr_transposed_product(matrix: sp.csr_array, y: np.ndarray, threads: int,
                           plan: RowParts) -> np.ndarray:
    """``matrix.T @ y`` (no conjugation) for a 1-D or 2-D ``y``, on the CSR arrays of ``matrix``.

    Each part adds its rows' entries into the output through scipy's serial
    CSC kernel (``csc_matvec``, or ``csc_matvecs`` for a block of columns),
    row by row in stored order; parts run phase by phase (those of a phase
    write disjoint outputs), so the result does not depend on ``threads``.
    It equals scipy's ``matrix.T @ y`` to rounding (bit for bit where the
    parts do not meet).  A ``y`` needing a wider dtype is scipy's product.
    """
    y = cast_if_safe(y, matrix.dtype)
    scatter = _sparsetools.csc_matvec if y.ndim == 1 else _sparsetools.csc_matvecs
    if y.dtype != matrix.dtype or scatter is None:
        return matrix.T @ y
    if matrix.nnz < _parallel.MIN_PARALLEL_NNZ:
        threads = 1  # the same parts and phases: the same result
    y = np.ascontiguousarray(y)
    n_cols = matrix.shape[1]
    out = np.zeros((n_cols,) + y.shape[1:], dtype=matrix.dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    flat_out = out.reshape(-1)

    def add_part(k):
        for a, b in plan.parts[k]:
            if b <= a:
                continue
            if y.ndim == 1:
                scatter(n_cols, b - a, indptr[a : b + 1], indices, data, y[a:b], flat_out)
            else:
                scatter(n_cols, b - a, y.shape[1], indptr[a : b + 1], indices, data,
                        y[a:b].reshape(-1), flat_out)

    run_phases(add_part, plan.phases, threads)
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

    def __init__(self, matrix: sp.csr_array, transposed: bool, channels: int = 1,
                 row_channels: int = 1, col_channels: int = 1):
        self.matrix = matrix
        self.transposed = transposed
        self.channels = channels  # > 1: columns numbered (position, channel)
        # the channels of the rows and columns (what the transposed product's parts follow)
        self.row_channels, self.col_channels = row_channels, col_channels

    @staticmethod
    def applies(geometry) -> bool:
        return True  # any geometry

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed) -> int:
        return matrix_size(geometry, dtype, transposed).nbytes  # the same in either numbering

    @classmethod
    def build(cls, request):
        geometry, transposed = request.geometry, request.transposed
        backward = request.role is Role.BACKWARD
        channels = _column_channels(geometry, transposed) if backward else 1
        sides = _column_channels(geometry, not transposed), _column_channels(geometry, transposed)
        if channels == 1:  # position-major is the canonical order: share the canonical CSR
            return cls(request.canonical_matrix(), transposed, 1, *sides)
        matrix = build(geometry, request.weight, transposed=transposed, threads=request.threads,
                       channels_last=True)
        return cls(matrix, transposed, channels, *sides)

    @property
    def pattern(self):
        if self.channels == 1:
            return None  # the canonical CSR: the operator refills it
        m = self.matrix
        return SimpleNamespace(indices=m.indices, indptr=m.indptr, shape=m.shape)

    @classmethod
    def refill(cls, pattern, request):
        if pattern is None:
            return cls.build(request)
        geometry, transposed = request.geometry, request.transposed
        matrix = refill(geometry, request.weight, pattern, transposed=transposed,
                        threads=request.threads, channels_last=True)
        channels = _column_channels(geometry, transposed)
        return cls(matrix, transposed, channels, _column_channels(geometry, not transposed),
                   channels)

    def multiply(self, x, threads):
        return csr_product(self.matrix, to_position_major(x, self.channels), threads)

    @functools.cached_property
    def _row_parts(self) -> RowParts:
        # one pass over the indices, on first use (two threads may both compute it)
        return row_parts(self.matrix, self.row_channels, self.col_channels,
                         _parallel.scatter_parts(self.matrix.nnz))

    def multiply_transposed(self, y, threads):
        if self.channels > 1:  # columns position-major: scipy's serial scatter
            return from_position_major(self.matrix.T @ y, self.channels)
        return csr_transposed_product(self.matrix, y, threads, self._row_parts)
