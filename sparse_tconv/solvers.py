"""Deconvolution: Tikhonov solves and preconditioners that know the structure of W.

- :func:`normal_operator`: ``W^H W + damp^2 I`` as a LinearOperator.
- :func:`preconditioner`: an approximation of ``(W^H W + damp^2 I)^{-1}``
  built from the geometry and the kernel (FFT, DCT or block-Jacobi), for
  ``scipy.sparse.linalg.cg(..., M=...)``.
- :func:`tikhonov`: ``argmin ||W x - y||^2 + damp^2 ||x||^2``, exactly by FFT
  for circular padding, by preconditioned CG otherwise, with the residual
  of the normal equations checked on return.

Operators are :class:`~sparse_tconv.ConvOperator` and
:class:`~sparse_tconv.ConvTransposeOperator` (W is the operator's matrix),
any dimension, channels, groups, stride and dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.sparse.linalg import LinearOperator

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
)

__all__ = ["normal_operator", "preconditioner", "tikhonov", "TikhonovInfo"]



class TikhonovInfo(NamedTuple):
    """What :func:`tikhonov` did, and how well."""

    method: str
    """``'fft'`` (the exact direct solve) or ``'cg'`` (preconditioned conjugate gradients)."""
    preconditioner: str
    """The preconditioner's kind; ``'none'`` for plain CG, ``'custom'`` for one passed in."""
    iterations: int
    """CG iterations (0 for a direct solve that met ``rtol`` at once)."""
    residual: float
    """``||W^H (W x - y) + damp^2 x|| / ||W^H y||``, measured on the returned ``x``."""
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
    """``W^H W + damp^2 I``: one product with W and one with W^H per application."""

    def __init__(self, op, damp):  # unannotated, as LinearOperator's own (scipy-stubs)
        self.op = op
        self.damp = damp
        self._real = not np.iscomplexobj(op.weight)
        n = op.shape[1]
        super().__init__(dtype=op.dtype, shape=(n, n))

    def _matvec(self, x):
        x = np.asarray(x).reshape(-1)
        y = _apply(self.op.rmatvec, self._real, _apply(self.op.matvec, self._real, x))
        return y + (self.damp * self.damp) * x if self.damp else y

    def _matmat(self, X):
        X = np.asarray(X)
        if self._real and np.iscomplexobj(X):
            return np.column_stack([self._matvec(column) for column in X.T])
        Y = self.op.rmatmat(self.op.matmat(X))
        return Y + (self.damp * self.damp) * X if self.damp else Y

    def _adjoint(self):
        return self  # Hermitian


def normal_operator(op, damp=0.0) -> LinearOperator:
    """The normal-equations operator ``W^H W + damp^2 I`` of a convolution.

    Parameters
    ----------
    op : ConvOperator or ConvTransposeOperator
        W, the operator's matrix (for a ConvTransposeOperator, the
        transposed convolution's).
    damp : float, optional
        Tikhonov damping (default 0).

    Returns
    -------
    scipy.sparse.linalg.LinearOperator, shape (n, n)
        ``n = op.shape[1]``, in ``op.dtype``, Hermitian (``.H`` is itself).
        ``matvec`` is ``op.rmatvec(op.matvec(x)) + damp**2 * x``: two of the
        operator's threaded products, each reading its stored product form
        once (``matmat``: once for all the columns).  ``op`` and ``damp``
        are its attributes.

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, or ``damp`` not a real number.
    ValueError
        If ``damp`` is negative or not finite.

    See Also
    --------
    tikhonov : Solves ``normal_operator(op, damp) x = op.rmatvec(y)``.

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
    return _NormalOperator(op, _check_damp(damp))


# ---------------------------------------------------------------------------
# Preconditioners
# ---------------------------------------------------------------------------


def _resolve_kind(op, kind: str, name: str = "kind") -> type[Construction]:
    """The construction ``kind`` names: one registered now, or 'auto''s choice."""
    return resolve(check_choice(kind, ("auto", *kinds()), name), op)


