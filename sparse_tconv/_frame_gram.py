"""The Gram matrix of a convolution on chosen input positions, from its taps, and a
streamed tiled Cholesky test of ``t I - G`` there.

``W = sum_t S_t (x) B_t``: for each tap ``t`` a 0/1 map ``S_t`` of the input
position each output reads (through the padding map: reflect and replicate
send several taps to one element) and the tap's channel block ``B_t``.
Every padding mode acts per dimension, so ``S_t`` is a Kronecker product of
one map per dimension and the Gram matrix's block between input positions
``p`` and ``q`` is

``G[p, q] = sum_(t, s) prod_d M_d[t_d, s_d][p_d, q_d] (B_t^H B_s)``,

with ``M_d[t_d, s_d] = A_d(t_d)^T A_d(s_d)`` the number of outputs along
dimension ``d`` that read ``p_d`` by tap ``t_d`` and ``q_d`` by ``s_d``.
The blocks of many position pairs are one matrix product: the pairs'
integer coefficients against every product of two taps' blocks.  No CSR of
W is formed, so this serves layers of any size.

:func:`streamed_cholesky` factorises a Hermitian band matrix given tile row
by tile row, keeping only the ``K + 1`` rows a step touches: the factor is
not kept, only whether every pivot was positive and ``||L||_F^2``, which is
all a certificate reads.  Its tiles are ``b x b`` with ``b`` a few hundred,
so that every step is a level-3 BLAS call at the machine's GEMM rate
(LAPACK's ``?pbtrf`` works in blocks of at most 32 and ran at a quarter
of that rate on these bands).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.linalg import get_blas_funcs, get_lapack_funcs
from scipy.sparse.csgraph import reverse_cuthill_mckee

from ._geometry import ConvGeometry
from ._indexmap import mode_map

__all__ = ["AxisCounts", "axis_counts", "tap_sources", "tap_products", "gram_blocks",
           "PositionBand", "position_band", "streamed_cholesky"]

# A tile holds about this many rows (a whole number of positions): GEMMs of this
# size run near the machine's rate, and the tiles past the band stay few.
_TILE_ROWS = 256
# Pairs' blocks are formed this many bytes at a time.
_CHUNK_BYTES = 1 << 25


def tap_sources(L: int, O: int, s: int, d: int, lo: int, k: int, mode: str) -> np.ndarray:
    """``(k, O)``: the input coordinate output ``o`` reads by tap ``t``, -1 for a zero."""
    padded = np.arange(O)[None, :] * s + np.arange(k)[:, None] * d - lo
    outside = (padded < 0) | (padded >= L)
    sources = padded.copy()
    if outside.any():
        sources[outside] = -1 if mode == "zeros" else mode_map(padded[outside], L, mode)
    return sources


class AxisCounts(NamedTuple):
    """One dimension's ``M[t, s, p, q - p + reach]``, its interior rows stored once.

    ``table[:, :, row[p], q - p + reach]`` is the number of outputs that read
    ``p`` by tap ``t`` and ``q`` by tap ``s``.  Away from the borders the
    counts depend only on ``p`` modulo the stride, so the coordinates there
    share ``stride`` rows: a 1-D input of 300,000 with an 11-tap kernel
    keeps a few hundred rows, not 6 GB.
    """

    table: np.ndarray
    row: np.ndarray
    reach: int


def _interior(L: int, O: int, s: int, d: int, lo: int, hi: int, k: int) -> tuple[int, int]:
    """``(first, stop)``: coordinates ``p`` in ``[first, stop)`` have the counts of
    ``p - s`` (every output reading them, by any tap, reads every tap inside the input
    and the outputs are not cut short).  Generous margins: a test checks them."""
    span = (k - 1) * d
    unused = max(0, L + lo + hi - ((O - 1) * s + span + 1))  # padded tail no output reads
    pad = lo + hi  # circular padding copies each side's padding to the other end
    return 2 * span + pad + 2 * s, L - (2 * span + pad + unused + 2 * s)


def axis_counts(geom: ConvGeometry) -> list[AxisCounts]:
    """Per dimension, the counts of outputs reading two coordinates by two taps
    (:class:`AxisCounts`), with ``reach``, the farthest apart two coordinates one
    output reads (the Gram matrix's reach along that dimension)."""
    counts = []
    for L, O, s, d, (lo, hi), k in zip(geom.input_size, geom.output_size, geom.stride,
                                       geom.dilation, geom.padding, geom.kernel_size):
        sources = tap_sources(L, O, s, d, lo, k, geom.padding_mode)
        read = sources >= 0
        far = np.where(read, sources, -1).max(axis=0) - np.where(read, sources, L).min(axis=0)
        r = int(far.max(initial=0)) if read.any() else 0
        first, stop = _interior(L, O, s, d, lo, hi, k)
        row = np.arange(L)
        if stop - first > s:  # rows first..first+s-1 stand for the whole interior
            row[first:stop] = first + (row[first:stop] - first) % s
            row[stop:] -= stop - first - s
        kept = np.zeros(L, dtype=bool)
        kept[np.unique(row, return_index=True)[1]] = True  # the first coordinate of each row
        M = np.zeros((k, k, int(row[-1]) + 1 if L else 0, 2 * r + 1), dtype=np.int64)
        for t in range(k):
            for u in range(k):
                both = read[t] & read[u]
                p, q = sources[t][both], sources[u][both]
                mine = kept[p]
                np.add.at(M[t, u], (row[p[mine]], q[mine] - p[mine] + r), 1)
        counts.append(AxisCounts(M, row, r))
    return counts


def tap_products(blocks: np.ndarray) -> np.ndarray:
    """``(taps^2, C^2)``: row ``t * taps + s`` is ``B_t^H B_s``, for ``blocks`` of shape
    ``(taps, C_out, C)``."""
    taps, _, cpg = blocks.shape
    work = np.result_type(blocks.dtype, np.float64)
    stacked = np.ascontiguousarray(blocks.astype(work).transpose(1, 0, 2)).reshape(-1, taps * cpg)
    products = stacked.conj().T @ stacked  # [t C + a, s C + b] = (B_t^H B_s)[a, b]
    return products.reshape(taps, cpg, taps, cpg).transpose(0, 2, 1, 3).reshape(taps * taps, -1)


def gram_blocks(counts: list[AxisCounts], products: np.ndarray, p: np.ndarray,
                q: np.ndarray) -> np.ndarray:
    """``(pairs, C, C)``: ``G[p_i, q_i]`` for the position pairs ``p, q`` (``(pairs, ndim)``,
    within the reach of :func:`axis_counts`)."""
    coefficients = None
    for d, axis in enumerate(counts):
        along = np.moveaxis(axis.table[:, :, axis.row[p[:, d]], q[:, d] - p[:, d] + axis.reach],
                            -1, 0)  # (pairs, k_d, k_d)
        if coefficients is None:
            coefficients = along
            continue
        n, a, _ = coefficients.shape
        k = along.shape[1]
        # taps in row-major order over the kernel's dimensions
        coefficients = (coefficients[:, :, None, :, None] * along[:, None, :, None, :]).reshape(
            n, a * k, a * k)
    assert coefficients is not None
    cpg = math.isqrt(products.shape[1])
    flat = coefficients.reshape(len(p), -1).astype(products.dtype)
    # (flat @ products)^T = products^T flat^T: both Fortran-ordered views, in
    # scipy's BLAS, the library the factorisation runs in (see streamed_cholesky)
    gemm = get_blas_funcs("gemm", dtype=products.dtype)
    return gemm(1.0, products.T, flat.T).T.reshape(len(p), cpg, cpg)


class PositionBand:
    """Chosen input positions in a low-bandwidth order, tiled, with the pairs that couple.

    ``positions`` (``(n, ndim)``) are ranked by ``rank``; a tile holds
    ``per_tile`` consecutive ranks (``per_tile * channels`` rows).  ``pairs``
    are the index pairs ``(i, j)`` with ``rank[i] >= rank[j]`` whose block
    is formed, sorted by the tile column of ``j`` (``starts`` delimits them).
    Block column ``J`` reaches ``below[J]`` tile rows below the diagonal,
    fill-in included: the factor's rows keep their first nonzero column
    (its envelope), so ``below[J] >= below[J - 1] - 1``.
    """

    def __init__(self, positions, rank, pairs, per_tile, channels):
        self.positions = positions
        self.rank = rank
        self.per_tile = per_tile
        self.channels = channels
        self.tile = per_tile * channels
        self.n_tiles = -(-len(positions) // per_tile)
        i, j = pairs
        column = rank[j] // per_tile
        order = np.argsort(column, kind="stable")
        self.pairs = (i[order], j[order])
        self.starts = np.searchsorted(column[order], np.arange(self.n_tiles + 1))
        below = np.zeros(self.n_tiles, dtype=np.int64)
        np.maximum.at(below, column, rank[i] // per_tile - column)
        for J in range(1, self.n_tiles):
            below[J] = max(below[J], below[J - 1] - 1)
        self.below = below
        self.K = int(below.max(initial=0))

    @property
    def operations(self) -> float:
        """The factorisation's floating-point operations (real)."""
        return float(((self.below ** 2 + self.below + 1 / 3) * float(self.tile) ** 3).sum())

    @property
    def terms(self) -> int:
        """The most terms of an entry of ``L L^H``: the tiled band's width."""
        return (self.K + 1) * self.tile


def _folded_angle_rank(positions: np.ndarray, size: tuple[int, ...]) -> np.ndarray | None:
    """2-D only: positions ranked by their angle's distance from one ray out of the centre.

    A frame around a 2-D input is a ring.  Any order of a ring's positions
    has two fronts; sorting by ``|angle|`` walks both halves together from
    the ray to the opposite side, each position's neighbours a few places away.
    """
    if positions.shape[1] != 2:
        return None
    centre = (np.asarray(size) - 1) / 2
    y, x = (positions - centre).T
    key = np.abs(np.arctan2(y, x))
    order = np.lexsort((positions[:, 1], positions[:, 0], key))
    rank = np.empty(len(positions), dtype=np.int64)
    rank[order] = np.arange(len(positions))
    return rank


def position_band(keep: np.ndarray, couples: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  reach: tuple[int, ...], channels: int) -> PositionBand:
    """The positions of the mask ``keep`` in the narrowest of a few orders, with their pairs.

    Positions ``p, q`` pair when ``|p_d - q_d| <= reach_d`` in every
    dimension and ``couples(i, j)`` (indices into the kept positions) says so.
    Orders tried: reverse Cuthill-McKee on the pairs' graph, row-major, and
    in 2-D the folded angle (:func:`_folded_angle_rank`); the one whose
    factorisation costs least wins.
    """
    size = keep.shape
    positions = np.argwhere(keep)
    index = np.full(size, -1, dtype=np.int64)
    index[tuple(positions.T)] = np.arange(len(positions))
    bounds = np.asarray(size)
    first, second = [], []
    for offset in itertools.product(*[range(-r, r + 1) for r in reach]):
        q = positions + np.asarray(offset, dtype=np.int64)
        inside = ((q >= 0) & (q < bounds)).all(axis=1)
        i = np.flatnonzero(inside)
        j = index[tuple(q[inside].T)]
        i, j = i[j >= 0], j[j >= 0]
        wanted = couples(i, j)
        first.append(i[wanted])
        second.append(j[wanted])
    i, j = np.concatenate(first), np.concatenate(second)
    n = len(positions)
    graph = sp.csr_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    order = reverse_cuthill_mckee(graph, symmetric_mode=True)
    by_levels = np.empty(n, dtype=np.int64)
    by_levels[order] = np.arange(n)
    per_tile = max(1, round(_TILE_ROWS / channels))
    candidates = []
    row_major = np.arange(n)  # np.argwhere's order: planes of a 3-D volume (RCM's wavefronts
    # there are wider)
    for rank in (by_levels, row_major, _folded_angle_rank(positions, size)):
        if rank is not None:
            lower = rank[i] >= rank[j]
            candidates.append(PositionBand(positions, rank, (i[lower], j[lower]), per_tile,
                                           channels))
    return min(candidates, key=lambda band: band.operations)


# Entries of the factor below this, relative to the matrix's scale, are set to
# zero: far from the diagonal the factor decays to 1e-150 and less, and GEMMs
# over products that underflow to subnormal numbers ran at a third of the rate
# (a 64-channel frame at 256x256).
_FLUSH = 1e-100


def _in_place(result: np.ndarray, target: np.ndarray) -> None:
    """Make sure an f2py wrapper's ``overwrite_*`` result is in ``target``: they write in
    place for Fortran-ordered arrays of their dtype, and copy otherwise."""
    if not np.shares_memory(result, target):
        target[...] = result


def streamed_cholesky(below: np.ndarray, tile: int, dtype,
                      fill: Callable[[int, np.ndarray], None],
                      scale: float = 1.0) -> tuple[float, float] | None:
    """``||L||_F^2`` of the Cholesky factor of a Hermitian tiled band matrix, or None.

    Block column ``J`` of the lower half has ``below[J]`` tiles under its
    diagonal tile, envelope closed (``below[J] >= below[J - 1] - 1``), and
    ``K = max(below)``.  ``fill(J, row)`` writes it into ``row`` (``(K + 1,
    tile, tile)``, its first ``below[J] + 1`` tiles zeroed): ``row[k]`` is
    the tile at block row ``J + k``
    (only the lower triangle of ``row[0]`` is read).  Right-looking: step
    ``J`` factorises the diagonal tile, solves the ``below[J]`` tiles under
    it, and subtracts their products from the next ``below[J]`` columns, so
    ``K + 1`` tile columns are held at a time.  None as soon as a pivot
    is not positive.  Every step is a conventional level-3 BLAS or LAPACK
    call, so ``L L^H = A + E`` with ``|E| <= gamma_(m+1) |L| |L^H|``, ``m``
    the band's ``(K + 1) tile`` (Higham, Thm 10.3, for any order of the
    inner products' terms).

    Returns ``(||L||_F^2, ||F||)``: the factor's entries of magnitude below
    ``_FLUSH * scale`` are set to zero as they are computed (each such
    change ``D`` of a step's panel adds ``U_JJ^H D`` to the backward error),
    so ``L L^H = A + E + F`` with ``||F|| <= 2 _FLUSH scale sqrt(entries)
    ||L||_F``, returned as the second figure.

    The steps run in place on the transposed rows (``A = U^H U``, row ``J``
    of ``U`` is a Fortran-ordered ``(tile, (K + 1) tile)`` view of the
    array ``fill`` wrote), all in scipy's BLAS: no temporaries (fresh memory
    is slow to touch on some virtual machines), and no second BLAS thread
    pool spinning beside it (numpy's and scipy's OpenBLAS are two libraries;
    interleaving their calls made each step several times slower).
    """
    n_tiles, K = len(below), int(np.max(below, initial=0))
    window = np.zeros((K + 1, K + 1, tile, tile), dtype=dtype)
    potrf: Any = get_lapack_funcs("potrf", dtype=window.dtype)
    trsm, gemm = get_blas_funcs(("trsm", "gemm"), dtype=window.dtype)
    adjoint = 2 if window.dtype.kind == "c" else 1
    flush = _FLUSH * scale
    magnitudes = np.empty((tile, K * tile), order="F")  # the panels' layout
    tiny = np.empty((tile, K * tile), dtype=bool, order="F")
    entries = 0

    def upper_row(J: int) -> np.ndarray:
        # [y, k tile + x] = A[(J + k) tile + x, J tile + y]
        return window[J % (K + 1)].reshape((K + 1) * tile, tile).T

    def filled(J: int) -> None:
        row = window[J % (K + 1)]
        row[:below[J] + 1].fill(0)  # the tiles past below[J] are never read
        fill(J, row)
        if adjoint == 2:
            np.conjugate(row, out=row)  # the transposed view is then the upper half

    for J in range(min(K, n_tiles)):
        filled(J)
    squares = 0.0
    for J in range(n_tiles):
        if J + K < n_tiles:
            filled(J + K)
        row = upper_row(J)
        diagonal = row[:, :tile]
        factor, info = potrf(diagonal, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        _in_place(factor, diagonal)
        reach = min(int(below[J]), n_tiles - 1 - J)
        used = row[:, :(reach + 1) * tile]
        if reach:
            # U_J,rest = U_JJ^-H A_J,rest, then each later row J + k loses
            # U_J,J+k^H U_J,J+k..
            panel = row[:, tile:(reach + 1) * tile]
            _in_place(trsm(1.0, diagonal, panel, lower=0, trans_a=adjoint, overwrite_b=1), panel)
            size = reach * tile
            np.abs(panel, out=magnitudes[:, :size])
            np.less(magnitudes[:, :size], flush, out=tiny[:, :size])
            panel[tiny[:, :size]] = 0
            for k in range(1, reach + 1):
                later = upper_row(J + k)[:, :(reach - k + 1) * tile]
                _in_place(gemm(-1.0, row[:, k * tile:(k + 1) * tile],
                               row[:, k * tile:(reach + 1) * tile], 1.0, later,
                               trans_a=adjoint, overwrite_c=1), later)
        flat = used.T.reshape(-1).view(np.float64)  # C-ordered: its real and imaginary parts
        squares += float(np.einsum("i,i->", flat, flat))
        entries += used.size
    return squares, 2 * flush * math.sqrt(entries * squares * (1 + 1e-10)) * (1 + 1e-10)
