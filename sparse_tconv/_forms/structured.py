"""The operators' product form for channel layers: the weight's taps, multiplied as GEMMs.

A convolution matrix is ``W = sum_t S_t (x) B_t``: for each kernel tap ``t``
a sampling pattern ``S_t`` over positions and one ``(C_out/g) x (C_in/g)``
block ``B_t`` per group, plus what the padding does at the border (drops
taps for zeros padding, sends them to mirrored, edge or wrapped positions
for the others).  This form stores the weight alone, as ``(groups,
C_out/g, C_in/g * taps)``: a few hundred kB where the CSR matrix takes
gigabytes, built in microseconds.  Its products are the structure's:

``W @ x`` (:func:`conv_samples`)
    The input is padded once by the padding mode (the border, handled apart,
    as a copy: the padded frame is ``P x`` for a 0/1 matrix ``P`` of one row
    per padded position).  The output is cut into *tiles*, ranges of rows of
    the first spatial dimension (every sample: the samples are the last
    axis, as the operators' columns are).  For each tile the windows of
    every tap are gathered into one matrix (im2col: ``C_in/g * taps`` rows,
    one column per output position and sample of the tile) and multiplied
    by the weight in one GEMM per group (numpy's ``matmul``, BLAS).
    Gathering all the taps into one GEMM keeps few-channel layers (a 3->64
    stem, 49 taps) as fast as wide ones, where one GEMM per tap would
    multiply 3-column matrices.
``W.T @ y``
    For stride 1, the convolution of ``y`` with the flipped weight over the
    padded frame (:func:`gathered_adjoint`), run by :func:`conv_samples`,
    then folded back (``P.T``: zeros padding crops, the other modes add each
    padded element onto the element it copies).  For other strides
    (:func:`conv_transpose_samples`), tile by tile: one GEMM by the
    transposed weight gives every tap's windows (col2im).  Each tap's
    windows land in one class of frame positions modulo the stride, as one
    contiguous run of that class's array: one add of long rows per tap.  The
    classes are then interleaved into the frame and folded back.  The GEMMs
    run on the threads; the adds, many short numpy calls, on the calling
    thread.

The tiles depend on the geometry and the number of samples alone, and each
is computed by the same calls whatever thread runs it: the result does not
depend on the number of threads.  Products equal the CSR matrix's to
rounding (sums in another order); the explicit zeros of the padding add
exact zeros for finite weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._blas import one_blas_thread
from .._geometry import ConvGeometry
from .._parallel import run_parallel
from .._validation import cast_if_safe
from ..direct import _padded_index, _padded_size
from .base import ProductForm
from .panels import conv_by_panels, conv_transpose_by_panels, panel_plan, panels_apply
from .scratch import scratch as _scratch

__all__ = ["StructuredForm", "conv_samples", "conv_transpose_samples", "Tiling", "tiling",
           "channel_chunks"]

# Elements of one tile's gathered windows (the im2col matrix): at least
# _TILE_ELEMENTS, at most _MAX_TILE_ELEMENTS, else a _MIN_TILES-th of the
# product's.  Fewer, larger GEMMs cost less per flop than the cache they spill
# (measured on the bench's layers in float64, 2 threads: (c) 3.2-3.5 ms with
# tiles of 1 MB, 2.8 with 8 MB; (b) 3.0-3.2 and 2.7), while a few tiles per
# thread keep both busy (a 32->64 4x4 stride-2 layer at 56x56, 3.2 MB of
# windows: 1.1 ms in one tile, 0.94-1.01 in four of 1 MB, 0.85-0.87 in two of
# 2 MB; a 64->128 3x3 stride-2 one, 3.6 MB: 1.51-1.55 ms in four, 1.36-1.44
# in two).  The bounds count elements, not bytes: a float32 tile of as many
# elements is as much work, and cutting by bytes left the float32 products of
# the bench's smaller layers in one tile, on one thread ((g)'s W.T @ y:
# 0.60-0.65 ms in one tile, 0.57-0.59 in two; (b)'s W.T @ y 2.4-2.5 -> 2.2 ms).
_TILE_ELEMENTS = 1 << 18
_MAX_TILE_ELEMENTS = 1 << 20
_MIN_TILES = 4

# The transposed product's tiles (windows added tap by tap) are larger: each
# tap's add is one numpy call, whose cost (some 4 us) a small tile pays for
# every tap (measured on the bench's 3->64 7x7 stride-2 layer in float64,
# when the adds were strided: 8.8 ms with 1 MB tiles, 5.7 ms with 4 MB).
_SCATTER_TILE_ELEMENTS = 1 << 19

# Below this many multiply-adds a product runs on one thread: handing tiles
# to a pool thread costs about 0.1 ms (as _parallel.MIN_PARALLEL_NNZ).
_MIN_PARALLEL_MACS = 1 << 22


class Tiling:
    """How a product over ``samples`` samples is cut into tiles: fixed by the geometry.

    ``tiles`` lists ``(first sample, end sample, first row, end row)``, rows
    of the first spatial dimension of the convolution's output.
    """

    __slots__ = ("tiles", "rows", "samples")

    def __init__(self, tiles: list[tuple[int, int, int, int]], rows: int, samples: int):
        self.tiles, self.rows, self.samples = tiles, rows, samples


def tiling(geom: ConvGeometry, samples: int, budget: int | None = None) -> Tiling:
    """The tiles of a product over ``samples`` samples: ranges of output rows of every sample.

    Each holds about ``budget`` elements of windows; by default a quarter of
    them (``_MIN_TILES`` tiles, for the threads to share), but no less than
    ``_TILE_ELEMENTS`` and no more than ``_MAX_TILE_ELEMENTS``.  Equal ranges,
    at least one row each.  The geometry and the number of samples alone
    decide (not the dtype).
    """
    out_rows = geom.output_size[0]
    taps = math.prod(geom.kernel_size)
    per_row = geom.in_channels * taps * math.prod(geom.output_size[1:]) * samples
    if budget is None:
        budget = min(_MAX_TILE_ELEMENTS, max(_TILE_ELEMENTS, per_row * out_rows // _MIN_TILES))
    count = -(-out_rows // max(1, min(out_rows, budget // per_row)))
    rows = -(-out_rows // count)
    tiles = [(0, samples, r, min(r + rows, out_rows)) for r in range(0, out_rows, rows)]
    return Tiling(tiles, rows, samples)


def _interior(geom: ConvGeometry) -> tuple[slice, ...]:
    return tuple(slice(lo, lo + n) for n, (lo, _) in zip(geom.input_size, geom.padding))


def _pad_frame(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``x`` (C, *L, samples) padded by the padding mode (C, *Lp, samples): ``P x``.

    A scratch array (overwritten by this thread's next product).  The padding
    runs one dimension at a time, over the padded extent of the dimensions
    before and the interior of those after (as ``np.pad``): every padded
    element is set once.
    """
    frame = _scratch("frame", (x.shape[0], *_padded_size(geom), x.shape[-1]), x.dtype)
    frame[(slice(None), *_interior(geom))] = x
    for d, (size, (lo, hi)) in enumerate(zip(geom.input_size, geom.padding)):
        if not (lo or hi):
            continue
        after = [slice(a, a + n) for n, (a, _) in zip(geom.input_size[d + 1:],
                                                       geom.padding[d + 1:])]
        view = frame[(slice(None),) * (1 + d) + (slice(None), *after, slice(None))]
        where = (slice(None),) * (1 + d)
        if geom.padding_mode == "zeros":
            view[where + (slice(0, lo),)] = 0
            view[where + (slice(lo + size, None),)] = 0
        else:
            border, source = _border_copies(size, lo, hi, geom.padding_mode)
            view[where + (border,)] = np.take(view, source, axis=1 + d)
    return frame


