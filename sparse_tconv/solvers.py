"""Deconvolution: Tikhonov solves and preconditioners that know the structure of W.

- :func:`normal_operator`: ``W^H W + damp^2 L^H L`` as a LinearOperator
  (``L = I`` by default).
- :func:`preconditioner`: an approximation of ``(W^H W + damp^2 I)^{-1}``
  (or with ``damp^2 D^H D``, ``D`` the gradient) built from the geometry and
  the kernel (FFT, DCT or block-Jacobi), for ``scipy.sparse.linalg.cg(..., M=...)``.
- :func:`tikhonov`: ``argmin ||W x - y||^2 + damp^2 ||L x||^2``, exactly by FFT
  for circular padding and ``L = I``, by preconditioned CG otherwise where a
  construction models ``W^H W`` (with a safeguard against a poor
  preconditioner), plain CG elsewhere, with the residual of the normal
  equations checked on return.
- :func:`gradient_operator`: ``D``, the forward differences of ``L='gradient'``.

Operators are :class:`~sparse_tconv.ConvOperator` and
:class:`~sparse_tconv.ConvTransposeOperator` (W is the operator's matrix),
any dimension, channels, groups, stride and dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from ._methods import METHODS, Method, Problem, Residual
from ._methods import auto as auto_method
from ._operator import CONV_OPERATORS
from ._preconditioning import Construction, auto, build_preconditioner, kinds, resolve
from ._validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_positive_tol,
    check_tol,
    check_vector,
    normalize_shape,
)

__all__ = ["gradient_operator", "normal_operator", "preconditioner", "tikhonov", "TikhonovInfo"]


class TikhonovInfo(NamedTuple):
    """What :func:`tikhonov` did, and how well."""

    method: str
    """``'fft'`` (the exact direct solve) or ``'cg'`` (preconditioned conjugate gradients)."""
    preconditioner: str
    """The preconditioner's kind; ``'none'`` for plain CG, ``'custom'`` for one passed in,
    ``'none (safeguard)'`` where ``M='auto'``'s choice lost its race with plain CG."""
    iterations: int
    """CG iterations (0 for a direct solve that met ``rtol`` at once), the safeguard's
    probes included."""
    residual: float
    """``||W^H (W x - y) + damp^2 L^H L x|| / ||W^H y||``, measured on the returned ``x``."""
    converged: bool
    """``residual <= rtol``; False only when the iterations stopped at ``maxiter``."""


# ---------------------------------------------------------------------------
# Products in double precision, complex vectors on real operators
# ---------------------------------------------------------------------------


def _check_damp(damp) -> float:
    """A damping whose square (what the normal equations add) is a finite float64."""
    damp = check_tol(damp, "damp")
    if not np.isfinite(damp * damp):
        raise ValueError(f"damp must be at most 1e154 (its square is added to W^H W and must "
                         f"be a finite float64), got damp={damp!r}")
    return damp


def _check_operator(op) -> None:
    if not isinstance(op, CONV_OPERATORS):
        raise TypeError(
            "op must be a ConvOperator or ConvTransposeOperator, got op of type "
            f"{type(op).__name__}"
        )


def _apply(product, real_operator: bool, v: np.ndarray) -> np.ndarray:
    """``product(v)``; a complex ``v`` on a real operator as its two real parts.

    The operators' threaded products take vectors of their own dtype; a
    complex vector would go to scipy's serial product.
    """
    if real_operator and np.iscomplexobj(v):
        return product(np.ascontiguousarray(v.real)) + 1j * product(np.ascontiguousarray(v.imag))
    return product(v)


class _NormalOperator(LinearOperator):
    """``W^H W + damp^2 L^H L``: one product with W and one with W^H per application
    (and one with L and L^H; ``L = I`` when None)."""

    def __init__(self, op, damp, L=None):  # unannotated, as LinearOperator's own (scipy-stubs)
        self.op = op
        self.damp = damp
        self.L = L
        self._real = not np.iscomplexobj(op.weight)
        n = op.shape[1]
        dtype = op.dtype if L is None else np.result_type(op.dtype, L.dtype)
        super().__init__(dtype=dtype, shape=(n, n))

    def _matvec(self, x):
        x = np.asarray(x).reshape(-1)
        y = _apply(self.op.rmatvec, self._real, _apply(self.op.matvec, self._real, x))
        if not self.damp:
            return y
        Lx = x if self.L is None else self.L.rmatvec(self.L.matvec(x))
        return y + (self.damp * self.damp) * Lx

    def _matmat(self, X):
        X = np.asarray(X)
        if self._real and np.iscomplexobj(X):
            return np.column_stack([self._matvec(column) for column in X.T])
        Y = self.op.rmatmat(self.op.matmat(X))
        if not self.damp:
            return Y
        LX = X if self.L is None else self.L.rmatmat(self.L.matmat(X))
        return Y + (self.damp * self.damp) * LX

    def _adjoint(self):
        return self  # Hermitian


def normal_operator(op, damp=0.0, *, L=None) -> LinearOperator:
    """The normal-equations operator ``W^H W + damp^2 L^H L`` of a convolution.

    Parameters
    ----------
    op : ConvOperator or ConvTransposeOperator
        W, the operator's matrix (for a ConvTransposeOperator, the
        transposed convolution's).
    damp : float, optional
        Tikhonov damping (default 0).
    L : None, 'gradient', LinearOperator, sparse matrix or ndarray, optional
        The regulariser, as in :func:`tikhonov` (default None: ``L = I``).

    Returns
    -------
    scipy.sparse.linalg.LinearOperator, shape (n, n)
        ``n = op.shape[1]``, in ``op.dtype``, Hermitian (``.H`` is itself).
        ``matvec`` is ``op.rmatvec(op.matvec(x)) + damp**2 * x``: two of the
        operator's threaded products, each reading its stored product form
        once (``matmat``: once for all the columns); with ``L``,
        ``damp**2 * L.rmatvec(L.matvec(x))`` in place of ``damp**2 * x``.
        ``op``, ``damp`` and ``L`` (a LinearOperator, or None) are its
        attributes.

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, ``damp`` not a real number,
        or ``L`` of another type.
    ValueError
        If ``damp`` is negative or not finite, ``L`` an unknown string or of
        the wrong shape.

    See Also
    --------
    tikhonov : Solves ``normal_operator(op, damp, L=L) x = op.rmatvec(y)``.
    gradient_operator : ``D`` of ``L='gradient'``.

    Notes
    -----
    ``(W^H W + damp^2 I) x = W^H y`` are the normal equations of
    ``min ||W x - y||^2 + damp^2 ||x||^2``; the operator is positive
    definite when ``damp > 0`` (or W has full column rank), so
    ``scipy.sparse.linalg.cg`` applies.  A complex vector with a real W is
    multiplied as its real and imaginary parts (the operators' threaded
    products take their own dtype).  The operator's own products build
    ``W^T``'s product form on first use, as ``rmatvec`` does.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.solvers import normal_operator
    >>> op = ConvOperator(np.array([[[1.0, 2.0]]]), (1, 3))
    >>> N = normal_operator(op, damp=1.0)
    >>> N @ np.eye(3)
    array([[2., 2., 0.],
           [2., 6., 2.],
           [0., 2., 5.]])
    >>> W = op.matrix.toarray()
    >>> np.allclose(N @ np.eye(3), W.T @ W + np.eye(3))
    True
    """
    _check_operator(op)
    damp = _check_damp(damp)
    return _NormalOperator(op, damp, _resolve_l(op, L)[0])