def preconditioner(op, damp=0.0, kind="auto", *, shift=None, border=True) -> LinearOperator:
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
    kind : {'auto', 'circulant', 'dct2', 'dct1', 'kronecker', 'block_jacobi'}, optional
        The construction (see Notes).  ``'auto'`` (default): ``'circulant'``
        where W is circulant (exact); ``'kronecker'`` for a separable kernel
        with one input and one output channel (exact; every axis at most 4096
        long); else, for a low-pass kernel (a blur: the Gram symbol's largest
        eigenvalue at frequency 0 is within 10% of the top) whose Gram matrix
        is Toeplitz (stride 1, or any transposed convolution), ``'dct1'`` for
        reflect padding and ``'dct2'`` for the other modes; else
        ``'circulant'`` (shifted) when the strides divide the input size,
        else ``'dct2'`` or ``'block_jacobi'``.
    shift : float, optional
        Damp the preconditioner more than the system: its blocks are
        inverted with ``damp**2 + shift * lambda_max`` in place of
        ``damp**2`` (``lambda_max`` the largest eigenvalue of its model of
        ``W^H W``).  Default ``None``: ``1e-3`` for ``'dct2'``, ``0.1`` for
        ``'circulant'`` where W is not circulant, 0 otherwise (see Notes).
    border : bool, optional
        Apply the border correction ``S`` of the construction (see Notes).
        Default True; False gives the plain transform model, as in the
        literature (for comparison).

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
        If ``kind`` does not apply to the geometry: ``'dct1'``/``'dct2'``
        on a strided ConvOperator (whose Gram matrix is not Toeplitz);
        ``'circulant'`` when a stride does not divide the input size or a
        dilated kernel is wider than the input; ``'kronecker'`` with several
        channels, or eigenvectors over 512 MiB (``16 * sum(L_a**2)`` bytes).

    See Also
    --------
    tikhonov, normal_operator
    sparse_tconv.spectral.column_norms : The diagonal (Jacobi) alone.

    Notes
    -----
    Each construction is ``S T^{-1} diag(K_f) T S``: a transform ``T``, one
    small Hermitian block ``K_f = (H_f + damp^2 I)^{-1}`` per frequency or
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
      heavier (replicate) than the model's.
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
      iteration.  Otherwise the nearest Kronecker product (Kamm & Nagy).
      Set-up: one ``L_a x L_a`` eigendecomposition per axis; each
      application ``4 n sum_a L_a`` flops (dense, BLAS).
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
    return build_preconditioner(op, damp, _resolve_kind(op, kind).name, boost=boost,
                                correct=border)


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


def _tikhonov_kind(op) -> str:
    """tikhonov's ``M='auto'``: :func:`preconditioner`'s choice, but plain CG on a wide W,
    or where the preconditioner's blocks would take more than 512 MB.

    A wide W (more unknowns than equations: a strided convolution) gives the
    damped normal matrix ``n - rank(W)`` eigenvalues at ``damp**2``, one
    cluster that plain CG resolves in a single step and that any inexact
    preconditioner spreads.
    """
    # Measured on a 4-channel stride-2 layer (a problem solve_bench does not hold):
    # 27 iterations plain, 250-1900 with the circulant or block-Jacobi.
    if _blocks_nbytes(op) > _PRECONDITIONER_BYTES:
        return "none"
    chosen = auto(op)
    return chosen.name if chosen.exact(op) or op.shape[0] >= op.shape[1] else "none"


def _resolve_m(op, M, damp: float):
    """``(LinearOperator or None, name)`` for tikhonov's ``M`` argument."""
    if isinstance(M, str) and M == "auto":
        M = _tikhonov_kind(op)
    if M is None or (isinstance(M, str) and M == "none"):
        return None, "none"
    if isinstance(M, str):
        kind = _resolve_kind(op, M, "M").name
        return build_preconditioner(op, damp, kind), kind
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


