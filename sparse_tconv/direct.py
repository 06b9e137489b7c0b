"""Direct convolution kernels: naive loops, a fast numpy kernel and FFT.

These compute the same results as the matrices of :func:`~sparse_tconv.conv_matrix` and
:func:`~sparse_tconv.conv_transpose_matrix` without building them.  They are the baselines
the sparse products are measured against and independent references for the
builders:

``"naive"``
    The definition, one output position at a time (a Python loop over
    positions, vectorised over channels).  For small sizes only.
``"fast"``
    im2col as a strided view of the padded input, then one batched matrix
    product per sample and group (BLAS).  The transposed kernel is its
    adjoint: one matrix product into a window tensor, then one strided add per
    kernel tap.
``"fft"``
    Correlation in the frequency domain (:mod:`scipy.fft`), summed over input
    channels as a batched product of spectra.  A stride computes the stride-1
    result and keeps every ``stride``-th element.

All three accept every geometry the builders accept (N-d, stride, dilation,
groups, ``(before, after)`` padding pairs, ``'same'``/``'valid'``, the four
padding modes, ``output_padding``) and validate their arguments exactly as the
builders do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal, cast

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import as_strided

from ._geometry import ConvGeometry, validate
from ._validation import check_choice, is_int

__all__ = ["METHODS", "conv", "conv_transpose"]

METHODS = ("naive", "fast", "fft")

# PyTorch's padding modes as np.pad modes.
_NUMPY_PAD_MODE: dict[str, Literal["constant", "reflect", "edge", "wrap"]] = {
    "zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap",
}

# The FFT method transforms the kernel with an explicit DFT matrix along a
# dimension when k <= _DFT_TAPS_PER_LOG2 * log2(transform length) there and
# the matrix serves at least _DFT_MIN_ROWS signals (channel pairs times the
# other dimensions' sizes), so that building it does not dominate.
_DFT_TAPS_PER_LOG2 = 4
_DFT_MIN_ROWS = 8


# ---------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------


def _prepare(x, weight, name: str, transposed: bool, geometry: dict):
    """Validated ``(x as (B, C, *spatial), weight, geometry, batched)``.

    ``x`` and the weight are cast to their common result dtype; neither input
    array is modified (the weight is a private copy, ``x`` is only read).
    """
    x = np.asarray(x)
    if x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array, got {name}.dtype={x.dtype}")
    n = np.ndim(weight) - 2
    if n < 1:
        # Not the builders' single-channel spelling: with batches allowed, a
        # kernel with as many dimensions as x would be ambiguous here.
        raise ValueError(
            "weight must have at least 3 dimensions (out_channels, in_channels // groups, "
            f"*kernel_size) for the direct kernels, got weight.shape={np.shape(weight)}; "
            "for one channel pass weight[None, None] and x[None] (a batch: x[:, None])"
        )
    if x.ndim not in (n + 1, n + 2):
        raise ValueError(
            f"{name} must be one sample (channels, *spatial) or a batch "
            f"(batch, channels, *spatial) with {n} spatial dimensions to match a weight "
            f"with {n} kernel dimensions, got {name}.shape={x.shape}"
        )
    batched = x.ndim == n + 2
    sample_shape = x.shape[-(n + 1):]
    wshape = np.shape(weight)
    groups = geometry["groups"]
    if transposed:
        expected = wshape[0]
    else:
        expected = wshape[1] * groups if is_int(groups) and groups > 0 else None
    if expected is not None and sample_shape[0] != expected:
        layout = ("(in_channels, out_channels // groups, *kernel_size)" if transposed
                  else "(out_channels, in_channels // groups, *kernel_size)")
        raise ValueError(
            f"{name} has {sample_shape[0]} channels but the weight {layout} expects "
            f"{expected}: {name}.shape={x.shape}, weight.shape={wshape}, groups={groups}"
        )
    if any(v <= 0 for v in sample_shape[1:]):
        raise ValueError(f"{name} must have positive spatial sizes, got {name}.shape={x.shape}")
    w, geom = validate(weight, sample_shape, transposed=transposed, **geometry)
    dtype = np.result_type(x.dtype, w.dtype)
    if not batched:
        x = x[None]
    return x.astype(dtype, copy=False), w.astype(dtype, copy=False), geom, batched


def _grouped_weight(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """The weight as ``(groups, out per group, in per group * prod(k))``."""
    g = geom.groups
    return w.reshape(g, geom.out_channels // g, -1)


# ---------------------------------------------------------------------------
# Padding and its adjoint
# ---------------------------------------------------------------------------


def _pad(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``x`` of shape (B, C, *L) extended by the padding mode to (B, C, *(L + lo + hi))."""
    pad_width = ((0, 0), (0, 0), *geom.padding)
    if not any(v for pair in geom.padding for v in pair):
        return x
    return np.pad(x, pad_width, mode=_NUMPY_PAD_MODE[geom.padding_mode])


