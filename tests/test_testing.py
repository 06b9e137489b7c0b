"""sparse_tconv.testing: dottest passes on correct adjoints and fails loudly on wrong ones;
assert_conv_matches_reference passes on the builders and catches a wrong entry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

import sparse_tconv._build
from sparse_tconv import ConvOperator, ConvTransposeOperator
from sparse_tconv.testing import assert_conv_matches_reference, dottest

from reference import random_array

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]


def _wrong_adjoint(A, conjugate=True):
    """A LinearOperator whose rmatvec is the plain transpose (wrong when complex)
    or, with ``conjugate=True``, the adjoint of a perturbed matrix."""
    B = A.copy()
    if conjugate:
        B[0, 0] += 0.5 * (1 + abs(B[0, 0]))
        rmatvec = lambda y: B.conj().T @ y  # noqa: E731
    else:
        rmatvec = lambda y: B.T @ y  # noqa: E731
    return LinearOperator(A.shape, matvec=lambda x: A @ x, rmatvec=rmatvec, dtype=A.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_operators_pass(dtype, transposed):
    rng = np.random.default_rng(0)
    weight = random_array(rng, (4, 2, 3, 2), dtype)
    if transposed:
        op = ConvTransposeOperator(weight, (4, 4, 5), stride=2, padding=1, output_padding=1,
                                   groups=2, padding_mode="zeros")
    else:
        op = ConvOperator(weight, (4, 9, 8), stride=(2, 1), padding=((1, 2), 1), groups=2,
                          padding_mode="reflect")
    lhs, rhs = dottest(op)
    assert lhs.dtype == rhs.dtype == np.dtype(dtype)
    # Independent check of the returned values: recompute with the dense matrix.
    dense = op.matrix.toarray()
    gen = np.random.default_rng(0)
    u = random_array(gen, op.shape[1], dtype)
    v = random_array(gen, op.shape[0], dtype)
    rtol = 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-12
    np.testing.assert_allclose(lhs, np.vdot(v, dense @ u), rtol=rtol)
    np.testing.assert_allclose(rhs, np.vdot(dense.conj().T @ v, u), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128, np.int64])
def test_matrices_pass(dtype):
    rng = np.random.default_rng(1)
    dense = (10 * random_array(rng, (7, 5), np.complex128 if dtype == np.complex128
                               else np.float64)).astype(dtype)
    for A in (dense, sp.csr_array(dense), sp.csr_matrix(dense)):
        lhs, rhs = dottest(A, rng=3)
        assert lhs.dtype == (np.float64 if dtype == np.int64 else dtype)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_wrong_adjoint_is_caught(dtype):
    rng = np.random.default_rng(2)
    A = random_array(rng, (30, 20), dtype)
    with pytest.raises(AssertionError, match=r"<A u, v> = .* != <u, A\^H v> = .*rtol"):
        dottest(_wrong_adjoint(A))


def test_plain_transpose_of_a_complex_matrix_is_caught():
    rng = np.random.default_rng(3)
    A = random_array(rng, (6, 4), np.complex128)
    with pytest.raises(AssertionError, match="dot test failed"):
        dottest(_wrong_adjoint(A, conjugate=False))
    # ... while for a real matrix the plain transpose is the adjoint.
    dottest(_wrong_adjoint(A.real.copy(), conjugate=False))


def test_message_has_both_sides_and_the_tolerance():
    A = np.eye(3)
    bad = LinearOperator((3, 3), matvec=lambda x: x, rmatvec=lambda y: 2 * y, dtype=np.float64)
    with pytest.raises(AssertionError) as info:
        dottest(bad, rng=5)
    message = str(info.value)
    gen = np.random.default_rng(5)
    u, v = gen.standard_normal(3), gen.standard_normal(3)
    assert repr(np.vdot(v, A @ u)) in message and repr(np.vdot(2 * v, u)) in message
    assert "|lhs - rhs|" in message and "op.shape=(3, 3)" in message


def test_rtol_decides():
    # A tiny, known error in the adjoint: caught at a tight rtol, tolerated at a loose one.
    rng = np.random.default_rng(6)
    A = rng.standard_normal((8, 8))
    B = A.copy()
    B[2, 3] += 1e-6
    op = LinearOperator(A.shape, matvec=lambda x: A @ x, rmatvec=lambda y: B.T @ y,
                        dtype=np.float64)
    with pytest.raises(AssertionError):
        dottest(op)
    dottest(op, rtol=1e-4)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(7)
    op = ConvOperator(rng.standard_normal((2, 2, 3)), (2, 10), padding=1)
    assert dottest(op) == dottest(op, rng=0) == dottest(op, rng=np.random.default_rng(0))
    assert dottest(op, rng=1) != dottest(op, rng=2)


def test_nan_fails():
    op = LinearOperator((2, 2), matvec=lambda x: np.full(2, np.nan), rmatvec=lambda y: y,
                        dtype=np.float64)
    with pytest.raises(AssertionError, match="nan"):
        dottest(op)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(op=[[1.0]]), TypeError, "op must be a scipy LinearOperator.*list"),
        (dict(op=np.ones(3)), ValueError, r"op must be 2-D.*op.shape=\(3,\)"),
        (dict(op=np.eye(2), rtol=0.0), ValueError, "rtol must be positive.*rtol=0.0"),
        (dict(op=np.eye(2), rtol=float("nan")), ValueError, "rtol must be positive"),
        (dict(op=np.eye(2), rtol="1e-3"), TypeError, "rtol must be a real number"),
        (dict(op=np.eye(2), rtol=True), TypeError, "rtol must be a real number"),
        (dict(op=np.eye(2), rng="seed"), TypeError, "rng must be an int seed.*'seed'"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    op = kwargs.pop("op")
    with pytest.raises(error, match=match):
        dottest(op, **kwargs)


REFERENCE_CASES = [
    # (weight shape, input shape, transpose, geometry)
    ((3, 2, 4), (2, 11), False, dict(stride=2, padding=[(1, 2)], dilation=2)),
    ((4, 1, 3, 2), (2, 6, 5), False, dict(padding="same", groups=2, padding_mode="reflect")),
    ((2, 3, 3, 3), (3, 5, 6), False, dict(stride=(2, 1), padding=2, padding_mode="circular")),
    ((2, 2, 2, 2, 3), (2, 4, 3, 5), False, dict(padding=1, padding_mode="replicate")),
    ((3, 2, 3, 3), (3, 4, 4), True, dict(stride=2, padding=1, output_padding=1)),
    ((4, 1, 3), (4, 6), True, dict(stride=3, dilation=2, groups=2, output_padding=2)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_builders_match_the_loop_reference(case, dtype):
    weight_shape, input_shape, transpose, geometry = case
    weight = random_array(np.random.default_rng(7), weight_shape, dtype)
    W = assert_conv_matches_reference(weight, input_shape, transpose=transpose, **geometry)
    assert W.dtype == dtype


def test_reference_check_catches_a_wrong_entry(monkeypatch):
    real = sparse_tconv._build.conv_matrix

    def off_by_one_entry(*args, **kwargs):
        W = real(*args, **kwargs)
        W.data[len(W.data) // 2] += 1.0
        return W

    monkeypatch.setattr(sparse_tconv._build, "conv_matrix", off_by_one_entry)
    weight = np.random.default_rng(0).standard_normal((2, 2, 3, 3))
    with pytest.raises(AssertionError, match=r"W @ x differs from the loop reference by"):
        assert_conv_matches_reference(weight, (2, 6, 6), padding=1)


class _DenseOperator:
    """A plain class (no scipy base) with matvec/rmatvec of a dense matrix; with
    ``dtype=False`` it has no dtype attribute, so dottest must infer it."""

    def __init__(self, A, adjoint=None, dtype=True):
        self.A, self.shape = A, A.shape
        self.adjoint = A.conj().T if adjoint is None else adjoint
        if dtype:
            self.dtype = A.dtype

    def matvec(self, x):
        return self.A @ x

    def rmatvec(self, y):
        return self.adjoint @ y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_dtype", [True, False])
def test_plain_class_passes(dtype, has_dtype):
    A = random_array(np.random.default_rng(8), (9, 6), dtype)
    lhs, rhs = dottest(_DenseOperator(A, dtype=has_dtype), rng=4)
    # Without a dtype attribute the one of A @ (float64 zeros) is used: float64
    # or complex128, whatever A's precision.
    expected = np.dtype(dtype) if has_dtype else np.result_type(dtype, np.float64)
    assert lhs.dtype == rhs.dtype == expected
    # The same random vectors, the dense products: both sides recomputed.
    gen = np.random.default_rng(4)
    u, v = random_array(gen, 6, expected), random_array(gen, 9, expected)
    rtol = 1e-4 if expected in (np.float32, np.complex64) else 1e-12
    np.testing.assert_allclose(lhs, np.vdot(v, A @ u), rtol=rtol)
    np.testing.assert_allclose(rhs, np.vdot(A.conj().T @ v, u), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_plain_class_with_a_wrong_adjoint_fails(dtype):
    A = random_array(np.random.default_rng(9), (7, 5), dtype)
    wrong = A.T.copy()  # the plain transpose: wrong when complex, so perturb it as well
    wrong[1, 2] += 1.0
    with pytest.raises(AssertionError, match="dot test failed"):
        dottest(_DenseOperator(A, adjoint=wrong))


def test_plain_class_dtype_by_name():
    # PyLops states dtypes by name ("float32"); the name is read as the dtype.
    A = random_array(np.random.default_rng(10), (4, 4), np.float32)
    op = _DenseOperator(A)
    op.dtype = "float32"
    lhs, _ = dottest(op)
    assert lhs.dtype == np.float32


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(shape=(3,)), ValueError, r"op.shape must be a pair .*op.shape=\(3,\)"),
        (dict(shape=(3, 2.0)), ValueError, r"op.shape=\(3, 2.0\)"),
        (dict(shape=(3, -1)), ValueError, r"op.shape=\(3, -1\)"),
        (dict(dtype="no dtype"), TypeError, "op.dtype must be a numpy dtype.*'no dtype'"),
        (dict(matvec=None), TypeError, "lacking matvec"),
        (dict(matvec=lambda x: np.ones(4)), ValueError,
         r"op.matvec returned an array of shape \(4,\).*op.shape=\(3, 2\) needs 3 values"),
        (dict(rmatvec=lambda y: np.ones(3)), ValueError,
         r"op.rmatvec returned an array of shape \(3,\).*needs 2 values"),
    ],
)
def test_plain_class_invalid(change, error, match):
    op = _DenseOperator(np.ones((3, 2)))
    for name, value in change.items():
        setattr(op, name, value)
    with pytest.raises(error, match=match):
        dottest(op)


def test_object_without_products_is_refused():
    class ShapeOnly:
        shape = (2, 2)

    with pytest.raises(TypeError, match="ShapeOnly, lacking matvec, rmatvec"):
        dottest(ShapeOnly())


@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
def test_pylops_operators(dtype):
    pylops = pytest.importorskip("pylops")
    rng = np.random.default_rng(11)
    weight = random_array(rng, (3, 2, 3, 3), dtype)
    op = ConvOperator(weight, (2, 7, 6), stride=2, padding=1)
    # PyLops' own wrapper of a scipy operator, with the sample shapes.
    wrapped = pylops.LinearOperator(op, dims=op.input_shape, dimsd=op.output_shape)
    assert not isinstance(wrapped, LinearOperator)  # duck-typed, not a scipy subclass
    lhs, rhs = dottest(wrapped)
    assert lhs.dtype == np.dtype(dtype)
    assert dottest(wrapped) == dottest(op)  # same vectors, same products
    # A PyLops operator of its own (dense matrix) and a composition with ours.
    dense = pylops.MatrixMult(random_array(rng, (5, op.shape[0]), dtype),
                              dtype=np.dtype(dtype).name)
    dottest(dense @ wrapped)
    # ... and a wrong adjoint in a PyLops operator is caught.
    A = random_array(rng, (6, 4), dtype)
    bad = pylops.FunctionOperator(lambda x: A @ x, lambda y: 2 * (A.conj().T @ y), 6, 4,
                                  dtype=np.dtype(dtype).name)
    with pytest.raises(AssertionError, match="dot test failed"):
        dottest(bad)
