"""The structured form's products as implicit GEMMs: one BLAS call per tap, no gathered windows.

Flatten the padded frame ``(C, *Lp, B)`` to ``(C, F)``.  For stride 1, the
windows of tap ``t`` are then the frame's *panel* of columns starting at the
tap's offset ``sum_d t_d d_d f_d`` (``f_d``: the frame's element strides):
a ``(C, n)`` matrix with the frame's row length as leading dimension, which
BLAS multiplies in place (:func:`.._blas.panel_gemm`; :class:`.._blas.PanelGemms`
makes the calls).  The output is computed *wide*, at every frame position
(``n`` columns run over the frame's rows, the positions past each output
row's end included), each tap's GEMM adding onto the last; the output is
then cut out of it.  im2col copies ``C * taps`` values per output position
before its GEMM; this copies none.

The transposed product of a strided layer (:func:`conv_transpose_by_panels`)
works on the frame's classes modulo the stride (depth-to-space): tap ``t``
sends output ``o`` to frame position ``o s + t d = (o + q) s + r`` for
``q, r = divmod(t d, s)``, so frame class ``r`` at lattice position ``p``
sums ``W_t.T y[p - q]`` over the taps of that class.  ``y``, widened by
zeros, is convolved (stride 1, panels) with blocks that stack the classes'
taps of each ``q`` (zeros where a class has no tap at that ``q``): one GEMM
per ``q`` gives every class at once, the classes are interleaved into the
frame, and the frame is folded back (``P.T``).  This replaces adding every
tap's windows into the frame one numpy call at a time.

Where the blocks are thin or the taps many, im2col, which gathers every tap
into one deep GEMM, is faster (:func:`panels_apply` says which runs).  The
columns are cut into pieces, fixed by the geometry and the number of samples
alone, which the threads share: a piece's columns are computed by the same
calls on whichever thread runs it.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._blas import _INT_MAX, PanelGemms, one_blas_thread, panel_gemm_available
from .._geometry import ConvGeometry
from ..direct import _padded_size
from .scratch import scratch as _scratch

__all__ = ["panels_apply", "conv_by_panels", "conv_transpose_by_panels", "PanelPlan", "panel_plan"]

# When panels run instead of im2col (see panels_apply): for a stride-1
# product, the least depth of a tap's block, the most taps, the dtypes; for a strided
# W.T @ y, the least channels of y per group, the least rows (C_in/g times
# the classes, as _MIN_PANEL_DEPTH) and the most blocks (taps times classes)
# per kernel tap.
_MIN_PANEL_DEPTH = 32
_MAX_PANEL_TAPS = 9
_PANEL_DTYPES = "d"  # float64 (dtype.char)
_MIN_TRANSPOSED_DEPTH = 8
_MAX_WASTE = 1.0

# Multiply-adds per piece of columns, at least two pieces, at most
# _MAX_PIECES, a power of two (even shares).  Fewer, wider GEMMs run faster
# (the 64->64 3x3 layer at 56², 2 threads: 2.0 ms in two pieces, 2.3 in
# four), so a piece is large.  A product of fewer than _MIN_PARALLEL_MACS is
# one piece, on one thread (as the tiles').  BLAS runs on one thread: letting
# OpenBLAS thread one piece's GEMMs instead was faster on small layers (0.85
# against 0.95-1.0 ms on the transposed 64->32 4x4 stride-2 layer at 28²), but
# its threads change the last bits of the products.
_PIECE_MACS = 1 << 25
_MAX_PIECES = 16
_MIN_PARALLEL_MACS = 1 << 22

# A product of fewer than 2 * _MIN_PIECE_COLUMNS wide columns (a deep layer on
# a small image) is cut into two ranges of output channels, of at least
# _MIN_PIECE_CHANNELS each, instead: BLAS runs short panels slowly (a 256->256
# 3x3 layer at 14x14, 2 threads: 2.9 ms in two pieces of 111 columns, 2.4 ms
# in two of 128 output channels; 128->128 at 28x28, 419 columns: even).
_MIN_PIECE_COLUMNS = 384
_MIN_PIECE_CHANNELS = 16


@functools.lru_cache(maxsize=64)
def panel_plan(geom: ConvGeometry) -> PanelPlan:
    """The :class:`PanelPlan` of ``geom`` (kept: products of a geometry repeat)."""
    return PanelPlan(geom)


class PanelPlan:
    """How a geometry runs as panel GEMMs: its classes, taps, offsets and weights.

    ``classes`` lists, per dimension, the classes modulo the stride that taps
    reach; ``taps`` the lattice offsets ``q`` that some tap has, each with the
    tuple of kernel taps (or None) per class combination.
    """

    def __init__(self, geom: ConvGeometry):
        self.geom = geom
        per_dim = [[divmod(u * d, s) for u in range(k)]
                   for k, d, s in zip(geom.kernel_size, geom.dilation, geom.stride)]
        self.classes = [sorted({r for _, r in dim}) for dim in per_dim]
        self.extent = [max(q for q, _ in dim) + 1 for dim in per_dim]  # Q per dimension
        self.lattice = tuple(-(-n // s) for n, s in zip(_padded_size(geom), geom.stride))
        self.count = math.prod(len(c) for c in self.classes)  # P
        # tap index (row-major over the kernel) of each (q, class combination)
        where = {}
        for u in itertools.product(*(range(k) for k in geom.kernel_size)):
            q = tuple(per_dim[d][ud][0] for d, ud in enumerate(u))
            r = tuple(self.classes[d].index(per_dim[d][ud][1]) for d, ud in enumerate(u))
            where[q, r] = u
        combos = list(itertools.product(*(range(len(c)) for c in self.classes)))
        self.taps = [(q, [where.get((q, r)) for r in combos])
                     for q in itertools.product(*(range(e) for e in self.extent))
                     if any((q, r) in where for r in combos)]

    @property
    def block_count(self) -> int:
        """Blocks in :meth:`forward_weights` (taps times classes) per group."""
        return len(self.taps) * self.count

    def forward_weights(self, weight: np.ndarray) -> np.ndarray:
        """``(taps, g, C_out/g, C_in/g * P)`` blocks (columns: channel, then class); for
        stride 1 (one class) the weight's taps, each a ``(C_out/g, C_in/g)`` block."""
        geom = self.geom
        g = geom.groups
        opg, cpg = geom.out_channels // g, geom.in_channels // g
        w = weight.reshape(g, opg, cpg, *geom.kernel_size)
        blocks = np.zeros((len(self.taps), g, opg, cpg, self.count), dtype=weight.dtype)
        for j, (_, kernel_taps) in enumerate(self.taps):
            for r, u in enumerate(kernel_taps):
                if u is not None:
                    blocks[j, :, :, :, r] = w[(slice(None),) * 3 + u]
        return blocks.reshape(len(self.taps), g, opg, cpg * self.count)

    def transposed_weights(self, weight: np.ndarray) -> np.ndarray:
        """``(taps, g, C_in/g * P, C_out/g)``: the forward blocks transposed (rows:
        channel, then class), for :func:`conv_transpose_by_panels`."""
        blocks = self.forward_weights(weight)
        return np.ascontiguousarray(blocks.transpose(0, 1, 3, 2))


