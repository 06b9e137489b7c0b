"""Spectra of convolution matrices: singular values, operator norms, Gram matrices.

- :func:`conv_singular_values`: every singular value of a circular-padding
  convolution, exactly, from small per-frequency blocks (no matrix is built).
- :func:`operator_norm`: the spectral norm ``||W||_2`` of any convolution
  (any padding mode and stride) or matrix, by ARPACK, power iteration, or a
  guaranteed upper bound by Gram iteration.
- :func:`gram_matrix` and :func:`column_norms`: ``W^H W`` as canonical CSR
  and the Euclidean norms of W's columns (Jacobi preconditioning).
- :func:`compose`: the product of two convolution matrices (stacked layers,
  or a convolution followed by its transpose) as one canonical CSR matrix.
- :func:`model_norm_bounds`: :func:`norm_bounds` for every convolution a
  PyTorch model applies, at the input sizes of a forward pass.

Operators are :class:`~sparse_tconv.ConvOperator` /
:class:`~sparse_tconv.ConvTransposeOperator` (their ``matrix``), scipy
sparse matrices or arrays, or dense 2-D ndarrays.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator, svds

from . import _bounds, _certificates, _model_norms
from ._bounds import NormBounds
from ._certificates import Interval
from ._certificates.band import reuse_band_memory
from ._fourier import check_circulant, circular_blocks
from ._geometry import conv_geometry
from ._model_norms import LayerNormBounds, ModelNormBounds
from ._operator import CONV_OPERATORS
from ._random import gaussian, generator, work_dtype
from ._validation import (
    INT64_MAX,
    as_weight,
    check_choice,
    check_non_negative_int,
    check_positive_int,
    check_tol,
    is_sparse,
)

__all__ = [
    "conv_singular_values",
    "norm_bounds",
    "NormBounds",
    "model_norm_bounds",
    "ModelNormBounds",
    "LayerNormBounds",
    "operator_norm",
    "gram_matrix",
    "column_norms",
    "compose",
]

# Gram iteration switches to dense arithmetic once a product is this full.
_DENSE_FRACTION = 0.25


# ---------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------


# The weights' magnitudes within which every method holds: Lanczos and the
# power iteration square the products' norms, and the certificates' rounding
# bounds assume no underflow (measured: power iteration gives 0 at 1e-100 and
# inf at 1e80, the bounds' eigensolver fails at 1e80).  A norm scales with
# the weight: scale it by a power of two into this range, exactly.
_WEIGHT_RANGE = (2.0**-200, 2.0**200)


def _check_finite(weight, name: str = "weight") -> np.ndarray:
    """The weight's magnitudes; a ValueError naming it if one is NaN or infinite."""
    magnitudes = np.abs(weight)
    if not np.all(np.isfinite(magnitudes)):
        raise ValueError(f"{name} must be finite: it has NaN or infinite entries, "
                         "so the operator has no norm")
    return magnitudes


def _check_weight(weight, name: str = "weight") -> None:
    """Refuse, by name, a weight whose norm the iterative methods here cannot bound."""
    magnitudes = _check_finite(weight, name)
    largest = float(magnitudes.max(initial=0.0))
    low, high = _WEIGHT_RANGE
    if largest and not low <= largest <= high:
        raise ValueError(
            f"{name}'s largest magnitude {largest:.3g} is outside [2**-200, 2**200], where "
            "the norm methods' products neither overflow nor underflow; scale the weight "
            "by a power of two (exact) and the norm by the same factor")


def _explicit_matrix(obj, name: str):
    """``(matrix, sample shapes or None)`` of an operator or matrix argument.

    The matrix is a CSR array, or a dense 2-D ndarray for a dense input.
    """
    if isinstance(obj, CONV_OPERATORS):
        return obj.matrix, (obj.input_shape, obj.output_shape)
    if is_sparse(obj):
        if obj.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got {name}.shape={obj.shape}")
        return sp.csr_array(obj), None
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got an array with {name}.shape={obj.shape}")
        if not np.issubdtype(obj.dtype, np.number) or obj.dtype == np.bool_:
            raise TypeError(f"{name} must be numeric, got {name}.dtype={obj.dtype}")
        return obj, None
    if isinstance(obj, LinearOperator):
        raise TypeError(
            f"{name} must be an explicit matrix (ConvOperator, ConvTransposeOperator, scipy "
            f"sparse matrix or 2-D ndarray), got a matrix-free {type(obj).__name__}"
        )
    raise TypeError(
        f"{name} must be a ConvOperator, ConvTransposeOperator, scipy sparse matrix or 2-D "
        f"ndarray, got {name} of type {type(obj).__name__}"
    )


def _as_csr(matrix) -> sp.csr_array:
    return matrix if is_sparse(matrix) else sp.csr_array(matrix)


def _canonical(matrix) -> sp.csr_array:
    """CSR with sorted indices and no duplicates (sorted in place if needed)."""
    out = sp.csr_array(matrix)
    out.sum_duplicates()  # sorts the indices too; a no-op when already canonical
    return out


def _conj(matrix: sp.csr_array) -> sp.csr_array:
    if not np.iscomplexobj(matrix.data):
        return matrix
    out = sp.csr_array((matrix.data.conj(), matrix.indices, matrix.indptr), shape=matrix.shape)
    out.has_canonical_format = matrix.has_canonical_format
    return out


def _adjoint_csr(obj, matrix: sp.csr_array) -> sp.csr_array:
    """``matrix^H`` as CSR, from the operator's ready-built transpose when it has one."""
    if isinstance(obj, CONV_OPERATORS):
        return _conj(obj.transpose_matrix)
    return _conj(matrix.T.tocsr())


# ---------------------------------------------------------------------------
# Exact singular values of circular convolutions
# ---------------------------------------------------------------------------