# ---------------------------------------------------------------------------
# Regularisers
# ---------------------------------------------------------------------------


class _Gradient(LinearOperator):
    """``D``: the forward differences along every spatial axis, per channel, stacked."""

    def __init__(self, input_shape):  # unannotated, as LinearOperator's own (scipy-stubs)
        self.input_shape = input_shape
        channels, size = input_shape[0], input_shape[1:]
        self._blocks = [(axis, channels * math.prod(size) // n * (n - 1))
                        for axis, n in enumerate(size)]
        rows = sum(count for _, count in self._blocks)
        super().__init__(dtype=np.dtype(np.float64), shape=(rows, math.prod(input_shape)))

    def _matvec(self, x):
        x = np.asarray(x).reshape(self.input_shape)
        return np.concatenate([np.diff(x, axis=1 + axis).reshape(-1)
                               for axis, _ in self._blocks])

    def _rmatvec(self, y):
        y = np.asarray(y).reshape(-1)
        out = np.zeros(self.input_shape, dtype=np.result_type(y.dtype, np.float64))
        start = 0
        for axis, count in self._blocks:
            shape = list(self.input_shape)
            shape[1 + axis] -= 1
            d = y[start:start + count].reshape(shape)
            start += count
            lower = [slice(None)] * len(shape)
            upper = [slice(None)] * len(shape)
            lower[1 + axis], upper[1 + axis] = slice(0, -1), slice(1, None)
            out[tuple(lower)] -= d  # (D^T d)[i] = d[i-1] - d[i]
            out[tuple(upper)] += d
        return out.reshape(-1)


def gradient_operator(input_shape) -> LinearOperator:
    """``D``, the forward differences of ``tikhonov(..., L='gradient')``, as a LinearOperator.

    Parameters
    ----------
    input_shape : sequence of int
        ``(C, L_1, ..., L_N)``: one sample (channels first), at least one
        spatial dimension; the operator's ``input_shape`` for a convolution.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator, shape (m, C * L_1 * ... * L_N)
        Real (float64), with ``m = sum_d C * (L_d - 1) * prod_{e != d} L_e``;
        ``matvec`` and ``rmatvec`` by numpy slicing (no matrix), ``.H`` and
        ``.T`` its transpose.  Attribute ``input_shape``.

    Raises
    ------
    TypeError
        If ``input_shape`` is not a sequence of ints.
    ValueError
        If a size is not positive, or there is no spatial dimension.

    See Also
    --------
    tikhonov, normal_operator

    Notes
    -----
    ``D x`` stacks, for each spatial dimension ``d`` in order, the
    differences of neighbours along ``d`` of every channel, with no
    boundary rows: along a line ``x[0], ..., x[n-1]`` of dimension ``d``,

    ``(D_d x)[i] = x[i+1] - x[i]``,  ``i = 0, ..., n - 2``,

    each block in C order on the shape ``(C, L_1, ..., L_d - 1, ..., L_N)``
    (empty where ``L_d = 1``).  ``D^T D = sum_d D_d^T D_d`` is the Laplacian
    with Neumann boundary conditions, per channel: along a line
    ``tridiag(-1, 2, -1)`` with ``1`` in the first and last diagonal
    entries, diagonalised by the DCT-II with the eigenvalues
    ``4 sin^2(pi k / (2 n))``, ``k = 0, ..., n - 1``.  Its null space is the
    constants of each channel, so ``W^H W + damp^2 D^T D`` is positive
    definite where W maps no channel's constant to zero.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv.solvers import gradient_operator
    >>> D = gradient_operator((1, 3))
    >>> D @ np.eye(3)
    array([[-1.,  1.,  0.],
           [ 0., -1.,  1.]])
    >>> D.T @ D @ np.eye(3)
    array([[ 1., -1.,  0.],
           [-1.,  2., -1.],
           [ 0., -1.,  1.]])
    >>> x = np.arange(6.0).reshape(1, 2, 3)  # rows differ by 3, columns by 1
    >>> gradient_operator((1, 2, 3)) @ x.ravel()
    array([3., 3., 3., 1., 1., 1., 1.])
    """
    shape = normalize_shape(input_shape, "input_shape")
    if len(shape) < 2:
        raise ValueError(
            "input_shape must be (C, L_1, ..., L_N) with at least one spatial dimension, "
            f"got input_shape={shape}"
        )
    return _Gradient(shape)


def _resolve_l(op, L: Any) -> tuple[LinearOperator | None, str]:
    """``(L as a LinearOperator or None, 'identity' | 'gradient' | 'operator')``."""
    if L is None:
        return None, "identity"
    if isinstance(L, str):
        check_choice(L, ("gradient",), "L")
        return _Gradient(tuple(op.input_shape)), "gradient"
    accepted = isinstance(L, (LinearOperator, np.ndarray)) or scipy.sparse.issparse(L)
    if not accepted:
        raise TypeError(
            "L must be None, 'gradient', a LinearOperator, a sparse matrix or a 2-D array, "
            f"got L of type {type(L).__name__}"
        )
    if isinstance(L, np.ndarray) and (L.ndim != 2 or L.dtype.kind not in "biufc"):
        raise ValueError(f"L must be a 2-D numeric array, got an array of shape {L.shape} "
                         f"and dtype {L.dtype}")
    shape = tuple(L.shape)
    if len(shape) != 2 or shape[1] != op.shape[1]:
        raise ValueError(
            f"L must have {op.shape[1]} columns (op.shape[1], the operator's input size), "
            f"got L.shape={shape}"
        )
    return aslinearoperator(L), "operator"


# ---------------------------------------------------------------------------
# Preconditioners
# ---------------------------------------------------------------------------


def _resolve_kind(op, kind: str, name: str = "kind",
                  regulariser: str = "identity") -> type[Construction]:
    """The construction ``kind`` names: one registered now, or 'auto''s choice."""
    return resolve(check_choice(kind, ("auto", *kinds()), name), op, regulariser)


def preconditioner(op, damp=0.0, kind="auto", *, shift=None, border=True,
                   L=None) -> LinearOperator:
    """An approximation of ``(W^H W + damp^2 I)^{-1}`` from the structure of W.

    Built from the geometry and the kernel, with no dense matrix: the
    ``M=`` of ``scipy.sparse.linalg.cg`` / ``minres`` on
    :func:`normal_operator`, and what :func:`tikhonov` uses.

    Parameters
    ----------
    op : ConvOperator or ConvTransposeOperator
        W.
    damp : float, optional
        The damping of the system to precondition (default 0).
    kind : str, optional
        The construction (see Notes): ``'auto'``, ``'circulant'``, ``'dct2'``,
        ``'dct1'``, ``'kronecker'``, ``'lines'``, ``'bordered'`` or
        ``'block_jacobi'`` (the registry's kinds).  ``'auto'`` (default): ``'circulant'``
        where W is circulant (exact); ``'kronecker'`` for a separable kernel
        with one input and one output channel, or a depthwise layer with a
        separable kernel in every channel (exact; every axis at most 4096
        long, and the axes' eigendecompositions, ``sum_a L_a^3``, at most 500
        times a product with W); ``'lines'`` for kernels whose nonzero
        taps lie on one line (a motion blur along a diagonal), one channel
        or a depthwise layer, stride 1 (exact in every padding mode; a band at most 64 steps wide,
        and the folded taps' columns about 512 MB at most); else,
        for a low-pass kernel (a blur: the
        Gram symbol's largest eigenvalue at frequency 0 is within 10% of the
        top) whose Gram kernel is even along every axis (within 25%, see
        Notes) and whose Gram matrix is Toeplitz (stride 1, or any transposed
        convolution), ``'dct1'`` for reflect padding and ``'dct2'`` for the
        other modes; else, for a convolution of stride 1 (channel mixing, an
        asymmetric kernel), ``'bordered'`` where W's CSR would take at most
        64 MB; else ``'circulant'`` (shifted) when the strides divide the
        input size, else ``'dct2'`` or ``'block_jacobi'``.
    shift : float, optional
        Damp the preconditioner more than the system: its blocks are
        inverted with ``damp**2 + shift * lambda_max`` in place of
        ``damp**2`` (``lambda_max`` the largest eigenvalue of its model of
        ``W^H W``).  Default ``None``: ``1e-3`` for ``'dct2'``, ``0.1`` for
        ``'circulant'`` where W is not circulant, ``0.01`` for the circulant
        inside ``'bordered'``, 0 otherwise (see Notes).
    border : bool, optional
        Apply the border correction ``S`` of the construction (see Notes).
        Default True; False gives the plain transform model, as in the
        literature (for comparison).
    L : {None, 'gradient'}, optional
        ``'gradient'``: approximate ``(W^H W + damp^2 D^H D)^{-1}`` instead,
        ``D`` the forward differences of :func:`gradient_operator` (see
        Notes); ``'auto'`` then walks the same order among the kinds that
        model it: ``'lines'``, ``'circulant'`` (stride 1 or transposed),
        ``'dct2'`` (also for reflect padding), ``'block_jacobi'``.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator, shape (n, n)
        Hermitian positive definite (``.H`` is itself), ``n = op.shape[1]``;
        its products run in double precision (float64, or complex128 for a
        complex W or vector) and return that dtype.  Attributes ``kind``
        (the construction, resolved) and ``damp``.

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, or an argument has the wrong type.
    ValueError
        Unknown ``kind``; negative or non-finite ``damp`` or ``shift``.
    NotImplementedError
        If ``kind`` does not model ``L='gradient'`` (``'dct1'``,
        ``'kronecker'``), or does not apply to the geometry:
        ``'dct1'``/``'dct2'`` on a strided ConvOperator (whose Gram matrix
        is not Toeplitz);
        ``'circulant'`` when a stride does not divide the input size or a
        dilated kernel is wider than the input; ``'kronecker'`` with several
        channels per group, or eigenvectors over 512 MiB (``16 C
        sum(L_a**2)`` bytes); ``'lines'`` on a kernel off one line, several
        channels, a stride or a transposed convolution, or folded taps'
        columns of about 1 GiB; ``'bordered'`` on a stride or a transposed
        convolution, no circulant of the kernel, or W's CSR over 256 MiB.

    See Also
    --------
    tikhonov, normal_operator
    sparse_tconv.spectral.column_norms : The diagonal (Jacobi) alone.

    Notes
    -----
    Each construction but ``'lines'`` is ``S T^{-1} diag(K_f) T S``: a
    transform ``T``, one small Hermitian block ``K_f = (H_f + damp^2
    I)^{-1}`` per frequency or
    position ``f``, and a diagonal border correction ``S`` (or none).  The
    blocks are ``m x m``, ``m`` the channels per group of the operator's
    input (times ``prod(stride)`` for ``'circulant'`` on a strided
    convolution): elementwise for one channel.  The Gram matrix lives on the
    operator's input: ``W^H W`` on ``(C_in, L)`` for a convolution,
    ``V V^H`` on ``(C_out, O)`` for a transposed convolution ``W^T = V^H``
    (``V`` the convolution with conjugated weights), Toeplitz there for any
    stride.  Its interior is the Toeplitz matrix of the kernel

    ``G[c, c'](t) = sum_o sum_u conj(w[o, c, u]) w[o, c', u + t / d]``

    (the kernel's autocorrelation); the padding mode only changes the rows
    near the border, and that is what each construction models.

    * ``'circulant'`` (T: polyphase split by the stride, then the DFT):
      ``H_f = B(f)^H B(f)`` with ``B(f)`` the per-frequency blocks of the
      circular convolution with the same kernel (those of
      :func:`~sparse_tconv.spectral.conv_singular_values`).  **Exact** for
      circular padding with a circulant geometry (output size ``L / s``),
      where ``W^H W = T^{-1} diag(H_f) T`` and the preconditioner is the
      inverse: CG converges in one iteration.  Otherwise the Strang-type
      circulant of the kernel, with ``S`` matching its diagonal to
      ``diag(W^H W)`` (below); it couples opposite borders, which zero,
      reflect and replicate padding do not.
    * ``'dct2'`` (T: orthonormal DCT-II of every axis the kernel reaches
      along): ``H_f = sum_t G(t) prod_a cos(pi f_a t_a / L_a)``, the
      symbol of the half-sample symmetric (Neumann) extension, positive
      semi-definite (it is the mean of ``B^H B`` over the ``2^N``
      reflections ``(+-theta_1, ..., +-theta_N)``, ``theta_a = pi f_a / L_a``).
      Exact, without ``S``, for kernels symmetric along every axis with
      symmetric (numpy ``'symmetric'``) padding.  For zeros and replicate
      padding it keeps the borders apart; ``S = sqrt((diag(M) + damp^2) /
      (diag(W^H W) + damp^2))`` (``M`` the DCT model) then gives every unknown
      the true diagonal: the border columns of W are lighter (zeros) or
      heavier (replicate) than the model's.  Being a mean over reflections,
      the symbol is the true one only where ``G`` is even along every axis
      alone; ``'auto'`` asks ``max_a ||G - R_a G|| / ||G|| <= 0.25`` (``R_a``
      the reversal of lag axis a).  Symmetric blurs, and any real
      single-channel 1-D or separable kernel, give 0; an L-shaped 5x5 0.52,
      a 7x7 anti-diagonal motion 1.26 (its model smears the blur over both
      diagonals), random 3 -> 3 and 4 -> 4 layers 0.75-0.77: on each the
      DCT lost to plain CG in time.
    * ``'dct1'`` (T: orthonormal DCT-I): ``H_f = sum_t G(t) prod_a cos(pi
      f_a t_a / (L_a - 1))``, the whole-sample symmetric extension, which is
      PyTorch's ``'reflect'``.  For an axis-symmetric kernel with reflect
      padding on both sides, ``W = D^{-1} S_0 D`` with ``S_0`` symmetric and
      diagonalised by the DCT-I and ``D = diag(1/sqrt(2), 1, ..., 1,
      1/sqrt(2))`` per axis, so ``W^H W + damp^2 I = D (S_0 (I + E) S_0 +
      damp^2 (I + E)) D`` with ``I + E = D^{-2}`` between ``I`` and
      ``2^N I``; with ``S = D^{-1}`` the preconditioned matrix has all its
      eigenvalues in ``[1, 2^N]`` whatever the damping: a handful of
      iterations.
    * ``'kronecker'`` (T: a dense eigenbasis per axis): the kernel's best
      rank-one approximation ``sigma u_1 (x) ... (x) u_N`` (exact for a
      separable kernel: Gaussian, box, motion along an axis) makes W the
      Kronecker product ``sigma A_1 (x) ... (x) A_N`` of one-dimensional
      convolutions with the operator's own stride, dilation, padding and
      padding mode (the modes act axis by axis), so ``W^H W = |sigma|^2
      (A_1^H A_1) (x) ... (x) (A_N^H A_N)`` and ``H_f = |sigma|^2 prod_a
      lambda_a(f_a)`` with ``A_a^H A_a = U_a diag(lambda_a) U_a^H``
      (Hansen, Nagy & O'Leary, *Deblurring Images*, ch. 4).  **Exact** for
      separable kernels in every padding mode and stride: CG converges in one
      iteration.  A depthwise layer (each group one channel in and one out)
      is one such convolution per channel, with eigenbases of its own:
      exact where every channel's kernel is separable.  Otherwise the
      nearest Kronecker product (Kamm & Nagy).
      Set-up: one ``L_a x L_a`` eigendecomposition per axis; each
      application ``4 n sum_a L_a`` flops (dense, BLAS).
    * ``'lines'`` (no transform: a banded Cholesky factor).  A kernel whose
      nonzero taps lie on one line ``t_0 + j v`` reads, for each output,
      inputs on one line ``p + Z u`` (``u = d v``, the dilation per axis);
      with zero padding two inputs share an output only on the same line,
      so ``W^H W`` is block diagonal over the lines, each block banded
      with ``G_k(p) = sum_j conj(w_j) w_{j+k} [p + lo - d t_j is an
      output]`` between ``p`` and ``p + k u``.  Ordered line by line,
      ``W^H W + damp^2 I`` is one band of width ``b`` (the taps' span
      along the line, 6 for a 7x7 anti-diagonal) whose Cholesky factor is
      **exact**: set-up ``O(n b^2)``, each application ``4 n b`` flops.
      Other padding modes fold taps onto a *ring* of positions (the edge,
      the rows inside it, the opposite side), which are eliminated last:
      ``C = L^{-1} A_IR`` (``L`` the lines' factor without the ring; each
      line meets the ring near its ends) and the Schur complement ``A_RR -
      C^H C``, banded in reverse Cuthill-McKee order, make it **exact** in
      every mode.  With ``L='gradient'`` it adds the part of ``damp^2 D^H
      D`` within the lines (its diagonal, and the differences along an
      axis-aligned line).
    * ``'bordered'``: the circulant (shift ``0.01``, no border scaling) and
      the exact block of ``A = W^H W + damp^2 I`` on the *ring* ``S`` of
      positions within ``d (k - 1)`` of an edge (its rows ``W[:, S]^H W``
      from W's CSR; a banded Cholesky factor in reverse Cuthill-McKee
      order), combined as symmetric multiplicative Schwarz: ``I - M A =
      (I - B_S A)(I - C A)(I - B_S A)``, ``B_S`` the ring's solve.  Each
      application costs the circulant's and two banded solves and two sparse
      products with the ring's rows; where the ring is the whole input it
      is the inverse.  Any kernel, channels and padding mode, stride 1, not
      transposed.
    * ``'block_jacobi'`` (no transform): ``H_f`` is the ``m x m`` diagonal
      block of ``W^H W`` at position ``f``, computed from the matrix (for
      one channel the squared column norms: Jacobi).  Any geometry; it only
      corrects the scaling of the unknowns.

    *The shift.*  An inexact model is wrong on the unknowns near the border
    by about the kernel's energy, and its blocks divide that error by
    ``damp^2`` where the symbol is small: outlying eigenvalues, as many as
    there are such unknowns.  Damping the blocks by ``shift * lambda_max``
    bounds them, at the price of a slower start on the interior's smallest
    eigenvalues.  Measured (``sparse_tconv.tools.solve_bench``): ``1e-3``
    for ``'dct2'`` on blurs at damp ``1e-2`` and ``1e-3`` (a 9x9 disk blur
    with zero padding at damp ``1e-3``: 720 iterations with no shift, 90 with
    it, 689 for plain CG); ``0.1`` for the circulant of a kernel on a grid
    where W is not circulant, whose model errs more (it joins opposite
    borders; a random 4 -> 4 channel 3x3 layer at damp ``1e-3``: over 612
    iterations with no shift, 233 with it, 612 for plain CG).  The exact
    constructions and ``'dct1'`` (whose bound holds for any damping) are
    not shifted.

    *The gradient* (``L='gradient'``).  ``D^H D`` is the Neumann Laplacian,
    which the orthonormal DCT-II diagonalises with the eigenvalues
    ``lambda_f = sum_a 4 sin^2(pi f_a / (2 L_a))`` on every channel: the
    ``'dct2'`` blocks become ``(H_f + damp^2 lambda_f I + shift)^{-1}``,
    exact in the regulariser (every axis of length over 1 is then
    transformed), with the border correction matching
    ``diag(W^H W) + damp^2 diag(D^H D)``.  The ``'circulant'`` blocks add
    the periodic Laplacian's ``damp^2 sum_a 4 sin^2(pi f_a / L_a)``, which
    exceeds ``D^H D`` by one wrap-around term per line, so it is never exact,
    even for circular padding (with the diagonal matching as the
    correction); it needs the DFT on the Gram side's own grid (stride 1, or a
    transposed convolution).  ``'block_jacobi'`` adds ``damp^2 diag(D^H D)``
    (1 or 2 per axis) to its blocks' diagonals.  ``'dct1'`` and
    ``'kronecker'`` do not model it.

    Eigenvalues of ``H_f + damp^2 I`` below ``1e-10`` times the largest are
    raised to it, so that the preconditioner stays positive definite with
    ``damp=0``.  The set-up is a few FFTs or DCTs of a kernel-sized array
    (``'block_jacobi'``: a pass over ``W^T``); each application two
    transforms of the vector and one pass over the blocks.

    Examples
    --------
    A 9x9 Gaussian blur with zero padding is separable: its Kronecker
    construction is the exact inverse, and CG converges in one iteration.  A
    defocus (disk) blur is not: the DCT-II cuts the iterations of plain CG
    several times:

    >>> import numpy as np
    >>> from scipy.sparse.linalg import cg
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.solvers import normal_operator, preconditioner
    >>> t = np.arange(9) - 4
    >>> gaussian = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / 8.0)
    >>> disk = (t[:, None] ** 2 + t[None, :] ** 2 <= 16).astype(float)
    >>> for kernel in (gaussian, disk):
    ...     op = ConvOperator(kernel[None, None] / kernel.sum(), (1, 64, 64), padding="same")
    ...     y = op @ np.random.default_rng(0).random(64 * 64)
    ...     N, b, M = normal_operator(op, 1e-2), op.rmatvec(y), preconditioner(op, 1e-2)
    ...     counts = []
    ...     for pre in (None, M):
    ...         steps = []
    ...         x, info = cg(N, b, rtol=1e-6, M=pre, callback=steps.append)
    ...         counts.append(len(steps))
    ...     print(M.kind, counts[1] <= 40, counts[0] > 4 * counts[1])
    kronecker True True
    dct2 True True
    """
    _check_operator(op)
    damp = _check_damp(damp)
    boost = None if shift is None else check_tol(shift, "shift")
    border = check_bool(border, "border")
    regulariser = "identity" if L is None else check_choice(L, ("gradient",), "L")
    return build_preconditioner(op, damp, _resolve_kind(op, kind, "kind", regulariser).name,
                                boost=boost, correct=border, regulariser=regulariser)


# ---------------------------------------------------------------------------
# Tikhonov
# ---------------------------------------------------------------------------


def _double(op):
    """``op`` in double precision (a float32/complex64 operator's values widened).

    The solve then runs in double precision on the operator's threaded
    products; the copy shares the index arrays (:meth:`with_weight`).
    """
    if op.dtype in (np.float64, np.complex128):
        return op
    wide = np.complex128 if np.iscomplexobj(op.weight) else np.float64
    return op.with_weight(op.weight, dtype=wide)


# tikhonov's M='auto' runs plain CG where the preconditioner's channel blocks
# (one C x C complex block per position and group) would take more than this:
# a 64->64 layer at 512^2 would need 17 GB of them.
_PRECONDITIONER_BYTES = 1 << 29


def _blocks_nbytes(op) -> int:
    """The bytes of a spectral preconditioner's blocks for ``op``: complex ``m x m`` per
    position of the input and group, ``m`` the input channels per group."""
    groups = op.convolution.geometry.groups
    m = op.input_shape[0] // groups
    return groups * math.prod(op.input_shape[1:]) * m * m * 16


def _plain_iterations(op, damp: float, rtol: float) -> float:
    """About how many iterations plain CG takes: half its bound ``sqrt(kappa) / 2
    ln(2 / rtol)``, ``kappa = 1 + ||W||^2 / damp^2``; infinite with no damping.

    ``||W||`` is bounded by the Schur test, ``sqrt(r c)`` with ``r`` the largest
    sum of ``|w|`` over an output channel's taps and inputs and ``c`` over an input
    channel's taps and outputs (the sum of a channel's ``|w|`` where each group maps
    one channel to one).  Measured on the 7x7 anti-diagonal at 256x256 (sum 1): 40,
    100 and 300 iterations at damp 1e-1, 3e-2 and 5e-3, where the bound is 73, 240
    and 1,450 (the data's smoothness helps CG most where the damping is small); on
    random 3 -> 3 layers with unit rows (solve_bench's ``mix3``), 151-175 at 1e-2 and
    443 at 1e-3 where it is 363 and 3,600.
    """
    if damp == 0.0:
        return math.inf
    geom = op.convolution.geometry
    g = geom.groups
    taps = np.abs(op.weight).reshape(*op.weight.shape[:2], -1).sum(axis=2)  # (out, in / g)
    rows = float(taps.sum(axis=1).max(initial=0.0))
    columns = float(taps.reshape(g, -1, taps.shape[1]).sum(axis=1).max(initial=0.0))
    norm = math.sqrt(rows * columns)
    return 0.25 * math.sqrt(1.0 + (norm / damp) ** 2) * math.log(2.0 / rtol)


def _tikhonov_kind(op, regulariser: str = "identity", damp: float = 0.0,
                   rtol: float = 1e-6) -> str:
    """tikhonov's ``M='auto'``: :func:`preconditioner`'s choice where it models ``W^H W``
    (``Construction.models``), but plain CG on a wide W, where the preconditioner's
    blocks would take more than 512 MB, or where its set-up is expected to cost more
    than plain CG's whole solve (``Construction.set_up_cost`` against
    :func:`_plain_iterations`: the lines construction's ring at damp 1e-1 took 94 ms
    where plain CG took 67).

    A wide W (more unknowns than equations: a strided convolution) gives the
    damped normal matrix ``n - rank(W)`` eigenvalues at ``damp**2``, one
    cluster that plain CG resolves in a single step and that any inexact
    preconditioner spreads.  A general ``L`` (``regulariser='operator'``)
    has no structured preconditioner: plain CG.
    """
    if regulariser == "operator":
        return "none"
    # Measured on a 4-channel stride-2 layer (a problem solve_bench does not hold):
    # 27 iterations plain, 250-1900 with the circulant or block-Jacobi.
    if _blocks_nbytes(op) > _PRECONDITIONER_BYTES:
        return "none"
    chosen = auto(op, regulariser)
    if not chosen.models(op):
        # The registry's choices for the other kernels (strided or transposed ones, where
        # 'bordered' does not apply) lost to plain CG in time on every problem measured
        # (2 threads, damp 5e-3 to 1e-2): the shifted circulant on random 3 -> 3 to
        # 32 -> 32 layers at 32x32 to 96x96, 0.4-0.9x (1.2-2x fewer iterations, each twice
        # the cost), on asymmetric single-channel blurs 0.74-1.5x; block-Jacobi 0.88-1.23
        # times plain CG's iterations (a convolution's diagonal is nearly constant).
        return "none"
    if chosen.set_up_cost(op) > _plain_iterations(op, damp, rtol):
        return "none"
    exact = regulariser == "identity" and chosen.exact(op)
    return chosen.name if exact or op.shape[0] >= op.shape[1] else "none"


def _resolve_m(op, M, damp: float, regulariser: str = "identity", rtol: float = 1e-6):
    """``(LinearOperator or None, name)`` for tikhonov's ``M`` argument."""
    if isinstance(M, str) and M == "auto":
        M = _tikhonov_kind(op, regulariser, damp, rtol)
    if M is None or (isinstance(M, str) and M == "none"):
        return None, "none"
    if isinstance(M, str):
        kind = _resolve_kind(op, M, "M", regulariser).name
        if regulariser == "operator":
            raise NotImplementedError(
                f"M={M!r}: the preconditioner kinds model L=None or L='gradient' only; with "
                "another L pass M='auto' (plain CG), 'none', None or a LinearOperator"
            )
        return build_preconditioner(op, damp, kind, regulariser=regulariser), kind
    if isinstance(M, LinearOperator):
        if M.shape != (op.shape[1],) * 2:
            raise ValueError(
                f"M must have shape {(op.shape[1],) * 2} (the operator's input size), "
                f"got M.shape={M.shape}"
            )
        return M, "custom"
    raise TypeError(
        f"M must be a preconditioner kind {('auto', *kinds())}, 'none', None or a "
        f"LinearOperator, got M of type {type(M).__name__}"
    )


def _as_sample(value, name: str, flat: int, shape: tuple[int, ...]):
    """``(flat array, was shaped)`` for a vector given flat or as one sample."""
    arr = check_vector(value, name)
    if arr.shape == (flat,):
        return arr, False
    if arr.shape == shape:
        return arr.reshape(-1), True
    raise ValueError(
        f"{name} must have shape ({flat},) or {shape} (one sample), got {name}.shape={arr.shape}"
    )


def tikhonov(op, y, damp, *, L=None, rtol=1e-6, maxiter=None, x0=None, callback=None,
             M="auto", method="auto"):
    """The Tikhonov solution ``argmin ||W x - y||^2 + damp^2 ||L x||^2``, fast.

    For circular padding (a circulant W: output size ``L / stride``, any
    channels, groups and stride) and ``L = I`` an exact direct solve by FFT
    with one small SVD per frequency, no iterations; otherwise conjugate
    gradients on the normal equations with the structured
    :func:`preconditioner`, raced against plain CG for up to 20 iterations (the
    safeguard, see Notes).  Either way the residual of the normal equations
    is measured on return.

    Parameters
    ----------
    op : ConvOperator or ConvTransposeOperator
        W.
    y : array_like, shape (op.shape[0],) or op.output_shape
        The data.  Not modified.
    damp : float
        The Tikhonov damping (``>= 0``; 0 gives a least-squares solution,
        the minimum-norm one by FFT).
    L : None, 'gradient', LinearOperator, sparse matrix or ndarray, optional
        The regularisation operator.  None (default): the identity.
        ``'gradient'``: ``D``, the forward differences along every spatial
        dimension of the operator's input, per channel, without boundary
        rows (``(D x)[i] = x[i+1] - x[i]`` along each line,
        :func:`gradient_operator`), so that ``D^H D`` is the Neumann
        Laplacian.  Any other ``L`` with ``op.shape[1]`` columns (a
        ``LinearOperator``, or a matrix through
        ``scipy.sparse.linalg.aslinearoperator``), used through its
        ``matvec`` and ``rmatvec``.
    rtol : float, optional
        Relative tolerance on the residual of the normal equations (see
        Returns), default ``1e-6``.  Must be positive.
    maxiter : int, optional
        Most CG iterations (default ``10 * n``, as scipy's ``cg``); 0 allowed.
    x0 : array_like, optional
        Starting point of the iterations (default zeros), flat or shaped as
        ``op.input_shape``; not used by a direct solve that meets ``rtol``.
    callback : callable, optional
        Called as ``callback(xk)`` after each CG iteration (flat ``xk``).
    M : str, LinearOperator or None, optional
        The preconditioner of CG: a ``kind`` of :func:`preconditioner`,
        ``'none'`` or ``None`` for plain CG, or a LinearOperator of shape
        ``(n, n)``.  Default ``'auto'``: :func:`preconditioner`'s
        ``kind='auto'`` (with ``L``: for ``'gradient'``, among the kinds
        that model it; plain CG for any other ``L``), except plain CG on a
        wide W (more unknowns than equations) that no exact construction
        covers (see Notes), where that choice does not model ``W^H W``
        (the shifted circulant and block-Jacobi of kernels that are not even
        blurs: see Notes), where the preconditioner's channel blocks would take more than
        512 MB (``C x C`` complex per position: a 64-channel input of
        512x512), and where its set-up is expected to cost more than plain
        CG's solve (a factorisation at a large ``damp``: plain CG then takes
        few iterations); guarded by the safeguard (Notes).  A
        kind by name, or a LinearOperator, is used as given.
    method : {'auto', 'fft', 'cg'}, optional
        ``'auto'`` (default): ``'fft'`` where W is circulant and ``L`` is
        None, else ``'cg'``.
        The exact solve ignores ``M`` (should rounding leave its residual
        above ``rtol``, CG refines it with the exact circulant preconditioner).

    Returns
    -------
    x : ndarray
        The solution, shaped as ``op.input_shape`` when ``y`` was given as
        one sample, else flat; float64, or complex128 when W, ``y`` or
        ``x0`` is complex (a single-precision operator is solved in double
        precision, see Notes).
    info : TikhonovInfo
        ``method``, ``preconditioner`` (``'none (safeguard)'`` where the
        safeguard switched to plain CG), ``iterations`` (the safeguard's
        probes included), ``residual`` (the relative residual
        ``||W^H (W x - y) + damp^2 L^H L x|| / ||W^H y||`` of the returned
        ``x``, measured with the operators' products) and ``converged``
        (``residual <= rtol``; False only if CG stopped at ``maxiter``, or
        broke down on non-finite values).

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, ``y`` or ``x0`` not
        numeric, ``callback`` not callable, ``M`` or ``L`` of the wrong type.
    ValueError
        Wrong shapes of ``y``, ``x0``, ``M`` or ``L``; non-finite values in
        ``y`` or ``x0``; negative ``damp``, non-positive ``rtol``, negative
        ``maxiter``, unknown ``M`` kind, ``method`` or ``L`` string.
    NotImplementedError
        ``method='fft'`` on a W that is not circulant or with an ``L``, or
        an ``M`` kind that does not apply (see :func:`preconditioner`; with
        ``L='gradient'`` only ``'circulant'``, ``'dct2'`` and
        ``'block_jacobi'``, with another ``L`` none).

    See Also
    --------
    preconditioner, normal_operator, gradient_operator
    scipy.sparse.linalg.lsqr : Tikhonov by Golub-Kahan, with ``damp=``.

    Notes
    -----
    *Exact solve.*  With the polyphase split and the DFT on both sides
    (:func:`~sparse_tconv.spectral.conv_singular_values`), a circulant W is
    ``F_out^{-1} diag(B_f) F_in``, so the solution is, frequency by
    frequency, ``x_f = V_f diag(s / (s^2 + damp^2)) U_f^H y_f`` with
    ``B_f = U_f diag(s) V_f^H`` (the Tikhonov filter factors; with
    ``damp = 0``, singular values below ``eps * max(W.shape)`` times the
    largest are dropped: the minimum-norm least-squares solution).  Cost:
    two FFTs of the data and one SVD of a ``C_out/g x (C_in/g) prod(s)``
    block per group and frequency.  If rounding leaves the residual above
    ``rtol`` (a nearly singular W with ``damp = 0``), CG continues from it
    with the exact preconditioner.

    *Iterative solve.*  ``scipy.sparse.linalg.cg`` on
    ``(W^H W + damp^2 L^H L) x = W^H y`` with ``M``; CG's own stopping test uses
    a recursively updated residual, so on exit the true residual is
    measured and CG restarts from ``x`` while it exceeds ``rtol`` (the
    iterations of every restart count towards ``maxiter``).  Each iteration
    costs one product with W and one with ``W^H`` (the operator's threads),
    one application of the preconditioner and a few vector operations
    (and one product with ``L`` and one with ``L^H``; ``L='gradient'``
    costs a few passes over the vector).

    *General Tikhonov.*  With ``L`` the problem is
    ``min ||W x - y||^2 + damp^2 ||L x||^2`` and its normal equations
    ``(W^H W + damp^2 L^H L) x = W^H y``: positive definite where W and L
    have no common null vector (for ``'gradient'``, whose null space is the
    constants of each channel, where W maps no channel's constant to zero,
    as a blur does).  The exact FFT solve does not extend to it: ``D^H D``
    is the Neumann Laplacian, diagonalised by the DCT-II, not by the DFT.
    With ``'gradient'``, ``'auto'`` picks ``'circulant'`` for circular
    padding (W exact, the Laplacian by its periodic version: an
    approximation), ``'dct2'`` for blurs with any other padding
    (``D^H D`` exact in its basis), plain CG for other kernels (see *Which
    preconditioner*) and for any other ``L``.

    *The safeguard.*  Where ``M='auto'`` chose a preconditioner, CG runs
    with it and plain CG runs from the same start, in rounds of 10 and 20
    iterations each (``sparse_tconv._methods.safeguard``), and the run
    ahead continues from its own state: after 10 iterations a residual at
    most 0.2 times the other's decides, after 20 the preconditioner goes on
    where its residual is at most 1.3 times plain CG's.  The comparison is
    per iteration (the same choice on every run and machine); the cost is
    the losing run's 10 or 20 iterations, nothing where the preconditioner
    meets ``rtol`` within its first round (the exact ones).

    *Which preconditioner.*  A separable single-channel kernel makes W a
    Kronecker product of one-dimensional convolutions, whatever the padding
    mode: the ``'kronecker'`` construction is its exact inverse (one
    iteration), per channel for a depthwise layer.  A kernel whose taps lie
    on one line (a motion blur along a diagonal) makes ``W^H W`` banded
    line by line: the ``'lines'`` factorisation is its exact inverse.  For
    other blurs even along every axis the DCTs cut the iterations 3-220x on
    the benchmark's problems and cost about one product each.  Channel
    mixing and the other kernels of stride 1 get ``'bordered'``: the shifted
    circulant, which models ``W^H W`` away from the border, and the border's
    exact block, in turn (random 3 -> 3 layers: 4.6-8x fewer iterations than
    plain CG, each costing 2-3.5 times as much; see Notes of
    :func:`preconditioner`), where its set-up and applications are expected
    to cost less than plain CG's solve (``Construction.set_up_cost``: from 9
    input channels per group it never does).  ``'auto'`` preconditions only
    with a construction that models ``W^H W`` (``Construction.models``: an
    exact one, a DCT of an even blur, the bordered circulant), and runs
    plain CG otherwise: measured in time, the shifted circulant alone and
    block-Jacobi never paid (random 3 -> 3 to 32 -> 32 channel layers:
    0.4-0.9x plain CG; asymmetric blurs such as an L-shape: 0.74-1.5x, and
    the DCTs 0.36-0.6x).
    On a wide W (a strided convolution) the ``n - rank(W)`` eigenvalues at
    ``damp**2`` form one cluster that plain CG resolves in one step and an
    inexact preconditioner spreads; ``'auto'`` runs plain CG there.

    A float32 or complex64 operator is solved in double precision through a
    copy with its values widened (sharing the index arrays): the residual
    test of a single-precision solve could not reach tolerances below about
    ``1e-5``.  A complex ``y`` with a real W is solved for its real and
    imaginary parts at once (CG runs in complex arithmetic; each product
    multiplies the two parts).

    Examples
    --------
    Deblurring with circular padding: exact, by FFT, and the same as
    numpy's dense solve of the normal equations:

    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.solvers import gradient_operator, tikhonov
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(np.ones((1, 1, 5, 5)) / 25, (1, 32, 32), padding="same",
    ...                   padding_mode="circular")
    >>> y = op @ rng.random(32 * 32)
    >>> x, info = tikhonov(op, y, damp=1e-2)
    >>> info.method, info.iterations, bool(info.residual < 1e-10)
    ('fft', 0, True)
    >>> W = op.matrix.toarray()
    >>> dense = np.linalg.solve(W.T @ W + 1e-4 * np.eye(1024), W.T @ y)
    >>> bool(np.allclose(x, dense))
    True

    With replicate padding the box blur, a separable kernel, is solved by CG
    with its exact Kronecker preconditioner (one iteration); a kernel that is
    not separable gets the DCT-II, to ``rtol``:

    >>> op = ConvOperator(np.ones((1, 1, 5, 5)) / 25, (1, 32, 32), padding="same",
    ...                   padding_mode="replicate")
    >>> x, info = tikhonov(op, op @ rng.random(32 * 32), damp=1e-2)
    >>> info.method, info.preconditioner, info.iterations
    ('cg', 'kronecker', 1)
    >>> plus = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 8.0
    >>> op = ConvOperator(plus[None, None], (1, 32, 32), padding="same",
    ...                   padding_mode="replicate")
    >>> x, info = tikhonov(op, op @ rng.random(32 * 32), damp=1e-2)
    >>> info.preconditioner, info.converged, bool(info.residual <= 1e-6)
    ('dct2', True, True)

    Smoothness regularisation: ``L='gradient'`` penalises the differences of
    neighbours instead of the values.  The residual reported is that of
    ``(W^T W + damp^2 D^T D) x = W^T y``, as a dense solve confirms:

    >>> op = ConvOperator(np.ones((1, 1, 5, 5)) / 25, (1, 32, 32), padding="same")
    >>> y = op @ rng.random(32 * 32)
    >>> x, info = tikhonov(op, y, damp=1e-2, L="gradient")
    >>> info.method, info.converged, bool(info.residual <= 1e-6)
    ('cg', True, True)
    >>> D = gradient_operator(op.input_shape) @ np.eye(32 * 32)
    >>> W = op.matrix.toarray()
    >>> dense = np.linalg.solve(W.T @ W + 1e-4 * D.T @ D, W.T @ y)
    >>> bool(np.linalg.norm(x - dense) <= 1e-3 * np.linalg.norm(dense))
    True
    """
    _check_operator(op)
    damp = _check_damp(damp)
    rtol = check_positive_tol(rtol, "rtol")
    n = op.shape[1]
    maxiter = 10 * n if maxiter is None else check_non_negative_int(maxiter, "maxiter")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got callback={callback!r}")
    method = check_choice(method, ("auto", *METHODS), "method")
    regulariser_op, regulariser = _resolve_l(op, L)
    y_flat, shaped = _as_sample(y, "y", op.shape[0], op.output_shape)
    start = None if x0 is None else _as_sample(x0, "x0", n, op.input_shape)[0]
    chosen = auto_method(op, regulariser) if method == "auto" else METHODS[method]
    if regulariser not in chosen.regularisers:
        raise NotImplementedError(
            f"method={chosen.name!r} solves with L=None only (the identity), got L of "
            f"{'value ' + repr(L) if isinstance(L, str) else 'type ' + type(L).__name__}; "
            "use method='cg' (or 'auto', which picks it here)"
        )
    chosen.check(op)
    work = _double(op)
    if chosen.uses_m:
        pre, name = _resolve_m(work, M, damp, regulariser, rtol)
    else:
        pre, name = None, chosen.preconditioner_name
    safeguard = isinstance(M, str) and M == "auto" and pre is not None
    x, iterations, value, switched = _solve(work, y_flat, damp, chosen, pre, start, rtol,
                                            maxiter, callback, regulariser_op, regulariser,
                                            safeguard)
    if switched:
        name = "none (safeguard)"
    info = TikhonovInfo(chosen.name, name, iterations, value, value <= rtol)
    return (x.reshape(op.input_shape) if shaped else x), info


def _solve(op, y, damp, method: type[Method], M, x0, rtol, maxiter, callback, L=None,
           regulariser="identity", safeguard=False):
    """``(x, iterations, residual, switched)`` on a double-precision operator, by ``method``."""
    real = not np.iscomplexobj(op.weight)
    dtype = np.result_type(op.dtype, y.dtype, np.float64,
                           np.float64 if x0 is None else x0.dtype,
                           np.float64 if L is None else L.dtype)
    y = y.astype(dtype, copy=False)
    normal = _NormalOperator(op, damp, L)
    b = _apply(op.rmatvec, real, y)
    residual = Residual(normal, b)
    if residual.norm_b == 0.0:  # W^H y = 0: x = 0 solves the normal equations exactly
        return np.zeros(op.shape[1], dtype=dtype), 0, 0.0, False
    problem = Problem(op, y, damp, normal, b, residual, np.dtype(dtype), x0, rtol, maxiter,
                      callback, M, L, regulariser, safeguard)
    x, iterations, value = method.solve(problem)
    return x, iterations, value, problem.switched
