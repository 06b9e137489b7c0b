"""The geometry of a convolution: validated once, then read by every other module.

Everything the builders and operators need to know about a convolution is
normalised and validated here, once, into a frozen :class:`ConvGeometry`.
The geometry always describes the *forward* convolution; a transposed
convolution is the transpose of the forward convolution whose output is its
input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._validation import (
    INT32_MAX,
    INT64_MAX,
    as_weight,
    check_padding_mode,
    check_positive_int,
    is_int,
    normalize_padding,
    normalize_shape,
    normalize_tuple,
    private_copy,
    weight_and_dtype,
)

__all__ = [
    "ConvGeometry",
    "Convolution",
    "ConvMatrixSize",
    "conv_geometry",
    "conv_transpose_geometry",
    "expand_single_channel",
    "transpose_output_padding",
    "validate",
    "given_shapes",
    "check_addressable",
    "MAX_SPATIAL_DIMS",
    "conv_output_shape",
    "conv_transpose_output_shape",
    "conv_matrix_nnz",
    "conv_transpose_matrix_nnz",
    "matrix_size",
    "index_dtype",
]

# ---------------------------------------------------------------------------
# The arguments that make a geometry
# ---------------------------------------------------------------------------


def _resolve_padding(padding, kernel, stride, dilation):
    """Turn 'same'/'valid' into explicit ``(lo, hi)`` pairs (PyTorch's split)."""
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions (stride={stride}); "
                "pass explicit (before, after) pairs per dimension instead, e.g. "
                "padding=((1, 2), (1, 2)), which also express TensorFlow/JAX 'SAME' exactly"
            )
        pairs = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)
    return padding


