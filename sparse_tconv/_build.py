"""CSR construction of W (convolution) and W.T (transposed convolution).

The matrix is written straight into its final ``indptr``/``indices``/``data``
arrays, with no COO stage and no sort.  Rows are ordered (row channel, row
position) and, within a row, entries are ordered (column channel, column
position); every per-dimension map lists a row's columns in increasing order,
so the rows come out sorted.

Write plan: the rows of one row channel form the *pattern*; every row channel
repeats it at an offset of ``nnz_pattern`` entries.  Each N-d product of
per-dimension families (see :mod:`._indexmap`) is a set of rows that all have
the same length and whose starting offsets are affine in the family indices,
i.e. a strided view of ``indices``/``data`` of shape::

    (groups, row channels per group, n_1, ..., n_N, column channels per group, m_1, ..., m_N)

``indices`` over that view is a broadcast sum of a per-row base and a per-entry
offset; ``data`` is the (tap-merged) kernel broadcast over the row positions.
So a whole block is two numpy calls, whatever its size, and large blocks are
cut along an outer axis and written from several threads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numpy.lib.stride_tricks import as_strided

from ._geometry import (
    ConvGeometry,
    _check_int,
    _check_positive_int,
    _matrix_size,
    allocation_context,
    as_weight,
    check_size,
    conv_geometry,
    conv_transpose_geometry,
    index_dtype,
)
from ._parallel import even_ranges, resolve_threads, run_parallel

__all__ = [
    "conv_matrix",
    "conv_transpose_matrix",
    "validate",
    "build",
    "refill",
    "build_rows",
    "row_offsets",
    "balanced_row_ranges",
]

# Blocks smaller than this are written by one call; larger ones are cut into
# chunks of about this size so that every thread gets work.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Block:
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    families: tuple


@dataclass(frozen=True)
class _Layout:
    """Channel blocks and per-dimension maps of the matrix being built."""

    groups: int
    row_channels: int  # per group
    col_channels: int  # per group
    maps: tuple
    # Columns numbered position-major, (position, channel), instead of
    # (channel, position): see ``build``.
    channels_last: bool = False

    @property
    def ndim(self):
        return len(self.maps)

    @functools.cached_property
    def nnz_pattern(self) -> int:
        return self.col_channels * math.prod(m.total for m in self.maps)

    @property
    def n_row_channels(self) -> int:
        return self.groups * self.row_channels


def _layout(geom: ConvGeometry, transpose: bool, channels_last: bool = False) -> _Layout:
    g = geom.groups
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    if transpose:
        return _Layout(g, cpg, opg, geom.transpose_maps, channels_last)
    return _Layout(g, opg, cpg, geom.forward_maps, channels_last)


def _kernel(weight: np.ndarray, geom: ConvGeometry, transpose: bool) -> np.ndarray:
    """The weight as ``(groups, row channels, column channels, *k)``."""
    g = geom.groups
    w = weight.reshape(g, geom.out_channels // g, geom.in_channels // g, *geom.kernel_size)
    return w.swapaxes(1, 2) if transpose else w


def _blocks(layout: _Layout) -> list[_Block]:
    """Offsets and strides of every family product (see the module docstring)."""
    maps, n = layout.maps, layout.ndim
    totals = [m.total for m in maps]
    cc = layout.col_channels
    blocks = []
    for fams in itertools.product(*(m.families for m in maps)):
        m = [len(f.cols) for f in fams]
        offset, pos_strides = 0, []
        for d, f in enumerate(fams):
            scale = cc * math.prod(m[:d]) * math.prod(totals[d + 1 :])
            row_offsets = maps[d].offsets
            offset += scale * int(row_offsets[f.start])
            step = int(row_offsets[f.start + f.step] - row_offsets[f.start]) if f.count > 1 else 0
            pos_strides.append(scale * step)
        shape = (layout.groups, layout.row_channels, *(f.count for f in fams), cc, *m)
        if layout.channels_last:  # a row's entries in (e_1..e_N, c) order
            entry_strides = (1, *(cc * math.prod(m[d + 1 :]) for d in range(n)))
        else:  # in (c, e_1..e_N) order
            entry_strides = (math.prod(m), *(math.prod(m[d + 1 :]) for d in range(n)))
        strides = (
            layout.row_channels * layout.nnz_pattern,
            layout.nnz_pattern,
            *pos_strides,
            *entry_strides,
        )
        blocks.append(_Block(offset, shape, strides, fams))
    return blocks


def _indptr(layout: _Layout, dtype) -> np.ndarray:
    row_lengths = functools.reduce(np.multiply.outer, [m.counts for m in layout.maps])
    pattern_end = np.cumsum(layout.col_channels * row_lengths.ravel())
    channels = layout.n_row_channels
    indptr = np.empty(channels * len(pattern_end) + 1, dtype=dtype)
    indptr[0] = 0
    channel_start = np.arange(channels, dtype=np.int64)[:, None] * layout.nnz_pattern
    np.add(channel_start, pattern_end, out=indptr[1:].reshape(channels, -1), casting="unsafe")
    return indptr


def _view(array: np.ndarray, block: _Block) -> np.ndarray:
    item = array.itemsize
    return as_strided(
        array[block.offset :], block.shape, tuple(s * item for s in block.strides)
    )


def _index_operands(layout: _Layout, block: _Block, dtype):
    """Per-row base and per-entry offset whose broadcast sum is the column index."""
    n = layout.ndim
    col_sizes = [m.n_cols for m in layout.maps]
    col_strides = [math.prod(col_sizes[d + 1 :]) for d in range(n)]
    channel_size = math.prod(col_sizes)
    cc = layout.col_channels
    if layout.channels_last:
        # Column (position, channel): one position spans every channel.
        col_strides = [s * layout.groups * cc for s in col_strides]
        group_stride, channel_stride = cc, 1
    else:
        group_stride, channel_stride = cc * channel_size, channel_size
    # base[g, j_1..j_N] = g * group_stride + sum_d j_d * col_step_d * col_stride_d
    base = np.arange(layout.groups, dtype=np.int64).reshape((-1,) + (1,) * n) * group_stride
    # entry[c, e_1..e_N] = c * channel_stride + sum_d cols_d[e_d] * col_stride_d
    entry = np.arange(cc, dtype=np.int64).reshape((-1,) + (1,) * n) * channel_stride
    for d, f in enumerate(block.families):
        shape = [1] * n
        shape[d] = -1
        base = base + (np.arange(f.count, dtype=np.int64) * (f.col_step * col_strides[d])).reshape(
            [1] + shape
        )
        entry = entry + (f.cols * col_strides[d]).reshape([1] + shape)
    base = base.reshape((layout.groups, 1) + base.shape[1:] + (1,) * (n + 1))
    entry = entry.reshape((1,) * (n + 2) + entry.shape)
    return base.astype(dtype), entry.astype(dtype)


def _data_operand(kernel: np.ndarray, block: _Block) -> np.ndarray:
    """The kernel restricted (and tap-merged) to this block's entries."""
    n = len(block.families)
    for d, f in enumerate(block.families):
        kernel = np.take(kernel, f.taps, axis=3 + d)
        if f.segments is not None:  # taps that land on one input element are summed
            # (w1 + w2) may overflow where w1 x + w2 x would not: the
            # documented convention (docs: semantics), not worth a warning.
            with np.errstate(over="ignore", invalid="ignore"):
                kernel = np.add.reduceat(kernel, f.segments, axis=3 + d)
    g, r, c = kernel.shape[:3]
    return kernel.reshape((g, r) + (1,) * n + (c,) + kernel.shape[3:])