def panels_apply(geom: ConvGeometry, dtype, samples: int, transposed: bool = False) -> bool:
    """Whether ``W @ x`` (or, ``transposed``, ``W.T @ y``) of ``geom`` runs as panel GEMMs.

    Measured against im2col on 2 threads, 8 to 128 channels a side (see the
    performance page).  ``W @ x`` of stride 1: panels win in float64 (0.8-0.95x
    im2col's time) where the taps are few (25 taps of a 5x5 kernel: 1.1-2x
    slower) and each tap's block deep (:data:`_MIN_PANEL_DEPTH` input
    channels per group; 16: 1.1-1.25x slower); not in float32 (1.0-1.2x
    slower from 48 channels: SGEMM runs twice as fast, so im2col's gather
    weighs less against its deeper GEMM) nor complex (1.0-1.2x).  With a
    stride, over the classes, they gained nothing (0.8-1.1x with a 4x4
    kernel, 1.3-1.6x slower with 3x3, whose 2x2 taps over 4 classes leave 7
    of 16 blocks empty): im2col runs.  ``W.T @ y`` of a strided layer replaces the adds
    of every tap's windows, which cost more: panels win from
    :data:`_MIN_TRANSPOSED_DEPTH` channels of ``y`` per group (4x4 kernel,
    stride 2: 0.5-0.9x) where no block is empty (:data:`_MAX_WASTE` blocks
    per kernel tap; 3x3, stride 2, 7 of 16 empty: 0.7-1.05x up to 64
    channels, 1.1-1.4x slower at 128) and the blocks have
    :data:`_MIN_PANEL_DEPTH` rows (``C_in/g * P``; the 3->64 7x7 stem's 12
    rows ran 1.5x slower).  Also needed: a BLAS that takes panels, and rows
    of the flat arrays (``samples`` columns each) that fit its C ints.
    """
    if not panel_gemm_available(np.dtype(dtype)):
        return False
    g = geom.groups
    plan = panel_plan(geom)  # (kept: this runs on every product)
    classes, taps = plan.count, len(plan.taps)
    strided = any(s > 1 for s in geom.stride)
    if strided and transposed:
        deep = (geom.out_channels // g >= _MIN_TRANSPOSED_DEPTH
                and geom.in_channels // g * classes >= _MIN_PANEL_DEPTH
                and taps * classes <= _MAX_WASTE * math.prod(geom.kernel_size))
    else:
        depth = geom.out_channels // g if transposed else geom.in_channels // g
        deep = (not strided and np.dtype(dtype).char in _PANEL_DTYPES
                and depth >= _MIN_PANEL_DEPTH and taps <= _MAX_PANEL_TAPS)
    # (the widest row: the frame, or y widened by the kernel's reach)
    row = math.prod(n + k * d for n, k, d in
                    zip(_padded_size(geom), geom.kernel_size, geom.dilation)) * samples
    return deep and row < _INT_MAX