def _padded_index(size: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """Input index of each padded coordinate (numpy's pad applied to the indices)."""
    return np.pad(np.arange(size), (lo, hi), mode=_NUMPY_PAD_MODE[mode])


def _fold(z: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Adjoint of :func:`_pad`: (B, C, *(L + lo + hi)) -> (B, C, *L).

    Zero padding crops; the other modes add each padded element onto the input
    element it copies.  The N-d padding map is a product of per-dimension
    maps, so its adjoint is applied one dimension at a time.
    """
    for axis, (size, (lo, hi)) in enumerate(zip(geom.input_size, geom.padding)):
        if lo == hi == 0:
            continue
        z = np.moveaxis(z, 2 + axis, -1)
        inner = z[..., lo:lo + size].copy()
        if geom.padding_mode != "zeros":
            border = np.r_[0:lo, lo + size:lo + size + hi]
            index = _padded_index(size, lo, hi, geom.padding_mode)[border]
            # (a tuple index, which numpy's stubs do not spell out)
            np.add.at(inner, cast(Any, (Ellipsis, index)), z[..., border])
        z = np.moveaxis(inner, -1, 2 + axis)
    return np.ascontiguousarray(z)


def _window_index(p, geom: ConvGeometry) -> tuple:
    """Slices of the padded frame read by output position ``p`` (all taps)."""
    return tuple(
        slice(q * s, q * s + (k - 1) * d + 1, d)
        for q, s, k, d in zip(p, geom.stride, geom.kernel_size, geom.dilation)
    )


def _tap_index(t, geom: ConvGeometry) -> tuple:
    """Slices of the padded frame read by tap ``t`` (all output positions)."""
    return tuple(
        slice(u * d, u * d + (o - 1) * s + 1, s)
        for u, d, o, s in zip(t, geom.dilation, geom.output_size, geom.stride)
    )


def _padded_size(geom: ConvGeometry) -> tuple[int, ...]:
    return tuple(n + lo + hi for n, (lo, hi) in zip(geom.input_size, geom.padding))


# ---------------------------------------------------------------------------
# Forward kernels: (B, C_in, *L) -> (B, C_out, *O)
# ---------------------------------------------------------------------------


def _conv_naive(x, w, geom):
    xpad = _pad(x, geom)
    batch, g = x.shape[0], geom.groups
    wg = _grouped_weight(w, geom)
    out = np.empty((batch, geom.out_channels, *geom.output_size), dtype=x.dtype)
    for p in np.ndindex(*geom.output_size):
        window = xpad[(slice(None), slice(None), *_window_index(p, geom))]
        window = window.reshape(batch, g, -1)
        out[(slice(None), slice(None), *p)] = np.einsum(
            "gok,bgk->bgo", wg, window
        ).reshape(batch, -1)
    return out


def _conv_fast(x, w, geom):
    xpad = np.ascontiguousarray(_pad(x, geom))
    batch, g = x.shape[0], geom.groups
    cpg = geom.in_channels // g
    sb, sc, *sl = xpad.strides
    # im2col as a view: (B, groups, C_in per group, *k, *O), no copy.
    view = as_strided(
        xpad,
        (batch, g, cpg, *geom.kernel_size, *geom.output_size),
        (sb, cpg * sc, sc,
         *(d * st for d, st in zip(geom.dilation, sl)),
         *(s * st for s, st in zip(geom.stride, sl))),
        writeable=False,
    )
    # One GEMM per (sample, group): (out per group, cpg * K) @ (cpg * K, P).
    # The reshape materialises the im2col matrix.
    cols = view.reshape(batch, g, cpg * math.prod(geom.kernel_size), -1)
    out = np.matmul(_grouped_weight(w, geom), cols)
    return out.reshape(batch, geom.out_channels, *geom.output_size)


def _fft_plan(dtype, size):
    """N-d transforms, their lengths, and whether they are real (half-spectrum)."""
    real = np.dtype(dtype).kind != "c"
    shape = tuple(scipy.fft.next_fast_len(v, real=real) for v in size)
    if real:
        return scipy.fft.rfftn, scipy.fft.irfftn, shape, real
    return scipy.fft.fftn, scipy.fft.ifftn, shape, real


def _kernel_spectrum(w, geom, shape, real, flip):
    """Spectrum of the dilated, optionally flipped kernel, as ``(F, groups, opg, cpg)``.

    ``F`` is the number of frequencies (all transform dimensions flattened).
    In dimension ``d`` tap ``t`` sits at ``t * dilation`` (flipped:
    ``span - 1 - t * dilation``, ``span = dilation * (k - 1) + 1``) of a
    length ``shape[d]`` signal.  Every (out, in) channel pair needs its own
    spectrum, so for many pairs a short kernel is transformed by an explicit
    DFT matrix (``k`` multiply-adds per frequency, several times cheaper than
    a zero-padded FFT for a 3x3 kernel); otherwise by an FFT of the
    zero-stuffed kernel.  The kernel axes are moved in front of the channels
    and the last dimension goes first (to the half spectrum for real data), so
    the final transform writes the result in its final layout.
    """
    n_dim = geom.ndim
    spec = np.moveaxis(w.reshape(-1, *geom.kernel_size), 0, -1)  # (*k, C_out * cpg)
    ctype = np.result_type(w.dtype, np.complex64)
    for axis in reversed(range(n_dim)):
        k, d, n = geom.kernel_size[axis], geom.dilation[axis], shape[axis]
        span = (k - 1) * d + 1
        pos = np.arange(k) * d
        if flip:
            pos = span - 1 - pos
        half = real and axis == n_dim - 1
        rows = spec.size // k  # signals transformed along this axis
        if rows >= _DFT_MIN_ROWS and k <= _DFT_TAPS_PER_LOG2 * math.log2(n):
            freqs = np.arange(n // 2 + 1 if half else n)
            roots = np.exp(np.arange(n) * (-2j * np.pi / n)).astype(ctype)
            matrix = roots[np.outer(freqs, pos) % n]  # exact integer phases
            spec = np.moveaxis(np.tensordot(matrix, spec, axes=([1], [axis])), 0, axis)
        else:
            stuffed = np.zeros(spec.shape[:axis] + (span,) + spec.shape[axis + 1:],
                               dtype=spec.dtype)
            stuffed[(slice(None),) * axis + (pos,)] = spec
            spec = (scipy.fft.rfft if half else scipy.fft.fft)(stuffed, n=n, axis=axis)
    g = geom.groups
    return spec.reshape(-1, g, geom.out_channels // g, geom.in_channels // g)


def _spectral_product(spec_w, spec_x, geom, transposed):
    """Per-frequency channel mixing: a stack of small matrix products.

    ``spec_w`` is (F, groups, opg, cpg) and ``spec_x`` (B, C, *F), whose
    channels are the forward input channels (forward: summed over each
    group's ``cpg``) or the forward output channels (transpose: summed over
    each group's outputs, with the kernel matrix transposed, not conjugated).
    """
    batch, g = spec_x.shape[0], geom.groups
    freq = spec_x.shape[2:]
    if transposed:
        spec_w = spec_w.swapaxes(-1, -2)
    xx = spec_x.reshape(batch, g, -1, spec_w.shape[0]).transpose(3, 1, 2, 0)  # (F, g, c, B)
    out = np.matmul(spec_w, np.ascontiguousarray(xx))
    return out.transpose(3, 1, 2, 0).reshape(batch, -1, *freq)


def _conv_fft(x, w, geom):
    xpad = _pad(x, geom)
    axes = tuple(range(2, 2 + geom.ndim))
    forward, inverse, shape, real = _fft_plan(x.dtype, xpad.shape[2:])
    # Correlation is convolution with the flipped (dilated) kernel.  A
    # transform length of at least the padded size wraps nothing into the
    # valid part [span - 1, padded size).
    spec = _spectral_product(_kernel_spectrum(w, geom, shape, real, flip=True),
                             forward(xpad, s=shape, axes=axes), geom, transposed=False)
    full = inverse(spec, s=shape, axes=axes)
    keep = tuple(slice((k - 1) * d, (k - 1) * d + (o - 1) * s + 1, s)
                 for k, d, o, s in zip(geom.kernel_size, geom.dilation, geom.output_size,
                                       geom.stride))
    return np.ascontiguousarray(full[(slice(None), slice(None), *keep)], dtype=x.dtype)


# ---------------------------------------------------------------------------
# Transposed kernels: (B, C_out, *O) -> (B, C_in, *L), the adjoints
# ---------------------------------------------------------------------------


def _conv_transpose_naive(y, w, geom):
    batch, g = y.shape[0], geom.groups
    opg, cpg = geom.out_channels // g, geom.in_channels // g
    wg = w.reshape(g, opg, cpg, -1)
    zpad = np.zeros((batch, geom.in_channels, *_padded_size(geom)), dtype=y.dtype)
    for p in np.ndindex(*geom.output_size):
        values = y[(slice(None), slice(None), *p)].reshape(batch, g, opg)
        window = np.einsum("gock,bgo->bgck", wg, values)
        zpad[(slice(None), slice(None), *_window_index(p, geom))] += window.reshape(
            batch, geom.in_channels, *geom.kernel_size
        )
    return _fold(zpad, geom)


def _conv_transpose_fast(y, w, geom):
    batch, g = y.shape[0], geom.groups
    opg = geom.out_channels // g
    # Window tensor (B, C_in, *k, *O): one GEMM per (sample, group),
    # (cpg * K, out per group) @ (out per group, P).
    wt = _grouped_weight(w, geom).swapaxes(1, 2)
    cols = np.matmul(wt, y.reshape(batch, g, opg, -1))
    cols = cols.reshape(batch, geom.in_channels, *geom.kernel_size, *geom.output_size)
    zpad = np.zeros((batch, geom.in_channels, *_padded_size(geom)), dtype=y.dtype)
    # Scatter-add: one strided slice add per kernel tap.
    for t in np.ndindex(*geom.kernel_size):
        zpad[(slice(None), slice(None), *_tap_index(t, geom))] += cols[
            (slice(None), slice(None), *t)
        ]
    return _fold(zpad, geom)


def _conv_transpose_fft(y, w, geom):
    axes = tuple(range(2, 2 + geom.ndim))
    padded = _padded_size(geom)
    forward, inverse, shape, real = _fft_plan(y.dtype, padded)
    # Zero-upsampled input: y[p] sits at p * stride.
    up = tuple((o - 1) * s + 1 for o, s in zip(geom.output_size, geom.stride))
    yu = np.zeros((y.shape[0], geom.out_channels, *up), dtype=y.dtype)
    yu[(slice(None), slice(None), *(slice(None, None, s) for s in geom.stride))] = y
    # The full convolution of yu with the dilated kernel has length
    # up + span - 1 <= padded size <= transform length: nothing wraps.
    spec = _spectral_product(_kernel_spectrum(w, geom, shape, real, flip=False),
                             forward(yu, s=shape, axes=axes), geom, transposed=True)
    full = inverse(spec, s=shape, axes=axes)
    zpad = full[(slice(None), slice(None), *(slice(0, v) for v in padded))]
    return _fold(np.asarray(zpad, dtype=y.dtype), geom)


_FORWARD = {"naive": _conv_naive, "fast": _conv_fast, "fft": _conv_fft}
_TRANSPOSE = {"naive": _conv_transpose_naive, "fast": _conv_transpose_fast,
              "fft": _conv_transpose_fft}


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _allocation_context(method: str, name: str, shape) -> Iterator[None]:
    """Say which kernel and input were too large when numpy cannot allocate."""
    try:
        yield
    except MemoryError as exc:
        raise MemoryError(f"the {method!r} kernel on {name}.shape={tuple(shape)} needs arrays "
                          f"this machine could not allocate ({exc})") from None


def conv(
    x,
    weight,
    *,
    method="fast",
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
) -> np.ndarray:
    """N-d, multi-channel convolution computed directly (no matrix).

    Gives ``conv_matrix(weight, x.shape[-(N+1):], ...) @ x.ravel()``, reshaped,
    i.e. PyTorch's ``conv{N}d`` with ``padding_mode`` applied as
    ``torch.nn.ConvNd`` does.

    Parameters
    ----------
    x : array_like, shape (C_in, L_1, ..., L_N) or (B, C_in, L_1, ..., L_N)
        One sample, or a batch when ``x.ndim == weight.ndim``.  Not modified.
    weight : array_like, shape (C_out, C_in // groups, k_1, ..., k_N)
        PyTorch's Conv layout.  Not modified.
    method : {'fast', 'naive', 'fft'}, optional
        ``'naive'``: a Python loop over output positions (small sizes only).
        ``'fast'``: im2col as a strided view and a matrix product.
        ``'fft'``: correlation through :mod:`scipy.fft`.  Default ``'fast'``.
    stride, padding, dilation, groups, padding_mode
        As for :func:`~sparse_tconv.conv_matrix`.

    Returns
    -------
    numpy.ndarray, shape (C_out, O_1, ..., O_N) or (B, C_out, O_1, ..., O_N)
        In the result dtype of ``x`` and the (validated) weight, e.g. float32
        for float32 inputs.

    Raises
    ------
    ValueError
        Unknown ``method``; ``x`` without the weight's number of spatial
        dimensions (plus an optional batch axis), with the wrong number of
        channels or an empty spatial size; every invalid geometry that
        :func:`~sparse_tconv.conv_matrix` rejects.
    TypeError
        Non-numeric ``x`` or weight, non-integer arguments.

    See Also
    --------
    conv_transpose, sparse_tconv.conv_matrix

    Notes
    -----
    With ``g = o // (C_out / groups)`` the group of output channel ``o``::

        y[b, o, p] = sum_{c < C_in/groups} sum_t weight[o, c, t]
                     * xpad[b, g * C_in/groups + c, p * stride + t * dilation]

    where ``xpad`` is ``x`` extended by ``(lo, hi)`` elements per dimension
    according to ``padding_mode`` (zeros, reflect without repeating the edge,
    replicate the edge, circular wrap), and per dimension
    ``O = floor((L + lo + hi - dilation * (k - 1) - 1) / stride) + 1``.

    Cost, with ``P = prod(O)`` and ``K = prod(k)``: ``'naive'`` and
    ``'fast'`` do ``B * C_out * (C_in / groups) * K * P`` multiply-adds.
    ``'fft'`` does ``O(B * (C_in + C_out) * M log M)`` for the transforms of
    the data, ``B * C_out * (C_in / groups) * M`` complex multiply-adds for
    the channel mixing and about ``C_out * (C_in / groups) * M * k`` for the
    kernel spectra (an explicit DFT per dimension for short kernels), with
    ``M`` the padded size rounded up to fast FFT lengths.  It computes every
    stride-1 output and keeps one in ``stride`` per dimension, so a stride
    wastes a factor ``prod(stride)`` of its work.
    ``'fast'`` materialises the im2col matrix, ``B * C_in * K * P`` elements.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv.direct import conv
    >>> X = np.arange(9.0).reshape(1, 3, 3)
    >>> K = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> conv(X, K[None, None])
    array([[[27., 37.],
            [57., 67.]]])
    >>> np.allclose(conv(X, K[None, None], method="fft"), conv(X, K[None, None]))
    True

    A batch of two samples, circular padding:

    >>> conv(np.stack([X, -X]), K[None, None], padding=1, padding_mode="circular").shape
    (2, 1, 4, 4)
    """
    method = check_choice(method, METHODS, "method")
    given = np.shape(x)
    x, w, geom, batched = _prepare(
        x, weight, "x", False,
        dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
             padding_mode=padding_mode),
    )
    if x.shape[0] == 0:
        out = np.zeros((0, *geom.output_shape), dtype=x.dtype)
    else:
        with _allocation_context(method, "x", given):
            out = _FORWARD[method](x, w, geom)
    return out if batched else out[0]


def conv_transpose(
    y,
    weight,
    *,
    method="fast",
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
) -> np.ndarray:
    """N-d, multi-channel transposed convolution computed directly (no matrix).

    Gives ``conv_transpose_matrix(weight, y.shape[-(N+1):], ...) @ y.ravel()``,
    reshaped: PyTorch's ``conv_transpose{N}d``, and for every padding mode the
    exact transpose of the forward :func:`conv` with the same arguments.

    Parameters
    ----------
    y : array_like, shape (C_in, O_1, ..., O_N) or (B, C_in, O_1, ..., O_N)
        One sample, or a batch when ``y.ndim == weight.ndim``.  Not modified.
    weight : array_like, shape (C_in, C_out // groups, k_1, ..., k_N)
        PyTorch's ConvTranspose layout, which is the Conv layout of the
        forward convolution being transposed.  Not modified.
    method : {'fast', 'naive', 'fft'}, optional
        ``'naive'``: a Python loop over input positions, each scattering
        ``weight * y[p]`` into its output window.  ``'fast'``: one matrix
        product into a window tensor, then one strided add per kernel tap.
        ``'fft'``: full convolution of the zero-upsampled ``y`` with the
        kernel through :mod:`scipy.fft`.  Default ``'fast'``.
    stride, padding, output_padding, dilation, groups, padding_mode
        As for :func:`~sparse_tconv.conv_transpose_matrix`.

    Returns
    -------
    numpy.ndarray, shape (C_out, L_1, ..., L_N) or (B, C_out, L_1, ..., L_N)
        In the result dtype of ``y`` and the (validated) weight.

    Raises
    ------
    ValueError
        Unknown ``method``; ``y`` of the wrong dimensions or channels; every
        invalid geometry that :func:`~sparse_tconv.conv_transpose_matrix`
        rejects.
    TypeError
        Non-numeric ``y`` or weight, non-integer arguments.

    See Also
    --------
    conv, sparse_tconv.conv_transpose_matrix

    Notes
    -----
    With ``g = i // (C_in / groups)`` the group of input channel ``i``, the
    padded output is::

        zpad[b, g * C_out/groups + c, j] = sum_{i in group g} sum_p sum_t
            weight[i, c, t] * y[b, i, p]   over  j == p * stride + t * dilation

    of size ``L + lo + hi`` per dimension, with
    ``L = (O - 1) * stride - lo - hi + dilation * (k - 1) + output_padding + 1``.
    Zero padding crops ``zpad`` to ``[lo, lo + L)``; the other modes add each
    padded element of ``zpad`` onto the output element it copies in the
    forward padding (the adjoint of the padding), so the result is ``W.T @ y``
    for the forward matrix ``W``.  ``'fft'`` upsamples ``y`` by the stride
    with zeros first, wasting a factor ``prod(stride)`` of its input size.

    Examples
    --------
    The basic 2x2 transposed convolution:

    >>> import numpy as np
    >>> from sparse_tconv.direct import conv_transpose
    >>> Y = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    >>> K = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> conv_transpose(Y, K[None, None])
    array([[[ 0.,  0.,  1.],
            [ 0.,  4.,  6.],
            [ 4., 12.,  9.]]])
    >>> conv_transpose(Y, K[None, None], method="naive", stride=2)
    array([[[0., 0., 0., 1.],
            [0., 0., 2., 3.],
            [0., 2., 0., 3.],
            [4., 6., 6., 9.]]])
    >>> np.round(conv_transpose(Y, K[None, None], method="fft"), 12) + 0.0
    array([[[ 0.,  0.,  1.],
            [ 0.,  4.,  6.],
            [ 4., 12.,  9.]]])
    """
    method = check_choice(method, METHODS, "method")
    given = np.shape(y)
    y, w, geom, batched = _prepare(
        y, weight, "y", True,
        dict(stride=stride, padding=padding, output_padding=output_padding,
             dilation=dilation, groups=groups, padding_mode=padding_mode),
    )
    if y.shape[0] == 0:
        out = np.zeros((0, *geom.input_shape), dtype=y.dtype)
    else:
        with _allocation_context(method, "y", given):
            out = _TRANSPOSE[method](y, w, geom)
    return out if batched else out[0]