def tikhonov(op, y, damp, *, rtol=1e-6, maxiter=None, x0=None, callback=None, M="auto",
             method="auto"):
    """The Tikhonov solution ``argmin ||W x - y||^2 + damp^2 ||x||^2``, fast.

    For circular padding (a circulant W: output size ``L / stride``, any
    channels, groups and stride) an exact direct solve by FFT with one
    small SVD per frequency, no iterations; otherwise conjugate gradients on
    the normal equations with the structured :func:`preconditioner`.  Either
    way the residual of the normal equations is measured on return.

    Parameters
    ----------
    op : ConvOperator or ConvTransposeOperator
        W.
    y : array_like, shape (op.shape[0],) or op.output_shape
        The data.  Not modified.
    damp : float
        The Tikhonov damping (``>= 0``; 0 gives a least-squares solution,
        the minimum-norm one by FFT).
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
        ``kind='auto'``, except plain CG on a wide W (more unknowns than
        equations) that no exact construction covers (see Notes), and where
        the preconditioner's channel blocks would take more than 512 MB
        (``C x C`` complex per position: a 64-channel input of 512x512).
    method : {'auto', 'fft', 'cg'}, optional
        ``'auto'`` (default): ``'fft'`` where W is circulant, else ``'cg'``.
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
        ``method``, ``preconditioner``, ``iterations``, ``residual`` (the
        relative residual ``||W^H (W x - y) + damp^2 x|| / ||W^H y||`` of the
        returned ``x``, measured with the operator's products) and
        ``converged`` (``residual <= rtol``; False only if CG stopped at
        ``maxiter``, or broke down on non-finite values).

    Raises
    ------
    TypeError
        If ``op`` is not a convolution operator, ``y`` or ``x0`` not
        numeric, ``callback`` not callable, or ``M`` of the wrong type.
    ValueError
        Wrong shapes of ``y``, ``x0`` or ``M``; non-finite values in
        ``y`` or ``x0``; negative ``damp``, non-positive ``rtol``, negative
        ``maxiter``, unknown ``M`` kind or ``method``.
    NotImplementedError
        ``method='fft'`` on a W that is not circulant, or an ``M`` kind that
        does not apply (see :func:`preconditioner`).

    See Also
    --------
    preconditioner, normal_operator
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
    ``(W^H W + damp^2 I) x = W^H y`` with ``M``; CG's own stopping test uses
    a recursively updated residual, so on exit the true residual is
    measured and CG restarts from ``x`` while it exceeds ``rtol`` (the
    iterations of every restart count towards ``maxiter``).  Each iteration
    costs one product with W and one with ``W^H`` (the operator's threads),
    one application of the preconditioner and a few vector operations.

    *Which preconditioner.*  A separable single-channel kernel makes W a
    Kronecker product of one-dimensional convolutions, whatever the padding
    mode: the ``'kronecker'`` construction is its exact inverse (one
    iteration).  For other blurs the DCTs cut the iterations 4-220x on the
    benchmark's problems and cost about one product each.  For kernels that
    are not low-pass (a random 4 -> 4 channel layer) the shifted circulant
    cuts them 1.7-2.6x, which is 1.1-1.6x in time.  On a wide W (a
    strided convolution) the ``n - rank(W)`` eigenvalues at ``damp**2`` form
    one cluster that plain CG resolves in one step and an inexact
    preconditioner spreads; ``'auto'`` runs plain CG there.

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
    >>> from sparse_tconv.solvers import tikhonov
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
    """
    _check_operator(op)
    damp = _check_damp(damp)
    rtol = check_positive_tol(rtol, "rtol")
    n = op.shape[1]
    maxiter = 10 * n if maxiter is None else check_non_negative_int(maxiter, "maxiter")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got callback={callback!r}")
    method = check_choice(method, ("auto", *METHODS), "method")
    y_flat, shaped = _as_sample(y, "y", op.shape[0], op.output_shape)
    start = None if x0 is None else _as_sample(x0, "x0", n, op.input_shape)[0]
    chosen = auto_method(op) if method == "auto" else METHODS[method]
    chosen.check(op)
    work = _double(op)
    pre, name = _resolve_m(work, M, damp) if chosen.uses_m else (None, chosen.preconditioner_name)
    x, iterations, value = _solve(work, y_flat, damp, chosen, pre, start, rtol, maxiter,
                                  callback)
    info = TikhonovInfo(chosen.name, name, iterations, value, value <= rtol)
    return (x.reshape(op.input_shape) if shaped else x), info


def _solve(op, y, damp, method: type[Method], M, x0, rtol, maxiter, callback):
    """``(x, iterations, residual)`` on a double-precision operator, by ``method``."""
    real = not np.iscomplexobj(op.weight)
    dtype = np.result_type(op.dtype, y.dtype, np.float64,
                           np.float64 if x0 is None else x0.dtype)
    y = y.astype(dtype, copy=False)
    normal = normal_operator(op, damp)
    b = _apply(op.rmatvec, real, y)
    residual = Residual(normal, b)
    if residual.norm_b == 0.0:  # W^H y = 0: x = 0 solves the normal equations exactly
        return np.zeros(op.shape[1], dtype=dtype), 0, 0.0
    problem = Problem(op, y, damp, normal, b, residual, np.dtype(dtype), x0, rtol, maxiter,
                      callback, M)
    return method.solve(problem)
