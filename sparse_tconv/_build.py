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

The same views write any *box* of rows (one index range per axis of the row
grid ``(group, row channel, position_1, ..., position_N)``): restricting a
family to a range of rows gives another family.  The whole matrix is one box;
:mod:`._build_rows` cuts a range of rows into boxes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numpy.lib.stride_tricks import as_strided

from ._geometry import ConvGeometry, ConvMatrixSize, given_shapes, matrix_size, validate
from ._indexmap import DimMap, Family
from ._parallel import even_ranges, resolve_threads, run_parallel
from ._validation import INT64_MAX, check_positive_int

__all__ = [
    "conv_matrix",
    "conv_transpose_matrix",
    "build",
    "check_size",
    "refill",
    "Layout",
    "layout",
    "grouped_kernel",
    "box_blocks",
    "write_blocks",
    "canonical_csr",
    "allocation_context",
]

# Blocks smaller than this are written by one call; larger ones are cut into
# chunks of about this size so that every thread gets work.
_CHUNK = 1 << 20

Box = tuple[tuple[int, int], ...]
"""One ``(start, stop)`` range per axis of the row grid (group, row channel, positions)."""


@dataclass(frozen=True)
class Layout:
    """Channel blocks and per-dimension maps of the matrix being built."""

    groups: int
    row_channels: int  # per group
    col_channels: int  # per group
    maps: tuple[DimMap, ...]
    # Columns numbered position-major, (position, channel), instead of
    # (channel, position): see ``build``.
    channels_last: bool = False

    @property
    def ndim(self) -> int:
        return len(self.maps)

    @functools.cached_property
    def nnz_pattern(self) -> int:
        """Entries of one row channel's rows."""
        return self.col_channels * math.prod(m.total for m in self.maps)

    @property
    def n_row_channels(self) -> int:
        return self.groups * self.row_channels

    @property
    def row_grid(self) -> tuple[int, ...]:
        """The axes the rows are the C-order flattening of."""
        return (self.groups, self.row_channels, *(m.n_rows for m in self.maps))

    @property
    def n_rows(self) -> int:
        return math.prod(self.row_grid)

    @property
    def whole(self) -> Box:
        """The box of every row."""
        return tuple((0, n) for n in self.row_grid)


def layout(geom: ConvGeometry, transposed: bool, channels_last: bool = False) -> Layout:
    """The layout of W (``transposed=False``) or of W.T."""
    groups = geom.groups
    opg, cpg = geom.out_channels // groups, geom.in_channels // groups
    if transposed:
        return Layout(groups, cpg, opg, geom.transpose_maps, channels_last)
    return Layout(groups, opg, cpg, geom.forward_maps, channels_last)


def grouped_kernel(weight: np.ndarray, geom: ConvGeometry, transposed: bool) -> np.ndarray:
    """The weight as ``(groups, row channels, column channels, *k)`` (a view)."""
    groups = geom.groups
    w = weight.reshape(groups, geom.out_channels // groups, geom.in_channels // groups,
                       *geom.kernel_size)
    return w.swapaxes(1, 2) if transposed else w


@dataclass(frozen=True)
class _Block:
    """One family product inside one box of rows: a strided view of the entries."""

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    families: tuple[Family, ...]
    group_range: tuple[int, int]
    channel_range: tuple[int, int]


def _restrict(family: Family, lo: int, hi: int) -> Family | None:
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


def box_blocks(layout: Layout, box: Box, origin: int = 0) -> list[_Block]:
    """The strided views that write one box, at offsets relative to entry ``origin``."""
    (g0, g1), (r0, r1), *ranges = box
    maps, n = layout.maps, layout.ndim
    per_dim = []
    for dim_map, (lo, hi) in zip(maps, ranges):
        fams = [r for r in (_restrict(f, lo, hi) for f in dim_map.families) if r is not None]
        if not fams:
            return []
        per_dim.append(fams)
    totals = [m.total for m in maps]
    cc = layout.col_channels
    channel_offset = (g0 * layout.row_channels + r0) * layout.nnz_pattern - origin
    blocks = []
    for product in itertools.product(*per_dim):
        m = [len(f.cols) for f in product]  # entries of each family's rows
        offset, pos_strides = channel_offset, []
        for d, f in enumerate(product):
            scale = cc * math.prod(m[:d]) * math.prod(totals[d + 1 :])
            row_offsets = maps[d].offsets
            offset += scale * int(row_offsets[f.start])
            step = int(row_offsets[f.start + f.step] - row_offsets[f.start]) if f.count > 1 else 0
            pos_strides.append(scale * step)
        shape = (g1 - g0, r1 - r0, *(f.count for f in product), cc, *m)
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
        blocks.append(_Block(offset, shape, strides, product, (g0, g1), (r0, r1)))
    return blocks