def _length(value) -> int | None:
    """``len(value)`` of a sequence (not a string), else None (reported later, by its check)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return len(value)
    except TypeError:
        return None


def expand_single_channel(weight_shape, input_shape, groups=1):
    """The shapes with the single-channel spelling expanded, and whether it was used.

    A weight ``(k_1, ..., k_N)`` with an input ``(L_1, ..., L_N)`` (as many
    dimensions) is the one-channel convolution of weight
    ``(1, 1, k_1, ..., k_N)`` on input ``(1, L_1, ..., L_N)``.  This reads no
    valid call differently: otherwise an N-d weight has N + 2 dimensions and
    its input N + 1.  Returns ``(weight_shape, input_shape, expanded)``; the
    shapes are returned unchanged (and not checked) when the rule does not
    apply.

    Raises
    ------
    ValueError
        For the single-channel spelling with ``groups`` other than 1.
    """
    n = _length(weight_shape)
    if not n or n != _length(input_shape):
        return weight_shape, input_shape, False
    if is_int(groups) and groups != 1:
        raise ValueError(
            f"a single-channel weight (as many dimensions as input_shape: "
            f"weight.shape={tuple(weight_shape)}, input_shape={tuple(input_shape)}) "
            f"needs groups=1, got groups={groups}"
        )
    return (1, 1, *weight_shape), (1, *input_shape), True


@contextlib.contextmanager
def _single_channel_note(expanded: bool, weight_shape, input_shape):
    """Say how a single-channel spelling was read when the expanded geometry is refused."""
    try:
        yield
    except ValueError as exc:
        if not expanded:
            raise
        raise ValueError(
            f"{exc} (single-channel weight: weight.shape={tuple(weight_shape)} on "
            f"input_shape={tuple(input_shape)} is read as weight.shape="
            f"{(1, 1, *weight_shape)} on input_shape={(1, *input_shape)})"
        ) from None


def transpose_output_padding(geom: ConvGeometry) -> tuple[int, ...]:
    """The ``output_padding`` of the transposed convolution of ``geom``, from the sizes.

    The transposed convolution maps the forward output ``O`` back onto the
    forward input ``L``; ``output_padding = L - ((O - 1) s - lo - hi + d (k - 1) + 1)``.
    Derived rather than read from ``geom.output_padding``, which is zero for
    the geometry of a forward convolution even where its transpose needs more
    (the stride does not divide evenly).
    """
    return tuple(
        n - ((o - 1) * s - lo - hi + d * (k - 1) + 1)
        for n, o, s, (lo, hi), d, k in zip(geom.input_size, geom.output_size, geom.stride,
                                            geom.padding, geom.dilation, geom.kernel_size)
    )


# The builder and the batched products index arrays of 2 N + 4 dimensions;
# numpy has 64.
MAX_SPATIAL_DIMS = 30


def _check_weight_and_groups(weight_shape, groups, channels: str):
    """The weight shape and groups; ``weight.shape[0]`` counts the ``channels`` channels."""
    shape = tuple(weight_shape)
    if len(shape) < 3:
        raise ValueError(
            "weight must have at least 3 dimensions (out_channels, in_channels // groups, "
            "*kernel_size), or as many as input_shape for a single-channel kernel, got "
            f"weight.shape={shape}"
        )
    shape = normalize_shape(shape, "weight.shape")
    if len(shape) - 2 > MAX_SPATIAL_DIMS:
        raise ValueError(
            f"at most {MAX_SPATIAL_DIMS} spatial dimensions are supported (a batch of samples "
            f"needs 2 N + 4 of numpy's 64 array dimensions), got weight.shape={shape} with "
            f"{len(shape) - 2}"
        )
    groups = check_positive_int(groups, "groups")
    if shape[0] % groups:
        raise ValueError(
            f"groups must divide the {channels} channels: weight.shape[0]={shape[0]} is not "
            f"divisible by groups={groups}"
        )
    return shape, groups


def _check_input_shape(input_shape, ndim: int) -> tuple[int, ...]:
    shape = normalize_shape(input_shape, "input_shape")
    if len(shape) != ndim + 1:
        raise ValueError(
            f"input_shape must be (channels, *spatial) with {ndim} spatial dimensions to match "
            f"a weight with {ndim} kernel dimensions, got input_shape={shape}"
        )
    return shape


def index_dtype(*sizes: int) -> np.dtype:
    """int32 when every size fits in it, else int64."""
    return np.dtype(np.int32) if max(sizes) <= INT32_MAX else np.dtype(np.int64)


# ---------------------------------------------------------------------------
# The geometry
# ---------------------------------------------------------------------------


def _conv_out_size(L, k, s, d, lo, hi):
    return (L + lo + hi - d * (k - 1) - 1) // s + 1


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised geometry of one forward convolution.

    ``input_size`` (L) and ``output_size`` (O) are the forward convolution's
    spatial sizes.  For a transposed convolution the geometry is that of the
    forward convolution it transposes: its input is ``output_size`` and its
    output ``input_size``.  ``output_size`` is stored, not derived, because a
    transposed convolution with ``output_padding >= stride`` (allowed when
    ``output_padding < dilation``) transposes only the first ``O`` outputs of
    the forward convolution on ``L``.
    """

    in_channels: int
    out_channels: int
    groups: int
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    output_padding: tuple[int, ...]

    def __getstate__(self):
        # Only the fields travel (to a worker, a file): the cached maps and
        # counts are rebuilt on use, and the maps are O(size) arrays.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Forward input shape ``(C_in, *L)``."""
        return (self.in_channels, *self.input_size)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Forward output shape ``(C_out, *O)``."""
        return (self.out_channels, *self.output_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @functools.cached_property
    def nnz(self) -> int:
        """Exact number of stored entries of W (and of W.T), a Python int.

        Counted per dimension without building the maps (O(kernel) work and
        memory per dimension, see :func:`~._indexmap.dim_nnz`).
        """
        from ._indexmap import dim_nnz

        per_dim = math.prod(dim_nnz(*self._dim_args(a)) for a in range(self.ndim))
        return self.out_channels * (self.in_channels // self.groups) * per_dim

    def _dim_args(self, axis):
        lo, hi = self.padding[axis]
        return (
            self.input_size[axis],
            self.output_size[axis],
            self.kernel_size[axis],
            self.stride[axis],
            self.dilation[axis],
            lo,
            hi,
            self.padding_mode,
        )

    @functools.cached_property
    def forward_maps(self):
        """Per-dimension maps of W: rows are output positions, columns inputs."""
        from ._indexmap import forward_dim_map

        return tuple(forward_dim_map(*self._dim_args(a)) for a in range(self.ndim))

    @functools.cached_property
    def transpose_maps(self):
        """Per-dimension maps of W.T: rows are input positions, columns outputs."""
        from ._indexmap import transpose_dim_map

        return tuple(transpose_dim_map(*self._dim_args(a)) for a in range(self.ndim))


@dataclass(frozen=True, eq=False)
class Convolution:
    """One convolution as the library's algorithms read it: geometry, weight and direction.

    ``transposed=False`` describes W, the matrix of the forward convolution;
    ``True`` describes W.T, the transposed convolution, on the same geometry
    and weight.  Operators give theirs as ``op.convolution``; preconditioners,
    norm bounds and files read this record, not the operator's attributes.

    Attributes
    ----------
    geometry : ConvGeometry
        The forward convolution's normalised geometry (read-only fields:
        ``input_size``, ``output_size``, ``kernel_size``, ``stride``,
        ``dilation``, ``padding`` as ``(before, after)`` pairs, ``groups``,
        ``padding_mode``, ``output_padding``, channel counts).
    weight : ndarray
        Read-only, ``(C_out, C_in // groups, *kernel_size)`` of the forward
        convolution (PyTorch's ConvTranspose layout of the transposed one).
    transposed : bool
        Whether the matrix is W.T.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> conv = ConvOperator(np.ones((4, 2, 3, 3)), (2, 8, 8), stride=2).convolution
    >>> conv.transposed, conv.input_shape, conv.output_shape
    (False, (2, 8, 8), (4, 3, 3))
    >>> conv.T.transposed, conv.T.input_shape
    (True, (4, 3, 3))
    """

    geometry: ConvGeometry
    weight: np.ndarray
    transposed: bool = False

    @property
    def T(self) -> Convolution:
        """The same convolution in the other direction."""
        return dataclasses.replace(self, transposed=not self.transposed)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample the matrix multiplies (its columns)."""
        return given_shapes(self.geometry, self.transposed)[0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample the matrix gives (its rows)."""
        return given_shapes(self.geometry, self.transposed)[1]


def _normalize_window(kernel, stride, padding, dilation, padding_mode):
    """Validated ``(stride, dilation, ((lo, hi), ...), padding_mode)``."""
    ndim = len(kernel)
    stride = normalize_tuple(stride, ndim, "stride")
    if any(v <= 0 for v in stride):
        raise ValueError(f"stride must be positive, got stride={stride}")
    dilation = normalize_tuple(dilation, ndim, "dilation")
    if any(v <= 0 for v in dilation):
        raise ValueError(f"dilation must be positive, got dilation={dilation}")
    pairs = normalize_padding(padding, ndim)
    mode = check_padding_mode(padding_mode)
    return stride, dilation, _resolve_padding(pairs, kernel, stride, dilation), mode


def _check_sizes_and_modes(L, k, s, d, pairs, mode, shape_name, shape):
    for axis, (n, kk, dd, (lo, hi)) in enumerate(zip(L, k, d, pairs)):
        if n + lo + hi < dd * (kk - 1) + 1:
            raise ValueError(
                f"the dilated kernel (size {dd * (kk - 1) + 1} in spatial dimension {axis}) is "
                f"larger than the padded input ({n} + {lo} + {hi} = {n + lo + hi}): the output "
                f"would be empty ({shape_name}={shape}, padding={pairs})"
            )
        if mode == "reflect" and (lo >= n or hi >= n):
            raise ValueError(
                f"reflect padding must be smaller than the input size in every dimension, got "
                f"padding=({lo}, {hi}) for size {n} in spatial dimension {axis}"
            )
        if mode == "circular" and (lo > n or hi > n):
            raise ValueError(
                f"circular padding must not exceed the input size (it would wrap more than "
                f"once), got padding=({lo}, {hi}) for size {n} in spatial dimension {axis}"
            )


# The index maps compute padded coordinates ``p * stride + t * dilation - lo``
# (and products such as ``O * stride``) in int64; every such figure must fit.
_COORDINATE_MAX = 2**62


def _check_coordinates(geom: ConvGeometry) -> None:
    """Refuse, by name, settings whose padded coordinates int64 cannot hold.

    (A stride of 2**62 gives an output of one element in PyTorch; here the
    index arithmetic would overflow, so it is refused before any is done.
    The sizes alone, :func:`conv_matrix_nnz`, are exact Python ints at any
    size, and do not need it.)
    """
    s, d, pairs = geom.stride, geom.dilation, geom.padding
    for axis, (n, o, kk, ss, dd, (lo, hi)) in enumerate(zip(
            geom.input_size, geom.output_size, geom.kernel_size, s, d, pairs)):
        largest = o * ss + kk * dd + 2 * (n + lo + hi)  # a bound on what the maps compute
        if largest > _COORDINATE_MAX:
            raise ValueError(
                f"stride={tuple(s)}, dilation={tuple(d)} and padding={tuple(pairs)} give "
                f"padded coordinates up to {largest:.3g} in spatial dimension {axis}, beyond "
                "2**62: they cannot be indexed with int64")


def conv_geometry(weight_shape, input_shape, *, groups=1, **settings) -> ConvGeometry:
    """Validate the arguments of a forward convolution and normalise them.

    The keywords are those of :func:`conv_matrix` (``stride``, ``padding``,
    ``dilation``, ``groups``, ``padding_mode``); a single-channel spelling is
    expanded first (see :func:`expand_single_channel`).
    """
    wshape, ishape, expanded = expand_single_channel(weight_shape, input_shape, groups)
    with _single_channel_note(expanded, weight_shape, input_shape):
        return _conv_geometry(wshape, ishape, groups=groups, **settings)


def _conv_geometry(
    weight_shape,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
) -> ConvGeometry:
    wshape, groups = _check_weight_and_groups(weight_shape, groups, "output")
    ndim = len(wshape) - 2
    c_out, cpg = wshape[0], wshape[1]
    ishape = _check_input_shape(input_shape, ndim)
    if ishape[0] != cpg * groups:
        raise ValueError(
            f"input_shape[0]={ishape[0]} channels do not match the weight: expected "
            f"weight.shape[1] * groups = {cpg} * {groups} = {cpg * groups} "
            f"(weight.shape={wshape}, input_shape={ishape})"
        )
    kernel = wshape[2:]
    stride, dilation, pairs, mode = _normalize_window(kernel, stride, padding, dilation,
                                                      padding_mode)
    L = ishape[1:]
    _check_sizes_and_modes(L, kernel, stride, dilation, pairs, mode, "input_shape", ishape)
    O = tuple(
        _conv_out_size(n, kk, s, d, lo, hi)
        for n, kk, s, d, (lo, hi) in zip(L, kernel, stride, dilation, pairs)
    )
    return ConvGeometry(
        in_channels=ishape[0],
        out_channels=c_out,
        groups=groups,
        input_size=L,
        output_size=O,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        padding=pairs,
        padding_mode=mode,
        output_padding=(0,) * ndim,
    )


def conv_transpose_geometry(weight_shape, input_shape, *, groups=1, **settings) -> ConvGeometry:
    """Validate the arguments of a transposed convolution.

    ``weight_shape`` is PyTorch's ConvTranspose layout
    ``(C_in, C_out // groups, *k)``, which is the Conv layout of the forward
    convolution it transposes, or a single-channel ``k`` (see
    :func:`expand_single_channel`).  The keywords are those of
    :func:`conv_transpose_matrix`.  Returns that forward convolution's
    geometry.
    """
    wshape, ishape, expanded = expand_single_channel(weight_shape, input_shape, groups)
    with _single_channel_note(expanded, weight_shape, input_shape):
        return _conv_transpose_geometry(wshape, ishape, groups=groups, **settings)


def _conv_transpose_geometry(
    weight_shape,
    input_shape,
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
) -> ConvGeometry:
    wshape, groups = _check_weight_and_groups(weight_shape, groups, "input")
    ndim = len(wshape) - 2
    c_in_t, opg = wshape[0], wshape[1]
    ishape = _check_input_shape(input_shape, ndim)
    if ishape[0] != c_in_t:
        raise ValueError(
            f"input_shape[0]={ishape[0]} channels do not match the weight: a transposed "
            f"convolution weight (in_channels, out_channels // groups, *kernel_size) expects "
            f"weight.shape[0]={c_in_t} input channels (input_shape={ishape})"
        )
    kernel = wshape[2:]
    stride, dilation, pairs, mode = _normalize_window(kernel, stride, padding, dilation,
                                                      padding_mode)
    output_padding = normalize_tuple(output_padding, ndim, "output_padding")
    if any(v < 0 for v in output_padding):
        raise ValueError(
            f"output_padding must be non-negative, got output_padding={output_padding}"
        )
    for axis, (a, s, d) in enumerate(zip(output_padding, stride, dilation)):
        if a >= max(s, d):
            raise ValueError(
                "output_padding must be smaller than either stride or dilation, got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation} "
                f"(spatial dimension {axis})"
            )
    O = ishape[1:]
    L = tuple(
        (o - 1) * s - lo - hi + d * (k - 1) + a + 1
        for o, s, (lo, hi), d, k, a in zip(O, stride, pairs, dilation, kernel, output_padding)
    )
    if any(n <= 0 for n in L):
        raise ValueError(
            f"the transposed convolution output would be empty: size {L} from "
            f"input_shape={ishape}, padding={pairs}, stride={stride}, dilation={dilation}, "
            f"output_padding={output_padding}"
        )
    _check_sizes_and_modes(L, kernel, stride, dilation, pairs, mode, "output size", L)
    return ConvGeometry(
        in_channels=opg * groups,
        out_channels=c_in_t,
        groups=groups,
        input_size=L,
        output_size=O,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        padding=pairs,
        padding_mode=mode,
        output_padding=output_padding,
    )


def validate(weight, input_shape, *, transposed: bool, dtype=None, **settings):
    """The private weight copy and the geometry, every argument checked.

    ``transposed=True`` reads the arguments of a transposed convolution
    (PyTorch's ConvTranspose layout and ``output_padding``).  A single-channel
    weight ``(k_1, ..., k_N)`` on ``input_shape`` ``(L_1, ..., L_N)`` comes
    back as ``(1, 1, k_1, ..., k_N)`` (see :func:`expand_single_channel`).
    """
    arr, target = weight_and_dtype(weight, dtype)
    make = conv_transpose_geometry if transposed else conv_geometry
    geom = make(arr.shape, input_shape, **settings)
    check_addressable(geom, transposed, target)
    _check_coordinates(geom)
    w = private_copy(arr, target)  # after every check: nothing is copied for a refusal
    if w.ndim != geom.ndim + 2:  # the single-channel spelling: a view, read-only too
        w = w.reshape(geom.weight_shape)
    return w, geom


def given_shapes(geom: ConvGeometry, transposed: bool):
    """``(input_shape, output_shape)`` as the caller names them (a transposed one's are swapped)."""
    if transposed:
        return geom.output_shape, geom.input_shape
    return geom.input_shape, geom.output_shape


def check_addressable(geom: ConvGeometry, transposed: bool, dtype) -> None:
    """Refuse, naming ``input_shape``, a convolution whose input or output no array can hold.

    An array of more than ``2**63 - 1`` bytes cannot exist on any machine
    (numpy's sizes are int64): such a geometry is a wrong argument, not a
    shortage of memory, so it is a :class:`ValueError` raised before anything
    is allocated.
    """
    itemsize = np.dtype(dtype).itemsize
    given, result = given_shapes(geom, transposed)
    for shape, what in ((given, "has"), (result, f"gives an output of shape {result} with")):
        n = math.prod(shape)
        if n * itemsize > INT64_MAX:
            raise ValueError(
                f"input_shape={given} {what} {n:.3g} elements ({n * itemsize:.3g} bytes of "
                f"{np.dtype(dtype)}), more than any array can hold (2**63 bytes)"
            )


# ---------------------------------------------------------------------------
# Public shape and size functions
# ---------------------------------------------------------------------------


def conv_output_shape(
    input_shape, weight_shape, *, stride=1, padding=0, dilation=1, groups=1
) -> tuple[int, ...]:
    """Output shape ``(C_out, *O)`` of a convolution, with PyTorch's formula.

    Parameters
    ----------
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)``.
    weight_shape : sequence of int
        ``(C_out, C_in // groups, k_1, ..., k_N)``, or a single-channel
        ``(k_1, ..., k_N)`` with ``input_shape`` ``(L_1, ..., L_N)`` (see
        :func:`conv_matrix`).
    stride, padding, dilation, groups
        As for :func:`conv_matrix`.

    Returns
    -------
    tuple of int
        ``(C_out, O_1, ..., O_N)``; ``(1, O_1, ..., O_N)`` for a
        single-channel kernel.

    Raises
    ------
    ValueError, TypeError
        For the invalid geometries listed in :func:`conv_matrix`.

    Notes
    -----
    Per dimension, with padding ``(lo, hi)``::

        O = floor((L + lo + hi - dilation * (k - 1) - 1) / stride) + 1

    Examples
    --------
    >>> conv_output_shape((10, 16, 16), (20, 10, 5, 5), stride=3, padding=2)
    (20, 6, 6)
    >>> conv_output_shape((16, 16), (5, 5), stride=3, padding=2)  # single channel
    (1, 6, 6)
    """
    geom = conv_geometry(
        weight_shape, input_shape, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return geom.output_shape


def conv_transpose_output_shape(
    input_shape, weight_shape, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1
) -> tuple[int, ...]:
    """Output shape ``(C_out, *L)`` of a transposed convolution (PyTorch's formula).

    Parameters
    ----------
    input_shape : sequence of int
        One sample, ``(C_in, O_1, ..., O_N)``.
    weight_shape : sequence of int
        PyTorch's ConvTranspose layout ``(C_in, C_out // groups, k_1, ..., k_N)``,
        or a single-channel ``(k_1, ..., k_N)`` with ``input_shape``
        ``(O_1, ..., O_N)`` (the result is then ``(1, L_1, ..., L_N)``).
    stride, padding, output_padding, dilation, groups
        As for :func:`conv_transpose_matrix`.

    Returns
    -------
    tuple of int
        ``(C_out, L_1, ..., L_N)``.

    Notes
    -----
    Per dimension, with padding ``(lo, hi)`` and output padding ``a``::

        L = (O - 1) * stride - lo - hi + dilation * (k - 1) + a + 1

    Examples
    --------
    The shape round trip of a strided convolution and its transpose:

    >>> conv_output_shape((10, 16, 16), (20, 10, 5, 5), stride=3, padding=2)
    (20, 6, 6)
    >>> conv_transpose_output_shape((20, 6, 6), (20, 10, 5, 5), stride=3, padding=2)
    (10, 16, 16)

    A 17x17 input gives 6x6 too; ``output_padding`` selects it:

    >>> conv_transpose_output_shape((20, 6, 6), (20, 10, 5, 5), stride=3, padding=2,
    ...                             output_padding=1)
    (10, 17, 17)
    """
    geom = conv_transpose_geometry(
        weight_shape,
        input_shape,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    return geom.input_shape


class ConvMatrixSize(NamedTuple):
    """What a convolution matrix will cost, known before it is built."""

    nnz: int
    """Exact number of stored entries."""
    nbytes: int
    """Bytes of ``data`` + ``indices`` + ``indptr``."""
    shape: tuple[int, int]
    dtype: np.dtype
    index_dtype: np.dtype


def matrix_size(geom: ConvGeometry, dtype, transposed: bool) -> ConvMatrixSize:
    """The size of W (``transposed=False``) or W.T with ``dtype`` values, from the geometry."""
    n_out = math.prod(geom.output_shape)
    n_in = math.prod(geom.input_shape)
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    nnz = geom.nnz
    idx = index_dtype(nnz, *shape)
    dtype = np.dtype(dtype)
    nbytes = nnz * (dtype.itemsize + idx.itemsize) + (shape[0] + 1) * idx.itemsize
    return ConvMatrixSize(nnz, nbytes, shape, dtype, idx)


def _size_dtype(dtype):
    # Validate dtype exactly as the builders do; float64 when not given.
    return as_weight(np.zeros(0), dtype).dtype


def conv_matrix_nnz(
    weight_shape,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    dtype=None,
) -> ConvMatrixSize:
    """Exact nnz and bytes of :func:`conv_matrix`, without building it.

    Exact for any size, in Python ints: O(kernel size) work and memory per
    dimension with zero padding, whatever the size of the matrix.  The other
    padding modes also count the rows whose window crosses an edge of the
    input one by one (about ``2 * dilation * (k - 1) / stride`` rows per
    dimension), in chunks of bounded memory.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(C_out, C_in // groups, k_1, ..., k_N)``, or a single-channel
        ``(k_1, ..., k_N)`` (see :func:`conv_matrix`).
    input_shape : sequence of int
        ``(C_in, L_1, ..., L_N)``, or ``(L_1, ..., L_N)`` with a
        single-channel kernel.
    stride, padding, dilation, groups, padding_mode
        As for :func:`conv_matrix`.
    dtype : dtype, optional
        Value dtype used for the byte count (default float64).

    Returns
    -------
    ConvMatrixSize
        ``(nnz, nbytes, shape, dtype, index_dtype)``.

    Notes
    -----
    With zero padding each stored entry is one (output position, input channel
    of the group, tap) triple whose input index falls inside the input, so

        nnz = C_out * (C_in / groups) * prod_d P_d

    where ``P_d`` counts the pairs ``(p, t)`` with
    ``0 <= p * stride - lo + t * dilation < L`` in dimension ``d``.  Other
    padding modes merge taps that land on the same input element.

    Examples
    --------
    A 64 -> 64 channel 3x3 convolution on 56x56 with padding 1 has
    ``3 * 56 - 2`` valid (position, tap) pairs per dimension:

    >>> size = conv_matrix_nnz((64, 64, 3, 3), (64, 56, 56), padding=1)
    >>> size.nnz == 64 * 64 * (3 * 56 - 2) ** 2
    True
    >>> size.nbytes  # float64 data + int32 indices + int32 indptr
    1355235332
    >>> size.index_dtype
    dtype('int32')
    """
    geom = conv_geometry(
        weight_shape,
        input_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    return matrix_size(geom, _size_dtype(dtype), transposed=False)


def conv_transpose_matrix_nnz(
    weight_shape,
    input_shape,
    *,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    dtype=None,
) -> ConvMatrixSize:
    """Exact nnz and bytes of :func:`conv_transpose_matrix`, without building it.

    Same arguments as :func:`conv_transpose_matrix` (with ``weight_shape`` in
    place of the weight); see :func:`conv_matrix_nnz`.

    Examples
    --------
    >>> conv_transpose_matrix_nnz((1, 1, 2, 2), (1, 2, 2), stride=2).nnz
    16
    """
    geom = conv_transpose_geometry(
        weight_shape,
        input_shape,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    return matrix_size(geom, _size_dtype(dtype), transposed=True)