def conv_singular_values(
    weight,
    input_shape,
    *,
    stride=1,
    padding="same",
    dilation=1,
    groups=1,
    padding_mode="circular",
) -> np.ndarray:
    """Every singular value of a circular-padding convolution, exactly, by FFT.

    The singular values of ``W = conv_matrix(weight, input_shape, ...,
    padding_mode='circular')`` are computed from ``prod(L / stride)`` small
    blocks (one per spatial frequency) without building W (Sedghi, Gupta &
    Long, "The Singular Values of Convolutional Layers", ICLR 2019), extended
    to strides by a polyphase decomposition and to groups and dilation.

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in // groups, k_1, ..., k_N)
        PyTorch's Conv layout; real or complex.
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)``.
    stride : int or sequence of int, optional
        As for :func:`~sparse_tconv.conv_matrix`.  Default 1.
    padding : int, sequence, 'same' or 'valid', optional
        As for :func:`~sparse_tconv.conv_matrix`.  Default ``'same'``
        (stride 1 only; pass explicit ``(before, after)`` pairs with a stride).
    dilation, groups : int or sequence of int, optional
        As for :func:`~sparse_tconv.conv_matrix`.  Default 1.
    padding_mode : str, optional
        Default ``'circular'``, the only mode with this structure; another
        mode is accepted only where no padding is read (zero padding).

    Returns
    -------
    ndarray of float64, shape (min(W.shape),)
        The singular values of W sorted in descending order, with
        multiplicity, as ``numpy.linalg.svd(W, compute_uv=False)`` returns
        them (computed in double precision whatever the weight's dtype).

    Raises
    ------
    ValueError, TypeError
        Invalid arguments, as for :func:`~sparse_tconv.conv_matrix`; a weight
        with NaN or infinite entries.
    NotImplementedError
        If the geometry is not a (subsampled) circulant: padding read in a
        mode other than ``'circular'``, or, in some dimension, a stride that
        does not divide the input size ``L`` or an output size other than
        ``L / stride`` (that is, ``lo + hi`` outside
        ``[d (k - 1) - s + 1, d (k - 1)]``).  Use :func:`operator_norm` for
        the largest singular value of any geometry, or a dense SVD of
        ``conv_matrix(...).toarray()`` for small sizes.

    See Also
    --------
    operator_norm : The largest singular value, for any geometry.
    sparse_tconv.conv_matrix : The matrix W whose singular values these are.

    Notes
    -----
    Per dimension, with stride ``s``, dilation ``d``, padding ``(lo, hi)``,
    input size ``L = s M`` and output size ``M``, tap ``t`` reads the input
    at ``(p s + t d - lo) mod L``.  Write ``t d - lo = q(t) s + r(t)`` with
    ``0 <= r(t) < s`` and split the input into its ``s^N`` polyphase
    components ``x_{c,r}[m] = x[c, m s + r]`` on the ``M`` grid.  Then

    ``y[o, p] = sum_c sum_t w[o, c, t] x_{c, r(t)}[(p + q(t)) mod M]``

    is a multi-channel circular correlation on the ``M`` grid with
    ``C_in s^N`` input channels.  The unitary DFT on that grid (a unitary
    change of basis on both sides, as is the polyphase permutation)
    block-diagonalises it: for each frequency ``f`` the ``C_out x C_in s^N``
    block is

    ``B(f)[o, (c, r)] = sum_{t : r(t) = r} w[o, c, t] exp(2 pi i sum_n f_n q_n(t) / M_n)``,

    and the singular values of W are the union over the ``prod(M)``
    frequencies of the singular values of ``B(f)``.  With groups, ``B(f)``
    is block diagonal (one ``C_out/groups x (C_in/groups) s^N`` block per
    group), and each block is decomposed separately.  For stride 1,
    ``B(f) = sum_t w[:, :, t] exp(2 pi i f (t d - lo) / L)``: the N-d DFT of
    the kernel with its taps at dilated positions, zero-padded to the input
    size; the padding offset ``lo`` (the cross-correlation's circular shift)
    only multiplies it by the unimodular factor ``exp(-2 pi i f lo / L)``,
    which leaves the singular values unchanged.  Multiple taps that land on
    one input element (a dilated kernel longer than the input) add up.

    Cost: one FFT of the ``C_out x C_in/groups x s^N x M`` polyphase kernel
    and ``groups * prod(M)`` SVDs of ``C_out/groups x (C_in/groups) s^N``
    matrices; the blocks take ``16 * C_out * (C_in/groups) * prod(L)`` bytes.

    Examples
    --------
    A single-channel circular 3-tap average has the singular values
    ``|1 + 2 cos(2 pi f / L)| / 3`` (here ``L = 4``):

    >>> import numpy as np
    >>> from sparse_tconv.spectral import conv_singular_values
    >>> conv_singular_values(np.ones((1, 1, 3)) / 3, (1, 4)).round(4)
    array([1.    , 0.3333, 0.3333, 0.3333])

    They are those of the built matrix, for a strided multi-channel layer too:

    >>> from sparse_tconv import conv_matrix
    >>> rng = np.random.default_rng(0)
    >>> w = rng.standard_normal((3, 2, 3, 3))
    >>> s = conv_singular_values(w, (2, 6, 8), stride=2, padding=1)
    >>> W = conv_matrix(w, (2, 6, 8), stride=2, padding=1, padding_mode="circular")
    >>> np.allclose(s, np.linalg.svd(W.toarray(), compute_uv=False))
    True
    """
    w = as_weight(weight)
    _check_finite(w)  # (the blocks' SVDs hold at any scale)
    geom = conv_geometry(
        w.shape,
        input_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    check_circulant(geom)
    _check_blocks_size(geom)
    blocks = circular_blocks(geom, w)
    values = np.linalg.svd(blocks, compute_uv=False).ravel()
    return np.ascontiguousarray(np.sort(values)[::-1])


def _check_blocks_size(geom) -> None:
    """Refuse, naming input_shape, DFT blocks no array could hold (complex128 entries)."""
    entries = math.prod(geom.input_size) * geom.out_channels * (geom.in_channels // geom.groups)
    if entries * 16 > INT64_MAX:
        raise ValueError(
            f"input_shape={geom.input_shape} gives {entries:.3g} DFT block entries "
            f"({entries * 16:.3g} bytes of complex128), more than any array can hold "
            "(2**63 bytes)")


# ---------------------------------------------------------------------------
# Operator norm
# ---------------------------------------------------------------------------


def _norm_operand(obj, *, explicit: bool = False):
    """``(LinearOperator or None, explicit matrix or None)`` for operator_norm.

    A convolution operator's CSR matrix is built only when ``explicit`` asks
    for it (the methods that multiply run on the operator's own products:
    its channel layers' matrix may be far larger than the operator).
    """
    if isinstance(obj, CONV_OPERATORS):
        _check_weight(obj.convolution.weight, "op's weight")
        return obj, (obj.matrix if explicit else None)
    if is_sparse(obj) or isinstance(obj, np.ndarray):
        matrix, _ = _explicit_matrix(obj, "op")
        return aslinearoperator(matrix), matrix
    if isinstance(obj, LinearOperator):
        return obj, None
    raise TypeError(
        "op must be a ConvOperator, ConvTransposeOperator, LinearOperator, scipy sparse "
        f"matrix or 2-D ndarray, got op of type {type(obj).__name__}"
    )


def _start_vector(gen, size, dtype):
    x = gaussian(gen, size, dtype)
    return (x / np.linalg.norm(x)).astype(dtype)


def _rank_one_norm(A: LinearOperator) -> float:
    """The norm of an operator with one row or one column: that row/column's norm."""
    m, n = A.shape
    dtype = work_dtype(A.dtype)
    if n == 1:
        return float(np.linalg.norm(A.matvec(np.ones(1, dtype=dtype))))
    return float(np.linalg.norm(A.rmatvec(np.ones(1, dtype=dtype))))


def _norm_svds(A, tol, maxiter, gen):
    if min(A.shape) == 1:
        return _rank_one_norm(A)
    dtype = work_dtype(A.dtype)
    v0 = _start_vector(gen, min(A.shape), dtype)
    # ARPACK fails on a zero operator ("starting vector is zero"): look first.
    first = A.matvec if A.shape[0] >= A.shape[1] else A.rmatvec
    if not np.any(first(v0)):
        return 0.0  # A v0 = 0 for a random v0: A is zero (almost surely)
    s = svds(A, k=1, tol=tol, maxiter=maxiter, v0=v0, return_singular_vectors=False)
    return float(s[0])


def _norm_power(A, tol, maxiter, gen):
    m, n = A.shape
    dtype = work_dtype(A.dtype)
    # Iterate on the smaller Gram matrix: A^H A (n x n) or A A^H (m x m).
    if n <= m:
        first, second = A.matvec, A.rmatvec
    else:
        first, second = A.rmatvec, A.matvec
    x = _start_vector(gen, min(m, n), dtype)
    estimate, change = 0.0, np.inf
    for _ in range(maxiter):
        y = second(first(x))  # G x, with G the Gram matrix; ||x|| = 1
        norm_y = float(np.linalg.norm(y))
        if norm_y == 0.0:
            return 0.0  # only when G x = 0 for a random x: A is zero
        new = math.sqrt(norm_y)  # sqrt(||G x||) <= sqrt(lambda_max(G)) = ||A||
        change = abs(new - estimate)
        estimate = new
        x = y / norm_y
        if change <= tol * estimate:
            return estimate
    warnings.warn(
        f"power iteration stopped after maxiter={maxiter} iterations with relative change "
        f"{change / estimate:.2e} > tol={tol:.2e}; the estimate {estimate!r} is a lower bound "
        "of the norm (raise maxiter, or use method='svds')",
        RuntimeWarning,
        stacklevel=3,
    )
    return estimate


def _norm_gram(matrix, iterations, max_nnz):
    # Double precision throughout, so that rounding cannot undercut the bound.
    if is_sparse(matrix):
        dtype = np.complex128 if np.iscomplexobj(matrix.data) else np.float64
        G = sp.csr_array(matrix, dtype=dtype, copy=True)
        G.sum_duplicates()
    else:
        dtype = np.complex128 if np.iscomplexobj(matrix) else np.float64
        G = np.array(matrix, dtype=dtype)
    # G = H_j / c_j with log c_j tracked; H_1 = W, H_{j+1} = H_j^H H_j.
    log_scale, done = 0.0, 0
    for _ in range(iterations):
        f = float(np.linalg.norm(G.data if is_sparse(G) else G))
        if f == 0.0:
            return 0.0
        # G^H G, or G G^H when smaller (same non-zero spectrum; equal once Hermitian).
        small_side = G.shape[1] <= G.shape[0]
        if is_sparse(G):
            scaled = G * (1.0 / f)  # G itself stays as is if this step is not taken
            H = scaled.conj().T.tocsr()
            left, right = (H, scaled) if small_side else (scaled, H)
            if max_nnz is not None:
                nnz = _bounds.product_nnz(left, right)
                if nnz > max_nnz:
                    warnings.warn(
                        f"Gram iteration stopped after {done} of {iterations} steps: the "
                        f"next product would store {nnz} entries, more than max_nnz={max_nnz}; "
                        "the bound returned is valid but looser",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    break
            G = left @ right
            if G.nnz > _DENSE_FRACTION * G.shape[0] * G.shape[1]:
                G = G.toarray()
        else:
            G = G / f
            G = G.conj().T @ G if small_side else G @ G.conj().T
        log_scale = 2.0 * (log_scale + math.log(f))
        done += 1
    frob = float(np.linalg.norm(G.data if is_sparse(G) else G))
    if frob == 0.0:
        return 0.0
    return math.exp((log_scale + math.log(frob)) / 2.0**done)


def operator_norm(
    op,
    *,
    method="svds",
    tol=None,
    maxiter=None,
    iterations=None,
    max_nnz=1 << 24,
    rng=None,
) -> float:
    """The spectral norm ``||W||_2`` (largest singular value) of a convolution or matrix.

    Three methods: an accurate value (ARPACK), a lower bound (power
    iteration) and a guaranteed upper bound (Gram iteration), each for any
    padding mode, stride and geometry.

    Parameters
    ----------
    op : ConvOperator, ConvTransposeOperator, LinearOperator, sparse matrix or ndarray
        The operator.  A convolution operator's products run on its threads;
        ``method='gram'`` uses its explicit ``matrix`` (a matrix-free
        LinearOperator is accepted by ``'svds'`` and ``'power'`` only).
    method : {'svds', 'power', 'gram'}, optional
        ``'svds'`` (default): ARPACK (``scipy.sparse.linalg.svds``, ``k=1``),
        accurate to ``tol``.  ``'power'``: power iteration on ``W^H W``; a
        lower bound that increases to the norm.  ``'gram'``: a guaranteed
        upper bound: for a convolution operator (with ``iterations`` not
        given) the structural bound of :func:`norm_bounds`, within 1% of the
        norm for zero and circular padding and computed in a fraction of a
        second; otherwise (a matrix, or ``iterations`` given) Gram iteration
        on the explicit sparse matrix (see Notes).
    tol : float, optional
        ``'svds'``: ARPACK's relative tolerance (default 0: machine
        precision).  ``'power'``: stop when the estimate changes by at most
        ``tol`` relative (default ``1e-8``; ``100 * eps``, about ``1.2e-5``, for
        a single-precision operator).  Not used by ``'gram'``.
    maxiter : int, optional
        ``'svds'``: ARPACK's limit (default: scipy's).  ``'power'``: the
        number of products with ``W^H W`` (default 1000).
    iterations : int, optional
        ``'gram'``: the number of Gram steps ``t`` on the explicit matrix
        (0 gives the Frobenius norm).  Default: :func:`norm_bounds`' upper
        bound for a convolution operator, 6 steps for a matrix.
    max_nnz : int or None, optional
        ``'gram'``: a step whose product would store more than this many
        entries (counted exactly beforehand by scipy's symbolic pass) is not
        taken; the iteration stops with a :class:`RuntimeWarning` and the
        (looser) bound reached so far.  Default ``2**24`` (200 to 270 MB of
        double-precision values and indices); ``None``: no limit.
    rng : int, numpy.random.Generator or None, optional
        Seed or generator of the starting vector (``'svds'``, ``'power'``).
        Default ``None``: the fixed seed 0, so results reproduce.

    Returns
    -------
    float
        The norm (``'svds'``), a lower bound (``'power'``) or an upper bound
        (``'gram'``).

    Raises
    ------
    ValueError
        Unknown ``method``; negative ``tol``, ``iterations`` or non-positive
        ``maxiter``/``max_nnz``; an operator that is not 2-D; a convolution
        operator whose weight has NaN or infinite entries, or a largest
        magnitude outside ``[2**-200, 2**200]`` (the power iteration and
        the certificates square the products: scale the weight by a power of
        two, which is exact, and the norm by the same factor).
    TypeError
        An unsupported ``op`` (or a matrix-free operator with ``'gram'``), or
        an argument of the wrong type.
    scipy.sparse.linalg.ArpackNoConvergence
        If ARPACK does not converge within ``maxiter``.

    Warns
    -----
    RuntimeWarning
        ``'power'`` reached ``maxiter`` before ``tol``; ``'gram'`` stopped
        early because of ``max_nnz``.

    See Also
    --------
    conv_singular_values : All singular values, exactly, for circular padding.

    Notes
    -----
    ``'power'`` iterates ``x <- G x / ||G x||`` with ``G = W^H W`` (or
    ``W W^H``, whichever is smaller) from a random unit ``x`` and returns
    ``sqrt(||G x||)``, which never exceeds ``sigma_max(W)``; it converges
    like ``(sigma_2 / sigma_1)^(2 k)``, slowly when the top singular values
    are close, as they often are for convolutions.

    ``'gram'`` on a convolution operator returns ``norm_bounds(op).upper``
    (the least of its circulant-embedding bounds, or a dense SVD's when the
    matrix is small): guaranteed, and for zero and circular padding within
    a percent of the norm in a fraction of the time of ``'svds'``.  With
    ``iterations`` given, or on a matrix:

    ``'gram'`` (Delattre, Barthelemy, Araujo & Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML
    2023) sets ``G_1 = W``, ``G_{j+1} = G_j^H G_j`` and uses
    ``sigma_max(W)^(2^t) = sigma_max(G_{t+1}) <= ||G_{t+1}||_F``, so

    ``sigma_max(W) <= ||G_{t+1}||_F^(1 / 2^t)``.

    To avoid overflow each ``G_j`` is divided by its Frobenius norm ``f_j``
    before squaring and the scale is carried in logarithms:
    ``log c_{j+1} = 2 (log c_j + log f_j)``, ``log c_1 = 0``, and the bound is
    ``exp((log c_{t+1} + log ||G~_{t+1}||_F) / 2^t)``.  The bound decreases
    with ``t`` towards ``sigma_max``; it exceeds it by at most a factor
    ``rank(W)^(1 / 2^(t+1))``.  Arithmetic is double precision.  The first
    step uses ``W W^H`` when it is smaller than ``W^H W`` (same non-zero
    spectrum).  On a sparse matrix each step about doubles the kernel's
    support (fill-in): the number of entries grows by up to ``2^N`` per step
    until the matrix is dense, hence ``max_nnz``.  A product fuller than
    1/4 continues in dense arithmetic.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.spectral import operator_norm
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 8, 8), padding=1)
    >>> exact = np.linalg.norm(op.matrix.toarray(), 2)
    >>> bool(np.isclose(operator_norm(op), exact))
    True
    >>> bool(np.isclose(operator_norm(op, method="power", maxiter=5000), exact, rtol=1e-3))
    True
    >>> bool(exact <= operator_norm(op, method="gram") <= 1.1 * exact)
    True
    """
    method = check_choice(method, tuple(_NORM_METHODS), "method")
    # Every argument is checked, whichever method uses it.
    if tol is not None:
        tol = check_tol(tol, "tol")
    if maxiter is not None:
        maxiter = check_positive_int(maxiter, "maxiter")
    if iterations is not None:
        iterations = check_non_negative_int(iterations, "iterations")
    if max_nnz is not None:
        max_nnz = check_positive_int(max_nnz, "max_nnz")
    settings = _NormSettings(tol, maxiter, iterations, max_nnz, generator(rng))
    return _NORM_METHODS[method](op, settings)


class _NormSettings(NamedTuple):
    """operator_norm's checked arguments, which each method reads as it needs."""

    tol: float | None
    maxiter: int | None
    iterations: int | None
    max_nnz: int | None
    gen: np.random.Generator


def _by_gram(op, settings: _NormSettings) -> float:
    if settings.iterations is None and isinstance(op, CONV_OPERATORS):
        with warnings.catch_warnings():  # the width of the interval is not asked for here
            warnings.simplefilter("ignore", RuntimeWarning)
            return norm_bounds(op, maxiter=1).upper
    _, matrix = _norm_operand(op, explicit=True)
    if matrix is None:
        raise TypeError(
            "method='gram' needs an explicit matrix (ConvOperator, ConvTransposeOperator, "
            f"scipy sparse matrix or ndarray), got a matrix-free {type(op).__name__}"
        )
    iterations = 6 if settings.iterations is None else settings.iterations
    return _norm_gram(matrix, iterations, settings.max_nnz)


def _by_svds(op, settings: _NormSettings) -> float:
    A, _ = _norm_operand(op)
    tol = 0.0 if settings.tol is None else settings.tol
    return _norm_svds(A, tol, settings.maxiter, settings.gen)


def _by_power(op, settings: _NormSettings) -> float:
    A, _ = _norm_operand(op)
    tol = settings.tol
    if tol is None:  # what the operator's precision can resolve
        tol = max(1e-8, 100 * float(np.finfo(work_dtype(A.dtype)).eps))
    maxiter = 1000 if settings.maxiter is None else settings.maxiter
    return _norm_power(A, tol, maxiter, settings.gen)


# operator_norm's methods by name (``method=``); the first is the default
_NORM_METHODS = {"svds": _by_svds, "power": _by_power, "gram": _by_gram}


# ---------------------------------------------------------------------------
# Certified bounds
# ---------------------------------------------------------------------------


def norm_bounds(op, *, rtol=1e-2, maxiter=None) -> NormBounds:
    """A certified interval ``lower <= ||W||_2 <= upper`` for a convolution's spectral norm.

    The Lipschitz constant of a layer, with a guarantee on both sides: the
    upper bound from the convolution's structure, the lower bound from its
    products, refined until ``upper / lower - 1 <= rtol`` (or ``maxiter``).

    Parameters
    ----------
    op : ConvOperator, ConvTransposeOperator or DistributedConvOperator
        Any geometry: N-d, stride, dilation, groups, the four padding modes,
        real or complex.  A transposed convolution has the norm of the
        forward convolution it transposes.
    rtol : float, optional
        The relative width ``upper / lower - 1`` to reach.  Default ``1e-2``.
    maxiter : int, optional
        The most products with ``W^H W`` spent on the lower bound.  Default
        200.

    Returns
    -------
    NormBounds
        A named tuple ``(lower, upper)`` of floats, with ``lower <= ||W||_2 <=
        upper`` for the matrix the operator stores (``NormBounds.gap`` is
        ``upper / lower - 1``).

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, or an argument has the wrong
        type.
    ValueError
        Negative ``rtol``, non-positive ``maxiter``; a weight with NaN or
        infinite entries, or whose largest magnitude is outside
        ``[2**-200, 2**200]`` (as for :func:`operator_norm`).

    Warns
    -----
    RuntimeWarning
        If the interval is still wider than ``rtol`` on return; it holds all
        the same.  With reflect or replicate padding past the border
        certificate's ``6e12`` operations (hundreds of channels on large
        grids) this is the rule, not the exception (see Notes).

    See Also
    --------
    operator_norm : An estimate (``'svds'``, ``'power'``) or an upper bound (``'gram'``).
    conv_singular_values : Every singular value, for circular padding.

    Notes
    -----
    *Upper bound.*  Write W as the strided correlation of the padded input:
    ``W = V P``, with ``P`` the padding map (input to padded input) and ``V``
    the convolution without padding.  On a grid ``N`` (per dimension a
    multiple of the stride, at least the padded size ``L + lo + hi``) the
    circular convolution ``C_N`` with the same taps contains ``V`` as a
    block of rows and columns (no tap wraps around), so

    ``||W|| <= ||C_N|| ||P||``.

    ``||C_N||`` is exact: the unitary DFT on the output grid, after a
    polyphase split of the input by the stride, block-diagonalises ``C_N``
    into one ``C_out/groups x (C_in/groups) prod(stride)`` block per group
    and frequency (Sedghi, Gupta & Long 2019), whose largest singular value
    an SVD gives.  ``P`` copies one input element into each padded
    position, so ``P^T P`` is the diagonal of the copy counts and
    ``||P|| = prod_d sqrt(max copies in dimension d)``: 1 with zero padding,
    where W itself is a block of ``C_N`` for any ``N >= L`` with
    ``N >= (O - 1) s + d (k - 1) - lo + 1`` (padded entries are zeros, so
    only the input's own columns must not alias).  Each such grid gives a
    bound; a few are tried, and the least kept.  With circular padding and
    a stride that divides the input, W is itself such a circulant and its
    norm is exact.  With reflect or replicate padding ``||P|| = sqrt(2)``
    or more per padded dimension: a guaranteed but loose bound, since the
    top singular vectors of these layers often sit at the border, where the
    padding duplicates input elements.

    *Inertia certificate.*  When the structural interval stays wider than
    ``rtol``, the upper bound is tested directly at ``t = (lower (1 + c
    rtol))^2``, with ``c = 0.1``, then 0.5 and 0.9 while it fails:
    ``||W||^2 <= t`` exactly when
    ``t I - G`` is positive semi-definite, ``G`` the smaller of ``W^H W``
    and ``W W^H`` (Sylvester's law of inertia).  A sparse LU factorisation of
    ``t I - G`` with a symmetric fill-reducing ordering and no pivoting
    (SuperLU) gives ``L U``; if every pivot ``d_i`` is positive,
    ``S = L D L^H`` is positive semi-definite and
    ``t I - G = S + L (U - D L^H) - E`` with the LU's backward error
    ``|E| <= gamma_n |L| |U|``, so ``||W||^2 <= t + ||L (U - D L^H)|| +
    gamma_n || |L| |U| ||`` plus the rounding of ``G``; those norms are
    bounded by ``sqrt(||B||_1 ||B||_inf)`` of non-negative matrices, from
    products with vectors.  It needs the explicit matrix, a Gram matrix of at
    most ``2**23`` stored entries, and in three or more dimensions at most
    4096 rows (the factorisation's cost grows with its separators).  If the
    interval is still open and the explicit matrix is small (``rows *
    columns <= 4e6``), a dense SVD closes it to rounding.

    *Band certificate.*  Zero padding where the banded factorisation costs
    at most ``3e12`` operations (small grids with many channels: the
    circulant bound loses 2-3% to the border there), and before the inertia
    certificate where it costs at most ``2e10`` (64 channels at 8x8: a
    fraction of a second against seconds for SuperLU).  Ordered
    by input position with the channels inside, ``G = W^H W`` is a band
    matrix (positions couple only when one output reads both), built from
    the products of two taps' channel blocks in double precision, and
    LAPACK's banded Cholesky ``?pbtrf`` factorises ``t I - G`` at ``t =
    (lower (1 + rtol / 2))^2``.  If it completes, ``L L^H = t I - G + E``
    with ``|E| <= gamma_(kd+1) |L| |L^H|``, so ``||W||^2 <= t +
    gamma_(kd+1) ||L||_F^2`` plus the roundings of ``G`` and of the shift.
    A ``Conv2d(512->512, 3x3)`` at 7x7 (ResNet-18's last stage): 0.5% in
    24-36 s, against 2.7% from the structure alone.

    *Border certificate.*  Reflect and replicate padding, ahead of the
    inertia certificate where it is cheap and past its limits otherwise.
    Split W's columns into a frame ``F`` near the borders (every input
    element from the border to the deepest one the padding copies, and at
    least 4 deep), the rest's positions ``N`` that share an output with the
    frame, and the others ``D``.  The rest's columns are those of zero
    padding, so ``G_RR <= u^2 I`` for ``R = N + D``, with ``u`` the
    circulant's norm, and ``G_FD = 0``; hence for ``t > u^2``

    ``t I - G >= [[t I - G_FF, -G_FN], [-G_NF, (t - u^2) I]]``,

    a band around the border (by Schur's complement on its diagonal block,
    the frame's ``t I - G_FF - G_FN G_NF / (t - u^2)``).  Its blocks are
    formed from the products of two taps' channel blocks, per dimension
    counting the outputs that read two positions by two taps (no explicit
    matrix: any size), and a tiled banded Cholesky factorisation in an
    envelope order (reverse Cuthill-McKee, or in 2-D the positions' angle
    around the centre, whichever costs less) tests it, holding only the
    tiles a step touches: if it completes, ``||W||^2 <= t +
    gamma_(m+1) ||L||_F^2`` plus the roundings of the blocks and the shift,
    ``m`` the band's width.  Where the whole ``t I - G`` costs at most
    ``3e10`` operations the frame is every position (no rest, no ``u``);
    where the frame fails within ``rtol`` the whole is tried up to ``6e12``.
    Tried at ``t = (max(lower, u) (1 + c))^2`` for ``c = rtol / 2``, then
    ``0.9 rtol``, then from ``max(rtol, 0.02)`` up to 0.25 until one holds
    and twice halfway back.  The top singular vectors of these layers sit at
    the border (an 8-channel reflect layer at 32x32 has norm 2.237 against
    2.016 with zero padding) and decay into the interior within a few
    pixels: ``Conv2d(64->64, 3x3)`` reflect or replicate at 64x64 comes to
    0.5% in 8 s, against 71-80% from the structure.

    *Lower bound.*  For any vector ``v``, ``||W v|| / ||v|| <= ||W||``.  The
    vector is the Ritz vector of restarted Lanczos iterations on ``W^H W``
    (the operator's own threaded products), started from the circulant's
    top singular vector cut to the input: a plane wave at the top block's
    frequency, which already attains ``||C_N||`` up to what the border
    loses.

    *Rounding.*  The FFT and the SVDs are backward stable: their error is
    at most a few ``log2(n) + block size`` units of roundoff times
    ``|| |W| ||``, the norm of W's absolute values, which the weight's
    magnitudes bound (a non-negative circulant's norm is its frequency-0
    block).  The upper bound is raised and the lower bound lowered by
    these amounts, and by ``gamma_m || |W| ||`` where the stored matrix
    sums ``m`` taps in its own precision (modes other than zeros), so that
    the interval holds for the matrix the operator stores; the lower
    bound's product is evaluated in double precision.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.spectral import norm_bounds
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((8, 4, 3, 3)) / 6, (4, 32, 32), padding=1)
    >>> lower, upper = norm_bounds(op)
    >>> from scipy.sparse.linalg import svds
    >>> estimate = svds(op.matrix, k=1, return_singular_vectors=False)[0]  # no guarantee
    >>> bool(lower <= estimate <= upper), bool(upper / lower - 1 <= 1e-2)
    (True, True)

    Circular padding is exact, strides included:

    >>> op = ConvOperator(rng.standard_normal((8, 4, 3, 3)), (4, 16, 16), stride=2,
    ...                   padding=1, padding_mode="circular")
    >>> bounds = norm_bounds(op)
    >>> bool(bounds.gap < 1e-9)
    True
    """
    rtol = check_tol(rtol, "rtol")
    maxiter = 200 if maxiter is None else check_positive_int(maxiter, "maxiter")
    structure = _bounds.structure_of(op)
    _check_weight(structure.weight, "op's weight")
    exact = _bounds.exact_interval(structure)
    if exact is not None:
        return exact
    if structure.abs_bound == 0.0:
        return NormBounds(0.0, 0.0)
    run = Interval(structure, rtol, maxiter)
    for step in _certificates.CERTIFICATES:  # read now: a registry line takes effect at once
        if step.applies(run):
            step.tighten(run)
    bounds = NormBounds(float(run.lower), float(run.upper))
    if bounds.gap > rtol:
        mode = structure.geometry.padding_mode
        if _bounds.inertia_applies(structure):
            certificate = "the inertia certificate did not close it"
        elif run.notes.get("border") is not None:
            certificate = ("the matrix is too large for the inertia certificate, and the "
                           "border certificate leaves this much")
        else:
            certificate = "the matrix is too large for the inertia and border certificates"
        if mode in ("reflect", "replicate"):
            why = (f"the upper bound of {mode!r} padding carries the padding map's norm "
                   f"{structure.padding_norm:.3g}, and {certificate}")
        elif run.spent < maxiter and not _bounds.inertia_applies(structure):
            # Lanczos stopped short of maxiter: its Rayleigh quotient had converged
            why = ("the circulant embedding's upper bound exceeds the norm by what the "
                   "borders lose (a few percent on grids of a few pixels), and the matrix is "
                   "too large for the inertia, dense SVD and band certificates")
        else:
            why = f"raise maxiter (spent {run.spent} of {maxiter})"
        warnings.warn(
            f"norm_bounds: the interval [{bounds.lower:.6g}, {bounds.upper:.6g}] is "
            f"{100 * bounds.gap:.3g}% wide, more than rtol={rtol:g}: {why}; it holds all the "
            "same",
            RuntimeWarning,
            stacklevel=2,
        )
    return bounds


def model_norm_bounds(model, input_shape, *, rtol=1e-2, maxiter=None) -> ModelNormBounds:
    """Certified norm intervals of every convolution a PyTorch model applies.

    Runs the model once to find its ``Conv1d/2d/3d`` and
    ``ConvTranspose1d/2d/3d`` layers in the order of the forward pass and
    the input each one receives, then bounds each layer's operator norm at
    that input with :func:`norm_bounds`.  Any architecture works: the sizes
    come from the forward pass, not from a list of known models.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is left as it was (see Notes).
    input_shape : sequence of int
        One sample's shape, without the batch axis, e.g. ``(3, 224, 224)``.
        The model runs once on zeros of shape ``(1, *input_shape)``.
    rtol : float, optional
        The relative width ``upper / lower - 1`` asked of each interval, as
        for :func:`norm_bounds`.  Default ``1e-2``.
    maxiter : int, optional
        As for :func:`norm_bounds`: the most products spent on each lower
        bound.  Default 200.

    Returns
    -------
    ModelNormBounds
        A sequence of :class:`LayerNormBounds`, one per application of a
        convolution in forward order (a layer applied twice gives two rows),
        each with ``name`` (as in ``model.named_modules()``),
        ``description``, ``geometry``, ``input_shape``, ``lower``, ``upper``,
        ``gap``, ``seconds``, ``certified`` (``gap <= rtol``) and ``reason``
        (why not); with ``upper_product`` (what it bounds: see
        :attr:`ModelNormBounds.upper_product`), the total ``seconds``, the
        ``uncertified`` rows and ``table()``.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    TypeError
        If ``model`` is not a ``torch.nn.Module``, ``input_shape`` is not a
        sequence of ints, or ``rtol``/``maxiter`` has the wrong type.
    ValueError
        Before any work: ``input_shape`` empty or with a size below 1, a
        negative ``rtol``, a non-positive ``maxiter``, a model with no
        convolution layer.  Then: the forward pass fails on ``input_shape``
        (the original exception is chained), it applies none of the
        convolution layers, or a layer cannot be bounded (e.g. a weight with
        NaN entries, a subclass whose forward does not apply its own
        settings); the message names the layer.

    See Also
    --------
    norm_bounds : One operator.
    sparse_tconv.from_torch : The operator of one layer.

    Notes
    -----
    Each layer's operator is built by :func:`~sparse_tconv.from_torch` in
    float64 (complex128 for a complex layer), with every setting of the
    layer: padding mode, stride, dilation, groups, and for a transposed
    layer the output size its forward produced (``output_size=`` passed to
    it included).  The bias is left out: the layer is the affine map
    ``x -> W x + b``, whose Lipschitz constant is ``||W||_2``, the same as
    without it.  Each interval holds for the layer at the input size of
    this run; the norm of a convolution depends on its input size.

    Only the convolution modules are bounded: a convolution called as a
    function (``torch.nn.functional.conv2d``), a subclass whose forward
    changes its weight (weight standardisation) and every other layer are
    not seen, or are bounded as their settings describe.

    The forward pass runs under ``torch.no_grad()`` on zeros of the dtype
    and device of the model's first parameter, in eval mode (batch
    normalisation uses its running statistics, dropout is off).  Afterwards
    every submodule's ``training`` flag is what it was and the hooks are
    removed, even when the pass fails; parameters and buffers are not
    changed (eval-mode batch normalisation does not update its statistics).

    An interval wider than ``rtol`` raises no warning: :func:`norm_bounds`'
    RuntimeWarning is caught and becomes the row's ``reason``, with
    ``certified=False``; the interval holds all the same.  ``seconds`` is
    the time of :func:`norm_bounds`; ``build_seconds`` that of building the
    operator.

    Examples
    --------
    >>> import math
    >>> import numpy as np
    >>> import torch
    >>> from sparse_tconv.spectral import model_norm_bounds
    >>> _ = torch.manual_seed(0)
    >>> nn = torch.nn
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
    ...     nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
    ...     nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"))
    >>> bounds = model_norm_bounds(model, (3, 16, 16))
    >>> [(row.name, row.input_shape) for row in bounds]
    [('0', (3, 16, 16)), ('2', (8, 16, 16)), ('5', (8, 4, 4))]
    >>> bounds[1].description
    'Conv2d(8->8, 3x3, stride 2, padding 1, circular) on 8x16x16'
    >>> all(row.certified for row in bounds), bool(bounds[1].gap < 1e-9)  # circular: exact
    (True, True)
    >>> bool(bounds.upper_product == math.prod(row.upper for row in bounds))
    True

    The intervals hold the norm of each layer's matrix (here by a dense SVD
    of the first):

    >>> from sparse_tconv import from_torch
    >>> op, bias = from_torch(model[0], (3, 16, 16), dtype=np.float64)
    >>> norm = np.linalg.norm(op.matrix.toarray(), 2)
    >>> bool(bounds[0].lower <= norm <= bounds[0].upper)
    True

    ``print(bounds.table())`` shows the rows, the times and the product
    (``sparse-tconv norms --model`` prints it for a saved model).
    """
    rtol = check_tol(rtol, "rtol")
    if maxiter is not None:
        check_positive_int(maxiter, "maxiter")
    with reuse_band_memory():  # one band buffer for every layer, not fresh memory each
        return _model_norms.bound_model(
            model, input_shape, rtol, lambda op: norm_bounds(op, rtol=rtol, maxiter=maxiter))


# ---------------------------------------------------------------------------
# Gram matrix, column norms, composition
# ---------------------------------------------------------------------------


def gram_matrix(op) -> sp.csr_array:
    """The Gram matrix ``W^H W`` as a canonical sparse matrix.

    The matrix of the normal equations ``W^H W x = W^H y``, explicit, for
    direct solvers, preconditioners or inspection.

    Parameters
    ----------
    op : ConvOperator, ConvTransposeOperator, sparse matrix or 2-D ndarray
        W: the operator's ``matrix`` (for a ConvTransposeOperator, the
        transposed convolution's matrix), or the matrix itself.

    Returns
    -------
    scipy.sparse.csr_array, shape (n, n)
        ``W^H W`` (``n = W.shape[1]``), Hermitian, in W's dtype; canonical
        CSR (sorted indices, no duplicates).

    Raises
    ------
    TypeError
        If ``op`` is not one of the accepted types (a matrix-free
        LinearOperator has no explicit Gram matrix).
    ValueError
        If ``op`` is not 2-D.

    See Also
    --------
    column_norms : The square roots of its diagonal, without forming it.
    compose : ``W^T W`` (no conjugation) and other products of two matrices.

    Notes
    -----
    ``G[j, l] = sum_i conj(W[i, j]) W[i, l]``, computed as the sparse product
    ``conj(W.T) @ W``, using a convolution operator's directly built
    ``transpose_matrix``.  For a convolution, ``G`` is the matrix of the
    transposed convolution applied after the convolution (with conjugated
    weights when complex): a convolution-like operator with a kernel of
    about twice the extent; entries whose sum cancels to exactly zero are not
    stored.  The product is scipy's (serial).

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.spectral import gram_matrix
    >>> op = ConvOperator(np.array([[[1.0, 2.0]]]), (1, 3))
    >>> op.matrix.toarray()
    array([[1., 2., 0.],
           [0., 1., 2.]])
    >>> gram_matrix(op).toarray()
    array([[1., 2., 0.],
           [2., 5., 2.],
           [0., 2., 4.]])
    """
    matrix, _ = _explicit_matrix(op, "op")
    matrix = _as_csr(matrix)
    return _canonical(_adjoint_csr(op, matrix) @ matrix)


def column_norms(op) -> np.ndarray:
    """The Euclidean norms of the columns of W, ``sqrt(diag(W^H W))``.

    The diagonal of the normal equations, for Jacobi preconditioning or
    column scaling of least-squares problems.

    Parameters
    ----------
    op : ConvOperator, ConvTransposeOperator, sparse matrix or 2-D ndarray
        W, as for :func:`gram_matrix`.

    Returns
    -------
    ndarray, shape (n,)
        ``norms[j] = sqrt(sum_i |W[i, j]|^2)``, in the real dtype of W's
        precision (float32 for float32/complex64, else float64); accumulated
        in double precision.

    Raises
    ------
    TypeError, ValueError
        As for :func:`gram_matrix`.

    See Also
    --------
    gram_matrix : The whole of ``W^H W``.

    Notes
    -----
    One pass over W's stored entries, without forming ``W^H W``.  For Jacobi
    preconditioning of the normal equations ``W^H W x = W^H y`` use
    ``M = diag(1 / norms**2)`` (e.g. ``cg(..., M=M)``), or solve the least
    squares problem for ``z`` on the column-scaled operator
    ``W diag(1 / norms)`` and set ``x = z / norms``; columns that are
    entirely zero have norm 0 and need a guard.  For a convolution with zero
    padding, columns near the border have smaller norms than interior ones.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.spectral import column_norms
    >>> op = ConvOperator(np.array([[[3.0, 4.0]]]), (1, 3))
    >>> column_norms(op)
    array([3., 5., 4.])
    """
    matrix, _ = _explicit_matrix(op, "op")
    if is_sparse(matrix):
        if not matrix.has_canonical_format:  # duplicates must be summed before squaring
            matrix = matrix.copy()
            matrix.sum_duplicates()
        data, dtype = matrix.data, matrix.dtype
        squares = (data.real.astype(np.float64) ** 2)
        if np.iscomplexobj(data):
            squares += data.imag.astype(np.float64) ** 2
        sums = np.bincount(matrix.indices, weights=squares, minlength=matrix.shape[1])
    else:
        dtype = matrix.dtype
        sums = np.sum(np.abs(matrix.astype(np.complex128 if np.iscomplexobj(matrix)
                                           else np.float64)) ** 2, axis=0)
    real = np.float32 if dtype in (np.float32, np.complex64) else np.float64
    return np.sqrt(sums).astype(real)


def compose(outer, inner) -> sp.csr_array:
    """The matrix of ``inner`` followed by ``outer``, ``outer.matrix @ inner.matrix``.

    Two stacked layers become one matrix; a convolution followed by its
    transpose is ``compose(op.T, op)``, which is ``W^T W``.

    Parameters
    ----------
    outer, inner : ConvOperator, ConvTransposeOperator, sparse matrix or 2-D ndarray
        The operators, applied ``inner`` first.

    Returns
    -------
    scipy.sparse.csr_array, shape (outer.shape[0], inner.shape[1])
        Canonical CSR (sorted indices, no duplicates), in the result dtype of
        the two matrices.

    Raises
    ------
    ValueError
        If ``inner``'s output size is not ``outer``'s input size
        (``inner.shape[0] != outer.shape[1]``), or, for two convolution
        operators, if ``inner.output_shape != outer.input_shape`` (pass
        ``.matrix`` to compose across a reshape); the message gives both
        shapes.  If either is not 2-D.
    TypeError
        If either is not one of the accepted types.

    See Also
    --------
    gram_matrix : ``W^H W`` (conjugated), for the normal equations.

    Notes
    -----
    ``C[i, j] = sum_l outer[i, l] inner[l, j]``, the sparse product (no
    conjugation), computed by scipy (serial); entries whose sum cancels to
    exactly zero are not stored.  ``C @ x == outer @ (inner @ x)``.  The
    product of two convolutions is itself a convolution-like operator whose
    receptive field is the composition of both (stride ``s_1 s_2``, kernel
    extent ``d_1 (k_1 - 1) + s_1 d_2 (k_2 - 1) + 1``, away from the border),
    so it stays sparse.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.spectral import compose
    >>> rng = np.random.default_rng(0)
    >>> first = ConvOperator(rng.standard_normal((4, 2, 3, 3)), (2, 8, 8), stride=2, padding=1)
    >>> second = ConvOperator(rng.standard_normal((3, 4, 3, 3)), first.output_shape, padding=1)
    >>> C = compose(second, first)
    >>> C.shape
    (48, 128)
    >>> x = rng.standard_normal(128)
    >>> np.allclose(C @ x, second.matvec(first.matvec(x)))
    True
    """
    a, a_shapes = _explicit_matrix(outer, "outer")
    b, b_shapes = _explicit_matrix(inner, "inner")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"cannot compose: inner's output size {b.shape[0]} (inner.shape={b.shape}) is not "
            f"outer's input size {a.shape[1]} (outer.shape={a.shape})"
        )
    if a_shapes is not None and b_shapes is not None and a_shapes[0] != b_shapes[1]:
        raise ValueError(
            f"cannot compose: inner.output_shape={b_shapes[1]} is not "
            f"outer.input_shape={a_shapes[0]} (same size, different layout; pass the "
            "operators' .matrix to compose across a reshape)"
        )
    return _canonical(_as_csr(a) @ _as_csr(b))