def _indptr(layout: Layout, dtype) -> np.ndarray:
    """Row pointers of the whole matrix: one row channel's pattern, repeated."""
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


def _index_operands(layout: Layout, block: _Block, dtype):
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
    g0, g1 = block.group_range
    base = np.arange(g0, g1, dtype=np.int64).reshape((-1,) + (1,) * n) * group_stride
    # entry[c, e_1..e_N] = c * channel_stride + sum_d cols_d[e_d] * col_stride_d
    entry = np.arange(cc, dtype=np.int64).reshape((-1,) + (1,) * n) * channel_stride
    for d, f in enumerate(block.families):
        shape = [1] * n
        shape[d] = -1
        base = base + (np.arange(f.count, dtype=np.int64) * (f.col_step * col_strides[d])).reshape(
            [1] + shape
        )
        entry = entry + (f.cols * col_strides[d]).reshape([1] + shape)
    base = base.reshape((g1 - g0, 1) + base.shape[1:] + (1,) * (n + 1))
    entry = entry.reshape((1,) * (n + 2) + entry.shape)
    return base.astype(dtype), entry.astype(dtype)


def _data_operand(kernel: np.ndarray, block: _Block) -> np.ndarray:
    """The kernel restricted (and tap-merged) to this block's entries."""
    (g0, g1), (r0, r1) = block.group_range, block.channel_range
    kernel = kernel[g0:g1, r0:r1]
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


def write_blocks(layout: Layout, blocks, indices, data, kernel, threads: int) -> None:
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


def canonical_csr(data, indices, indptr, shape) -> sp.csr_array:
    """The CSR array of these arrays (not copied), marked canonical."""
    matrix = sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    matrix.has_canonical_format = True  # sorted, no duplicates: by construction
    return matrix


def check_size(size: ConvMatrixSize, geom: ConvGeometry, transposed: bool, max_bytes=None,
               what: str = "the matrix") -> ConvMatrixSize:
    """``size`` if it can be built within ``max_bytes``; else a clear error, before allocating.

    Raises
    ------
    TypeError, ValueError
        If ``max_bytes`` is not None or a positive int.
    ValueError
        If no machine could index or hold the matrix: more entries or rows
        than int64 indices (numpy's and scipy's widest) address, or more than
        2**63 bytes.  The message names ``input_shape`` and the figures.
    MemoryError
        If the bytes exceed ``max_bytes``.
    """
    given, _ = given_shapes(geom, transposed)
    described = (f"{what} would need {size.nbytes} bytes (nnz={size.nnz}, shape={size.shape}, "
                 f"{size.dtype} values, {size.index_dtype} indices)")
    arguments = f"input_shape={given}, weight.shape={geom.weight_shape}"
    if max(size.nnz, *size.shape) > INT64_MAX:
        raise ValueError(f"{described}: more entries or rows than int64 indices can address "
                         f"({arguments})")
    if size.nbytes > INT64_MAX:
        raise ValueError(f"{described}: more bytes than any address space ({arguments})")
    if max_bytes is not None:
        max_bytes = check_positive_int(max_bytes, "max_bytes")
        if size.nbytes > max_bytes:
            raise MemoryError(f"{described}, more than max_bytes={max_bytes}")
    return size


@contextlib.contextmanager
def allocation_context(size: ConvMatrixSize, what: str = "the matrix"):
    """Say what was being built when numpy cannot allocate it."""
    try:
        yield
    except MemoryError as exc:
        raise MemoryError(
            f"{what} needs {size.nbytes} bytes (nnz={size.nnz}, shape={size.shape}), "
            f"which this machine could not allocate ({exc}); conv_matrix_nnz() gives the size "
            "before building, and max_bytes= refuses a build beyond a budget"
        ) from None


