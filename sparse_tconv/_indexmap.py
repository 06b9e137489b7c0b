"""Per-dimension index maps of a convolution matrix.

In one spatial dimension a convolution is a small banded "matrix" whose entry
``(row, col)`` carries the list of kernel taps that connect them.  The N-d
matrix is the Kronecker-like product of these per-dimension maps (and of the
channel blocks), so everything the builder needs is computed here, per
dimension, in O(size of the dimension) with no loop over positions.

Rows of a map are grouped into *families*: arithmetic progressions of rows
``start, start + step, ...`` whose entries are the same taps, merged the same
way, at columns that all shift by ``col_step`` from one row to the next, and
whose row offsets (the exclusive cumulative sum of the row counts) are affine
along the family.  The builder writes each N-d product of families with one
strided numpy operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Family", "DimMap", "forward_dim_map", "transpose_dim_map", "mode_map", "dim_nnz"]


@dataclass(frozen=True)
class Family:
    """Rows ``start + j * step`` (``j < count``) that share one entry layout."""

    start: int
    step: int
    count: int
    cols: np.ndarray
    """Sorted, distinct columns of the first row (int64)."""
    col_step: int
    """Shift of every column from one row of the family to the next."""
    taps: np.ndarray
    """Kernel taps in gather order, grouped by column."""
    segments: np.ndarray | None
    """Start of each column's group in ``taps`` (``None``: one tap per column)."""


@dataclass(frozen=True)
class DimMap:
    """The map of one spatial dimension."""

    n_rows: int
    n_cols: int
    counts: np.ndarray
    """Entries per row (int64)."""
    offsets: np.ndarray
    """Exclusive cumulative sum of ``counts``, length ``n_rows + 1``."""
    families: tuple[Family, ...]
    """Families covering every row that has at least one entry."""

    @property
    def total(self) -> int:
        return int(self.offsets[-1])


def mode_map(q: np.ndarray, L: int, mode: str) -> np.ndarray:
    """Map padded coordinates ``q`` in ``[-lo, L + hi)`` onto input indices.

    Only meaningful for the non-zero padding modes; coordinates already inside
    ``[0, L)`` map to themselves.
    """
    if mode == "reflect":  # mirror without repeating the edge
        q = np.abs(q)
        return np.where(q >= L, 2 * (L - 1) - q, q)
    if mode == "replicate":
        return np.clip(q, 0, L - 1)
    if mode == "circular":
        return np.mod(q, L)
    raise ValueError(f"no index map for padding_mode={mode!r}")


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _merge_rows(cols: np.ndarray, taps: np.ndarray):
    """Group sorted ``cols`` into distinct columns; return (cols, taps, segments)."""
    first = np.ones(len(cols), dtype=bool)
    first[1:] = cols[1:] != cols[:-1]
    segments = None if first.all() else np.flatnonzero(first)
    return cols[first], taps, segments


# ---------------------------------------------------------------------------
# Entry counts without the maps: O(kernel) per dimension, exact Python ints
# ---------------------------------------------------------------------------

# Rows evaluated one by one (windows across an edge, non-zero modes) are
# handled this many at a time, so the memory stays O(kernel) whatever the size.
_COUNT_CHUNK = 1 << 14


