"""The structured form's products as implicit GEMMs: one BLAS call per tap, no gathered windows.

Flatten the padded frame ``(C, *Lp, B)`` to ``(C, F)``.  For stride 1, the
windows of tap ``t`` are then the frame's *panel* of columns starting at the
tap's offset ``sum_d t_d d_d f_d`` (``f_d``: the frame's element strides):
a ``(C, n)`` matrix with the frame's row length as leading dimension, which
BLAS multiplies in place (:func:`.._blas.panel_gemm`).  The output is
computed *wide*, at every frame position (``n`` columns run over the frame's
rows, the positions past each output row's end included), each tap's GEMM
adding onto the last; the output is then cut out of it.  im2col copies
``C * taps`` values per output position before its GEMM; this copies none.

A stride ``s`` splits the frame into its classes modulo the stride
(space-to-depth: ``C * P`` channels of frame positions ``p s + r`` for the
classes ``r`` that taps reach, on a lattice of ``ceil(Lp / s)`` per
dimension).  Tap ``t`` lands in class ``r`` at lattice offset ``q``, for
``q, r = divmod(t d, s)``, so the convolution is a stride-1 one over the
lattices, with taps ``q`` whose ``(C_out, C * P)`` blocks gather the weight's
taps by class (zeros for the classes a ``q`` lacks).  The transposed product
(:func:`conv_transpose_by_panels`) is the same construction read backwards
(depth-to-space): ``y``, widened by zeros, convolved with the flipped
per-class blocks gives every class of the frame at once, the classes are
interleaved into the frame, and the frame folded back (``P.T``).

One GEMM per tap multiplies a ``(C_out/g) x (C_in/g * P)`` block: where that
depth is small (a 3-channel stem) the GEMMs are thin and slow, and im2col,
which gathers every tap into one deep GEMM, runs instead
(:func:`panels_apply`).  The columns are cut into pieces, fixed by the
geometry and the number of samples alone, which the threads share: a piece's
columns are computed by the same calls on whichever thread runs it.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._blas import _INT_MAX, panel_gemm, panel_gemm_available
from .._geometry import ConvGeometry
from ..direct import _padded_size

__all__ = ["panels_apply", "conv_by_panels", "conv_transpose_by_panels", "PanelPlan", "panel_plan"]

# The least depth (rows of each tap's panel: C_in/g times the classes) for
# which one GEMM per tap is chosen over im2col.  Measured on 2 threads,
# float64: (c) 64->64 3x3 at 56² ... (set from the bench, see performance.md).
_MIN_PANEL_DEPTH = 32

# Multiply-adds per piece of columns: a product of fewer runs as one piece (one
# thread); larger ones as up to _MAX_PIECES pieces.  Fewer, wider GEMMs run
# faster (the 64->64 3x3 layer at 56², 2 threads: 2.0 ms in two pieces, 2.3
# in four), so a piece is large.
_PIECE_MACS = 1 << 26
_MAX_PIECES = 16
_MIN_PARALLEL_MACS = 1 << 22


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
    def strided(self) -> bool:
        return any(s != 1 for s in self.geom.stride)

    def forward_weights(self, weight: np.ndarray) -> np.ndarray:
        """``(taps, g, C_out/g, C_in/g * P)`` blocks (columns: channel, then class)."""
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
        """``(taps, g, C_in/g * P, C_out/g)``: the forward blocks transposed, in the
        order of :meth:`transposed_offsets` (tap ``q`` reads ``y`` at ``p - q``)."""
        blocks = self.forward_weights(weight)
        return np.ascontiguousarray(blocks.transpose(0, 1, 3, 2))


def panels_apply(geom: ConvGeometry, dtype, samples: int) -> bool:
    """Whether the products of ``geom`` in ``dtype`` run as panel GEMMs.

    Each tap's GEMM multiplies a block of ``C_out/g`` rows by ``C_in/g * P``
    columns (``W @ x``; for ``W.T @ y``, ``C_in/g * P`` rows by ``C_out/g``):
    both at least :data:`_MIN_PANEL_DEPTH`; a BLAS that takes panels; and
    rows of the flat arrays (``samples`` columns each) that fit BLAS's C ints.
    """
    if not panel_gemm_available(np.dtype(dtype)):
        return False
    g = geom.groups
    classes = math.prod(len({u * d % s for u in range(k)})
                        for k, d, s in zip(geom.kernel_size, geom.dilation, geom.stride))
    thin = min(geom.out_channels // g, geom.in_channels // g * classes)
    # (the widest row: the frame, or y widened by the kernel's reach)
    row = math.prod(n + k * d for n, k, d in
                    zip(_padded_size(geom), geom.kernel_size, geom.dilation)) * samples
    return thin >= _MIN_PANEL_DEPTH and row < _INT_MAX


def _pieces(columns: int, rows: int, row_length: int, macs: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` of a wide product: whole rows of its first
    dimension, as many pieces as its work calls for (the geometry decides)."""
    count = 1 if macs < _MIN_PARALLEL_MACS else max(2, min(_MAX_PIECES, macs // _PIECE_MACS))
    count = min(count, rows)
    cuts = [rows * k // count * row_length for k in range(count)] + [columns]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _multiply_panels(source: np.ndarray, blocks: np.ndarray, offsets: list[int],
                     wide: np.ndarray, pieces, threads: int) -> None:
    """``wide[:, c0:c1] = sum_t blocks[t] @ source[:, offset_t + c0 : offset_t + c1]`` per group.

    ``source`` ``(g * K, F)``, ``blocks`` ``(taps, g, M, K)``, ``wide``
    ``(g * M, Fw)``, all C-contiguous.  Each piece sums its taps in order.
    """
    from .structured import _run_tiles  # (the tiles' runner: one share per thread)

    taps, g, m, k = blocks.shape
    f, fw = source.shape[1], wide.shape[1]

    def run(share):
        for c0, c1 in share:
            for gi in range(g):
                for t, offset in enumerate(offsets):
                    panel_gemm(blocks[t, gi], source, gi * k * f + offset + c0, f,
                               wide, gi * m * fw + c0, fw, c1 - c0, t > 0)

    _run_tiles(run, pieces, threads)


def _flat_strides(shape: tuple[int, ...], samples: int) -> list[int]:
    """Element strides of each spatial dimension of a flat (*shape, samples) array."""
    return [math.prod(shape[d + 1:]) * samples for d in range(len(shape))]


def _scratch(slot, shape, dtype):
    from .structured import _scratch as scratch
    return scratch(slot, shape, dtype)


def conv_by_panels(frame: np.ndarray, blocks: np.ndarray, plan: PanelPlan, out: np.ndarray,
                   threads: int) -> None:
    """``out = conv(frame)`` (the padded frame ``(C_in, *Lp, B)``) by panel GEMMs.

    ``blocks`` from :meth:`PanelPlan.forward_weights` in the frame's dtype.
    """
    geom = plan.geom
    samples = frame.shape[-1]
    if plan.strided:
        source = _space_to_depth(frame, plan)
        shape = plan.lattice
    else:
        source, shape = frame, tuple(frame.shape[1:-1])
    strides = _flat_strides(shape, samples)
    source = source.reshape(-1, math.prod(shape) * samples)
    offsets = [sum(q * f for q, f in zip(qs, strides)) for qs, _ in plan.taps]
    width = sum((o - 1) * f for o, f in zip(geom.output_size, strides)) + samples
    wide = _scratch("wide", (geom.out_channels, width), frame.dtype)
    macs = width * geom.out_channels * blocks.shape[3] * len(offsets)
    pieces = _pieces(width, geom.output_size[0], strides[0], macs)
    _multiply_panels(source, blocks, offsets, wide, pieces, threads)
    itemsize = wide.itemsize
    view = as_strided(wide, (geom.out_channels, *geom.output_size, samples),
                      (wide.strides[0], *(f * itemsize for f in strides), itemsize),
                      writeable=False)
    np.copyto(out, view)


def _space_to_depth(frame: np.ndarray, plan: PanelPlan) -> np.ndarray:
    """The frame's classes that taps reach, ``(C, P, *lattice, B)``: element
    ``(c, r, p)`` is frame position ``p s + r`` (zero past the frame)."""
    geom = plan.geom
    samples = frame.shape[-1]
    lattices = _scratch("classes", (frame.shape[0], plan.count, *plan.lattice, samples),
                        frame.dtype)
    for index, r in enumerate(itertools.product(*plan.classes)):
        target = lattices[:, index]
        source = frame[(slice(None), *(slice(c, None, s) for c, s in zip(r, geom.stride)))]
        inside = tuple(slice(0, n) for n in source.shape[1:-1])
        target[(slice(None), *inside)] = source
        for d, n in enumerate(source.shape[1:-1]):
            if n < plan.lattice[d]:
                where = [slice(None)] * target.ndim
                where[1 + d] = slice(n, None)
                target[tuple(where)] = 0
    return lattices


def conv_transpose_by_panels(y: np.ndarray, blocks: np.ndarray, plan: PanelPlan,
                             frame: np.ndarray, threads: int) -> None:
    """``frame = C.T y``: the transposed convolution onto the padded frame ``(C_in, *Lp, B)``.

    ``blocks`` from :meth:`PanelPlan.transposed_weights`.  Frame class ``r``
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
    macs = width * rows * blocks.shape[3] * len(offsets)
    pieces = _pieces(width, plan.lattice[0], strides[0], macs)
    _multiply_panels(padded.reshape(geom.out_channels, -1), blocks, offsets, wide, pieces,
                     threads)
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
