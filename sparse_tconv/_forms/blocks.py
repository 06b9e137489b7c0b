"""The operators' product form: W as dense channel blocks (BSR), position-major.

With zeros padding, W's entries for output position ``p`` and input position
``q`` form one dense block ``(C_out/groups) x (C_in/groups)`` per group: the
weight of the one kernel tap that links ``p`` to ``q`` (no two taps reach the
same ``q`` from the same ``p``).  Numbering rows ``(p, channel)`` and
columns ``(q, channel)`` makes each block contiguous, so W is a BSR matrix
whose block pattern is that of the single-channel convolution.  Against the
CSR matrix it stores one index per block instead of one per entry (8 bytes
per entry in float64 instead of 12: two thirds of the memory traffic of a
product, which is bandwidth bound), and a ``matvec`` reads a few
neighbouring positions of every channel per block row.

A block row of W multiplied by a block of columns is a sum of small dense
products, which :func:`bsr_product` hands to numpy's ``matmul`` (BLAS): that
is what makes a batch cost far less per column than separate products.

The transposed product on the same arrays (:func:`bsr_transposed_product`,
``keep_transpose=False``) reads the blocks in their stored order and adds
``B.T @ y[p]`` into the output block of each block's column, through
scipy's serial CSC kernel on the blocks' rows: row ``r`` of block ``B``
scaled by ``y[p, r]`` is one column of a scatter whose vectors are the rows
of the blocks.  Read in stored order, the matrix streams from memory as in
``W @ x`` (reading it in the transpose's order instead jumps between the
block rows of every tap: slower, docs/performance.md).  Parts of block rows that write
disjoint outputs run at once, in phases (:func:`~.._parallel.disjoint_phases`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.sparse as sp

from .. import _parallel, _sparsetools
from .._build import build
from .._geometry import ConvGeometry, index_dtype
from .._parallel import (
    balanced_ranges,
    disjoint_phases,
    even_ranges,
    run_parallel,
    run_phases,
)
from .._validation import INT32_MAX, cast_if_safe
from .base import ProductForm, from_position_major, to_position_major

__all__ = [
    "BlockForm",
    "BlockPattern",
    "block_shape",
    "block_pattern",
    "fill_blocks",
    "bsr_product",
    "bsr_transposed_product",
    "ScatterPlan",
    "scatter_plan",
]

# Stored bytes of the blocks one ``matmul`` call of a batched product reads:
# the blocks, their columns of x and the partial products stay in cache.
_BATCH_CHUNK_BYTES = 1 << 22

# Block rows (one per scatter column) one call of the transposed product's
# kernel takes: its index and scale arrays (4 + 8 bytes each) stay in cache.
_SCATTER_CHUNK = 1 << 15


@dataclasses.dataclass(frozen=True)
class BlockPattern:
    """Where each block of the BSR matrix sits, and which weight block it holds.

    ``source[b]`` numbers block ``b``'s weight block among the
    ``groups * taps`` of :func:`_weight_blocks`; ``indptr``/``indices`` are
    the BSR arrays (block rows ``(p, group)``, block columns ``(q, group)``).
    """

    indptr: np.ndarray
    indices: np.ndarray
    source: np.ndarray
    shape: tuple[int, int]
    blocksize: tuple[int, int]


def block_shape(geom: ConvGeometry, transposed: bool) -> tuple[int, int]:
    """``(rows, columns)`` of one block: channels per group of output and input."""
    r, c = geom.out_channels // geom.groups, geom.in_channels // geom.groups
    return (c, r) if transposed else (r, c)


def _weight_blocks(geom: ConvGeometry, weight: np.ndarray, transposed: bool) -> np.ndarray:
    """The weight as ``(groups * taps, R, C)`` contiguous blocks.

    ``weight`` is in the forward convolution's layout ``(C_out, C_in/g, *k)``
    (a transposed convolution's weight is that array, see ``_build``).
    """
    g, taps = geom.groups, math.prod(geom.kernel_size)
    r, c = geom.out_channels // g, geom.in_channels // g
    blocks = weight.reshape(g, r, c, taps)
    blocks = blocks.transpose(0, 3, 2, 1) if transposed else blocks.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(blocks).reshape(g * taps, *block_shape(geom, transposed))


def _pattern_index_dtype(nnz: int, rows: int, cols: int, groups: int) -> np.dtype:
    """The pattern's index dtype: the single-channel matrix's (``nnz`` blocks, ``rows x cols``),
    or int64 when ``groups`` copies of its blocks or columns overflow int32."""
    if groups > 1 and max(nnz * groups, cols * groups) > INT32_MAX:
        return np.dtype(np.int64)
    return index_dtype(nnz, rows, cols)


def block_pattern(geom: ConvGeometry, *, transposed: bool, threads: int) -> BlockPattern:
    """The BSR pattern of W (or W.T), from the single-channel matrix.

    The single-channel matrix is built with the tap numbers ``1..taps`` as
    its weight, so each stored value names the tap of its block (exactly:
    small integers in float64, no two taps summed under zeros padding).
    Costs O(number of blocks), ``1 / (R * C)`` of the entries.
    """
    taps = math.prod(geom.kernel_size)
    single = dataclasses.replace(geom, in_channels=1, out_channels=1, groups=1)
    tap_numbers = np.arange(1, taps + 1, dtype=np.float64).reshape((1, 1, *geom.kernel_size))
    s = build(single, tap_numbers, transposed=transposed, threads=threads)
    tap = s.data.astype(np.intp) - 1
    g = geom.groups
    r, c = block_shape(geom, transposed)
    shape = (s.shape[0] * g * r, s.shape[1] * g * c)
    if g == 1:
        return BlockPattern(s.indptr, s.indices, tap, shape, (r, c))
    # Block row (p, group) holds the blocks of row p of the single-channel
    # matrix, in group ``group``'s column block and weight.
    per_row = np.repeat(np.diff(s.indptr), g)
    index_dtype = _pattern_index_dtype(len(s.indices), *s.shape, g)
    indptr = np.zeros(len(per_row) + 1, dtype=index_dtype)
    np.cumsum(per_row, out=indptr[1:])
    first = np.repeat(np.repeat(s.indptr[:-1], g), per_row)
    entry = np.arange(indptr[-1], dtype=np.intp) - np.repeat(indptr[:-1], per_row) + first
    group = np.repeat(np.tile(np.arange(g, dtype=np.intp), s.shape[0]), per_row)
    indices = (s.indices[entry].astype(index_dtype) * g + group).astype(index_dtype)
    return BlockPattern(indptr, indices, group * taps + tap[entry], shape, (r, c))


def fill_blocks(
    pattern: BlockPattern, geom: ConvGeometry, weight: np.ndarray, *, transposed: bool,
    threads: int = 1,
) -> sp.bsr_array:
    """The BSR matrix of ``pattern`` with the blocks of ``weight``.

    The index arrays are the pattern's (shared, not copied); the values are
    one gather of the weight blocks, written once, by ``threads`` threads
    into ``np.empty`` (each thread faults in its own pages).
    """
    blocks = _weight_blocks(geom, weight, transposed)
    data = np.empty((len(pattern.source), *blocks.shape[1:]), dtype=blocks.dtype)
    ranges = even_ranges(len(data), threads)

    def gather(part):
        a, b = part
        # mode="clip": no bounds check pass (the sources are valid by construction)
        np.take(blocks, pattern.source[a:b], axis=0, mode="clip", out=data[a:b])

    if threads > 1 and data.size >= _parallel.MIN_PARALLEL_NNZ:
        run_parallel(gather, ranges, threads)
    else:
        gather((0, len(data)))
    matrix = sp.bsr_array((data, pattern.indices, pattern.indptr), shape=pattern.shape,
                          blocksize=pattern.blocksize, copy=False)
    matrix.has_canonical_format = True  # sorted, no duplicates: by construction
    return matrix


def bsr_product(matrix: sp.bsr_array, x: np.ndarray, threads: int, groups: int = 1) -> np.ndarray:
    """``W @ x`` for the block form ``matrix`` of W, with ``x`` and the result channel-major.

    ``x`` is 1-D or 2-D (a block of columns), its rows numbered like W's
    columns, ``(channel, position)``; ``matrix`` is W position-major, as
    :func:`fill_blocks` makes it, with ``groups`` groups.

    1-D: ``x`` is reordered position-major (a copy, small next to the
    matrix) and multiplied by scipy's serial BSR kernel on block-row ranges
    balanced by blocks: bit for bit ``matrix @ x`` whatever the number of
    threads.  2-D: each block row is a sum of dense products (numpy
    ``matmul``, i.e. BLAS), gathered from and written to the channel-major
    arrays directly; it equals ``matrix @ x`` to rounding and does not
    depend on the number of threads either (each block row is summed by the
    same code in the same order).  A product whose ``x`` needs a wider dtype
    than the matrix is scipy's.
    """
    r, c = matrix.blocksize
    in_channels, out_channels = groups * c, groups * r
    x = cast_if_safe(x, matrix.dtype)
    if x.dtype != matrix.dtype or _sparsetools.bsr_matvec is None:
        y = matrix @ to_position_major(x, in_channels)
        return from_position_major(y, out_channels)
    if matrix.nnz < _parallel.MIN_PARALLEL_NNZ:
        threads = 1
    if x.ndim == 2 and x.shape[1] == 0:
        return np.zeros((matrix.shape[0], 0), dtype=matrix.dtype)
    if x.ndim == 2 and x.shape[1] > 1:
        return _block_matmat(matrix, np.ascontiguousarray(x), threads, groups)
    y = _block_matvec(matrix, to_position_major(x.reshape(-1), in_channels), threads)
    return from_position_major(y, out_channels).reshape((-1,) + x.shape[1:])


def _block_matvec(matrix, x, threads):
    r, c = matrix.blocksize
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data.reshape(-1)
    n_block_cols = matrix.shape[1] // c
    # np.empty, zeroed by each thread on its own rows (pages touched in parallel).
    out = np.empty(matrix.shape[0], dtype=matrix.dtype)
    matvec = _sparsetools.bsr_matvec

    def multiply(rows):
        a, b = rows
        part = out[a * r : b * r]
        part[:] = 0  # the kernel adds into its output
        matvec(b - a, n_block_cols, r, c, indptr[a : b + 1], indices, data, x, part)

    ranges = balanced_ranges(indptr, threads)
    run_parallel(multiply, ranges, threads)  # on this thread when threads <= 1
    return out


def _uniform_chunks(indptr, rows, max_blocks):
    """Split block rows ``rows = (a, b)`` into ranges of equally long rows.

    Each range holds at most ``max_blocks`` blocks (at least one row).  A
    convolution has few distinct row lengths (one per border case), in long
    runs, so the ranges stay large.
    """
    a, end = rows
    lengths = np.diff(indptr[a : end + 1])
    changes = np.flatnonzero(lengths[1:] != lengths[:-1]) + 1 + a
    for run_start, run_stop in zip([a, *changes.tolist()], [*changes.tolist(), end]):
        per_row = int(lengths[run_start - a])
        step = max(1, max_blocks // per_row) if per_row else run_stop - run_start
        for first in range(run_start, run_stop, step):
            yield first, min(first + step, run_stop)


def _block_matmat(matrix, x, threads, groups):
    r, c = matrix.blocksize
    n_vecs = x.shape[1]
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    n_block_rows = len(indptr) - 1
    # Column block (q, g) of x is channels g*c..(g+1)*c at position q: a
    # strided view, gathered by np.take without reordering x first.
    x_blocks = x.reshape(groups, c, -1, n_vecs).transpose(0, 2, 1, 3)  # (g, q, c, vecs)
    if groups == 1:
        # Block row p is rows (channel, p) of the channel-major result: sum
        # straight into a strided view of it.
        result = np.empty((r, n_block_rows, n_vecs), dtype=matrix.dtype)
        out = result.transpose(1, 0, 2)
    else:
        out = np.empty((n_block_rows, r, n_vecs), dtype=matrix.dtype)
    # a block, its gathered columns of x and its product
    per_block = (r * c + c * n_vecs + r * n_vecs) * data.itemsize
    blocks_per_call = max(1, _BATCH_CHUNK_BYTES // per_block)

    def gather(columns):
        if groups == 1:
            return x_blocks[0][columns]  # (np.take would copy the strided view whole)
        return x_blocks[columns % groups, columns // groups]

    def multiply(rows):
        for a, b in _uniform_chunks(indptr, rows, blocks_per_call):
            start, stop = indptr[a], indptr[b]
            products = np.matmul(data[start:stop], gather(indices[start:stop]))
            # Every row of the chunk has the same number of blocks (zero gives
            # zeros), so a reshape lines them up: a sum over one axis, in block
            # order, ten times faster than np.add.reduceat on segments.
            products = products.reshape(b - a, -1, r, n_vecs)
            np.sum(products, axis=1, out=out[a:b])

    ranges = balanced_ranges(indptr, threads)
    run_parallel(multiply, ranges, threads)  # on this thread when threads <= 1
    if groups == 1:
        return result.reshape(-1, n_vecs)
    return from_position_major(out.reshape(-1, n_vecs), groups * r)


@dataclasses.dataclass(frozen=True)
class ScatterPlan:
    """How :func:`bsr_transposed_product` cuts a BSR matrix: fixed by its pattern alone.

    ``parts`` are block-row ranges (:func:`~.._parallel.scatter_parts` of
    them, balanced by blocks, whatever the number of threads); ``phases``
    deal them into groups that write disjoint block columns.
    """

    parts: list[tuple[int, int]]
    phases: list[list[int]]


def scatter_plan(indptr: np.ndarray, indices: np.ndarray, parts: int) -> ScatterPlan:
    """The parts and phases of the scatter of a compressed matrix's rows (O(blocks))."""
    ranges = balanced_ranges(indptr, parts)
    spans = []
    for a, b in ranges:
        columns = indices[indptr[a]:indptr[b]]
        spans.append((int(columns.min()), int(columns.max()) + 1) if len(columns) else (0, 0))
    return ScatterPlan(ranges, disjoint_phases(spans))


def _row_chunks(indptr, rows, max_blocks):
    """Cut block rows ``rows = (a, b)`` into ranges of about ``max_blocks`` blocks.

    Whole rows, at least one: a range may hold more than ``max_blocks`` blocks
    (a long row, or where the balanced cuts fall), which its users must allow for.
    """
    a, b = rows
    n = -(-int(indptr[b] - indptr[a]) // max_blocks)
    if n <= 1:
        return [rows]
    return [(a + i, a + j) for i, j in balanced_ranges(indptr[a : b + 1] - indptr[a], n)]


def bsr_transposed_product(matrix: sp.bsr_array, y: np.ndarray, threads: int, groups: int,
                           plan: ScatterPlan) -> np.ndarray:
    """``matrix.T @ y`` on the arrays of the block form ``matrix``, channel-major in and out.

    ``matrix`` is a block form as :func:`fill_blocks` makes it (rows ``(p,
    channel)`` with ``groups * r`` channels, columns with ``groups * c``);
    ``plan`` is :func:`scatter_plan` of its pattern.  Each part of block rows
    adds, block by block in stored order, ``B.T @ y[p]`` into its block
    column's output: for one vector scipy's serial ``csc_matvecs`` does it,
    with the rows of the blocks as its vectors (so every output element is
    summed in the order of ``bsr_matvec`` on the transposed matrix, blocks by
    row then the rows of each block, up to where two parts meet); for a block
    of columns numpy's ``matmul`` forms each block's products and the same
    kernel adds them up.  Parts run phase by phase (parts of a phase write
    disjoint outputs), so the result does not depend on ``threads``.  A ``y``
    needing a wider dtype than the matrix is multiplied in that dtype, the
    blocks converted a chunk at a time.
    """
    r, c = matrix.blocksize
    y = cast_if_safe(y, matrix.dtype)
    dtype = np.result_type(matrix.dtype, y.dtype)
    if y.ndim == 2 and y.shape[1] == 0:
        return np.zeros((matrix.shape[1], 0), dtype=dtype)
    y = y.astype(dtype, copy=False)
    if _sparsetools.csc_matvecs is None:  # scipy's own product (it transposes the blocks)
        return from_position_major(matrix.T @ to_position_major(y, groups * r), groups * c)
    if matrix.nnz < _parallel.MIN_PARALLEL_NNZ:
        threads = 1  # the same parts and phases: the same result
    n_vecs = 1 if y.ndim == 1 else y.shape[1]
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    n_block_cols = matrix.shape[1] // c
    v = to_position_major(y.reshape(len(y), n_vecs), groups * r).reshape(-1, r, n_vecs)
    out = np.zeros((n_block_cols, c, n_vecs), dtype=dtype)
    flat_out = out.reshape(-1)
    if n_vecs == 1:
        max_blocks = max(1, _SCATTER_CHUNK // r)
    else:
        max_blocks = max(1, _BATCH_CHUNK_BYTES // ((r * c + (r + c) * n_vecs) * dtype.itemsize))
    shared_columns = np.arange(max_blocks * r + 1, dtype=indices.dtype)  # one per scatter column
    shared_ones = np.ones(max_blocks, dtype=dtype)
    scatter = _sparsetools.csc_matvecs

    def add_rows(rows):
        a, b = rows
        start, stop = int(indptr[a]), int(indptr[b])
        m = stop - start
        if m == 0:
            return
        # A chunk is whole rows, so it may hold more than max_blocks blocks (a long
        # row, or balanced cuts): the kernel must not read past the shared arrays.
        columns, ones = shared_columns, shared_ones
        if m > max_blocks:
            columns = np.arange(m * r + 1, dtype=indices.dtype)
            ones = np.ones(m, dtype=dtype)
        # y's block row for every block of the rows
        scale = np.repeat(v[a:b], np.diff(indptr[a : b + 1]), axis=0)  # (m, r, n_vecs)
        blocks = data[start:stop].astype(dtype, copy=False)
        if n_vecs == 1:
            # column (block k, row i) of the scatter: row i of block k, times y[p_k, i],
            # into output block indices[k]
            scatter(n_block_cols, m * r, c, columns[: m * r + 1],
                    np.repeat(indices[start:stop], r), scale.reshape(-1),
                    blocks.reshape(-1), flat_out)
        else:
            products = np.matmul(blocks.transpose(0, 2, 1), scale)  # (m, c, n_vecs)
            scatter(n_block_cols, m, c * n_vecs, columns[: m + 1], indices[start:stop],
                    ones[:m], products.reshape(-1), flat_out)

    def add_part(k):
        for rows in _row_chunks(indptr, plan.parts[k], max_blocks):
            add_rows(rows)

    run_phases(add_part, plan.phases, threads)
    result = from_position_major(out.reshape(-1, n_vecs), groups * c)
    return result.reshape(-1) if y.ndim == 1 else result


class BlockForm(ProductForm):
    """W (or W.T) as a BSR matrix of dense channel blocks, numbered position-major."""

    name = "blocks"

    def __init__(self, pattern: BlockPattern, matrix: sp.bsr_array, transposed: bool,
                 groups: int):
        self.block_pattern = pattern
        self.matrix = matrix
        self.transposed = transposed
        self.groups = groups

    @staticmethod
    def applies(geometry) -> bool:
        """Zeros padding (the other modes fold several taps onto one input
        position) and blocks of more than one entry (one-entry blocks are the
        CSR matrix again, with one more reordering per product)."""
        r, c = block_shape(geometry, False)
        return geometry.padding_mode == "zeros" and r * c > 1

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed) -> int:
        # The pattern is the single-channel matrix's, once per group (see
        # block_pattern), with the index dtype it gets there.
        single = dataclasses.replace(geometry, in_channels=1, out_channels=1, groups=1)
        per_group = single.nnz
        rows, cols = math.prod(single.input_size), math.prod(single.output_size)
        if not transposed:
            rows, cols = cols, rows
        g = geometry.groups
        idx = _pattern_index_dtype(per_group, rows, cols, g)
        return (geometry.nnz * np.dtype(dtype).itemsize + per_group * g * idx.itemsize
                + (rows * g + 1) * idx.itemsize)

    @classmethod
    def build(cls, request):
        geometry, transposed = request.geometry, request.transposed
        pattern = block_pattern(geometry, transposed=transposed, threads=request.threads)
        return cls.refill(pattern, request)

    @classmethod
    def vectors_via_transpose(cls, geometry, transposed, dtype) -> bool:
        """In single precision, when this matrix's blocks have at least
        ``min(columns, 16)`` rows.

        scipy's ``bsr_matvec`` takes dot products along a block's rows; in
        single precision they run slower than the matrix can be read unless
        the blocks are wide and flat, while the other matrix's scatter adds
        whole rows of its blocks (this matrix's columns, ``rows`` long).
        Double precision keeps its own form.  The measurements behind the
        rule: docs/performance.md, "Single precision".
        """
        rows, cols = block_shape(geometry, transposed)
        return np.dtype(dtype).char in "fF" and rows >= min(cols, 16)

    @classmethod
    def lean_transposed(cls, geometry, transposed) -> bool:
        """The matrix whose blocks are wider than tall (its own when square).

        Both directions then run on long rows: ``bsr_matvec`` takes dot
        products along a block's rows, the transposed scatter adds whole
        rows (measured on a 3->64 layer: docs/performance.md).
        """
        rows, cols = block_shape(geometry, transposed)
        return transposed if rows <= cols else not transposed

    @property
    def pattern(self) -> BlockPattern:
        return self.block_pattern

    @classmethod
    def refill(cls, pattern, request):
        if pattern is None:
            return cls.build(request)
        geometry, transposed = request.geometry, request.transposed
        matrix = fill_blocks(pattern, geometry, request.weight, transposed=transposed,
                             threads=request.threads)
        return cls(pattern, matrix, transposed, geometry.groups)

    def multiply(self, x, threads):
        return bsr_product(self.matrix, x, threads, self.groups)

    @functools.cached_property
    def _scatter_plan(self) -> ScatterPlan:
        # O(blocks), on first use (two threads may both compute it: the same plan)
        m = self.matrix
        return scatter_plan(m.indptr, m.indices, _parallel.scatter_parts(m.nnz))

    def multiply_transposed(self, y, threads):
        return bsr_transposed_product(self.matrix, y, threads, self.groups, self._scatter_plan)

    def _arrays(self):
        return [*super()._arrays(), self.block_pattern.source]