def _rows_with_window_in(O: int, s: int, lo: int, first: int, last: int) -> tuple[int, int]:
    """``[p0, p1)``: the rows ``p < O`` whose window start ``p * s - lo`` is in [first, last]."""
    p0 = max(0, -((lo + first) // -s))  # ceil((first + lo) / s)
    p1 = min(O, (last + lo) // s + 1)
    return p0, max(p0, p1)


def _distinct_mapped(p0: int, p1: int, L, k, s, d, lo, mode) -> int:
    """Sum over rows ``p0 <= p < p1`` of the number of distinct input indices their taps reach."""
    total = 0
    # int64 is exact while every padded coordinate stays below 2**62; beyond,
    # Python ints (object arrays) keep the count exact.
    exact = np.int64 if max(abs(p1 * s - lo), L + (k - 1) * d) < 2**62 else object
    taps = np.array(range(k), dtype=exact) * d
    for start in range(p0, p1, _COUNT_CHUNK):
        stop = min(p1, start + _COUNT_CHUNK)
        rows = np.array(range(start, stop), dtype=exact)
        mapped = np.sort(mode_map(rows[:, None] * s - lo + taps, L, mode), axis=1)
        total += len(rows) + int(np.count_nonzero(mapped[:, 1:] != mapped[:, :-1]))
    return total


def dim_nnz(L, O, k, s, d, lo, hi, mode) -> int:
    """Entries of one dimension's map (``DimMap.total``), without building it.

    Zeros padding: the pairs ``(p, t)`` with ``0 <= p * s - lo + t * d < L``,
    counted tap by tap in closed form, O(k).  Other modes: a window inside
    the input has ``k`` distinct entries; one wholly in the padding has ``k``
    (reflect and circular map it one to one) or 1 (replicate clamps it onto
    the edge); only the rows whose window crosses an edge of the input are
    counted one by one (about ``2 * d * (k - 1) / s`` of them), in chunks.
    """
    if mode == "zeros":
        total = 0
        for t in range(k):
            p0, p1 = _rows_with_window_in(O, s, lo - t * d, 0, L - 1)
            total += p1 - p0
        return total
    extent = (k - 1) * d
    inside = _rows_with_window_in(O, s, lo, 0, L - 1 - extent)
    left = _rows_with_window_in(O, s, lo, -lo, -extent - 1)  # the window ends before 0
    right = _rows_with_window_in(O, s, lo, L, L + hi)  # the window starts after L - 1
    left_end, right_start = left[1], min(right[0], O)
    total = k * (inside[1] - inside[0])
    total += (1 if mode == "replicate" else k) * (left_end + O - right_start)
    # The rows in between cross an edge: before and after the inside ones.
    crossing: list[tuple[int, int]] = [(left_end, right_start)]
    if inside[1] > inside[0]:
        crossing = [(left_end, inside[0]), (inside[1], right_start)]
    for p0, p1 in crossing:
        total += _distinct_mapped(p0, p1, L, k, s, d, lo, mode)
    return total


# ---------------------------------------------------------------------------
# Forward map: rows are output positions p, columns input positions.
# ---------------------------------------------------------------------------


def _forward_valid_taps(L, O, k, s, d, lo):
    """First and one-past-last tap whose input index lies in [0, L), per p."""
    first = np.arange(O, dtype=np.int64) * s - lo  # input index of tap 0
    a = np.clip(-(first // d), 0, k)  # ceil(-first / d)
    b = np.clip((L - 1 - first) // d + 1, 0, k)
    return first, a, np.maximum(a, b)


def _boundary_entries(first, rows, k, d, L, mode):
    """Mapped, sorted and merged entries of boundary rows (non-zero modes).

    Returns ``order`` (taps in column order), the sorted mapped columns and a
    flag marking the first tap of each distinct column, all shaped
    ``(len(rows), k)``.
    """
    q = first[rows][:, None] + np.arange(k, dtype=np.int64) * d
    mapped = mode_map(q, L, mode)
    order = np.argsort(mapped, axis=1, kind="stable")
    sorted_cols = np.take_along_axis(mapped, order, axis=1)
    new_col = np.ones(sorted_cols.shape, dtype=bool)
    new_col[:, 1:] = sorted_cols[:, 1:] != sorted_cols[:, :-1]
    return order, sorted_cols, new_col


def _boundary_families(rows, order, sorted_cols, new_col):
    """Group consecutive boundary rows whose entries only shift by a constant."""
    n = len(rows)
    shift = np.zeros(n, dtype=np.int64)
    same = np.zeros(n, dtype=bool)
    if n > 1:
        shift[1:] = sorted_cols[1:, 0] - sorted_cols[:-1, 0]
        same[1:] = (
            (rows[1:] == rows[:-1] + 1)
            & (order[1:] == order[:-1]).all(axis=1)
            & (new_col[1:] == new_col[:-1]).all(axis=1)
            & ((sorted_cols[1:] - sorted_cols[:-1]) == shift[1:, None]).all(axis=1)
        )
    starts = ~same
    if n > 2:  # a family keeps one shift throughout
        starts[2:] |= same[1:-1] & (shift[2:] != shift[1:-1])
    begin = np.flatnonzero(starts)
    ends = np.append(begin[1:], n)
    families = []
    for j0, j1 in zip(begin.tolist(), ends.tolist()):
        seg = new_col[j0]
        families.append(
            Family(
                start=int(rows[j0]),
                step=1,
                count=j1 - j0,
                cols=sorted_cols[j0][seg],
                col_step=int(shift[j0 + 1]) if j1 - j0 > 1 else 0,
                taps=order[j0],
                segments=None if seg.all() else np.flatnonzero(seg),
            )
        )
    return families


def forward_dim_map(L, O, k, s, d, lo, hi, mode) -> DimMap:
    """Map of W in one dimension: output position p -> input indices and taps."""
    first, a, b = _forward_valid_taps(L, O, k, s, d, lo)
    counts = b - a
    if mode == "zeros":
        boundary = np.zeros(O, dtype=bool)
    else:  # rows whose window touches the padding
        boundary = (a > 0) | (b < k)
    key = a * (k + 1) + b
    rows = np.arange(O, dtype=np.int64)
    key[boundary] = -1 - rows[boundary]  # boundary rows never join a run
    run_start = np.ones(O, dtype=bool)
    run_start[1:] = key[1:] != key[:-1]
    begin = np.flatnonzero(run_start)
    ends = np.append(begin[1:], O)
    families = []
    for p0, p1 in zip(begin.tolist(), ends.tolist()):
        if boundary[p0] or counts[p0] == 0:
            continue
        taps = np.arange(a[p0], b[p0], dtype=np.int64)
        families.append(
            Family(
                start=p0,
                step=1,
                count=p1 - p0,
                cols=first[p0] + taps * d,
                col_step=s,
                taps=taps,
                segments=None,
            )
        )
    if boundary.any():
        rows_b = rows[boundary]
        order, sorted_cols, new_col = _boundary_entries(first, rows_b, k, d, L, mode)
        counts[boundary] = new_col.sum(axis=1)
        families += _boundary_families(rows_b, order, sorted_cols, new_col)
    return DimMap(O, L, counts, _offsets(counts), tuple(families))


# ---------------------------------------------------------------------------
# Transposed map: rows are input positions i, columns output positions p.
# ---------------------------------------------------------------------------


def _transpose_valid_taps(L, O, k, s, d, lo):
    """Per input index i: the taps t with (i + lo - t*d) / s an integer in [0, O).

    They form an arithmetic progression ``first, first + sp, ...`` of
    ``counts`` taps (sp = s / gcd(s, d)).
    """
    r = np.arange(L, dtype=np.int64) + lo
    g = math.gcd(s, d)
    sp, dp = s // g, d // g
    inv = pow(dp, -1, sp) if sp > 1 else 0
    t0 = ((r // g) % sp) * inv % sp  # the residue class of t solving t*d = r (mod s)
    tmin = np.maximum(0, -(((O - 1) * s - r) // d))  # ceil((r - (O-1)*s) / d)
    tmax = np.minimum(k - 1, r // d)
    first = tmin + (t0 - tmin) % sp
    valid = (r % g == 0) & (first <= tmax)
    counts = np.where(valid, (tmax - first) // sp + 1, 0)
    return r, sp, first, counts


def _wrapped_rows(L, O, k, s, d, lo, mode):
    """Entries of the input rows that receive padded (reflected, wrapped or
    clamped) taps: every incidence of those rows, sorted by column then tap."""
    first_q, a, b = _forward_valid_taps(L, O, k, s, d, lo)
    boundary = np.flatnonzero((a > 0) | (b < k))
    q = first_q[boundary][:, None] + np.arange(k, dtype=np.int64) * d
    outside = (q < 0) | (q >= L)
    rows = mode_map(q[outside], L, mode)
    cols = np.broadcast_to(boundary[:, None], q.shape)[outside]
    taps = np.broadcast_to(np.arange(k, dtype=np.int64), q.shape)[outside]
    special = np.unique(rows)
    # The in-range (zero-padding) incidences of the same rows.
    num = special[:, None] + lo - np.arange(k, dtype=np.int64) * d
    inside = (num % s == 0) & (num >= 0) & (num // s < O)
    rows = np.concatenate([rows, np.broadcast_to(special[:, None], num.shape)[inside]])
    cols = np.concatenate([cols, (num // s)[inside]])
    taps = np.concatenate([taps, np.broadcast_to(np.arange(k), num.shape)[inside]])
    order = np.lexsort((taps, cols, rows))
    rows, cols, taps = rows[order], cols[order], taps[order]
    bounds = np.searchsorted(rows, np.append(special, L))
    return special, [(cols[i0:i1], taps[i0:i1]) for i0, i1 in zip(bounds[:-1], bounds[1:])]


def transpose_dim_map(L, O, k, s, d, lo, hi, mode) -> DimMap:
    """Map of W.T in one dimension: input index i -> output positions and taps."""
    r, sp, first, counts = _transpose_valid_taps(L, O, k, s, d, lo)
    key = first * (k + 1) + counts
    special_entries = {}
    if mode != "zeros":
        special, entries = _wrapped_rows(L, O, k, s, d, lo, mode)
        for i, (cols, taps) in zip(special.tolist(), entries):
            special_entries[i] = _merge_rows(cols, taps)
            counts[i] = len(special_entries[i][0])
        key[special] = -1 - special
    offsets = _offsets(counts)
    # Rows i, i + s, i + 2s, ... (one residue class) share their taps; walk the
    # rows in that order and cut wherever the taps or the offset increment change.
    order = np.argsort(r % s, kind="stable")
    res, key_o, off_o = (r % s)[order], key[order], offsets[order]
    start = np.ones(L, dtype=bool)
    start[1:] = (key_o[1:] != key_o[:-1]) | (res[1:] != res[:-1])
    if L > 2:
        d_off = np.diff(off_o)
        start[2:] |= (res[2:] == res[:-2]) & (d_off[1:] != d_off[:-1])
    begin = np.flatnonzero(start)
    lengths = np.diff(np.append(begin, L))
    families = []
    for j, n in zip(begin.tolist(), lengths.tolist()):
        i = int(order[j])
        if counts[i] == 0:
            continue
        if i in special_entries:
            cols, taps, segments = special_entries[i]
            families.append(Family(i, s, 1, cols, 0, taps, segments))
            continue
        taps = first[i] + sp * np.arange(counts[i] - 1, -1, -1, dtype=np.int64)
        cols = (r[i] - taps * d) // s  # ascending: taps run backwards
        families.append(Family(i, s, n, cols, 1, taps, None))
    return DimMap(L, O, counts, offsets, tuple(families))
