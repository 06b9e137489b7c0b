"""The operators' product form for one channel and stride 1: W by diagonals (DIA).

A single-channel convolution with stride 1 whose output has the input's
spatial size (``'same'``-like padding) links output position ``i`` to input
position ``i + offset(t)`` through kernel tap ``t``, with one flat offset per
tap.  W is then the sum of one diagonal per tap: scipy's DIA format, which
stores the values only (8 bytes per float64 entry against 12 in CSR, plus
the explicit zeros where a tap falls into the padding, a few percent) and no
index at all.  Away from the borders of the first dimension the values of a
diagonal repeat with the flat stride of that dimension, so the products read
the border rows' values and one period of the interior's
(:class:`BandedDiagonals`): a few MB whatever the size, which stay in cache,
so that a product moves little more than its two vectors.  Each call of
scipy's serial DIA kernel multiplies a chunk of rows; threads take disjoint
chunks.

When every dilated kernel extent is shorter than its dimension, the offsets
grow strictly with the tap number (row-major), so each row adds its entries
in the CSR matrix's column order: the products equal the CSR products bit
for bit, the explicit zeros adding exact zeros, for finite inputs.  (An
infinite or NaN input element would also reach, times zero, the rows whose
padding covers it: the operators send such vectors to the CSR matrix.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.sparse as sp

from .. import _parallel, _sparsetools
from .._geometry import ConvGeometry, index_dtype
from .._parallel import even_ranges, run_parallel
from .._validation import cast_if_safe
from .base import ProductForm, Role
from .csr import csr_product

__all__ = ["DiagonalForm", "BandedForm", "BandedDiagonals", "build_diagonals"]


def _offsets(geom: ConvGeometry, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The diagonals' offsets (column - row, increasing) and each one's step along dimension 0.

    Tap ``t`` links output position ``i`` to input position ``i + offset(t)``;
    for W.T the taps come in reverse order, negated, so that the offsets
    still increase.  The second array is each diagonal's column coordinate
    minus its row coordinate along the first spatial dimension.
    """
    sizes, kernel, ndim = tuple(geom.input_size), tuple(geom.kernel_size), geom.ndim
    flat_strides = [math.prod(sizes[d + 1:]) for d in range(ndim)]
    offsets = np.zeros(kernel, dtype=np.int64)
    for d in range(ndim):
        shift = np.arange(kernel[d]) * geom.dilation[d] - geom.padding[d][0]
        offsets += (shift * flat_strides[d]).reshape([-1 if e == d else 1 for e in range(ndim)])
    first = np.arange(kernel[0]) * geom.dilation[0] - geom.padding[0][0]
    steps = np.repeat(first, math.prod(kernel[1:]))
    offsets = offsets.reshape(-1)
    if transposed:
        return -offsets[::-1], -steps[::-1]
    return offsets, steps


def _diagonal_values(geom: ConvGeometry, weight: np.ndarray, *, transposed: bool,
                     rows: tuple[int, int] | None = None, threads: int = 1) -> np.ndarray:
    """The DIA values of W (or W.T) at the columns whose first coordinate is in ``rows``.

    ``(taps, count * prod(sizes[1:]))``, diagonal ``t`` holding tap ``t``'s
    weight at every column whose other end (the output position for W, the
    input position for W.T) is in range, and 0 elsewhere.  ``rows=None``:
    one period of the interior (``count = 1``), the columns of a first
    coordinate that every tap keeps in range along the first dimension,
    which all hold these values.  Written in
    two steps: every diagonal filled with its weight (one pass, on
    ``threads`` threads), then, per dimension and tap index along it, the
    slab of columns that falls outside set to 0 (loops over
    ``sum(kernel_size)`` slabs, not over taps or positions).
    """
    sizes, kernel, ndim = tuple(geom.input_size), tuple(geom.kernel_size), geom.ndim
    lo_row, hi_row = (0, 1) if rows is None else rows
    window = (hi_row - lo_row,) + sizes[1:]
    n, taps = math.prod(window), math.prod(kernel)
    data = np.empty((taps, n), dtype=weight.dtype)
    values = weight.reshape(taps, 1)

    def fill(part):
        np.copyto(data[part[0]:part[1]], values[part[0]:part[1]])

    run_parallel(fill, even_ranges(taps, threads), threads if n * taps > 1 << 16 else 1)
    grid = data.reshape(kernel + window)
    for d in range(0 if rows is not None else 1, ndim):
        # input index = output index + shift, along dimension d
        shift = np.arange(kernel[d]) * geom.dilation[d] - geom.padding[d][0]
        # DIA values are indexed by column: valid where column - shift (W) or
        # column + shift (W.T) is a position of the other side.
        first_valid = np.clip(-shift if transposed else shift, 0, sizes[d])
        end_valid = np.clip(sizes[d] - shift if transposed else sizes[d] + shift, 0, sizes[d])
        if d == 0:  # the window's own coordinates
            first_valid = np.clip(first_valid - lo_row, 0, window[0])
            end_valid = np.clip(end_valid - lo_row, 0, window[0])
        for t in range(kernel[d]):
            slab: list[int | slice] = [slice(None)] * (2 * ndim)
            slab[d] = t
            slab[ndim + d] = slice(0, first_valid[t])
            grid[tuple(slab)] = 0
            slab[ndim + d] = slice(end_valid[t], None)
            grid[tuple(slab)] = 0
    return np.ascontiguousarray(data[::-1]) if transposed else data