def build(
    geom: ConvGeometry, weight: np.ndarray, *, transposed: bool, threads: int,
    channels_last: bool = False,
) -> sp.csr_array:
    """CSR of W (``transposed=False``) or W.T for a validated geometry.

    ``channels_last=True`` numbers the columns position-major: column
    ``(c, q)`` (channel ``c`` of ``C``, flat position ``q``) becomes
    ``q * C + c``, and rows stay sorted in that numbering.  The operators use
    it for the transposed products, where a row then reads every channel of a
    few neighbouring positions at once instead of one element from each of
    ``C`` distant planes.
    """
    size = check_size(matrix_size(geom, weight.dtype, transposed), geom, transposed)
    with allocation_context(size):
        lay = layout(geom, transposed, channels_last)  # its maps are O(size) too
        indptr = _indptr(lay, size.index_dtype)
        indices = np.empty(size.nnz, dtype=size.index_dtype)
        data = np.empty(size.nnz, dtype=weight.dtype)
    kernel = grouped_kernel(weight, geom, transposed)
    write_blocks(lay, box_blocks(lay, lay.whole), indices, data, kernel, threads)
    return canonical_csr(data, indices, indptr, size.shape)


def refill(
    geom: ConvGeometry, weight: np.ndarray, like, *, transposed: bool, threads: int,
    channels_last: bool = False,
) -> sp.csr_array:
    """A matrix with the pattern of ``like`` (shared, not copied) and new values.

    Only ``like.indices``, ``like.indptr`` and ``like.shape`` are read;
    ``channels_last`` must be what ``like`` was built with.
    """
    lay = layout(geom, transposed, channels_last)
    data = np.empty(len(like.indices), dtype=weight.dtype)
    kernel = grouped_kernel(weight, geom, transposed)
    write_blocks(lay, box_blocks(lay, lay.whole), None, data, kernel, threads)
    return canonical_csr(data, like.indices, like.indptr, like.shape)


def _validated_build(weight, input_shape, *, transposed, dtype, max_bytes, **settings):
    w, geom = validate(weight, input_shape, transposed=transposed, dtype=dtype, **settings)
    check_size(matrix_size(geom, w.dtype, transposed), geom, transposed, max_bytes)
    return build(geom, w, transposed=transposed, threads=resolve_threads(None))


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
    weight : array_like, shape (C_out, C_in // groups, k_1, ..., k_N) or (k_1, ..., k_N)
        PyTorch's Conv layout; N >= 1 spatial dimensions.  Real or complex;
        integer weights are converted to float64.  Not modified.  A weight
        with as many dimensions as ``input_shape`` is a single-channel kernel:
        ``(k_1, ..., k_N)`` on ``(L_1, ..., L_N)`` means ``weight[None, None]``
        on ``(1, L_1, ..., L_N)`` (``groups`` must be 1).  This is never
        ambiguous, since a multi-channel weight has one more dimension than
        its input.
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)`` (no batch axis), or
        ``(L_1, ..., L_N)`` with a single-channel weight.
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
        How the padded input is extended, as PyTorch does.  Default
        ``'zeros'``.  In scipy's and numpy's names: ``'reflect'`` is
        ``scipy.ndimage``'s ``'mirror'`` (numpy.pad's ``'reflect'``: the edge
        is not repeated; ndimage's ``'reflect'`` repeats it), ``'replicate'``
        is ndimage's ``'nearest'`` (numpy's ``'edge'``), ``'circular'`` is
        ``'wrap'`` in both.
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
        smaller than the input, circular padding larger than the input; a
        size no machine can hold (an input, output or matrix of more than
        2**63 bytes, or more entries than int64 indices address), with the
        figure and ``input_shape``.
    TypeError
        Non-numeric or boolean weights, non-integer arguments, unsupported dtype.
    MemoryError
        If ``max_bytes`` is exceeded, or this machine cannot allocate the
        matrix (the message gives its size).

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

    A single-channel kernel may be given without its channel axes, and the
    input shape without its channel:

    >>> (conv_matrix(K, (3, 3)) != W).nnz
    0
    """
    return _validated_build(
        weight,
        input_shape,
        transposed=False,
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
    weight : array_like, shape (C_in, C_out // groups, k_1, ..., k_N) or (k_1, ..., k_N)
        PyTorch's ConvTranspose layout, which is the Conv layout of the
        forward convolution being transposed.  Not modified.  A single-channel
        kernel ``(k_1, ..., k_N)`` with ``input_shape`` ``(O_1, ..., O_N)``
        means ``weight[None, None]`` on ``(1, O_1, ..., O_N)``, as for
        :func:`conv_matrix`.
    input_shape : sequence of int
        One sample of the transposed convolution's input, ``(C_in, O_1, ..., O_N)``,
        or ``(O_1, ..., O_N)`` with a single-channel weight.
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

    The same without the channel axes (a single-channel kernel):

    >>> (conv_transpose_matrix(K, (2, 2), stride=2) != M).nnz
    0
    """
    return _validated_build(
        weight,
        input_shape,
        transposed=True,
        dtype=dtype,
        max_bytes=max_bytes,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