def _border_copies(size: int, lo: int, hi: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Along one dimension of the frame: its padded positions, and the frame position
    of the input element each one copies (the padding map ``P`` of that dimension)."""
    border = np.r_[0:lo, lo + size:lo + size + hi]
    return border, _padded_index(size, lo, hi, mode)[border] + lo


def _fold_into(frame: np.ndarray, geom: ConvGeometry, out: np.ndarray) -> None:
    """``out = P.T frame``: the padded frame (C, *Lp, samples) folded onto (C, *L, samples).

    Zeros padding crops.  The other modes add, one dimension at a time, each
    padded slab onto the slab it copies (the N-d padding map is a product of
    per-dimension maps), in place on the frame: only the border slabs are
    copied, then the interior is written to ``out``.  The frame is consumed.
    """
    view = frame
    for axis, (size, (lo, hi)) in enumerate(zip(geom.input_size, geom.padding)):
        ax = 1 + axis
        if geom.padding_mode != "zeros" and (lo or hi):
            border, target = _border_copies(size, lo, hi, geom.padding_mode)
            where: list[Any] = [slice(None)] * view.ndim
            where[ax] = target
            np.add.at(view, tuple(where), np.take(view, border, axis=ax))
        where = [slice(None)] * view.ndim
        where[ax] = slice(lo, lo + size)
        view = view[tuple(where)]
    np.copyto(out, view)


def _windows(frame: np.ndarray, geom: ConvGeometry, tile) -> np.ndarray:
    """The tile's windows, a view of the frame: (groups, C_in/g, *k, rows, *O[1:], samples)."""
    b0, b1, r0, r1 = tile
    g = geom.groups
    cpg = geom.in_channels // g
    base = frame[:, r0 * geom.stride[0]:, ..., b0:b1]
    sc, *sl, sb = base.strides
    return as_strided(
        base,
        (g, cpg, *geom.kernel_size, r1 - r0, *geom.output_size[1:], b1 - b0),
        (cpg * sc, sc, *(d * s for d, s in zip(geom.dilation, sl)),
         *(st * s for st, s in zip(geom.stride, sl)), sb),
        writeable=False,
    )


def _threads_for(geom: ConvGeometry, samples: int, threads: int) -> int:
    macs = samples * math.prod(geom.output_size) * geom.out_channels * (
        geom.in_channels // geom.groups) * math.prod(geom.kernel_size)
    return threads if macs >= _MIN_PARALLEL_MACS else 1


def conv_samples(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry, out: np.ndarray,
                 threads: int, blocks: dict | None = None) -> None:
    """``out[..., b] = conv(x[..., b])``: ``x`` (C_in, *L, B) into ``out`` (C_out, *O, B).

    The samples are the last axis (the columns of the operators' products).
    ``weight`` is ``(groups, C_out/g, C_in/g * taps)`` in the dtype of ``x``;
    ``blocks``, where given, keeps its panel blocks by dtype (:mod:`.panels`).
    Deep panels run as one GEMM per tap (:func:`.panels.conv_by_panels`),
    others as tiled im2col; pieces or tiles run on ``threads`` threads (BLAS
    on one), each computed the same way whatever thread runs it.
    """
    unpadded = all(lo == hi == 0 for lo, hi in geom.padding)
    # (without padding the frame is x itself: the products only read it)
    frame = x if unpadded and x.flags.c_contiguous else _pad_frame(x, geom)
    if panels_apply(geom, x.dtype, x.shape[-1]):
        panel = panel_plan(geom)
        conv_by_panels(frame, _kept(blocks, x.dtype, panel.forward_weights, weight), panel, out,
                       _threads_for(geom, x.shape[-1], threads), _run_tiles)
        return
    g = geom.groups
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    depth = weight.shape[2]
    plan = tiling(geom, x.shape[-1])
    width = plan.samples * plan.rows * math.prod(geom.output_size[1:])

    def run(share):
        # One buffer of each per thread, reused by its tiles (a fresh 1 MB array
        # would be mapped and faulted in for every tile).
        windows = _scratch("windows", (g * depth * width,), x.dtype)
        products = _scratch("products", (g * opg * width,), x.dtype)
        for tile in share:
            b0, b1, r0, r1 = tile
            shape = (r1 - r0, *geom.output_size[1:], b1 - b0)
            n = math.prod(shape)
            gathered = windows[: g * depth * n].reshape(g, depth, n)
            np.copyto(gathered.reshape((g, cpg, *geom.kernel_size, *shape)),
                      _windows(frame, geom, tile))
            target = out[:, r0:r1, ..., b0:b1]
            rows = target.reshape(g, opg, n) if _rows_are_contiguous(target) else None
            if rows is not None:  # BLAS writes the tile's rows in place (a leading dimension)
                np.matmul(weight, gathered, out=rows)
            else:
                result = products[: g * opg * n].reshape(g, opg, n)
                np.matmul(weight, gathered, out=result)
                np.copyto(target, result.reshape((g * opg, *shape)))

    with one_blas_thread():
        _run_tiles(run, plan.tiles, _threads_for(geom, x.shape[-1], threads))


def _kept(store: dict | None, dtype, make, weight: np.ndarray) -> np.ndarray:
    """``make(weight)``, kept in ``store`` by dtype for the next products (where given)."""
    if store is None:
        return make(weight)
    blocks = store.get(dtype.char)
    if blocks is None:
        blocks = store[dtype.char] = make(weight)
    return blocks


def channel_chunks(geom: ConvGeometry, tiles: int) -> list[tuple[int, int]]:
    """Ranges of each group's input channels whose windows one GEMM computes.

    A product of fewer than ``_MIN_TILES`` tiles cuts each tile's GEMM into
    that many, so that a small layer keeps the threads busy (the bench's
    64->32 4x4 stride-2 transposed layer at 28x28 is one tile).  The geometry
    and the number of tiles alone decide, as the tiles do.
    """
    cpg = geom.in_channels // geom.groups
    count = max(1, min(cpg, -(-_MIN_TILES // max(1, tiles))))
    cuts = [cpg * k // count for k in range(count + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _lattice(geom: ConvGeometry) -> tuple[int, ...]:
    """Per dimension, the positions of the padded frame in each class modulo the stride
    (``ceil(Lp / s)``: the first class's count, the most any class has)."""
    return tuple(-(-n // s) for n, s in zip(_padded_size(geom), geom.stride))


def _widened(y: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``y`` (C_out, *O, B) with zeros after its last elements along the dimensions after
    the first, up to the lattice's extent (:func:`_lattice`): a view when it needs none."""
    lattice = _lattice(geom)
    wide = (geom.output_size[0], *lattice[1:])
    if wide == tuple(geom.output_size):
        return y
    widened = _scratch("widened", (y.shape[0], *wide, y.shape[-1]), y.dtype)
    widened[(slice(None), *(slice(0, n) for n in geom.output_size), slice(None))] = y
    for axis, n in enumerate(geom.output_size[1:], start=2):
        where: list[Any] = [slice(None)] * widened.ndim
        where[axis] = slice(n, None)
        widened[tuple(where)] = 0
    return widened


def _landing(geom: ConvGeometry, lattice: tuple[int, ...], samples: int) -> list[tuple[int, int]]:
    """Per tap (row-major): the index of its lattice (the class of ``t d`` modulo the
    stride, row-major) and the offset of its windows in that lattice, flattened."""
    steps = [math.prod(lattice[k + 1:]) * samples for k in range(geom.ndim)]
    per_axis = []
    for k, d, s, step in zip(geom.kernel_size, geom.dilation, geom.stride, steps):
        per_axis.append([(u * d % s, u * d // s * step) for u in range(k)])
    landing = []
    for t in itertools.product(*per_axis):
        index = 0
        for (r, _), s in zip(t, geom.stride):
            index = index * s + r
        landing.append((index, sum(offset for _, offset in t)))
    return landing


def conv_transpose_samples(y: np.ndarray, weight: np.ndarray, geom: ConvGeometry,
                           out: np.ndarray, threads: int, blocks: dict | None = None) -> None:
    """``out[..., b] = conv_transpose(y[..., b])``: ``y`` (C_out, *O, B) into ``out`` (C_in, *L, B).

    The adjoint of :func:`conv_samples` (no conjugation), on the same tiles.
    Tap ``t`` sends output position ``o`` to frame position ``o s + t d``,
    per dimension, which is ``(o + q) s + r`` for ``q, r = divmod(t d, s)``:
    in the frame's class ``r`` modulo the stride (its *lattice*, an array
    of its own), at ``o + q``.  So, with ``y`` widened by zeros along the
    dimensions after the first to the lattices' extent (:func:`_widened`),
    every tap's windows land in one lattice as one contiguous run at a fixed
    offset: a tile's GEMM by the transposed weight gives every tap's windows,
    and each tap is one add of long rows (zeros land past each row's end,
    where the widened ``y`` is zero).  The lattices are then interleaved into
    the padded frame and folded onto ``out``.

    The GEMMs of a few tiles (in chunks of channels, :func:`channel_chunks`)
    run at once, then this thread adds their windows, in tile order: the
    order of every sum depends on the tiles alone.

    Deep panels (:func:`.panels.panels_apply`) run as one GEMM per tap of the
    classes instead (:func:`.panels.conv_transpose_by_panels`; ``blocks``,
    where given, keeps their blocks by dtype).
    """
    if panels_apply(geom, y.dtype, y.shape[-1], transposed=True):
        panel = panel_plan(geom)
        frame = _scratch("sums", (geom.in_channels, *_padded_size(geom), y.shape[-1]), y.dtype)
        conv_transpose_by_panels(y, _kept(blocks, y.dtype, panel.transposed_weights, weight),
                                 panel, frame, _threads_for(geom, y.shape[-1], threads),
                                 _run_tiles)
        _fold_into(frame, geom, out)
        return
    g = geom.groups
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    samples = y.shape[-1]
    lattice = _lattice(geom)
    classes = math.prod(geom.stride)
    # one more row: a tap's run ends up to a row after its last position
    lattices = _scratch("lattices", (classes, g, cpg, lattice[0] + 1, *lattice[1:], samples),
                        y.dtype)
    lattices.fill(0)
    runs = lattices.reshape(classes, g, cpg, -1)
    row = math.prod(lattice[1:]) * samples  # elements of one lattice row
    taps = math.prod(geom.kernel_size)
    landing = _landing(geom, lattice, samples)
    values = _widened(y, geom)
    flipped = weight.transpose(0, 2, 1)  # (g, cpg * taps, opg), a view
    plan = tiling(geom, samples, _SCATTER_TILE_ELEMENTS)
    chunks = channel_chunks(geom, len(plan.tiles))

    def windows_of(tile, chunk, windows):  # a chunk of the tile's windows: one GEMM
        (_, _, r0, r1), (c0, c1) = tile, chunk
        np.matmul(flipped[:, c0 * taps:c1 * taps], values[:, r0:r1].reshape(g, opg, -1),
                  out=windows[:, c0 * taps:c1 * taps])

    def add_windows(tile, windows):
        _, _, r0, r1 = tile
        n = (r1 - r0) * row
        windows = windows.reshape(g, cpg, taps, n)
        for j, (lattice_index, start) in enumerate(landing):
            start += r0 * row
            runs[lattice_index, :, :, start:start + n] += windows[:, :, j]

    threads = _threads_for(geom, samples, threads)
    tiles = plan.tiles
    per_batch = max(1, _MIN_TILES // len(chunks))
    with one_blas_thread():
        for first in range(0, len(tiles), per_batch):
            batch = [(tile, _scratch(f"windows{j}", (g, cpg * taps, (tile[3] - tile[2]) * row),
                                     y.dtype))
                     for j, tile in enumerate(tiles[first:first + per_batch])]
            run_parallel(lambda item: windows_of(*item),
                         [(tile, chunk, windows) for tile, windows in batch for chunk in chunks],
                         threads)
            for tile, windows in batch:
                add_windows(tile, windows)
    _interleave(lattices, geom, out)


def _interleave(lattices: np.ndarray, geom: ConvGeometry, out: np.ndarray) -> None:
    """``out = P.T frame``, the frame being the lattices (:func:`conv_transpose_samples`)
    interleaved.  Zeros padding (``P.T`` crops) writes the cropped part of each lattice
    straight into ``out``; the other modes fill the frame and fold it."""
    crop = geom.padding_mode == "zeros"
    if crop:
        frame, offsets = out, [lo for lo, _ in geom.padding]
    else:
        frame = _scratch("sums", (geom.in_channels, *_padded_size(geom), out.shape[-1]),
                         out.dtype)
        offsets = [0] * geom.ndim
    shape = (geom.in_channels, *lattices.shape[3:])
    for index, r in enumerate(np.ndindex(*geom.stride)):
        target, source = [slice(None)], [slice(None)]
        for c, s, lo, n in zip(r, geom.stride, offsets, frame.shape[1:-1]):
            first = max(0, -(-(lo - c) // s))  # the lattice's first position at or after lo
            start = first * s + c - lo
            count = len(range(start, n, s))
            target.append(slice(start, n, s))
            source.append(slice(first, first + count))
        frame[tuple(target)] = lattices[index].reshape(shape)[tuple(source)]
    if not crop:
        _fold_into(frame, geom, out)


def adjoint_geometry(geom: ConvGeometry):
    """``(geometry, frame)`` of :func:`gathered_adjoint` (stride 1), or None."""
    if any(s != 1 for s in geom.stride):
        return None
    ndim = geom.ndim
    reach = [(k - 1) * d for k, d in zip(geom.kernel_size, geom.dilation)]
    # The frame's last elements that no output reads (a transposed convolution's
    # output_padding): zeros of the transposed product, read off y's zeros.
    slack = [n + lo + hi - r - o for n, (lo, hi), r, o in
             zip(geom.input_size, geom.padding, reach, geom.output_size)]
    crop = geom.padding_mode == "zeros" and all(
        lo <= r and hi <= r + e for (lo, hi), r, e in zip(geom.padding, reach, slack))
    if crop:
        padding = tuple((r - lo, r - hi + e) for (lo, hi), r, e in zip(geom.padding, reach, slack))
        output_size = geom.input_size
    else:
        padding = tuple((r, r + e) for r, e in zip(reach, slack))
        output_size = _padded_size(geom)
    adjoint = dataclasses.replace(
        geom, in_channels=geom.out_channels, out_channels=geom.in_channels,
        input_size=geom.output_size, output_size=output_size, padding=padding,
        padding_mode="zeros", output_padding=(0,) * ndim)
    # (every output position of the adjoint reads inside its padded input)
    assert all(o + lo + hi - r == n for o, (lo, hi), r, n in
               zip(geom.output_size, padding, reach, output_size))
    return adjoint, not crop


def gathered_adjoint(geom: ConvGeometry, weight: np.ndarray):
    """The transposed product of a stride-1 geometry as a convolution, or None.

    With stride 1, ``W.T`` is the correlation of ``y`` with the flipped
    kernel, channels swapped, over the whole padded frame (zeros beyond
    ``y``), followed by the fold ``P.T``: a convolution that
    :func:`conv_samples` runs on gathered windows, as fast as ``W @ x``,
    instead of adding every tap's windows into the frame.  Under zeros
    padding the fold is a crop, computed only where it keeps something.
    Returns ``(geometry, weight, frame)`` (``frame``: whether the result is
    the padded frame, to fold) for ``weight`` in the form's layout
    ``(groups, C_out/g, C_in/g * taps)``.
    """
    found = adjoint_geometry(geom)
    if found is None:
        return None
    adjoint, frame = found
    g, ndim = geom.groups, geom.ndim
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    w = weight.reshape(g, opg, cpg, *geom.kernel_size)
    w = np.flip(w, axis=tuple(range(3, 3 + ndim))).swapaxes(1, 2)
    return adjoint, np.ascontiguousarray(w).reshape(g, cpg, -1), frame


def _rows_are_contiguous(target: np.ndarray) -> bool:
    """Whether each channel's part of ``target`` (C, ...) is one contiguous run."""
    inner = target[0]
    return inner.flags.c_contiguous and target.strides[0] > 0


def _run_tiles(run_share, tiles, threads: int) -> None:
    """``run_share`` on ``threads`` shares of the tiles (dealt round-robin), at once."""
    threads = max(1, min(threads, len(tiles)))
    run_parallel(run_share, [tiles[i::threads] for i in range(threads)], threads)


class StructuredForm(ProductForm):
    """W (or W.T) as the weight's taps: products are tiled im2col GEMMs (see the module).

    The form of W stores the weight, ``(groups, C_out/g, C_in/g * taps)`` (a
    view of the operator's own); the form of W.T, for stride 1, also the
    flipped weight of :func:`gathered_adjoint`, on which its products gather
    windows as W's do.  Each serves the other direction on the same arrays
    (``W.T @ y`` by adding windows, :func:`conv_transpose_samples`).
    """

    name = "structured"

    def __init__(self, weight: np.ndarray, geometry: ConvGeometry, transposed: bool):
        self.weight = weight
        self.geometry = geometry
        self.transposed = transposed
        self.matrix = None  # no scipy matrix: the operator's CSR is built when read
        self.adjoint = gathered_adjoint(geometry, weight) if transposed else None
        # panel blocks (the weight rearranged per tap, see .panels) by dtype, for
        # W @ x, the gathered W.T @ y, or W.T @ y by classes: those of the form's
        # own direction (multiply) made here for the weight's dtype, the others by
        # the first product that needs them
        self.blocks: dict[str, dict] = {"forward": {}, "adjoint": {}, "transposed": {}}
        role, plan = self._own_blocks(geometry, weight.dtype, transposed)
        if role == "forward":
            self.blocks[role][weight.dtype.char] = plan.forward_weights(weight)
        elif role == "adjoint" and self.adjoint is not None:
            self.blocks[role][weight.dtype.char] = plan.forward_weights(self.adjoint[1])
        elif role == "transposed":
            self.blocks[role][weight.dtype.char] = plan.transposed_weights(weight)

    @staticmethod
    def _own_blocks(geometry, dtype, transposed):
        """``(role, plan)`` of the panel blocks of the form's own products (``multiply``:
        W @ x, or W.T @ y for the form of W.T), or ``(None, None)`` where none run."""
        if not transposed:
            if panels_apply(geometry, dtype, 1):
                return "forward", panel_plan(geometry)
        elif (adjoint := adjoint_geometry(geometry)) is not None:
            if panels_apply(adjoint[0], dtype, 1):
                return "adjoint", panel_plan(adjoint[0])
        elif panels_apply(geometry, dtype, 1, transposed=True):
            return "transposed", panel_plan(geometry)
        return None, None

    @staticmethod
    def applies(geometry) -> bool:
        """Every channel layer: blocks of more than one entry (one channel in and
        out, or one per group, is a scalar per tap: the diagonal or CSR forms)."""
        g = geometry.groups
        return (geometry.out_channels // g) * (geometry.in_channels // g) > 1

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed) -> int:
        """The weight, for W.T of stride 1 its flipped copy (:func:`gathered_adjoint`),
        and the panel blocks of the form's own products: what it holds when built.
        A form that also serves the other direction (``keep_transpose=False``)
        adds that direction's blocks, as large as the weight, at its first
        product there."""
        dtype = np.dtype(dtype)
        per_tap = math.prod(geometry.weight_shape[:2]) * dtype.itemsize
        copies = 2 if transposed and all(s == 1 for s in geometry.stride) else 1
        nbytes = copies * math.prod(geometry.kernel_size) * per_tap
        _, plan = cls._own_blocks(geometry, dtype, transposed)
        if plan is not None:
            nbytes += plan.block_count * per_tap
        return nbytes

    @classmethod
    def lean_transposed(cls, geometry, transposed) -> bool:
        """W.T for stride 1: its form holds both the weight (for ``W @ x``) and the
        flipped weight (for ``W.T @ y``, gathered as fast as ``W @ x``)."""
        return all(s == 1 for s in geometry.stride) or transposed

    @classmethod
    def build(cls, request):
        geom = request.geometry
        g = geom.groups
        weight = np.ascontiguousarray(request.weight).reshape(g, geom.out_channels // g, -1)
        return cls(weight, geom, request.transposed)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays())

    def _arrays(self):
        kept = [b for store in self.blocks.values() for b in store.values()]
        return [self.weight] + ([] if self.adjoint is None else [self.adjoint[1]]) + kept

    def _apply(self, v: np.ndarray, threads: int, transposed: bool) -> np.ndarray:
        geom = self.geometry
        v = cast_if_safe(v, self.weight.dtype)
        dtype = np.result_type(v.dtype, self.weight.dtype)
        v = v.astype(dtype, copy=False)
        columns = 1 if v.ndim == 1 else v.shape[1]
        in_shape, out_shape = geom.input_shape, geom.output_shape
        if transposed:
            in_shape, out_shape = out_shape, in_shape
        result = np.empty((math.prod(out_shape), columns), dtype=dtype)
        if columns:
            # Columns are samples: (n, B) is (C, *L, B) as it lies in memory.
            samples = v.reshape((*in_shape, columns))
            out = result.reshape((*out_shape, columns))
            if not transposed:
                conv_samples(samples, self.weight.astype(dtype, copy=False), geom, out, threads,
                             self.blocks["forward"])
            elif self.adjoint is None:
                conv_transpose_samples(samples, self.weight.astype(dtype, copy=False), geom, out,
                                       threads, self.blocks["transposed"])
            else:
                adjoint, weight, frame = self.adjoint
                weight = weight.astype(dtype, copy=False)
                if frame:
                    padded = _scratch("sums", (geom.in_channels, *_padded_size(geom), columns),
                                      dtype)
                    conv_samples(samples, weight, adjoint, padded, threads,
                                 self.blocks["adjoint"])
                    _fold_into(padded, geom, out)
                else:
                    conv_samples(samples, weight, adjoint, out, threads, self.blocks["adjoint"])
        return result.reshape(-1) if v.ndim == 1 else result

    def multiply(self, x, threads):
        return self._apply(x, threads, self.transposed)

    def multiply_transposed(self, y, threads):
        return self._apply(y, threads, not self.transposed)
