"""Test utilities for linear operators, public so that users can check their own.

:func:`assert_conv_matches_reference` checks a built matrix against the
textbook loop of :mod:`sparse_tconv.direct`; :func:`dottest` checks that an
operator's adjoint (``rmatvec``) is the adjoint of its forward product
(``matvec``), the first thing to verify before
handing an operator to an iterative solver: ``lsqr``, ``lsmr`` and ``cg`` on
the normal equations all silently converge to a wrong answer when it is not.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from ._geometry import validate
from ._random import gaussian, generator, work_dtype
from ._validation import check_bool, check_positive_int, is_sparse

__all__ = ["dottest", "assert_conv_matches_reference"]


class _Products(NamedTuple):
    """What the dot test needs of an operator: its shape, dtype and two products."""

    shape: tuple[int, int]
    dtype: np.dtype
    matvec: Callable[[np.ndarray], Any]
    rmatvec: Callable[[np.ndarray], Any]


def _products(op) -> _Products:
    """The shape, dtype and products of a LinearOperator, matrix or duck-typed operator."""
    if isinstance(op, LinearOperator) or is_sparse(op) or isinstance(op, np.ndarray):
        if op.ndim != 2:
            raise ValueError(f"op must be 2-D, got an array with op.shape={op.shape}")
        A = aslinearoperator(op)
        return _Products(A.shape, np.dtype(A.dtype), A.matvec, A.rmatvec)
    # Any other operator (PyLops', a class of one's own) by what the test calls.
    lacking = [
        name for name in ("shape", "matvec", "rmatvec")
        if not hasattr(op, name) or (name != "shape" and not callable(getattr(op, name)))
    ]
    if lacking:
        raise TypeError(
            "op must be a scipy LinearOperator, a scipy sparse matrix, a 2-D numpy array or "
            "an object with shape and callable matvec and rmatvec (a PyLops operator, for "
            f"one), got op of type {type(op).__name__}, lacking {', '.join(lacking)}"
        )
    shape = _operator_shape(op.shape)
    # A dtype the operator states is used as it is; PyLops gives strings such as
    # "float64".  Without one, the dtype of a product tells (as scipy infers it).
    if getattr(op, "dtype", None) is not None:
        try:
            dtype = np.dtype(op.dtype)
        except TypeError:
            raise TypeError(f"op.dtype must be a numpy dtype, got op.dtype={op.dtype!r}") from None
    else:
        dtype = np.asarray(op.matvec(np.zeros(shape[1]))).dtype
    return _Products(shape, dtype, op.matvec, op.rmatvec)


def _operator_shape(shape) -> tuple[int, int]:
    """``shape`` as a pair of non-negative ints, or a ValueError naming it."""
    try:
        pair = tuple(operator.index(d) for d in shape if not isinstance(d, (bool, np.bool_)))
    except TypeError:  # not iterable, or not ints
        pair = ()
    if len(pair) != 2 or len(shape) != 2 or min(pair) < 0:
        raise ValueError(f"op.shape must be a pair of non-negative ints, got op.shape={shape!r}")
    return pair[0], pair[1]


def _product(function, vector: np.ndarray, length: int, name: str, shape) -> np.ndarray:
    """``function(vector)`` as a 1-D array, checked to have ``length`` entries."""
    result = np.asarray(function(vector))
    if result.size != length:
        raise ValueError(
            f"op.{name} returned an array of shape {result.shape} for an input of shape "
            f"{vector.shape}; op.shape={shape} needs {length} values"
        )
    return result.ravel()


def _random_vector(rng: np.random.Generator, size: int, dtype: np.dtype) -> np.ndarray:
    return gaussian(rng, size, dtype).astype(dtype)


def dottest(op, *, rtol=None, rng=None):
    """Check the adjoint identity ``<A u, v> == <u, A^H v>`` on random vectors.

    One product each way with random vectors, compared with a tolerance
    that scales with the dtype's precision; the test every operator should
    pass before an iterative solver relies on its ``rmatvec``.

    Parameters
    ----------
    op : LinearOperator, scipy sparse matrix, 2-D ndarray or operator-like
        The operator ``A`` of shape ``(m, n)``; its ``matvec`` and ``rmatvec``
        (for a matrix: ``A @ u`` and ``A.conj().T @ v``) are compared.  Any
        object with a ``shape`` ``(m, n)`` and methods ``matvec`` and
        ``rmatvec`` that take and return 1-D arrays will do: a PyLops
        operator, a class of your own.  Its ``dtype`` is used where it has
        one (a numpy dtype or its name); otherwise the dtype of ``matvec``
        applied to a float64 zero vector (one extra product).
    rtol : float, optional
        Relative tolerance, relative to the Cauchy-Schwarz bound of the two
        sides (see Notes).  Default ``100 * eps``, with ``eps`` the machine
        epsilon of the operator's dtype (``float64`` for an integer matrix):
        about ``1.2e-5`` for float32/complex64, ``2.2e-14`` for
        float64/complex128.
    rng : int, numpy.random.Generator or None, optional
        Seed or generator of the random vectors.  Default ``None`` uses the
        fixed seed 0, so that a failure reproduces.

    Returns
    -------
    lhs : numpy scalar
        ``v^H (A u)``, in the operator's dtype.
    rhs : numpy scalar
        ``(A^H v)^H u``, in the operator's dtype.

    Raises
    ------
    AssertionError
        If the identity does not hold within the tolerance; the message gives
        both sides, their difference and the tolerance.
    TypeError
        If ``op`` is not an operator or matrix (nor has ``shape``, ``matvec``
        and ``rmatvec``), its ``dtype`` is not a numpy dtype, ``rtol`` is not
        a real number, or ``rng`` is not a seed or generator.
    ValueError
        If ``op`` is not 2-D (its ``shape`` is not two non-negative ints), a
        product returns the wrong number of values, or ``rtol`` is not
        positive and finite.

    See Also
    --------
    scipy.sparse.linalg.LinearOperator : The interface checked.

    Notes
    -----
    With ``u`` of length ``n`` and ``v`` of length ``m`` drawn from a
    standard normal distribution in the operator's dtype (complex: independent
    real and imaginary parts), the test passes when

    ``|lhs - rhs| <= rtol * max(||A u|| ||v||, ||u|| ||A^H v||)``.

    The right-hand side scales with the largest value either side could take
    (by Cauchy-Schwarz, ``|lhs| <= ||A u|| ||v||``), which is also the scale
    of the rounding errors of both inner products.  So the test stays
    meaningful when ``lhs`` happens to be small, and a wrong adjoint, whose
    error is of the order of ``|lhs| ~ ||A u|| ||v|| / sqrt(m)``, is caught
    for any realistic size in double precision and for ``m`` up to about
    ``10^9`` in single precision.

    For a real operator both vectors are real: ``rmatvec`` is then the plain
    transpose and complex inputs are not exercised.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> from sparse_tconv.testing import dottest
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 8, 8), stride=2, padding=1)
    >>> lhs, rhs = dottest(op)
    >>> bool(np.isclose(lhs, rhs))
    True

    Any object with ``shape``, ``matvec`` and ``rmatvec`` is tested the same
    way, a PyLops operator or a plain class:

    >>> class Scaled:  # x -> d * x; the adjoint multiplies by conj(d)
    ...     def __init__(self, d):
    ...         self.d, self.shape, self.dtype = d, (d.size, d.size), d.dtype
    ...     def matvec(self, x):
    ...         return self.d * x
    ...     def rmatvec(self, y):
    ...         return self.d.conj() * y
    >>> lhs, rhs = dottest(Scaled(rng.standard_normal(6) + 1j * rng.standard_normal(6)))
    >>> lhs.dtype
    dtype('complex128')

    A wrong adjoint is caught:

    >>> from scipy.sparse.linalg import LinearOperator
    >>> A = rng.standard_normal((5, 4))
    >>> bad = LinearOperator(A.shape, matvec=lambda x: A @ x, rmatvec=lambda y: A[:4].T @ y[:4],
    ...                      dtype=A.dtype)
    >>> dottest(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: dot test failed: <A u, v> = ... != <u, A^H v> = ...
    """
    A = _products(op)
    dtype = work_dtype(A.dtype)
    eps = float(np.finfo(dtype).eps)
    if rtol is None:
        rtol = 100 * eps
    else:
        if not isinstance(rtol, numbers.Real) or isinstance(rtol, (bool, np.bool_)):
            raise TypeError(f"rtol must be a real number, got rtol={rtol!r}")
        rtol = float(rtol)
        if not (np.isfinite(rtol) and rtol > 0):
            raise ValueError(f"rtol must be positive and finite, got rtol={rtol!r}")
    gen = generator(rng)

    m, n = A.shape
    u = _random_vector(gen, n, dtype)
    v = _random_vector(gen, m, dtype)
    Au = _product(A.matvec, u, m, "matvec", A.shape)
    AHv = _product(A.rmatvec, v, n, "rmatvec", A.shape)
    lhs = np.vdot(v, Au)
    rhs = np.vdot(AHv, u)
    scale = max(
        float(np.linalg.norm(Au)) * float(np.linalg.norm(v)),
        float(np.linalg.norm(u)) * float(np.linalg.norm(AHv)),
    )
    err = float(abs(lhs - rhs))
    tol = rtol * scale
    if not err <= tol:  # also fails on NaN
        raise AssertionError(
            f"dot test failed: <A u, v> = {lhs!r} != <u, A^H v> = {rhs!r}: "
            f"|lhs - rhs| = {err:.3e} > rtol * scale = {rtol:.3e} * {scale:.3e} = {tol:.3e} "
            f"(scale = max(||A u|| ||v||, ||u|| ||A^H v||); op.shape={A.shape}, "
            f"dtype={dtype})"
        )
    return lhs, rhs


def assert_conv_matches_reference(
    weight, input_shape, *, transpose=False, batch=2, rtol=None, rng=None, **geometry
):
    """Check ``conv_matrix`` (or ``conv_transpose_matrix``) against the loop definition.

    Builds the matrix, multiplies a random batch by it, and compares the
    result with :func:`sparse_tconv.direct.conv` (or ``conv_transpose``) with
    ``method="naive"``: a Python loop over output positions written from the
    definition, sharing nothing with the builder but argument validation.
    Also checks that ``W.T`` of the forward matrix equals the matrix of the
    transposed convolution entry for entry.  For small geometries only.

    Parameters
    ----------
    weight : array_like
        PyTorch's Conv layout (ConvTranspose layout with ``transpose=True``).
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)``.
    transpose : bool, optional
        Check the transposed convolution.  Default False.
    batch : int, optional
        Number of random samples multiplied.  Default 2.
    rtol : float, optional
        Relative tolerance on the largest difference, relative to the largest
        magnitude of the reference.  Default ``1000 * eps`` of the matrix dtype.
    rng : int or numpy.random.Generator, optional
        Seed of the random samples.  Default 0.
    **geometry
        ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``
        (and ``output_padding`` with ``transpose=True``), as for the builders.

    Returns
    -------
    scipy.sparse.csr_array
        The checked matrix.

    Raises
    ------
    AssertionError
        If the products differ, with the largest difference and where it is.

    Notes
    -----
    With ``Y = W @ X`` for a batch ``X`` of shape ``(n, batch)``, the check
    is ``max |Y - Y_ref| <= rtol * max(1, max |Y_ref|)``.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv.testing import assert_conv_matches_reference
    >>> w = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    >>> W = assert_conv_matches_reference(w, (2, 7, 6), stride=2, padding=1,
    ...                                   padding_mode="reflect")
    >>> W.shape
    (48, 84)
    """
    # The builder's public functions are under test; the oracle (direct) and
    # the validation share nothing with it.
    from . import direct
    from ._build import conv_matrix, conv_transpose_matrix

    transpose = check_bool(transpose, "transpose")
    batch = check_positive_int(batch, "batch")
    builder = conv_transpose_matrix if transpose else conv_matrix
    W = builder(weight, input_shape, **geometry)
    w, geom = validate(weight, input_shape, transposed=transpose, **geometry)
    gen = generator(rng)
    dtype = work_dtype(W.dtype)
    sample_shape = geom.output_shape if transpose else geom.input_shape  # with its channel
    samples = _random_vector(gen, batch * W.shape[1], dtype).reshape(batch, *sample_shape)
    got = (W @ samples.reshape(batch, -1).T).T
    if transpose:
        expected = direct.conv_transpose(samples, w, method="naive", **geometry)
        other = conv_matrix(w, geom.input_shape, **_forward_keywords(geometry))
    else:
        expected = direct.conv(samples, w, method="naive", **geometry)
        other = None
    expected = expected.reshape(batch, -1)
    if rtol is None:
        rtol = 1000 * float(np.finfo(dtype).eps)
    err = np.abs(got - expected)
    bound = rtol * max(1.0, float(np.abs(expected).max(initial=0.0)))
    if not err.max(initial=0.0) <= bound:
        where = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"W @ x differs from the loop reference by {err.max():.3e} > {bound:.3e} at "
            f"(sample, row) = {tuple(int(i) for i in where)}; weight.shape={w.shape}, "
            f"input_shape={tuple(input_shape)}, transpose={transpose}, geometry={geometry}"
        )
    if other is not None and (other.T != W).nnz:
        raise AssertionError("conv_transpose_matrix(...) differs from conv_matrix(...).T")
    return W


def _forward_keywords(geometry: dict) -> dict:
    """The forward convolution's keywords for a transposed convolution's."""
    return {k: v for k, v in geometry.items() if k != "output_padding"}
