"""Rows ``[row_start, row_stop)`` of W (or W.T) on their own, without the rest.

Rows are the C-order flattening of the grid (group, row channel of the group,
position_1, ..., position_N).  A contiguous range of that flattening is a
union of at most ``2 * (N + 2) - 1`` boxes (products of one index range per
axis), listed in row order.  Restricting every per-dimension family to a
box's range on its axis gives another arithmetic progression (start and first
columns shifted), so each box is written by the strided views of
:mod:`._build`, at the whole matrix's offsets minus the offset of
``row_start``.  The distributed operator builds its row blocks this way, on
the workers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse as sp

from ._build import Layout, box_blocks, canonical_csr, grouped_kernel, layout, write_blocks
from ._geometry import ConvGeometry, index_dtype, matrix_size
from ._validation import check_int, check_positive_int

__all__ = ["build_rows", "row_offsets", "balanced_row_ranges"]


def _boxes(start: int, stop: int, sizes) -> list[tuple[tuple[int, int], ...]]:
    """Cut the flat C-order range [start, stop) of a grid into boxes, in row order.

    Each box is one ``(lo, hi)`` index range per axis of ``sizes``.
    """
    out = []
    last = len(sizes) - 1

    def cut(a, b, axis, prefix):
        if a >= b:
            return
        if axis == last:
            out.append(prefix + ((a, b),))
            return
        inner = math.prod(sizes[axis + 1 :])
        ia, ra = divmod(a, inner)
        ib, rb = divmod(b, inner)
        if ia == ib:
            cut(ra, rb, axis + 1, prefix + ((ia, ia + 1),))
            return
        if ra:
            cut(ra, inner, axis + 1, prefix + ((ia, ia + 1),))
            ia += 1
        if ib > ia:
            out.append(prefix + ((ia, ib),) + tuple((0, n) for n in sizes[axis + 1 :]))
        if rb:
            cut(0, rb, axis + 1, prefix + ((ib, ib + 1),))

    cut(start, stop, 0, ())
    return out


def _box_indptr(lay: Layout, boxes, dtype) -> np.ndarray:
    """Row pointers of the rows of ``boxes`` (in order), starting at 0."""
    pieces = []
    for (g0, g1), (r0, r1), *ranges in boxes:
        lengths = functools.reduce(
            np.multiply.outer, [m.counts[lo:hi] for m, (lo, hi) in zip(lay.maps, ranges)]
        )
        lengths = np.ravel(lengths) * lay.col_channels
        pieces.append(np.tile(lengths, (g1 - g0) * (r1 - r0)))
    lengths = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    indptr = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=indptr[1:], dtype=dtype)
    return indptr


def _check_row(value, name: str, n_rows: int) -> int:
    value = check_int(value, name)
    if not 0 <= value <= n_rows:
        raise ValueError(
            f"{name} must be in [0, {n_rows}] (the number of rows), got {name}={value}"
        )
    return value


def row_offsets(geom: ConvGeometry, rows, *, transposed: bool) -> np.ndarray:
    """``indptr[rows]`` of W (or W.T) without building anything.

    Costs O(N) per requested row (N spatial dimensions), independent of the
    size of the matrix.

    Parameters
    ----------
    geom : ConvGeometry
        A validated geometry.
    rows : int or array_like of int
        Row indices in ``[0, n_rows]`` (``n_rows`` gives ``nnz``).
    transposed : bool
        Rows of W.T instead of W.

    Returns
    -------
    ndarray of int64
        The row pointers, shaped like ``rows``.

    Raises
    ------
    ValueError
        If a row index is outside ``[0, n_rows]``.
    """
    lay = layout(geom, transposed)
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"rows must be integers, got rows.dtype={rows.dtype}")
    rows = rows.astype(np.int64)
    n_rows = lay.n_rows
    if rows.size and (rows.min() < 0 or rows.max() > n_rows):
        raise ValueError(
            f"rows must lie in [0, {n_rows}] (the number of rows), got values in "
            f"[{rows.min()}, {rows.max()}]"
        )
    maps = lay.maps
    sizes = [m.n_rows for m in maps]
    totals = [m.total for m in maps]
    channel, rest = np.divmod(rows, math.prod(sizes))
    out = channel * lay.nnz_pattern
    leading = np.full(rows.shape, lay.col_channels, dtype=np.int64)
    for d, m in enumerate(maps):
        # rows before (p_1, ..., p_N) inside one row channel's pattern: those
        # with equal p_1..p_{d-1} and a smaller p_d, summed over d.
        p, rest = np.divmod(rest, math.prod(sizes[d + 1 :]))
        out = out + leading * m.offsets[p] * math.prod(totals[d + 1 :])
        leading = leading * m.counts[p]
    return out


def balanced_row_ranges(geom: ConvGeometry, parts: int, *, transposed: bool):
    """Cut the rows of W (or W.T) into at most ``parts`` ranges of about equal nnz.

    The cuts are ``searchsorted(indptr, nnz * i / parts)`` (the rule of the
    threaded products), found by bisection on :func:`row_offsets`, so the
    cost is O(parts * N * log(n_rows)) and nothing is built.

    Parameters
    ----------
    geom : ConvGeometry
        A validated geometry.
    parts : int
        The number of ranges wanted, at least 1.
    transposed : bool
        Rows of W.T instead of W.

    Returns
    -------
    list of (int, int)
        Non-empty, contiguous ``(row_start, row_stop)`` ranges covering every
        row in order; fewer than ``parts`` when there are fewer rows (or when
        single rows hold more than ``nnz / parts`` entries).

    Raises
    ------
    TypeError, ValueError
        If ``parts`` is not a positive int.
    """
    parts = check_positive_int(parts, "parts")
    lay = layout(geom, transposed)
    n_rows = lay.n_rows
    nnz = lay.n_row_channels * lay.nnz_pattern
    targets = nnz * np.arange(1, parts, dtype=np.int64) // parts
    lo = np.zeros(len(targets), dtype=np.int64)
    hi = np.full(len(targets), n_rows, dtype=np.int64)
    while (lo < hi).any():  # the first row whose offset reaches the target
        mid = (lo + hi) // 2
        below = row_offsets(geom, mid, transposed=transposed) < targets
        lo = np.where(below, mid + 1, lo)
        hi = np.where(below, hi, mid)
    cuts = [0, *lo.tolist(), n_rows]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def build_rows(
    geom: ConvGeometry,
    weight: np.ndarray,
    row_start: int,
    row_stop: int,
    *,
    transposed: bool,
    threads: int,
) -> sp.csr_array:
    """CSR of rows ``[row_start, row_stop)`` of W (``transposed=False``) or W.T.

    Equal to ``build(geom, weight, ...)[row_start:row_stop]``: same shape
    ``(row_stop - row_start, n_cols)``, same ``indptr`` (starting at 0),
    ``indices`` and ``data``, bit for bit, in canonical format.  Time and
    memory are O(rows + nnz of the range) (plus the per-dimension maps of the
    geometry, which every build shares): nothing outside the range is built.

    Parameters
    ----------
    geom : ConvGeometry
        A validated geometry (see :func:`validate`).
    weight : ndarray
        The validated weight (see :func:`validate`); its dtype is the dtype
        of ``data``.
    row_start, row_stop : int
        ``0 <= row_start <= row_stop <= n_rows``.
    transposed : bool
        Rows of W.T instead of W.
    threads : int
        Threads used to write the entries.

    Returns
    -------
    scipy.sparse.csr_array, shape (row_stop - row_start, n_cols)
        Index dtype chosen from the block's own nnz, rows and columns
        (int32 when they fit, as for the whole matrix).

    Raises
    ------
    TypeError, ValueError
        If a row bound is not an int in range, or ``row_start > row_stop``.

    Notes
    -----
    The rows are the C-order flattening of (group, row channel of the group,
    position_1, ..., position_N); the range is cut into at most
    ``2 * (N + 2) - 1`` boxes (one index range per axis), and every
    per-dimension family is intersected with its axis' range: an arithmetic
    progression of rows meets a range in another progression, whose first
    columns are shifted by ``col_step`` per skipped row.  Each box is then
    written by the same strided views as the whole matrix, at the whole
    matrix's offsets minus ``indptr[row_start]``.
    """
    lay = layout(geom, transposed)
    n_rows = lay.n_rows
    row_start = _check_row(row_start, "row_start", n_rows)
    row_stop = _check_row(row_stop, "row_stop", n_rows)
    if row_start > row_stop:
        raise ValueError(
            f"row_start must not exceed row_stop, got row_start={row_start}, row_stop={row_stop}"
        )
    n_cols = matrix_size(geom, weight.dtype, transposed).shape[1]
    origin, end = row_offsets(geom, [row_start, row_stop], transposed=transposed).tolist()
    nnz = end - origin
    shape = (row_stop - row_start, n_cols)
    idx = index_dtype(nnz, *shape)
    boxes = _boxes(row_start, row_stop, lay.row_grid)
    indptr = _box_indptr(lay, boxes, idx)
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=weight.dtype)
    if nnz:
        blocks = [b for box in boxes for b in box_blocks(lay, box, origin)]
        kernel = grouped_kernel(weight, geom, transposed)
        write_blocks(lay, blocks, indices, data, kernel, threads)
    return canonical_csr(data, indices, indptr, shape)
