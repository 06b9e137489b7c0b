"""The cosine basis of the 'dct1'/'dct2' preconditioners: scipy.fft or dense DCT matrices.

``_CosineBasis`` transforms each axis by scipy.fft or, where pocketfft is slow
at that length, by the dense orthonormal DCT matrix.  Both paths (forced by
replacing the per-axis rule, and taken by the rule itself at chosen lengths)
are checked against scipy.fft.dctn / idctn with ``norm='ortho'`` on the same
samples, and the preconditioner built on them against the same preconditioner
computed through scipy.fft alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from sparse_tconv import ConvOperator
from sparse_tconv import _preconditioners as pc
from sparse_tconv._preconditioners import _CosineBasis
from sparse_tconv._preconditioning.cosine import _cosine_diagonal, _cosine_sums
from sparse_tconv.solvers import preconditioner

RTOL = ATOL = 1e-12

# rules replacing pc._dense_dct: every axis dense, every axis by scipy, or a mix
RULES = {
    "dense": lambda n, dct_type: True,
    "scipy": lambda n, dct_type: False,
    "mixed": lambda n, dct_type: n % 2 == 1,  # the sizes below mix odd and even lengths
}

# (channels, groups, sample_size, axes)
CASES = [
    (1, 1, (9,), (0,)),
    (3, 1, (16,), (0,)),
    (4, 2, (7, 12), (0, 1)),
    (6, 3, (8, 5), (0, 1)),
    (2, 2, (6, 9), (1,)),  # one axis left untransformed
    (1, 1, (5, 6, 7), (0, 1, 2)),
    (4, 2, (4, 7, 3), (0, 2)),
]


def oracle(x: np.ndarray, dct_type: int, axes: tuple[int, ...], inverse: bool = False):
    if not axes:
        return x
    f = scipy.fft.idctn if inverse else scipy.fft.dctn
    return f(x, type=dct_type, axes=[2 + a for a in axes], norm="ortho")


@pytest.mark.parametrize("dct_type", [1, 2])
@pytest.mark.parametrize("n", [2, 3, 5, 16, 17, 127, 128])
def test_dct_matrix_is_scipys(dct_type, n):
    M = pc._dct_matrix(n, dct_type)
    expected = scipy.fft.dct(np.eye(n), type=dct_type, norm="ortho", axis=0)
    np.testing.assert_allclose(M, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(M.T @ M, np.eye(n), rtol=0, atol=1e-13)
    if dct_type == 1:
        np.testing.assert_array_equal(M, M.T)  # symmetric: its own inverse
    assert not M.flags.writeable  # cached: shared by every basis
    assert pc._dct_matrix(n, dct_type) is M


def test_rule_chooses_the_dense_matrix_where_pocketfft_is_slow():
    # DCT-I: FFT length 2(n - 1) = 254 = 2 * 127, 382 = 2 * 191, 508 = 4 * 127;
    # 256 = 2^8, 510 = 2 * 3 * 5 * 17 and 512 = 2^9: small prime factors
    assert pc._dense_dct(128, 1) and pc._dense_dct(192, 1) and pc._dense_dct(255, 1)
    assert not pc._dense_dct(129, 1) and not pc._dense_dct(256, 1)
    assert not pc._dense_dct(257, 1)
    # DCT-II: FFT length n
    assert pc._dense_dct(127, 2) and pc._dense_dct(257, 2) and pc._dense_dct(509, 2)
    assert not pc._dense_dct(128, 2) and not pc._dense_dct(192, 2)
    # too large a matrix, whatever the factors (1278 = 2 * 3^2 * 71; 1009 prime); a
    # single point is left to scipy
    assert not pc._dense_dct(640, 1) and not pc._dense_dct(1009, 2)
    assert not pc._dense_dct(1, 1)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dct_type", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}ch{c[1]}g{c[2]}ax{c[3]}")
def test_forward_and_inverse_match_scipy(monkeypatch, rule, dct_type, case):
    channels, groups, size, axes = case
    monkeypatch.setattr(pc, "_dense_dct", RULES[rule])
    basis = _CosineBasis(channels, groups, size, dct_type, axes, 1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, channels, *size))
    X = basis.forward(x)
    assert X.shape == (2, groups, channels // groups, *size)
    np.testing.assert_allclose(X.reshape(x.shape), oracle(x, dct_type, axes),
                               rtol=RTOL, atol=ATOL)
    Y = rng.standard_normal(X.shape)
    np.testing.assert_allclose(basis.inverse(Y),
                               oracle(Y.reshape(x.shape), dct_type, axes, inverse=True),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(basis.inverse(X), x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dct_type, size", [(1, (128, 129)), (2, (127, 128)), (1, (3, 65, 192))])
def test_rule_paths_match_scipy(dct_type, size):
    """The rule itself, at lengths it sends to each path (2-D: one of each)."""
    axes = tuple(range(len(size)))
    assert len({pc._dense_dct(n, dct_type) for n in size}) == 2
    basis = _CosineBasis(2, 1, size, dct_type, axes, 2)
    x = np.random.default_rng(11).standard_normal((1, 2, *size))
    X = basis.forward(x)
    np.testing.assert_allclose(X.reshape(x.shape), oracle(x, dct_type, axes),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(basis.inverse(X), x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dct_type", [1, 2])
def test_complex_samples(monkeypatch, rule, dct_type):
    monkeypatch.setattr(pc, "_dense_dct", RULES[rule])
    basis = _CosineBasis(2, 1, (6, 7), dct_type, (0, 1), 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 6, 7)) + 1j * rng.standard_normal((2, 2, 6, 7))
    X = basis.forward(x)
    np.testing.assert_allclose(X.reshape(x.shape), oracle(x, dct_type, (0, 1)),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(basis.inverse(X), x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("complex_vector", [False, True])
def test_dct1_preconditioner_matches_scipy_only(monkeypatch, complex_vector):
    """The 'dct1' preconditioner at 128 x 128 (dense DCT-I matrices) against scipy.fft's."""
    assert pc._dense_dct(128, 1)
    kernel = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    op = ConvOperator(kernel[None, None], (1, 128, 128), padding=1, padding_mode="reflect")
    rng = np.random.default_rng(5)
    v = rng.standard_normal(op.shape[1])
    if complex_vector:
        v = v + 1j * rng.standard_normal(op.shape[1])
    dense = preconditioner(op, 0.05, kind="dct1") @ v
    monkeypatch.setattr(pc, "_dense_dct", RULES["scipy"])
    reference = preconditioner(op, 0.05, kind="dct1") @ v
    np.testing.assert_allclose(dense, reference, rtol=0,
                               atol=1e-12 * np.abs(reference).max())