def build_diagonals(
    geom: ConvGeometry, weight: np.ndarray, *, transposed: bool, threads: int = 1
) -> sp.dia_array:
    """W (or W.T) of a geometry :meth:`DiagonalForm.applies` accepts, as a DIA matrix.

    See :func:`_diagonal_values` for the values and :func:`_offsets` for the
    offsets.
    """
    n = math.prod(geom.input_size)
    offsets, _ = _offsets(geom, transposed)
    data = _diagonal_values(geom, weight, transposed=transposed, rows=(0, geom.input_size[0]),
                            threads=threads)
    return sp.dia_array((data, offsets), shape=(n, n))


# The interior rows are multiplied in chunks whose values (one period of the
# interior, as many columns as a chunk reads) stay in cache from one chunk to
# the next: about this many bytes of them per chunk, and at least this many rows
# (a call of scipy's kernel costs some 5 us).
_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the rows of a banded DIA matrix (:class:`BandedDiagonals`) come from.

    Rows ``[0, top)`` and ``[bottom, n)`` read stored windows of the
    diagonals; the rows between, in chunks of ``chunk`` rows (a multiple of
    ``period``, the flat stride of the first dimension), read one stored
    period of the interior of ``period_rows`` first coordinates.  ``top ==
    bottom`` when there is no interior worth it (then one window holds all).
    """

    n: int
    offsets: np.ndarray
    period: int
    top: int
    bottom: int
    chunk: int
    top_rows: tuple[int, int]  # first coordinates of the columns the top rows read
    bottom_rows: tuple[int, int]
    period_rows: int

    @classmethod
    def of(cls, geom: ConvGeometry, transposed: bool, itemsize: int) -> _Layout:
        sizes = tuple(geom.input_size)
        n, period = math.prod(sizes), math.prod(sizes[1:])
        offsets, steps = _offsets(geom, transposed)
        lowest, highest = int(offsets.min()), int(offsets.max())
        # A column is read alike by every tap along dimension 0 when its first
        # coordinate c has c - step in range for every step: rows whose every
        # column is such a column are interior.
        top = max(0, period * int(steps.max()) - lowest)
        bottom = min(n, period * (sizes[0] + int(steps.min())) - highest)
        taps = len(offsets)
        chunk = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (itemsize * taps))
        chunk = max(period, chunk // period * period)
        if bottom - top < chunk:
            whole = (0, sizes[0])
            return cls(n, offsets, period, n, n, chunk, whole, whole, 0)
        top_end = min(n, top + highest)  # columns read: [0, top_end)
        bottom_start = max(0, bottom + lowest)
        span = highest - lowest
        # the phase (< period) of the first chunk's first column, plus a chunk
        period_rows = -(-(period - 1 + chunk + span + 1) // period)
        return cls(n, offsets, period, top, bottom, chunk, (0, -(-top_end // period)),
                   (bottom_start // period, sizes[0]), period_rows)

    def nbytes(self, itemsize: int) -> int:
        taps = len(self.offsets)
        rows = self.top_rows[1] - self.top_rows[0]
        if self.top < self.bottom:
            rows += self.bottom_rows[1] - self.bottom_rows[0] + self.period_rows
        # (the offsets stored in the smallest index dtype for the shape, as scipy's)
        return taps * (rows * self.period * itemsize + index_dtype(self.n).itemsize)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One call of scipy's DIA kernel: rows ``[start, stop)`` reading ``values``
    from element ``phase`` of each diagonal (stored ``values.shape[1]`` apart)
    for the columns ``first_column, first_column + 1, ...``."""

    start: int
    stop: int
    first_column: int
    values: np.ndarray
    phase: int
    offsets: np.ndarray  # the matrix's offsets minus (first_column - start)