def _pieces(columns: int, rows: int, row_length: int, macs: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` of a wide product: whole rows of its first
    dimension, as many pieces as its work calls for (the geometry decides)."""
    count = max(2, min(_MAX_PIECES, macs // _PIECE_MACS))
    count = min(1 << (count.bit_length() - 1), rows)  # a power of two: even shares
    cuts = [rows * k // count * row_length for k in range(count)] + [columns]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _channel_split(columns: int, channels: int, macs: int) -> bool:
    """Whether a product's pieces are ranges of output channels over all its columns
    rather than ranges of columns: where two column pieces would be narrow."""
    return (macs >= _MIN_PARALLEL_MACS and columns < 2 * _MIN_PIECE_COLUMNS
            and channels >= 2 * _MIN_PIECE_CHANNELS)


def _run_pieces(source, blocks, offsets, width: int, rows: int, row_length: int, threads: int,
                run_shares, *, wide=None, crop=None) -> None:
    """The product's ``width`` wide columns by :func:`_multiply_panels`, in pieces of
    whole rows (``rows`` of ``row_length`` columns) on ``threads`` threads, BLAS on one.

    Into ``wide`` where given; else each piece into a buffer of its thread's,
    handed to ``crop(r0, r1, piece)`` for its rows ``[r0, r1)`` while in cache
    (a large layer then holds a piece's columns per thread, not all of them).
    A narrow product (:func:`_channel_split`) is cut into two ranges of output
    channels instead, into a wide buffer cropped once.
    """
    _, g, m, k = blocks.shape
    macs = width * g * m * k * len(offsets)
    crop_once = None
    if _channel_split(width, m, macs):
        pieces = [(0, m // 2, 0, width), (m // 2, m, 0, width)]
        if wide is None:  # (every piece spans all columns: one buffer, cropped after)
            wide, crop_once, crop = _scratch("wide", (g * m, width), source.dtype), crop, None
    else:
        pieces = [(0, m, c0, c1) for c0, c1 in
                  ([(0, width)] if macs < _MIN_PARALLEL_MACS
                   else _pieces(width, rows, row_length, macs))]
    with one_blas_thread():
        _multiply_panels(source, blocks, offsets, pieces, threads, run_shares, wide, crop,
                         row_length)
    if crop_once is not None:
        crop_once(0, rows, wide)


def _multiply_panels(source: np.ndarray, blocks: np.ndarray, offsets: list[int], pieces,
                     threads: int, run_shares, wide=None, crop=None,
                     row_length: int = 1) -> None:
    """``C[m0:m1, c0:c1] = sum_t blocks[t, :, m0:m1] @ source[:, offset_t + c0 : offset_t + c1]``
    per group, for each piece ``(m0, m1, c0, c1)``.

    ``source`` ``(g * K, F)``, ``blocks`` ``(taps, g, M, K)``, all
    C-contiguous; ``C`` is ``wide`` ``(g * M, width)``, or per piece (all
    ``M`` rows) a ``(g * M, c1 - c0)`` buffer passed on to ``crop`` (see
    :func:`_run_pieces`).  Each piece sums its taps in order.
    """
    taps, g, m, k = blocks.shape
    f = source.shape[1]
    size = source.itemsize
    # (addresses: the BLAS calls take them, with their constant arguments made
    # once per piece, see PanelGemms)
    source_at, blocks_at = source.ctypes.data, blocks.ctypes.data

    def run(share):
        for m0, m1, c0, c1 in share:
            if wide is None:
                target, ld, start = _scratch("piece", (g * m, c1 - c0), source.dtype), c1 - c0, 0
            else:
                target, ld, start = wide, wide.shape[1], c0
            gemms = PanelGemms(source.dtype, m1 - m0, k, f, ld, c1 - c0)
            target_at = target.ctypes.data
            for gi in range(g):
                c = target_at + ((gi * m + m0) * ld + start) * size
                for t, offset in enumerate(offsets):
                    gemms(blocks_at + ((t * g + gi) * m + m0) * k * size,
                          source_at + (gi * k * f + offset + c0) * size, c, t > 0)
            if crop is not None:
                crop(c0 // row_length, -(-c1 // row_length), target)

    run_shares(run, pieces, threads)


def _flat_strides(shape: tuple[int, ...], samples: int) -> list[int]:
    """Element strides of each spatial dimension of a flat (*shape, samples) array."""
    return [math.prod(shape[d + 1:]) * samples for d in range(len(shape))]


def conv_by_panels(frame: np.ndarray, blocks: np.ndarray, plan: PanelPlan, out: np.ndarray,
                   threads: int, run_shares) -> None:
    """``out = conv(frame)`` (the padded frame ``(C_in, *Lp, B)``) by panel GEMMs, stride 1.

    ``blocks`` from :meth:`PanelPlan.forward_weights` in the frame's dtype;
    ``run_shares(run, pieces, threads)`` runs ``run`` on shares of the pieces
    on the threads (the form's tile runner).
    """
    geom = plan.geom
    samples = frame.shape[-1]
    shape = tuple(frame.shape[1:-1])
    strides = _flat_strides(shape, samples)
    source = frame.reshape(geom.in_channels, -1)
    offsets = [sum(q * f for q, f in zip(qs, strides)) for qs, _ in plan.taps]
    width = sum((o - 1) * f for o, f in zip(geom.output_size, strides)) + samples
    itemsize = frame.itemsize

    def crop(r0, r1, piece):  # the output's rows out of the piece's wide ones
        view = as_strided(piece, (geom.out_channels, r1 - r0, *geom.output_size[1:], samples),
                          (piece.strides[0], *(f * itemsize for f in strides), itemsize),
                          writeable=False)
        np.copyto(out[:, r0:r1], view)

    if shape[1:] == geom.output_size[1:] and out.flags.c_contiguous:
        # the wide output is the output (a 1x1 kernel, or one tap wide with
        # nothing padded after the first dimension): nothing to crop
        _run_pieces(source, blocks, offsets, width, geom.output_size[0], strides[0], threads,
                    run_shares, wide=out.reshape(geom.out_channels, -1))
        return
    _run_pieces(source, blocks, offsets, width, geom.output_size[0], strides[0], threads,
                run_shares, crop=crop)


def conv_transpose_by_panels(y: np.ndarray, blocks: np.ndarray, plan: PanelPlan,
                             frame: np.ndarray, threads: int, run_shares) -> None:
    """``frame = C.T y``: the transposed convolution onto the padded frame ``(C_in, *Lp, B)``.

    ``blocks`` from :meth:`PanelPlan.transposed_weights`; ``run_shares`` as
    for :func:`conv_by_panels`.  Frame class ``r``
    at lattice position ``p`` sums ``blocks[q] y[p - q]`` over the taps:
    ``y`` is widened by ``Q - 1`` zeros before it (and zeros after, up to the
    lattice), the panels of every tap give every class at once, and the
    classes are interleaved into the frame (zeros where no tap lands).
    """
    geom = plan.geom
    samples = y.shape[-1]
    shape = tuple(n + e - 1 for n, e in zip(plan.lattice, plan.extent))
    padded = _scratch("widened", (geom.out_channels, *shape, samples), y.dtype)
    padded.fill(0)
    padded[(slice(None), *(slice(e - 1, e - 1 + n) for e, n in
                           zip(plan.extent, geom.output_size)))] = y
    strides = _flat_strides(shape, samples)
    # tap q reads y at p - q: at p + (Q - 1 - q) in the widened array
    offsets = [sum((e - 1 - q) * f for e, q, f in zip(plan.extent, qs, strides))
               for qs, _ in plan.taps]
    width = sum((n - 1) * f for n, f in zip(plan.lattice, strides)) + samples
    rows = geom.in_channels * plan.count
    wide = _scratch("wide", (rows, width), y.dtype)
    _run_pieces(padded.reshape(geom.out_channels, -1), blocks, offsets, width, plan.lattice[0],
                strides[0], threads, run_shares, wide=wide)
    itemsize = wide.itemsize
    classes = as_strided(wide, (geom.in_channels, plan.count, *plan.lattice, samples),
                         (plan.count * wide.strides[0], wide.strides[0],
                          *(f * itemsize for f in strides), itemsize), writeable=False)
    _depth_to_space(classes, plan, frame)


def _depth_to_space(classes: np.ndarray, plan: PanelPlan, frame: np.ndarray) -> None:
    """The frame from its classes ``(C, P, *lattice, B)``; zeros in classes no tap reaches."""
    geom = plan.geom
    if plan.count < math.prod(geom.stride):
        frame.fill(0)
    for index, r in enumerate(itertools.product(*plan.classes)):
        target = frame[(slice(None), *(slice(c, None, s) for c, s in zip(r, geom.stride)))]
        inside = tuple(slice(0, n) for n in target.shape[1:-1])
        where: tuple[Any, ...] = (slice(None), index, *inside)
        target[...] = classes[where]
