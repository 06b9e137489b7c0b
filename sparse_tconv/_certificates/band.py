"""The band certificate: ``t I - W^H W`` positive definite, by a banded Cholesky factorisation.

Zero-padded layers on grids of a few pixels with many channels (ResNet's
last stage: 512 channels at 7x7) are where the circulant embedding is
loosest (the border loses 2-3% of the norm there) and where the inertia
certificate cannot go (its sparse factorisation of a Gram matrix with 10^8
entries would not fit).  Ordered by position, channels inside, the Gram
matrix ``G = W^H W`` is a band matrix: input positions ``p`` and ``q``
couple only when one output reads both, at most ``(k - 1) d`` apart per
dimension, so its half-bandwidth is that reach in row-major order times
the channels.  LAPACK's banded Cholesky (``?pbtrf``) factorises ``t I - G``
in ``n kd^2`` operations, in double precision (single precision's rounding,
``kd u ||L||_F^2``, would exceed the gap it certifies): 16-18 s for the
512-channel layer at 7x7, where a dense factorisation would take a minute.
Where the band is cheap (64 channels at 8x8: a fraction of a second) it also
goes ahead of the inertia certificate's SuperLU, which takes seconds there.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import _bounds
from .._geometry import ConvGeometry
from .base import Certificate, Interval

__all__ = ["Band", "band_applies", "band_cost", "band_upper", "reuse_band_memory"]

# The factorisation is tried when its operations (n kd^2 per group) are at
# most this many (about 30 s on 2 cores) and its band takes at most _BAND_BYTES.
_BAND_OPERATIONS = 3e12
_BAND_BYTES = 1 << 31
# Where the inertia certificate applies too, the band goes first up to this.
_BAND_CHEAP = 2e10


def _reach(geom: ConvGeometry) -> int:
    """The largest offset, in row-major input positions, between two positions an
    output reads: the band's half-width in positions."""
    reach, stride = 0, 1
    for L, k, d in zip(reversed(geom.input_size), reversed(geom.kernel_size),
                       reversed(geom.dilation)):
        reach += min(L - 1, (k - 1) * d) * stride
        stride *= L
    return reach


def band_cost(geom: ConvGeometry, complex_weight: bool = False) -> tuple[float, int]:
    """``(operations, bytes)`` of the band certificate: ``n kd^2`` per group, and the
    double-precision band of one group."""
    cpg = geom.in_channels // geom.groups
    n = math.prod(geom.input_size) * cpg
    kd = (_reach(geom) + 1) * cpg - 1
    item = 16 if complex_weight else 8
    return float(n) * kd * kd * geom.groups, (kd + 1) * n * item


def band_applies(run: Interval) -> bool:
    """Zero padding, an interval still open, a matrix past the dense SVD, and a
    factorisation within :data:`_BAND_OPERATIONS` and :data:`_BAND_BYTES`; where
    the inertia certificate applies too, only a band of at most
    :data:`_BAND_CHEAP` operations (a fraction of a second, where SuperLU on the
    same Gram matrix takes seconds: 64 channels at 8x8)."""
    structure = run.structure
    geom = structure.geometry
    if geom.padding_mode != "zeros" or not run.open or run.lower <= 0:
        return False
    if math.prod(geom.output_shape) * structure.n_in <= _bounds._DENSE_SVD_ENTRIES:
        return False
    operations, nbytes = band_cost(geom, np.iscomplexobj(structure.weight))
    if _bounds.inertia_applies(structure):
        return operations <= _BAND_CHEAP
    return operations <= _BAND_OPERATIONS and nbytes <= _BAND_BYTES


_kept = threading.local()  # .depth, .buffer: this thread's band memory while reused


@contextlib.contextmanager
def reuse_band_memory():
    """Within it, this thread's band certificates reuse one buffer instead of a fresh one.

    A 512-channel layer at 7x7 has a 1.75 GB band.  Fresh memory costs its
    page faults on every use (8 s for 2 GB on a virtual machine that backs
    its memory lazily, where reused memory takes 0.3 s to clear), so a run
    over many layers (:func:`~sparse_tconv.spectral.model_norm_bounds`)
    keeps the largest buffer until it ends; outside, nothing is kept.
    """
    _kept.depth = getattr(_kept, "depth", 0) + 1
    try:
        yield
    finally:
        _kept.depth -= 1
        if _kept.depth == 0:
            _kept.buffer = None