class BandedDiagonals:
    """A DIA matrix of a convolution as its edge rows and one period of its interior.

    Away from the first dimension's borders, a diagonal's value at a column
    depends only on the column's position within its slab of
    ``prod(sizes[1:])`` columns: one period of them, as long as a chunk of
    rows reads, serves every interior chunk (and stays in cache), while the
    rows near the borders read windows of the diagonals stored as they are.
    Every row is one call of scipy's DIA kernel over the same diagonals in
    the same order as on the whole matrix: the products are bit for bit
    those of the DIA matrix, whatever the number of threads, and the stored
    values a few MB whatever the size (16 MB against 170 MB for a 9x9 blur
    of 512x512).
    """

    def __init__(self, geom: ConvGeometry, weight: np.ndarray, *, transposed: bool,
                 threads: int = 1):
        layout = _Layout.of(geom, transposed, weight.dtype.itemsize)
        self.shape = (layout.n, layout.n)
        self.dtype = weight.dtype
        # Taps of weight 0 add exact zeros to every row (the operators send
        # vectors with a NaN or infinity to the CSR matrix): they are left out,
        # so that a sparse kernel (a 7x7 motion blur along a diagonal: 7 taps of
        # 49) costs what its nonzero taps do.
        nonzero = weight.reshape(-1) != 0
        self.kept = np.flatnonzero(nonzero[::-1] if transposed else nonzero)
        self.offsets = layout.offsets[self.kept].astype(index_dtype(layout.n))
        self.pieces = self._pieces(geom, weight, transposed, layout, threads)
        self.nbytes = sum(a.nbytes for a in self.arrays())

    def _pieces(self, geom, weight, transposed, layout, threads) -> list[_Piece]:
        def window(rows):
            values = _diagonal_values(geom, weight, transposed=transposed, rows=rows,
                                      threads=threads)
            return values if len(self.kept) == len(values) else values[self.kept]

        def piece(start, stop, first_column, values, phase=0):
            shifted = (self.offsets + (start - first_column)).astype(self.offsets.dtype)
            return _Piece(start, stop, first_column, values, phase, shifted)

        n, period, lowest = layout.n, layout.period, int(layout.offsets.min())

        def chunks(start, stop, values, window_column, periodic):
            # Rows in chunks, each call reading from the first column its rows
            # reach: element j of a window's diagonal is column window_column + j,
            # of the interior's period the columns at position j mod period.
            for a in range(start, stop, layout.chunk):
                first = max(window_column, a + lowest)
                phase = first % period if periodic else first - window_column
                yield piece(a, min(stop, a + layout.chunk), first, values, phase)

        if layout.top >= layout.bottom:
            return list(chunks(0, n, window(layout.top_rows), 0, False))
        interior = np.tile(window(None), (1, layout.period_rows))
        bottom_column = layout.bottom_rows[0] * period
        return [*chunks(0, layout.top, window(layout.top_rows), 0, False),
                *chunks(layout.top, layout.bottom, interior, 0, True),
                *chunks(layout.bottom, n, window(layout.bottom_rows), bottom_column, False)]

    def arrays(self) -> list[np.ndarray]:
        seen: dict[int, np.ndarray] = {}
        for p in self.pieces:
            seen.setdefault(id(p.values), p.values)
        return [*seen.values(), self.offsets]

    def matvec(self, x: np.ndarray, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        """``self @ x`` for a 1-D ``x`` of the matrix's dtype, pieces split among threads."""
        n = self.shape[0]
        if out is None:
            out = np.empty(n, dtype=self.dtype)
        kernel = _sparsetools.dia_matvec
        taps = len(self.offsets)

        def multiply(part):
            for p in self.pieces[part[0]:part[1]]:
                out[p.start:p.stop] = 0  # the kernel adds into its output
                length = p.values.shape[1]
                columns = min(n - p.first_column, length - p.phase)
                kernel(p.stop - p.start, columns, taps, length, p.offsets,
                       p.values.reshape(-1)[p.phase:], x[p.first_column:], out[p.start:p.stop])

        run_parallel(multiply, even_ranges(len(self.pieces), threads), threads)
        return out


def _banded_product(banded: BandedDiagonals, x: np.ndarray, threads: int,
                    fallback) -> np.ndarray:
    """``banded @ x`` for a 1-D ``x`` or a 2-D block of columns (column by column).

    An ``x`` needing a wider dtype than the matrix (or no scipy kernel) goes
    to ``fallback``; small matrices run on one thread.
    """
    x = cast_if_safe(x, banded.dtype)
    if x.dtype != banded.dtype or _sparsetools.dia_matvec is None:
        return fallback(x)
    if banded.shape[0] * len(banded.offsets) < _parallel.MIN_PARALLEL_NNZ:
        threads = 1
    if x.ndim == 2:
        # One contiguous row per column, both ways: the result comes back as
        # the transpose of a C-ordered array (a view, no copy).
        columns = np.ascontiguousarray(x.T)
        out = np.empty((x.shape[1], banded.shape[0]), dtype=banded.dtype)
        for column, result in zip(columns, out):
            banded.matvec(column, threads, result)
        return out.T
    return banded.matvec(np.ascontiguousarray(x), threads)


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


class BandedForm(ProductForm):
    """A form whose products read :class:`BandedDiagonals`: its own matrix's
    (``banded``), and the other matrix's, built on first use, for
    :meth:`multiply_transposed`."""

    banded: BandedDiagonals
    _other: BandedDiagonals | None = None
    _frozen: bool = False

    def _other_diagonals(self, build) -> BandedDiagonals:
        """The other matrix's diagonals, ``build()`` on first use (read-only if the form is)."""
        if self._other is None:
            other = build()
            if self._frozen:
                for array in other.arrays():
                    array.flags.writeable = False
            self._other = other
        return self._other

    @property
    def nbytes(self) -> int:
        return self.banded.nbytes  # what a product reads

    def freeze(self) -> ProductForm:
        self._frozen = True
        return super().freeze()

    def _arrays(self):
        arrays = self.banded.arrays()
        if self._other is not None:
            arrays += self._other.arrays()
        return arrays


class DiagonalForm(BandedForm):
    """W (or W.T) of a single-channel, stride-1, same-size convolution by diagonals.

    The products read :class:`BandedDiagonals` (the edge rows and one period
    of the interior, a few MB); :attr:`matrix`, the whole DIA matrix they
    equal bit for bit, is built only when asked for.  A block of several
    columns (``matmat``) runs on the canonical CSR instead, built on first
    use: scipy's multi-vector CSR kernel reads it once for all the columns,
    and the columns need no transposition (faster per column: figures in
    docs/performance.md; with ``keep_transpose=False``, which builds nothing
    more, they run column by column on the diagonals).
    So does a vector with a NaN or infinity: the stored zeros of the
    diagonals would carry it, times zero, to rows that do not read it.
    Either way the results are bit for bit the CSR products.  The transposed product
    (``keep_transpose=False``) reads the banded diagonals of the other
    matrix, built from the weight on first use: its values are as small, and
    its sums run in the order of W.T's own DIA kernel, which the default
    operators use.
    """

    name = "diagonals"
    # No index arrays to share on refill (the diagonals are all values): the
    # base class's pattern (None) and refill (a build) apply.

    def __init__(self, geometry: ConvGeometry, weight: np.ndarray, banded: BandedDiagonals,
                 transposed: bool, canonical, lean: bool = False):
        self._geometry = geometry
        self._weight = weight
        self.banded = banded
        self.transposed = transposed
        self._canonical = canonical
        # keep_transpose=False: a block of columns runs on the diagonals, column
        # by column, so that no CSR matrix is built for it.
        self.lean = lean
        self._matrix: sp.dia_array | None = None

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
    def predict_nbytes(cls, geometry, dtype, *, transposed) -> int:
        itemsize = np.dtype(dtype).itemsize
        return _Layout.of(geometry, transposed, itemsize).nbytes(itemsize)

    @classmethod
    def build(cls, request):
        geometry, weight, transposed = request.geometry, request.weight, request.transposed
        banded = BandedDiagonals(geometry, weight, transposed=transposed, threads=request.threads)
        return cls(geometry, weight, banded, transposed, request.canonical_matrix,
                   request.role is Role.LEAN)

    @property
    def matrix(self) -> sp.dia_array:
        """The whole DIA matrix (built on first use, read-only once the form is)."""
        if self._matrix is None:
            matrix = build_diagonals(self._geometry, self._weight, transposed=self.transposed)
            if self._frozen:
                matrix.data.flags.writeable = matrix.offsets.flags.writeable = False
            self._matrix = matrix
        return self._matrix

    def _fallback(self, x):
        return self._canonical() @ x

    def multiply(self, x, threads):
        if (_is_batch(x) and not self.lean) or not _all_finite(x):
            return csr_product(self._canonical(), x, threads)
        return _banded_product(self.banded, x, threads, self._fallback)

    def multiply_transposed(self, y, threads):
        if not _all_finite(y):
            # the canonical CSR's transpose (scipy's serial CSC kernel), as the
            # default operators' W.T would: infinities reach only the rows that read them
            return self._canonical().T @ y
        other = self._other_diagonals(lambda: BandedDiagonals(
            self._geometry, self._weight, transposed=not self.transposed))
        return _banded_product(other, y, threads, lambda v: self._canonical().T @ v)

    def _arrays(self):
        arrays = super()._arrays()
        if self._matrix is not None:
            arrays += [self._matrix.data, self._matrix.offsets]
        return arrays