# ---------------------------------------------------------------------------
# The DCT-II model's diagonal (its border scaling reads it)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size, reach", [((1,), 0), ((6,), 2), ((40,), 3), ((5, 9), (2, 1)),
                                         ((3, 30), (4, 6)), ((64,), 20)])
def test_the_cosine_model_diagonal_is_that_of_its_dense_matrix(size, reach):
    # The model is C^T diag(lambda) C per channel, C the orthonormal DCT-II matrix of each
    # axis (scipy's) and lambda_f = sum_t G(t) prod_a cos(pi f_a t_a / n_a): its diagonal
    # formed densely, against the one counted from the reflections.
    reach = np.broadcast_to(reach, len(size))
    rng = np.random.default_rng(int(np.prod(size)) + int(reach.sum()))
    lags = [np.r_[0:r + 1, -r:0] for r in reach]  # wrap-around order, as _gram_kernel's
    G = rng.random((1, 2, 2, *(lag.size for lag in lags)))
    for axis, lag in enumerate(lags):  # even in every lag axis: G(-t) = G(t)
        G = (G + np.take(G, (-np.arange(lag.size)) % lag.size, axis=3 + axis)) / 2
    diagonal = _cosine_diagonal(G, lags, size, tuple(range(len(size))))
    for c in range(2):
        lam = G[0, c, c]
        for axis, (n, lag) in enumerate(zip(size, lags)):
            cos = np.cos(np.pi * np.outer(np.arange(n), lag) / n)
            lam = np.moveaxis(np.tensordot(lam, cos, axes=([axis], [1])), -1, axis)
        C = np.ones((1, 1))
        for n in size:
            C = np.kron(C, scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0))
        dense = C.T @ np.diag(lam.ravel()) @ C
        np.testing.assert_allclose(diagonal[c].ravel(), np.diag(dense), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("n, dct_type", [(2, 1), (2, 2), (5, 1), (17, 2), (64, 1), (2048, 2)])
@pytest.mark.parametrize("lag", [[0], [0, 1, 2, -2, -1], [0, 3, -3], list(range(-40, 41))],
                         ids=["zero", "reach-2", "strided", "past-2N"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_the_cosine_sums_are_the_table_of_cosines(n, dct_type, lag, dtype):
    # The model's symbol sum_j G_j cos(pi f lag_j / N) by a folded FFT against the
    # definition, a table of cosines; lags past 2N alias unless the FFT is longer.
    rng = np.random.default_rng(n)
    lag = np.array(lag)
    values = rng.standard_normal((2, 3, lag.size, 4))
    if dtype == np.complex128:
        values = values + 1j * rng.standard_normal(values.shape)
    N = n - 1 if dct_type == 1 else n
    table = np.cos(np.pi * np.outer(np.arange(n), lag) / N)
    expected = np.moveaxis(np.tensordot(values, table, axes=([2], [1])), -1, 2)
    got = _cosine_sums(values, 2, lag, n, N)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(values).sum())