def _zeros(count: int, dtype) -> np.ndarray:
    """``np.zeros(count, dtype)``, from the kept buffer inside :func:`reuse_band_memory`."""
    if not getattr(_kept, "depth", 0):
        return np.zeros(count, dtype=dtype)
    dtype = np.dtype(dtype)
    buffer = getattr(_kept, "buffer", None)
    if buffer is None or buffer.nbytes < count * dtype.itemsize:
        _kept.buffer = None  # let the old one go first
        buffer = _kept.buffer = np.empty(count * dtype.itemsize, dtype=np.uint8)
    out = buffer[:count * dtype.itemsize].view(dtype)
    out.fill(0)
    return out


def _tap_reads(geom: ConvGeometry, tap: np.ndarray) -> list[range]:
    """Per dimension, the input coordinates tap ``tap`` reads: ``o s - lo + tap d``
    for the outputs ``o`` whose read falls inside the input."""
    ranges = []
    for L, O, s, d, (lo, _), k in zip(geom.input_size, geom.output_size, geom.stride,
                                      geom.dilation, geom.padding, tap):
        first = k * d - lo
        o0 = max(0, -(first // s))  # the first output reading a coordinate >= 0: ceil(-first / s)
        o1 = min(O, (L - 1 - first) // s + 1) if L - 1 - first >= 0 else 0
        ranges.append(range(first + o0 * s, first + o1 * s, s) if o1 > o0 else range(0))
    return ranges


def _pair_box(geom: ConvGeometry, t: np.ndarray, u: np.ndarray) -> tuple[slice, ...] | None:
    """The input positions ``p`` (a box, as slices) read by tap ``t`` of an output that
    reads ``q = p + (u - t) d`` by tap ``u`` inside the input; None if there are none."""
    box = []
    for read_t, read_u, d, a, b in zip(_tap_reads(geom, t), _tap_reads(geom, u),
                                       geom.dilation, t, u):
        shift = (b - a) * d
        # p in read_t with p + shift in read_u: both progressions share the stride
        lo = max(read_t.start, read_u.start - shift)
        hi = min(read_t.stop, read_u.stop - shift)
        if not len(read_t) or not len(read_u) or hi <= lo:
            return None
        box.append(slice(lo, hi, read_t.step))
    return tuple(box)


def _gram_band(geom: ConvGeometry, blocks: np.ndarray, shift: float) -> tuple[np.ndarray, int]:
    """``shift I - G`` of one group in LAPACK's lower band storage, ``(kd + 1, n)`` Fortran
    order, positions outer and channels inner.

    ``G = sum_(t, u) S_u^T S_t (x) B_u^H B_t`` over pairs of taps, with
    ``S_t`` the 0/1 map of the outputs reading each input position by tap
    ``t``: ``S_u^T S_t`` puts the block at ``(q, p) = (p + (u - t) d, p)``
    for a box of positions ``p``.  In band storage ``A[i, j]`` (``i >= j``)
    sits at flat index ``i + j kd``, so the blocks of one pair over its
    whole box are one strided view of the array, updated in place.  Pairs
    with ``q < p`` are the other half of the Hermitian matrix (not stored);
    the diagonal blocks (``u = t``) are summed apart, their lower triangles
    written last (their upper triangles would alias other entries).
    """
    taps, cpg = blocks.shape[0], blocks.shape[2]
    size = geom.input_size
    n_pos = math.prod(size)
    n = n_pos * cpg
    kd = (_reach(geom) + 1) * cpg - 1
    work = np.result_type(blocks.dtype, np.float64)
    # every product of two taps' blocks at once: [u c, t d] = (B_u^H B_t)[c, d]
    stacked = np.ascontiguousarray(blocks.astype(work).transpose(1, 0, 2)).reshape(-1, taps * cpg)
    products = stacked.conj().T @ stacked  # Hermitian: its blocks' transposes are views
    flat = _zeros((kd + 1) * n, work)
    item = flat.itemsize
    # position strides (row-major) in units of band columns, then the block's own
    position_strides = [math.prod(size[a + 1:]) * cpg * (kd + 1) * item for a in range(len(size))]
    taps_at = np.stack(np.unravel_index(np.arange(taps), geom.kernel_size), axis=1)
    diagonal = np.zeros((*size, cpg, cpg), dtype=work)
    for t in range(taps):
        for u in range(taps):
            box = _pair_box(geom, taps_at[t], taps_at[u])
            if box is None:
                continue
            block = products[u * cpg:(u + 1) * cpg, t * cpg:(t + 1) * cpg]
            if u == t:
                diagonal[box] += block
                continue
            step = sum(int(a) * int(d) * math.prod(size[k + 1:])
                       for k, (a, d) in enumerate(zip(taps_at[u] - taps_at[t], geom.dilation)))
            if step < 0:
                continue  # q < p: the upper half
            # A[(p + step) C + a, p C + b] at flat (p + step) C + a + (p C + b) kd: the
            # view is indexed [p, b, a], so that its last axis and block.T's are contiguous
            view = as_strided(flat[step * cpg:], shape=(*size, cpg, cpg),
                              strides=(*position_strides, kd * item, item), writeable=True)
            view[box] -= block.T
    lower = np.tril(np.ones((cpg, cpg), dtype=bool))
    identity = np.eye(cpg, dtype=bool)
    for p in range(n_pos):
        where = np.unravel_index(p, size)
        view = as_strided(flat[p * cpg * (kd + 1):], shape=(cpg, cpg), strides=(item, kd * item),
                          writeable=True)
        values = -diagonal[where]
        values[identity] += shift
        view[lower] = values[lower]
    return flat.reshape((kd + 1, n), order="F"), kd


def band_upper(structure: _bounds._Structure, t: float) -> float | None:
    """A certified bound on ``||W||`` just above ``sqrt(t)`` if ``t I - W^H W`` factorises.

    For each group: the band of ``A = t I - G`` in double precision (``G``
    off by at most ``gamma_m || |W| ||^2`` with ``m`` the terms of an
    entry, ``A``'s entries by ``u (t + || |W| ||^2)`` in norm), factorised
    by ``?pbtrf``.  If it completes, ``L L^H = A + E`` with ``|E| <=
    gamma_(kd+1) |L| |L^H|`` (Higham, Thm 10.3), so ``A >= -||E|| I`` with
    ``||E|| <= gamma_(kd+1) ||L||_F^2``, and ``lambda_max(G) <= t + ||E||
    +`` the roundings.  None when a pivot is not positive (some eigenvalue
    of G exceeds ``t``).
    """
    geom = structure.geometry
    g = geom.groups
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    taps = math.prod(geom.kernel_size)
    weight = np.asarray(structure.weight).reshape(g, opg, cpg, taps)
    complex_weight = np.iscomplexobj(weight)
    abs_sq = (structure.abs_bound * (1 + 1e-6)) ** 2
    worst = 0.0
    for group in range(g):
        blocks = np.moveaxis(weight[group], 2, 0)  # (taps, opg, cpg)
        ab, _ = _gram_band(geom, blocks, t)
        error = _bounds.banded_cholesky_error(ab)
        del ab
        if error is None:
            return None
        worst = max(worst, error)
    complex_factor = 2 if complex_weight else 1
    gram_error = _bounds._gamma(complex_factor * (opg * taps + 1)) * abs_sq
    storage_error = 2 * _bounds._U64 * (t + abs_sq)
    top = (t + worst + gram_error + storage_error) * (1 + 8 * _bounds._U64)
    return math.sqrt(top) * (1 + 2 * _bounds._U64)


class Band(Certificate):
    """Certifies ``upper`` just above ``lower`` for zero-padded layers on small grids, by a
    banded Cholesky factorisation of ``t I - W^H W`` (see :func:`band_applies`).

    One try, at half of ``rtol`` above the lower bound: Lanczos has run to
    its stall by then, and each try costs the whole factorisation.
    """

    name = "band"
    widening = 0.5
    """The fraction of ``rtol`` above the lower bound tried."""

    def applies(self, run: Interval) -> bool:
        return band_applies(run)

    def tighten(self, run: Interval) -> None:
        t = (run.lower * (1 + self.widening * run.rtol)) ** 2
        certified = band_upper(run.structure, t)
        if certified is not None:
            run.upper = min(run.upper, certified)
