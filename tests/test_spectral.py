"""sparse_tconv.spectral against dense linear algebra (numpy SVD, dense products) and torch."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsqr

from sparse_tconv import ConvOperator, ConvTransposeOperator, conv_matrix
from sparse_tconv.spectral import (
    column_norms,
    compose,
    conv_singular_values,
    gram_matrix,
    norm_bounds,
    operator_norm,
)

from reference import random_array, reference_conv_matrix

# (weight_shape, input_shape, geometry): every one a (subsampled) circulant.
CIRCULANT_CASES = [
    ((3, 2, 3), (2, 8), dict(padding=1)),  # 1-D, C_out > C_in
    ((1, 1, 4), (1, 7), dict(padding="same")),  # default 'same', even kernel
    ((4, 3, 3, 3), (3, 6, 5), dict(padding=1)),  # 2-D, non-square grid
    ((2, 5, 3, 3), (5, 4, 4), dict(padding=((2, 0), (0, 2)))),  # C_out < C_in, shifted
    ((2, 2, 3, 3, 3), (2, 4, 4, 4), dict(padding=1)),  # 3-D
    ((1, 3, 2, 3, 2), (3, 3, 4, 3), dict(padding="same")),  # 3-D, 'same' with even kernels
    ((4, 1, 3, 3), (2, 6, 6), dict(padding=1, groups=2)),  # groups
    ((6, 1, 3), (3, 7), dict(padding=1, groups=3)),  # depthwise
    ((2, 2, 3), (2, 9), dict(padding=2, dilation=2)),  # dilation
    ((2, 2, 3, 2), (2, 5, 4), dict(padding=((2, 2), (0, 2)), dilation=(2, 2))),
    ((2, 2, 5), (2, 3), dict(padding=2)),  # kernel longer than the input: taps wrap
    ((2, 2, 3), (2, 3), dict(padding=3, dilation=3)),  # every tap on one element
    ((3, 2, 3, 3), (2, 6, 8), dict(padding=1, stride=2)),  # stride: polyphase
    ((3, 2, 3, 3), (2, 6, 8), dict(padding=((1, 0), (0, 1)), stride=2)),  # lo + hi = d(k-1) - 1
    ((3, 2, 3, 3), (2, 6, 8), dict(padding=((1, 1), (0, 2)), stride=(2, 1))),
    ((5, 1, 4), (1, 12), dict(padding=((2, 1),), stride=3)),  # C_out > C_in s^N
    ((6, 2, 2, 2), (2, 4, 4), dict(padding=0, stride=2)),  # patchify: no padding, no wrap
    ((4, 2, 3, 3, 3), (4, 4, 2, 4), dict(padding=1, stride=(2, 1, 2), groups=2)),
    ((2, 1, 1, 1), (1, 3, 3), dict(padding=0)),  # 1x1 kernel, no padding
]


def _dense_singular_values(weight, input_shape, geometry):
    W = conv_matrix(weight, input_shape, padding_mode="circular", **geometry).toarray()
    return np.linalg.svd(W, compute_uv=False), W


# ---------------------------------------------------------------------------
# conv_singular_values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.complex128, np.float32])
@pytest.mark.parametrize("case", CIRCULANT_CASES, ids=str)
def test_singular_values_match_dense_svd(case, dtype):
    weight_shape, input_shape, geometry = case
    rng = np.random.default_rng(zlib.crc32(repr((case, np.dtype(dtype).name)).encode()))
    weight = random_array(rng, weight_shape, dtype)
    values = conv_singular_values(weight, input_shape, **geometry)
    expected, W = _dense_singular_values(weight, input_shape, geometry)
    assert values.dtype == np.float64
    assert values.shape == (min(W.shape),)
    assert np.all(np.diff(values) <= 0)  # sorted descending
    rtol = 1e-5 if dtype == np.float32 else 1e-12  # the dense SVD runs in W's precision
    np.testing.assert_allclose(values, expected, rtol=0, atol=rtol * expected[0])


@pytest.mark.parametrize(
    "weight_shape, input_shape, geometry",
    [((3, 2, 3, 3), (2, 5, 6), dict(padding=1)),
     ((4, 2, 3, 3), (4, 6, 4), dict(padding=(1, 2), stride=2, groups=2, dilation=(1, 2)))],
)
def test_singular_values_of_the_torch_layer(weight_shape, input_shape, geometry):
    # Second oracle: W from torch.nn.Conv2d(padding_mode='circular') applied to the
    # unit vectors (its Jacobian), sharing no code with conv_matrix.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(weight_shape)
    layer = torch.nn.Conv2d(input_shape[0], weight_shape[0], weight_shape[2:], bias=False,
                            padding_mode="circular", dtype=torch.float64, **geometry)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        n = int(np.prod(input_shape))
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
        W = layer(basis).reshape(n, -1).T.numpy()
    expected = np.linalg.svd(W, compute_uv=False)
    values = conv_singular_values(weight, input_shape, **geometry)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12 * expected[0])


def test_singular_values_closed_form():
    # A single-channel circular kernel: |DFT of the kernel| at every frequency.
    kernel = np.array([1.0, -2.0, 0.5, 3.0])
    L = 10
    values = conv_singular_values(kernel[None, None], (1, L), padding=((1, 2),))
    padded = np.zeros(L)
    padded[:4] = kernel
    np.testing.assert_allclose(values, np.sort(np.abs(np.fft.fft(padded)))[::-1], rtol=1e-13)


def test_singular_values_are_those_of_the_transposed_layer():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3, 3, 3))
    top = ConvTransposeOperator(weight, (4, 3, 4), stride=2, padding=1, output_padding=1,
                                padding_mode="circular")
    assert top.output_shape == (3, 6, 8)
    expected = np.linalg.svd(top.matrix.toarray(), compute_uv=False)
    values = conv_singular_values(weight, top.output_shape, stride=2, padding=1)
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12 * expected[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding_mode="zeros"), "circular padding.*'zeros'.*operator_norm"),
        (dict(padding_mode="reflect"), "circular padding.*'reflect'"),
        (dict(padding=0), r"output size.*dimension 0 has input size 8, stride 1, output size 6"),
        (dict(padding=2), "output size 10.*operator_norm"),  # rows repeat
        (dict(padding=((1, 1), (1, 1)), stride=3),  # 3 does not divide 8
         "stride must divide the input size.*dimension 0 has input size 8, stride 3"),
        (dict(padding=((0, 0), (1, 1)), stride=2), "dimension 0 has input size 8, stride 2, "
         "output size 3"),  # O = 3 < L / s = 4: a strict subset of the rows
    ],
)
def test_singular_values_refuse_non_circulant_geometries(kwargs, match):
    weight = np.ones((2, 2, 3, 3))
    with pytest.raises(NotImplementedError, match=match):
        conv_singular_values(weight, (2, 8, 8), **kwargs)


def test_singular_values_of_unpadded_kernels_accept_any_mode():
    weight = np.random.default_rng(3).standard_normal((3, 2, 2))
    values = conv_singular_values(weight, (2, 6), stride=2, padding=0, padding_mode="zeros")
    expected = np.linalg.svd(conv_matrix(weight, (2, 6), stride=2).toarray(), compute_uv=False)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (((2, 3, 3), (2, 8)), {}, ValueError, "input_shape\\[0\\]=2 channels"),
        (((2, 2, 3), (2, 8)), dict(stride=2), ValueError, "'same' is not supported"),
        (((2, 2, 3), (2, 8)), dict(padding_mode="wrap"), ValueError, "padding_mode must be"),
        (((2, 2, 3), (2, 8)), dict(groups=3), ValueError, "groups must divide"),
    ],
)
def test_singular_values_validate_arguments(args, kwargs, error, match):
    weight_shape, input_shape = args
    with pytest.raises(error, match=match):
        conv_singular_values(np.ones(weight_shape), input_shape, **kwargs)


# ---------------------------------------------------------------------------
# operator_norm
# ---------------------------------------------------------------------------

NORM_CASES = [
    # (weight_shape, input_shape, geometry, mode, dtype)
    ((4, 3, 3, 3), (3, 8, 8), dict(padding=1), "zeros", np.float64),
    ((4, 3, 3, 3), (3, 8, 7), dict(padding=1, stride=2), "reflect", np.float64),
    ((2, 2, 3, 3), (2, 6, 6), dict(padding=((2, 0), 1)), "replicate", np.complex128),
    ((6, 1, 3), (2, 20), dict(padding=2, dilation=2, groups=2), "circular", np.float64),
    ((2, 2, 3, 3, 3), (2, 4, 5, 4), dict(padding=1, stride=(1, 2, 1)), "zeros", np.complex128),
    ((3, 2, 5), (2, 16), dict(stride=3), "zeros", np.float32),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_operator_norm_methods_match_dense_svd(case):
    weight_shape, input_shape, geometry, mode, dtype = case
    rng = np.random.default_rng(4)
    weight = random_array(rng, weight_shape, dtype)
    op = ConvOperator(weight, input_shape, padding_mode=mode, **geometry)
    dense = op.matrix.toarray().astype(np.complex128 if np.iscomplexobj(weight)
                                       else np.float64)
    true = np.linalg.svd(dense, compute_uv=False)[0]
    single = dtype == np.float32
    for A in (op, op.T, op.matrix, sp.csr_matrix(op.matrix), dense):
        np.testing.assert_allclose(operator_norm(A), true, rtol=1e-5 if single else 1e-12)
        if A is op or A is dense:  # (slow to converge: top singular values are close)
            power = operator_norm(A, method="power", tol=1e-10, maxiter=20000)
            assert power <= true * (1 + (1e-6 if single else 1e-12))  # a lower bound
            np.testing.assert_allclose(power, true, rtol=1e-4)
        bounds = [operator_norm(A, method="gram", iterations=t) for t in range(6)]
        assert all(b >= true * (1 - 1e-12) for b in bounds)  # never below the norm
        assert all(b2 <= b1 * (1 + 1e-12) for b1, b2 in zip(bounds, bounds[1:]))
        np.testing.assert_allclose(bounds[0], np.linalg.norm(dense), rtol=1e-6)  # Frobenius
        assert bounds[-1] <= 1.1 * true


def test_gram_bound_is_tight_where_the_top_singular_value_stands_out():
    # Rank one: sigma_max = ||W||_F, so every bound equals the norm.
    rng = np.random.default_rng(5)
    A = np.outer(rng.standard_normal(7), rng.standard_normal(5))
    true = np.linalg.norm(A, 2)
    for t in range(4):
        np.testing.assert_allclose(operator_norm(A, method="gram", iterations=t), true,
                                   rtol=1e-12)
        np.testing.assert_allclose(
            operator_norm(sp.csr_array(A), method="gram", iterations=t), true, rtol=1e-12)


def test_gram_bound_survives_huge_and_tiny_scales():
    # Without the rescaling, the 2^t-th power would overflow or underflow.
    rng = np.random.default_rng(6)
    op = ConvOperator(rng.standard_normal((2, 2, 3, 3)), (2, 6, 6), padding=1)
    true = np.linalg.norm(op.matrix.toarray(), 2)
    for scale in (1e150, 1e-150):
        bound = operator_norm(op.matrix * scale, method="gram", iterations=8)
        assert np.isfinite(bound) and true * scale * (1 - 1e-12) <= bound <= 1.01 * true * scale


def test_gram_stops_at_max_nnz_with_a_warning():
    rng = np.random.default_rng(7)
    op = ConvOperator(rng.standard_normal((2, 2, 3, 3)), (2, 12, 12), padding=1)
    true = np.linalg.norm(op.matrix.toarray(), 2)
    gram_nnz = gram_matrix(op).nnz
    # Room for W^H W, not for (W^H W)^2.
    with pytest.warns(RuntimeWarning, match=r"stopped after 1 of 5 steps.*max_nnz="):
        capped = operator_norm(op, method="gram", iterations=5, max_nnz=gram_nnz)
    expected = np.sum(np.linalg.svd(op.matrix.toarray(), compute_uv=False) ** 4) ** 0.25
    np.testing.assert_allclose(capped, expected, rtol=1e-12)  # ||W^H W||_F^(1/2)
    assert capped >= true
    with pytest.warns(RuntimeWarning, match="stopped after 0 of 5 steps"):
        assert operator_norm(op, method="gram", iterations=5, max_nnz=10) == pytest.approx(
            np.linalg.norm(op.matrix.data))
    uncapped = operator_norm(op, method="gram", iterations=5, max_nnz=None)
    assert true * (1 - 1e-12) <= uncapped < capped


def test_power_warns_when_not_converged():
    rng = np.random.default_rng(8)
    op = ConvOperator(rng.standard_normal((3, 3, 3, 3)), (3, 10, 10), padding=1)
    true = np.linalg.norm(op.matrix.toarray(), 2)
    with pytest.warns(RuntimeWarning, match="maxiter=3 iterations.*lower bound"):
        estimate = operator_norm(op, method="power", maxiter=3)
    assert 0 < estimate <= true


def test_power_default_tolerance_follows_the_precision():
    # float32 products cannot resolve 1e-8: the default stops at 100 eps, without a warning.
    rng = np.random.default_rng(16)
    weight = rng.standard_normal((3, 2, 3)).astype(np.float32)
    op = ConvOperator(weight, (2, 12), padding=1)
    true = np.linalg.norm(op.matrix.toarray().astype(np.float64), 2)
    estimate = operator_norm(op, method="power")
    assert true * 0.99 < estimate <= true * (1 + 1e-6)


def test_operator_norm_edge_cases():
    rng = np.random.default_rng(9)
    column = rng.standard_normal((6, 1))
    row = rng.standard_normal((1, 6)) + 1j * rng.standard_normal((1, 6))
    for A, dense in ((column, column), (row, row), (sp.csr_array(row), row)):
        for method in ("svds", "power", "gram"):
            np.testing.assert_allclose(operator_norm(A, method=method), np.linalg.norm(dense),
                                       rtol=1e-12)
    zero = sp.csr_array((5, 4))
    for method in ("svds", "power", "gram"):
        assert operator_norm(zero, method=method) == 0.0
    two = rng.standard_normal((2, 2))
    np.testing.assert_allclose(operator_norm(two), np.linalg.norm(two, 2), rtol=1e-12)
    # a matrix-free LinearOperator: svds and power
    lin = aslinearoperator(rng.standard_normal((9, 4)))
    np.testing.assert_allclose(operator_norm(lin), np.linalg.norm(lin.A, 2), rtol=1e-12)


def test_operator_norm_is_reproducible():
    rng = np.random.default_rng(10)
    op = ConvOperator(rng.standard_normal((2, 2, 3)), (2, 30), padding=1)
    assert operator_norm(op, method="power", tol=1e-3) == operator_norm(
        op, method="power", tol=1e-3, rng=0)
    assert operator_norm(op, method="power", tol=1e-3, rng=1) != operator_norm(
        op, method="power", tol=1e-3, rng=2)


@pytest.mark.parametrize(
    "op, kwargs, error, match",
    [
        (np.eye(3), dict(method="lanczos"), ValueError, "method must be one of.*'lanczos'"),
        (np.eye(3), dict(method="gram", iterations=-1), ValueError, "iterations must be a "
         "non-negative int, got iterations=-1"),
        (np.eye(3), dict(method="gram", iterations=2.0), TypeError, "iterations must be an int"),
        (np.eye(3), dict(method="gram", max_nnz=0), ValueError, "max_nnz must be a positive"),
        (np.eye(3), dict(tol=-1.0), ValueError, "tol must be non-negative.*tol=-1.0"),
        (np.eye(3), dict(method="power", maxiter=0), ValueError, "maxiter must be a positive"),
        (np.eye(3), dict(rng="x"), TypeError, "rng must be an int seed"),
        (np.ones(3), {}, ValueError, r"op must be 2-D.*op.shape=\(3,\)"),
        ([[1.0]], {}, TypeError, "op must be a ConvOperator.*got op of type list"),
        (aslinearoperator(np.eye(3)), dict(method="gram"), TypeError,
         "method='gram' needs an explicit matrix"),
    ],
)
def test_operator_norm_validates_arguments(op, kwargs, error, match):
    with pytest.raises(error, match=match):
        operator_norm(op, **kwargs)


# ---------------------------------------------------------------------------
# gram_matrix, column_norms
# ---------------------------------------------------------------------------


def _assert_canonical(matrix):
    assert isinstance(matrix, sp.csr_array)
    assert matrix.has_canonical_format
    for row in range(matrix.shape[0]):
        cols = matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]
        assert np.all(np.diff(cols) > 0)  # sorted, no duplicates: checked, not trusted


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_matrix_and_column_norms_match_dense(dtype, transposed):
    rng = np.random.default_rng(11)
    weight = random_array(rng, (4, 2, 3, 2), dtype)
    geometry = dict(stride=(2, 1), padding=[(1, 2), 1], dilation=(1, 2), groups=2)
    dense, _, _ = reference_conv_matrix(weight, (4, 9, 8), geometry["stride"],
                                        geometry["padding"], geometry["dilation"],
                                        geometry["groups"], "reflect")
    op = ConvOperator(weight, (4, 9, 8), padding_mode="reflect", **geometry)
    if transposed:
        op, dense = op.T, dense.T
    G = gram_matrix(op)
    _assert_canonical(G)
    assert G.dtype == np.dtype(dtype) and G.shape == (dense.shape[1],) * 2
    expected = dense.conj().T @ dense
    tol = 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-12
    np.testing.assert_allclose(G.toarray(), expected, rtol=tol, atol=tol * np.abs(expected).max())
    # the same for the plain matrix and a dense array
    for A in (op.matrix, op.matrix.toarray(), sp.coo_matrix(op.matrix)):
        np.testing.assert_allclose(gram_matrix(A).toarray(), expected, rtol=tol,
                                   atol=tol * np.abs(expected).max())
    norms = column_norms(op)
    assert norms.dtype == (np.float32 if tol > 1e-6 else np.float64)
    np.testing.assert_allclose(norms, np.linalg.norm(dense, axis=0), rtol=tol)
    np.testing.assert_allclose(norms ** 2, np.diag(expected).real, rtol=tol)
    np.testing.assert_allclose(column_norms(op.matrix.toarray()), norms, rtol=tol)


def test_gram_and_column_norms_of_a_matrix_with_duplicates():
    # (0, 1) is stored twice, as 3 and 1: the entry is 4.
    coo = sp.coo_array(([3.0, 1.0, 2.0, -1.0], ([0, 0, 1, 2], [1, 1, 0, 1])), shape=(3, 2))
    dense = coo.toarray()
    np.testing.assert_array_equal(column_norms(coo), np.linalg.norm(dense, axis=0))
    csr = sp.csr_array((coo.data, [1, 1, 0, 1], [0, 2, 3, 4]), shape=(3, 2))  # kept twice
    assert not csr.has_canonical_format
    np.testing.assert_array_equal(csr.toarray(), dense)
    for A in (coo, csr):
        np.testing.assert_array_equal(column_norms(A), np.linalg.norm(dense, axis=0))
        G = gram_matrix(A)
        _assert_canonical(G)
        np.testing.assert_array_equal(G.toarray(), dense.T @ dense)
        assert operator_norm(A, method="gram", iterations=0) == pytest.approx(
            np.linalg.norm(dense))
    assert csr.nnz == 4  # the argument is not modified


def test_gram_and_column_norms_reject_matrix_free_operators():
    lin = aslinearoperator(np.eye(3))
    for func in (gram_matrix, column_norms):
        with pytest.raises(TypeError, match="explicit matrix.*matrix-free"):
            func(lin)
        with pytest.raises(TypeError, match="op of type str"):
            func("W")
        with pytest.raises(ValueError, match="op must be 2-D"):
            func(np.ones((2, 2, 2)))


def test_jacobi_preconditioning_needs_fewer_iterations():
    # Input channels with weights on very different scales: the columns of W
    # differ in norm by about 100 and W^T W is badly scaled (cond(W) ~ 490,
    # ~ 5.8 once the columns are scaled to unit norm).
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((4, 2, 3, 3))
    weight[:, 1] *= 100.0
    op = ConvOperator(weight, (2, 8, 8), padding=1)
    dense = op.matrix.toarray()
    x_true = rng.standard_normal(op.shape[1])
    y = op.matvec(x_true)
    b = op.rmatvec(y)  # consistent normal equations W^T W x = W^T y
    expected = np.linalg.solve(dense.T @ dense, b)
    np.testing.assert_allclose(expected, x_true, rtol=1e-8, atol=1e-8)

    norms = column_norms(op)
    normal = aslinearoperator(op.H) @ op
    jacobi = LinearOperator(normal.shape, matvec=lambda r: r / norms**2, dtype=np.float64)
    counts = {}
    for name, M in (("plain", None), ("jacobi", jacobi)):
        iterations = []
        x, info = cg(normal, b, rtol=1e-12, maxiter=5000, M=M,
                     callback=lambda xk, iterations=iterations: iterations.append(1))
        assert info == 0
        assert np.linalg.norm(x - expected) <= 1e-6 * np.linalg.norm(expected)
        counts[name] = len(iterations)
    assert counts["jacobi"] < counts["plain"] / 2, counts

    # The same with lsqr on the column-scaled operator W diag(1 / norms).
    scaled = op @ aslinearoperator(sp.diags_array(1.0 / norms))
    plain = lsqr(op, y, atol=1e-12, btol=1e-12, iter_lim=5000)
    z = lsqr(scaled, y, atol=1e-12, btol=1e-12, iter_lim=5000)
    assert plain[1] in (1, 2) and z[1] in (1, 2)  # converged
    for x in (plain[0], z[0] / norms):
        assert np.linalg.norm(x - expected) <= 1e-6 * np.linalg.norm(expected)
    assert z[2] < plain[2] / 2, (z[2], plain[2])


# ---------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.complex128, np.float32])
def test_compose_equals_applying_in_turn(dtype):
    rng = np.random.default_rng(13)
    first = ConvOperator(random_array(rng, (4, 2, 3, 3), dtype), (2, 9, 8), stride=2, padding=1)
    second = ConvOperator(random_array(rng, (2, 2, 3, 3), dtype), first.output_shape,
                          padding=2, dilation=2, groups=2, padding_mode="reflect")
    C = compose(second, first)
    _assert_canonical(C)
    assert C.shape == (second.shape[0], first.shape[1]) and C.dtype == np.dtype(dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    expected = second.matrix.toarray() @ first.matrix.toarray()
    np.testing.assert_allclose(C.toarray(), expected, rtol=tol, atol=tol * np.abs(expected).max())
    x = random_array(rng, first.shape[1], dtype)
    np.testing.assert_allclose(C @ x, second.matvec(first.matvec(x)), rtol=tol,
                               atol=tol * np.abs(expected).max())
    # conv followed by its transpose: W^T W (no conjugation), unlike gram_matrix
    WtW = compose(first.T, first)
    _assert_canonical(WtW)
    W = first.matrix.toarray()
    np.testing.assert_allclose(WtW.toarray(), W.T @ W, rtol=tol, atol=tol * np.abs(W).max() ** 2)
    # matrices and dense arrays compose too, with mixed dtypes promoted
    mixed = compose(second.matrix.toarray(), first.matrix.astype(np.complex128))
    assert mixed.dtype == np.complex128
    np.testing.assert_allclose(mixed.toarray(), expected, rtol=tol,
                               atol=tol * np.abs(expected).max())


def test_compose_matches_torch_layers():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    w1, w2 = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((2, 4, 3, 3))
    first = ConvOperator(w1, (3, 8, 8), stride=2, padding=1)
    second = ConvOperator(w2, first.output_shape, padding=1, padding_mode="circular")
    x = rng.standard_normal((1, 3, 8, 8))
    xt = torch.from_numpy(x)
    hidden = F.conv2d(xt, torch.from_numpy(w1), stride=2, padding=1)
    out = F.conv2d(F.pad(hidden, (1, 1, 1, 1), mode="circular"), torch.from_numpy(w2))
    np.testing.assert_allclose(compose(second, first) @ x.ravel(), out.numpy().ravel(),
                               rtol=1e-12, atol=1e-12)
    # the convolution followed by its transposed convolution (output_padding picks 8)
    back = F.conv_transpose2d(hidden, torch.from_numpy(w1), stride=2, padding=1,
                              output_padding=1)
    np.testing.assert_allclose(compose(first.T, first) @ x.ravel(), back.numpy().ravel(),
                               rtol=1e-12, atol=1e-12)


def test_compose_checks_shapes():
    rng = np.random.default_rng(15)
    a = ConvOperator(rng.standard_normal((4, 2, 3)), (2, 10), padding=1)  # 20 -> 40
    b = ConvOperator(rng.standard_normal((2, 2, 3)), (2, 10))  # 20 -> 16
    with pytest.raises(ValueError, match=r"inner's output size 40 \(inner.shape=\(40, 20\)\) "
                                         r"is not outer's input size 20 \(outer.shape=\(16, 20\)"):
        compose(b, a)
    c = ConvOperator(rng.standard_normal((1, 4, 3)), (4, 10), padding=1)  # (4, 10) -> (1, 10)
    d = ConvOperator(rng.standard_normal((1, 8, 3)), (8, 5), padding=1)  # (8, 5) -> (1, 5)
    with pytest.raises(ValueError, match=r"inner.output_shape=\(4, 10\) is not "
                                         r"outer.input_shape=\(8, 5\)"):
        compose(d, a)
    assert compose(d.matrix, a.matrix).shape == (5, 20)  # across a reshape: matrices
    with pytest.raises(TypeError, match="outer must be .*got outer of type list"):
        compose([[1.0]], a)
    with pytest.raises(ValueError, match=r"inner must be 2-D"):
        compose(c, np.ones(40))


@pytest.mark.parametrize("scale, match", [
    (np.nan, r"op's weight must be finite"),
    (np.inf, r"op's weight must be finite"),
    (1e80, r"op's weight's largest magnitude .* is outside \[2\*\*-200, 2\*\*200\]"),
    (1e-100, r"op's weight's largest magnitude .* is outside \[2\*\*-200, 2\*\*200\]"),
])
def test_norms_of_weights_no_method_can_bound_are_refused_by_name(scale, match):
    # measured before: power iteration gave 0 at 1e-100 and inf at 1e80, the certificate's
    # eigensolver raised LinAlgError at 1e80 and gave lower > upper at 1e160
    w = np.random.default_rng(0).standard_normal((2, 3, 3, 3))
    w[0, 0, 0, 0] = scale if not np.isfinite(scale) else w[0, 0, 0, 0]
    op = ConvOperator(w * (scale if np.isfinite(scale) else 1.0), (3, 6, 6), padding=1)
    with pytest.raises(ValueError, match=match):
        norm_bounds(op)
    for method in ("svds", "power", "gram"):
        with pytest.raises(ValueError, match=match):
            operator_norm(op, method=method)


@pytest.mark.parametrize("scale", [2.0**-190, 2.0**190])
def test_norm_bounds_hold_at_the_ends_of_the_weight_range(scale):
    # the interval contains the dense SVD's norm at both ends of the accepted range
    w = np.random.default_rng(1).standard_normal((2, 3, 3, 3))
    op = ConvOperator(w * scale, (3, 6, 6), padding=1)
    exact = np.linalg.norm(ConvOperator(w, (3, 6, 6), padding=1).matrix.toarray(), 2) * scale
    bounds = norm_bounds(op)
    assert bounds.lower <= exact * (1 + 1e-12) and exact <= bounds.upper * (1 + 1e-12)
    assert bounds.upper <= bounds.lower * 1.02