def _chunks(out, operands, n_outer, threads):
    """Cut a block along its longest outer axis into pieces for the threads."""
    parts = min(out.size // _CHUNK, 4 * threads) if threads > 1 else 1
    axis = int(np.argmax(out.shape[:n_outer]))
    parts = min(parts, out.shape[axis])
    if parts <= 1:
        return [(out, operands)]
    pieces = []
    for lo, hi in even_ranges(out.shape[axis], parts):
        index = (slice(None),) * axis + (slice(lo, hi),)
        pieces.append(
            (out[index], tuple(op[index] if op.shape[axis] > 1 else op for op in operands))
        )
    return pieces


def _write(job):
    out, operands = job
    if len(operands) == 2:
        np.add(*operands, out=out)
    else:
        np.copyto(out, operands[0])


def _fill(layout, blocks, indices, data, kernel, threads):
    """Write every block of ``indices`` and/or ``data`` (either may be None)."""
    n_outer = 2 + layout.ndim
    jobs = []
    for block in blocks:
        if indices is not None:
            ops = _index_operands(layout, block, indices.dtype)
            jobs += _chunks(_view(indices, block), ops, n_outer, threads)
        if data is not None:
            ops = (_data_operand(kernel, block),)
            jobs += _chunks(_view(data, block), ops, n_outer, threads)
    # Big chunks first so that the round-robin deal stays balanced.
    jobs.sort(key=lambda job: -job[0].size)
    run_parallel(_write, jobs, threads)


def _csr(data, indices, indptr, shape) -> sp.csr_array:
    matrix = sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    matrix.has_canonical_format = True  # sorted, no duplicates: by construction
    return matrix


def build(
    geom: ConvGeometry, weight: np.ndarray, *, transpose: bool, threads: int,
    channels_last: bool = False,
):
    """CSR of W (``transpose=False``) or W.T for a validated geometry.

    ``channels_last=True`` numbers the columns position-major: column
    ``(c, q)`` (channel ``c`` of ``C``, flat position ``q``) becomes
    ``q * C + c``, and rows stay sorted in that numbering.  The operators use
    it for the transposed products, where a row then reads every channel of a
    few neighbouring positions at once instead of one element from each of
    ``C`` distant planes.
    """
    size = check_size(_matrix_size(geom, weight.dtype, transpose))
    with allocation_context(size):
        layout = _layout(geom, transpose, channels_last)  # its maps are O(size) too
        indptr = _indptr(layout, size.index_dtype)
        indices = np.empty(size.nnz, dtype=size.index_dtype)
        data = np.empty(size.nnz, dtype=weight.dtype)
    kernel = _kernel(weight, geom, transpose)
    _fill(layout, _blocks(layout), indices, data, kernel, threads)
    return _csr(data, indices, indptr, size.shape)


def refill(
    geom: ConvGeometry, weight: np.ndarray, like, *, transpose: bool, threads: int,
    channels_last: bool = False,
):
    """A matrix with the pattern of ``like`` (shared, not copied) and new values.

    Only ``like.indices``, ``like.indptr`` and ``like.shape`` are read;
    ``channels_last`` must be what ``like`` was built with.
    """
    layout = _layout(geom, transpose, channels_last)
    data = np.empty(len(like.indices), dtype=weight.dtype)
    _fill(layout, _blocks(layout), None, data, _kernel(weight, geom, transpose), threads)
    return _csr(data, like.indices, like.indptr, like.shape)


def validate(weight, input_shape, *, transpose: bool, dtype=None, **geometry):
    """The private weight copy and the geometry, every argument checked.

    ``transpose=True`` reads the arguments of a transposed convolution.
    """
    w = as_weight(weight, dtype)
    make = conv_transpose_geometry if transpose else conv_geometry
    return w, make(w.shape, input_shape, **geometry)


def _validated_build(weight, input_shape, *, transpose, dtype, max_bytes, **geometry):
    w, geom = validate(weight, input_shape, transpose=transpose, dtype=dtype, **geometry)
    check_size(_matrix_size(geom, w.dtype, transpose), max_bytes)
    return build(geom, w, transpose=transpose, threads=resolve_threads(None))


def conv_matrix(
    weight,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    dtype=None,
    max_bytes=None,
) -> sp.csr_array:
    """The sparse matrix W of an N-d, multi-channel convolution.

    ``W @ x.ravel()`` equals ``torch.nn.functional.conv{N}d(x[None], weight, ...)``
    raveled (with ``padding_mode`` applied the way ``torch.nn.ConvNd`` does).

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in // groups, k_1, ..., k_N)
        PyTorch's Conv layout; N >= 1 spatial dimensions.  Real or complex;
        integer weights are converted to float64.  Not modified.
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)`` (no batch axis).
    stride, dilation : int or sequence of N ints, optional
        Positive.  Default 1.
    padding : int, sequence, 'valid' or 'same', optional
        An int (all sides), one int per dimension, one ``(before, after)`` pair
        per dimension, ``'valid'`` (no padding) or ``'same'`` (PyTorch's split:
        total ``dilation * (k - 1)``, the extra element after; stride 1 only).
        Default 0.
    groups : int, optional
        Blocked connections; must divide ``C_in`` and ``C_out``.  Default 1.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}, optional
        How the padded input is extended.  Default ``'zeros'``.
    dtype : dtype, optional
        float32, float64, complex64 or complex128.  Default: that of
        ``weight`` (float64 for integers).
    max_bytes : int, optional
        Raise :class:`MemoryError` before allocating if the matrix would need
        more bytes than this (see :func:`conv_matrix_nnz`).

    Returns
    -------
    scipy.sparse.csr_array, shape (C_out * prod(O), C_in * prod(L))
        Canonical CSR (sorted indices, no duplicates).  Rows index the output
        ``(C_out, O_1, ..., O_N)``, columns the input ``(C_in, L_1, ..., L_N)``,
        both flattened in C order.  Indices are int32 when every index, nnz
        and dimension fits, else int64.

    Raises
    ------
    ValueError
        Inconsistent shapes, non-positive stride, dilation or groups, negative
        padding, unknown padding or mode, ``'same'`` with stride > 1, a
        dilated kernel larger than the padded input, reflect padding not
        smaller than the input, circular padding larger than the input.
    TypeError
        Non-numeric or boolean weights, non-integer arguments, unsupported dtype.
    MemoryError
        If ``max_bytes`` is exceeded.

    See Also
    --------
    conv_transpose_matrix, conv_matrix_nnz, ConvOperator

    Notes
    -----
    With ``g = o // (C_out / groups)`` the group of output channel ``o``,
    entry ``W[(o, p), (g * C_in / groups + c, i)]`` is the sum of
    ``weight[o, c, t]`` over the taps ``t`` with
    ``pad(p * stride + t * dilation - lo) == i`` in every dimension, where
    ``pad`` maps a padded coordinate onto the input (zeros: only coordinates
    inside the input; reflect: mirror without repeating the edge; replicate:
    clamp; circular: modulo).  With zero padding each entry comes from exactly
    one tap.  Output size per dimension:
    ``O = floor((L + lo + hi - dilation * (k - 1) - 1) / stride) + 1``.

    The sparsity pattern depends only on the geometry (shapes, stride,
    padding, dilation, groups, mode), never on the weight values: a zero
    weight keeps its stored entry, so the pattern can be reused for new
    weights (see :meth:`ConvOperator.with_weight`).

    Examples
    --------
    A 3x3 input and a 2x2 kernel give the 4x9 matrix of a "valid" convolution:

    >>> import numpy as np
    >>> from sparse_tconv import conv_matrix
    >>> K = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> W = conv_matrix(K[None, None], (1, 3, 3))
    >>> W.toarray()
    array([[1., 2., 0., 3., 4., 0., 0., 0., 0.],
           [0., 1., 2., 0., 3., 4., 0., 0., 0.],
           [0., 0., 0., 1., 2., 0., 3., 4., 0.],
           [0., 0., 0., 0., 1., 2., 0., 3., 4.]])
    >>> X = np.arange(9.0).reshape(3, 3)
    >>> (W @ X.ravel()).reshape(2, 2)
    array([[27., 37.],
           [57., 67.]])
    """
    return _validated_build(
        weight,
        input_shape,
        transpose=False,
        dtype=dtype,
        max_bytes=max_bytes,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )


def conv_transpose_matrix(
    weight,
    input_shape,
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    dtype=None,
    max_bytes=None,
) -> sp.csr_array:
    """The sparse matrix of an N-d transposed convolution.

    ``M @ y.ravel()`` equals
    ``torch.nn.functional.conv_transpose{N}d(y[None], weight, ...)`` raveled,
    and ``M`` equals ``conv_matrix(weight, x_shape, ...).T`` (same shape,
    pattern and values) with
    ``x_shape = conv_transpose_output_shape(input_shape, weight.shape, ...)``.
    It is built directly as CSR, not by converting the forward matrix.

    Parameters
    ----------
    weight : array_like, shape (C_in, C_out // groups, k_1, ..., k_N)
        PyTorch's ConvTranspose layout, which is the Conv layout of the
        forward convolution being transposed.  Not modified.
    input_shape : sequence of int
        One sample of the transposed convolution's input, ``(C_in, O_1, ..., O_N)``.
    stride, padding, dilation, groups, padding_mode, dtype, max_bytes
        As for :func:`conv_matrix`, describing the forward convolution.
        Beyond PyTorch, ``(before, after)`` padding pairs and the non-zero
        padding modes are accepted: the result is then the exact transpose of
        the forward convolution with that padding.
    output_padding : int or sequence of N ints, optional
        Extra size added after the output in each dimension, smaller than the
        stride or the dilation there.  Among the input lengths that the
        forward convolution maps onto the same ``O``, it picks the one wanted.

    Returns
    -------
    scipy.sparse.csr_array, shape (C_out * prod(L), C_in * prod(O))
        Canonical CSR.

    Raises
    ------
    ValueError, TypeError, MemoryError
        As for :func:`conv_matrix`; also ``output_padding`` not smaller than
        stride or dilation, or an empty output.

    See Also
    --------
    conv_matrix, conv_transpose_output_shape, ConvTransposeOperator

    Notes
    -----
    Output size per dimension, with padding ``(lo, hi)`` and output padding ``a``:
    ``L = (O - 1) * stride - lo - hi + dilation * (k - 1) + a + 1``.
    Entry ``M[(c, i), (o, p)]`` is the entry ``W[(o, p), (c, i)]`` of the
    forward matrix: input position ``p`` spreads ``weight[o, c, t] * y[o, p]``
    onto output position ``i = p * stride + t * dilation - lo``.  When
    ``output_padding >= stride`` (allowed if it is smaller than the dilation)
    the forward convolution on ``L`` has more than ``O`` outputs and ``M`` is
    the transpose of its first ``O`` rows per dimension, as in PyTorch.

    Examples
    --------
    The basic 2x2 transposed convolution, and the same with stride 2:

    >>> import numpy as np
    >>> from sparse_tconv import conv_transpose_matrix
    >>> X = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> K = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> (conv_transpose_matrix(K[None, None], (1, 2, 2)) @ X.ravel()).reshape(3, 3)
    array([[ 0.,  0.,  1.],
           [ 0.,  4.,  6.],
           [ 4., 12.,  9.]])
    >>> M = conv_transpose_matrix(K[None, None], (1, 2, 2), stride=2)
    >>> (M @ X.ravel()).reshape(4, 4)
    array([[0., 0., 0., 1.],
           [0., 0., 2., 3.],
           [0., 2., 0., 3.],
           [4., 6., 6., 9.]])
    """
    return _validated_build(
        weight,
        input_shape,
        transpose=True,
        dtype=dtype,
        max_bytes=max_bytes,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )


# ---------------------------------------------------------------------------
# Row ranges: rows [row_start, row_stop) of W (or W.T) on their own
# ---------------------------------------------------------------------------
#
# Rows are the C-order flattening of the grid (group, row channel of the group,
# position_1, ..., position_N).  A contiguous range of that flattening is a
# union of at most 2 * (N + 2) - 1 boxes (products of one index range per
# axis), listed in row order.  Restricting every per-dimension family to a
# box's range on its axis gives another arithmetic progression (start and
# first columns shifted), so each box is written by the same strided views as
# the whole matrix, at the same offsets minus the offset of ``row_start``.


@dataclass(frozen=True)
class _BoxBlock(_Block):
    """A family product restricted to a box: also its group and row-channel ranges."""

    group_range: tuple[int, int] = (0, 0)
    channel_range: tuple[int, int] = (0, 0)


def _row_grid(layout: _Layout) -> tuple[int, ...]:
    return (layout.groups, layout.row_channels, *(m.n_rows for m in layout.maps))


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


def _restrict(family, lo: int, hi: int):
    """The rows of ``family`` inside [lo, hi), as a family, or None if there are none."""
    step = family.step
    j0 = max(0, -((family.start - lo) // step))  # ceil((lo - start) / step)
    j1 = min(family.count, -((family.start - hi) // step))
    if j1 <= j0:
        return None
    if j0 == 0 and j1 == family.count:
        return family
    return dataclasses.replace(
        family,
        start=family.start + j0 * step,
        count=j1 - j0,
        cols=family.cols + j0 * family.col_step,
    )


def _box_blocks(layout: _Layout, box, origin: int) -> list[_BoxBlock]:
    """The strided views (offsets relative to ``origin``) that write one box."""
    (g0, g1), (r0, r1), *ranges = box
    maps, n = layout.maps, layout.ndim
    per_dim = []
    for m, (lo, hi) in zip(maps, ranges):
        fams = [f for f in (_restrict(f, lo, hi) for f in m.families) if f is not None]
        if not fams:
            return []
        per_dim.append(fams)
    totals = [m.total for m in maps]
    cc = layout.col_channels
    channel_offset = (g0 * layout.row_channels + r0) * layout.nnz_pattern - origin
    blocks = []
    for fams in itertools.product(*per_dim):
        m = [len(f.cols) for f in fams]
        offset, pos_strides = channel_offset, []
        for d, f in enumerate(fams):
            scale = cc * math.prod(m[:d]) * math.prod(totals[d + 1 :])
            row_offsets_d = maps[d].offsets
            offset += scale * int(row_offsets_d[f.start])
            step = (
                int(row_offsets_d[f.start + f.step] - row_offsets_d[f.start]) if f.count > 1 else 0
            )
            pos_strides.append(scale * step)
        shape = (g1 - g0, r1 - r0, *(f.count for f in fams), cc, *m)
        strides = (
            layout.row_channels * layout.nnz_pattern,
            layout.nnz_pattern,
            *pos_strides,
            math.prod(m),
            *(math.prod(m[d + 1 :]) for d in range(n)),
        )
        blocks.append(_BoxBlock(offset, shape, strides, fams, (g0, g1), (r0, r1)))
    return blocks


def _box_indptr(layout: _Layout, boxes, dtype) -> np.ndarray:
    """Row pointers of the rows of ``boxes`` (in order), starting at 0."""
    pieces = []
    for (g0, g1), (r0, r1), *ranges in boxes:
        lengths = functools.reduce(
            np.multiply.outer, [m.counts[lo:hi] for m, (lo, hi) in zip(layout.maps, ranges)]
        )
        lengths = np.ravel(lengths) * layout.col_channels
        pieces.append(np.tile(lengths, (g1 - g0) * (r1 - r0)))
    lengths = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    indptr = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=indptr[1:], dtype=dtype)
    return indptr


def _fill_boxes(layout, blocks, indices, data, kernel, threads):
    """Write every restricted block of ``indices`` and ``data``."""
    n_outer = 2 + layout.ndim
    group_size = layout.col_channels * math.prod(m.n_cols for m in layout.maps)
    jobs = []
    for block in blocks:
        g0, g1 = block.group_range
        r0, r1 = block.channel_range
        base, entry = _index_operands(
            dataclasses.replace(layout, groups=g1 - g0), block, np.dtype(np.int64)
        )
        base = (base + g0 * group_size).astype(indices.dtype)
        jobs += _chunks(_view(indices, block), (base, entry.astype(indices.dtype)), n_outer,
                        threads)
        ops = (_data_operand(kernel[g0:g1, r0:r1], block),)
        jobs += _chunks(_view(data, block), ops, n_outer, threads)
    jobs.sort(key=lambda job: -job[0].size)
    run_parallel(_write, jobs, threads)


def _n_rows(layout: _Layout) -> int:
    return math.prod(_row_grid(layout))


def _check_row(value, name: str, n_rows: int) -> int:
    value = _check_int(value, name)
    if not 0 <= value <= n_rows:
        raise ValueError(
            f"{name} must be in [0, {n_rows}] (the number of rows), got {name}={value}"
        )
    return value


def row_offsets(geom: ConvGeometry, rows, *, transpose: bool) -> np.ndarray:
    """``indptr[rows]`` of W (or W.T) without building anything.

    Costs O(N) per requested row (N spatial dimensions), independent of the
    size of the matrix.

    Parameters
    ----------
    geom : ConvGeometry
        A validated geometry.
    rows : int or array_like of int
        Row indices in ``[0, n_rows]`` (``n_rows`` gives ``nnz``).
    transpose : bool
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
    layout = _layout(geom, transpose)
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"rows must be integers, got rows.dtype={rows.dtype}")
    rows = rows.astype(np.int64)
    n_rows = _n_rows(layout)
    if rows.size and (rows.min() < 0 or rows.max() > n_rows):
        raise ValueError(
            f"rows must lie in [0, {n_rows}] (the number of rows), got values in "
            f"[{rows.min()}, {rows.max()}]"
        )
    maps = layout.maps
    sizes = [m.n_rows for m in maps]
    totals = [m.total for m in maps]
    channel, rest = np.divmod(rows, math.prod(sizes))
    out = channel * layout.nnz_pattern
    leading = np.full(rows.shape, layout.col_channels, dtype=np.int64)
    for d, m in enumerate(maps):
        # rows before (p_1, ..., p_N) inside one row channel's pattern: those
        # with equal p_1..p_{d-1} and a smaller p_d, summed over d.
        p, rest = np.divmod(rest, math.prod(sizes[d + 1 :]))
        out = out + leading * m.offsets[p] * math.prod(totals[d + 1 :])
        leading = leading * m.counts[p]
    return out


def balanced_row_ranges(geom: ConvGeometry, parts: int, *, transpose: bool):
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
    transpose : bool
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
    parts = _check_positive_int(parts, "parts")
    layout = _layout(geom, transpose)
    n_rows = _n_rows(layout)
    nnz = layout.n_row_channels * layout.nnz_pattern
    targets = nnz * np.arange(1, parts, dtype=np.int64) // parts
    lo = np.zeros(len(targets), dtype=np.int64)
    hi = np.full(len(targets), n_rows, dtype=np.int64)
    while (lo < hi).any():  # the first row whose offset reaches the target
        mid = (lo + hi) // 2
        below = row_offsets(geom, mid, transpose=transpose) < targets
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
    transpose: bool,
    threads: int,
) -> sp.csr_array:
    """CSR of rows ``[row_start, row_stop)`` of W (``transpose=False``) or W.T.

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
    transpose : bool
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
    layout = _layout(geom, transpose)
    n_rows = _n_rows(layout)
    row_start = _check_row(row_start, "row_start", n_rows)
    row_stop = _check_row(row_stop, "row_stop", n_rows)
    if row_start > row_stop:
        raise ValueError(
            f"row_start must not exceed row_stop, got row_start={row_start}, row_stop={row_stop}"
        )
    n_cols = _matrix_size(geom, weight.dtype, transpose).shape[1]
    origin, end = row_offsets(geom, [row_start, row_stop], transpose=transpose).tolist()
    nnz = end - origin
    shape = (row_stop - row_start, n_cols)
    idx = index_dtype(nnz, *shape)
    boxes = _boxes(row_start, row_stop, _row_grid(layout))
    indptr = _box_indptr(layout, boxes, idx)
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=weight.dtype)
    if nnz:
        blocks = [b for box in boxes for b in _box_blocks(layout, box, origin)]
        _fill_boxes(layout, blocks, indices, data, _kernel(weight, geom, transpose), threads)
    return _csr(data, indices, indptr, shape)
