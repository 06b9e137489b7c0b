"""The bordered construction (``kind='bordered'``): the circulant and the border's block.

- the ring against its definition (positions within ``d (k - 1)`` of an edge);
- the ring's rows of ``W^H W`` against the dense matrix built
  from the CSR, in every padding mode, 1-D to 3-D, dilated, grouped, complex;
- the preconditioner against symmetric multiplicative Schwarz written out
  densely, ``I - M A = (I - B_S A)(I - C A)(I - B_S A)``, and against the
  inverse where the ring is the whole input;
- the solves against dense ones, and in fewer iterations than plain CG;
- the Schur-test bound of plain CG's estimate against the dense norm;
- refusals, and 'auto''s rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tconv import ConvOperator, ConvTransposeOperator, solvers
from sparse_tconv._preconditioning import bordered
from sparse_tconv._preconditioning.bordered import Bordered, ring_mask
from sparse_tconv.solvers import preconditioner, tikhonov

MODES = ("zeros", "reflect", "replicate", "circular")


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dense(op) -> np.ndarray:
    return op.matrix.toarray().astype(np.result_type(op.dtype, np.float64))


def random_weight(shape, seed, complex_=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if complex_:
        w = w + 1j * rng.standard_normal(shape)
    return w / np.abs(w).sum(axis=tuple(range(1, len(shape))), keepdims=True)


GEOMETRIES = [  # (weight shape, input shape, settings, complex)
    ((3, 3, 3, 3), (3, 9, 8), dict(padding=1), False),
    ((2, 2, 3, 3), (2, 7, 9), dict(padding=(1, 2)), True),
    ((4, 2, 3, 3), (4, 8, 7), dict(padding=1, groups=2), False),
    ((2, 2, 3, 3), (2, 11, 10), dict(padding=2, dilation=(2, 1)), False),
    ((2, 3, 5), (3, 13), dict(padding=2), False),
    ((2, 2, 3, 3, 3), (2, 5, 6, 5), dict(padding=1), False),
    ((1, 1, 5, 4), (1, 10, 9), dict(padding=(2, 1)), False),  # one channel, asymmetric
]


def operator(case, mode):
    shape, input_shape, settings_, complex_ = case
    return ConvOperator(random_weight(shape, len(input_shape) + shape[0], complex_),
                        input_shape, padding_mode=mode, **settings_)


def schwarz(op, damp, circulant: np.ndarray) -> np.ndarray:
    """``M`` with ``I - M A = (I - B_S A)(I - C A)(I - B_S A)``, densely."""
    W = dense(op)
    n = W.shape[1]
    A = W.conj().T @ W + damp * damp * np.eye(n)
    geom = op.convolution.geometry
    ring = np.flatnonzero(np.broadcast_to(ring_mask(geom), op.input_shape))
    B = np.zeros((n, n), dtype=A.dtype)
    B[np.ix_(ring, ring)] = np.linalg.inv(A[np.ix_(ring, ring)])
    eye = np.eye(n)
    error = (eye - B @ A) @ (eye - circulant @ A) @ (eye - B @ A)
    return (eye - error) @ np.linalg.inv(A)


# ---------------------------------------------------------------------------
# The ring


@pytest.mark.parametrize("size, kernel, dilation", [
    ((9, 8), (3, 3), (1, 1)), ((11, 10), (3, 5), (2, 1)), ((13,), (5,), (1,)),
    ((5, 6, 5), (3, 3, 3), (1, 1, 1)), ((6, 6), (1, 3), (1, 1)),
])
def test_the_ring_is_every_position_within_the_reach_of_an_edge(size, kernel, dilation):
    geom = ConvOperator(np.ones((1, 1, *kernel)), (1, *size), dilation=dilation,
                        padding=tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
                        ).convolution.geometry
    mask = ring_mask(geom)
    for index in np.ndindex(*size):
        near = any(min(i, L - 1 - i) < max(1, d * (k - 1))
                   for i, L, k, d in zip(index, size, kernel, dilation))
        assert mask[index] == near, index


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRIES, ids=[str(c[1]) for c in GEOMETRIES])
def test_the_ring_rows_are_those_of_the_normal_matrix(case, mode):
    op = operator(case, mode)
    P = preconditioner(op, 0.3, "bordered")
    W = dense(op)
    A = W.conj().T @ W
    ring = np.flatnonzero(np.broadcast_to(ring_mask(op.convolution.geometry), op.input_shape))
    np.testing.assert_array_equal(np.sort(P._ring), ring)  # (numbered in the factor's order)
    np.testing.assert_allclose(P._rows.toarray(), A[P._ring], atol=1e-13)
    np.testing.assert_allclose(P._rows_adjoint.toarray(), A[:, P._ring], atol=1e-13)


# ---------------------------------------------------------------------------
# The preconditioner


@pytest.mark.parametrize("damp", [0.2, 1e-2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRIES, ids=[str(c[1]) for c in GEOMETRIES])
def test_it_is_symmetric_multiplicative_schwarz(case, mode, damp):
    op = operator(case, mode)
    n = op.shape[1]
    P = preconditioner(op, damp, "bordered")
    circulant = preconditioner(op, damp, "circulant", shift=Bordered.default_shift,
                               border=False) @ np.eye(n)
    M = P @ np.eye(n)
    assert rel(M, schwarz(op, damp, circulant)) < 1e-9
    assert rel(M, M.conj().T) < 1e-10
    assert np.linalg.eigvalsh((M + M.conj().T) / 2).min() > 0


@pytest.mark.parametrize("mode", MODES)
def test_where_the_ring_is_the_whole_input_it_is_the_inverse(mode):
    op = ConvOperator(random_weight((2, 2, 3, 3), 1), (2, 4, 4), padding=1, padding_mode=mode)
    assert ring_mask(op.convolution.geometry).all()
    W = dense(op)
    damp = 0.1
    inverse = np.linalg.inv(W.T @ W + damp * damp * np.eye(W.shape[1]))
    assert rel(preconditioner(op, damp, "bordered") @ np.eye(W.shape[1]), inverse) < 1e-10


def test_complex_vectors_and_blocks_of_columns():
    op = operator(GEOMETRIES[0], "reflect")
    n = op.shape[1]
    P = preconditioner(op, 1e-2, "bordered")
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n, 3)) + 1j * rng.standard_normal((n, 3))
    M = P @ np.eye(n)
    assert rel(P @ X, M @ X) < 1e-12
    assert rel(P.matvec(X[:, 1]), M @ X[:, 1]) < 1e-12


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_layers(data):
    ndim = data.draw(st.integers(1, 2), label="ndim")
    groups = data.draw(st.sampled_from([1, 2]), label="groups")
    per_group = data.draw(st.integers(1, 2), label="channels per group")
    channels = groups * per_group
    kernel = tuple(data.draw(st.integers(1, 4), label="kernel") for _ in range(ndim))
    dilation = tuple(data.draw(st.integers(1, 2), label="dilation") for _ in range(ndim))
    reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
    size = tuple(data.draw(st.integers(r + 1, r + 7), label="size") for r in reach)
    padding = tuple((r // 2, r - r // 2) for r in reach)  # the input's size
    mode = data.draw(st.sampled_from(MODES), label="mode")
    if mode == "reflect" and any(max(p) >= L for p, L in zip(padding, size)):
        mode = "zeros"
    damp = data.draw(st.sampled_from([1e-2, 0.3]), label="damp")
    op = ConvOperator(random_weight((channels, per_group, *kernel), data.draw(
        st.integers(0, 99), label="seed"), data.draw(st.booleans(), label="complex")),
        (channels, *size), padding=padding, dilation=dilation, groups=groups,
        padding_mode=mode)
    n = op.shape[1]
    circulant = preconditioner(op, damp, "circulant", shift=Bordered.default_shift,
                               border=False) @ np.eye(n)
    assert rel(preconditioner(op, damp, "bordered") @ np.eye(n),
               schwarz(op, damp, circulant)) < 1e-8


# ---------------------------------------------------------------------------
# Solves


@pytest.mark.parametrize("mode", ["zeros", "replicate", "reflect"])
def test_tikhonov_solves_mixing_layers_in_fewer_iterations(mode):
    op = ConvOperator(random_weight((3, 3, 3, 3), 0), (3, 24, 24), padding=1, padding_mode=mode)
    rng = np.random.default_rng(3)
    y = op @ rng.random(op.shape[1]) + 1e-3 * rng.standard_normal(op.shape[0])
    damp = 1e-2
    x, info = tikhonov(op, y, damp, rtol=1e-8)
    assert info.preconditioner == "bordered" and info.converged
    W = dense(op)
    exact = np.linalg.solve(W.T @ W + damp * damp * np.eye(W.shape[1]), W.T @ y)
    assert rel(x, exact) < 1e-5
    _, plain = tikhonov(op, y, damp, rtol=1e-8, M=None)
    # (measured: 4-8 times fewer; half is far from any processor's rounding)
    assert 2 * info.iterations <= plain.iterations


def test_the_schur_bound_bounds_the_norm():
    for seed, (shape, input_shape, settings_, _) in enumerate(GEOMETRIES):
        op = ConvOperator(random_weight(shape, seed), input_shape, **settings_)
        norm = np.linalg.norm(dense(op), 2)
        damp, rtol = 1e-2, 1e-6
        estimate = solvers._plain_iterations(op, damp, rtol)
        bound = math.sqrt(((estimate / (0.25 * math.log(2 / rtol))) ** 2 - 1) * damp * damp)
        assert norm <= bound * (1 + 1e-12)
    single = ConvOperator(np.array([[[1.0, -2.0, 0.5]]]), (1, 9), padding=1)
    estimate = solvers._plain_iterations(single, 0.1, 1e-6)
    assert estimate == pytest.approx(0.25 * math.sqrt(1 + 35**2) * math.log(2e6))


# ---------------------------------------------------------------------------
# Where it applies


@pytest.mark.parametrize("op", [
    ConvOperator(random_weight((2, 2, 3, 3), 0), (2, 8, 8), padding=1, stride=2),
    ConvTransposeOperator(random_weight((2, 2, 3, 3), 0), (2, 8, 8), padding=1),
], ids=["strided", "transposed"])
def test_it_needs_a_convolution_of_stride_one(op):
    with pytest.raises(NotImplementedError, match="kind='bordered' needs a convolution"):
        preconditioner(op, 1e-2, "bordered")
    assert not Bordered.auto_applies(op) and Bordered.set_up_cost(op) == math.inf


def test_it_refuses_a_csr_past_its_limit(monkeypatch):
    op = ConvOperator(random_weight((2, 2, 3, 3), 0), (2, 8, 8), padding=1)
    monkeypatch.setattr(bordered, "_CSR_BYTES", 1000)
    with pytest.raises(NotImplementedError, match="bytes here, more than 1000"):
        preconditioner(op, 1e-2, "bordered")
    assert not Bordered.auto_applies(op)


def test_auto_weighs_its_cost_against_plain_cg():
    three = ConvOperator(random_weight((3, 3, 3, 3), 0), (3, 16, 16), padding=1)
    nine = ConvOperator(random_weight((9, 9, 3, 3), 0), (9, 16, 16), padding=1)
    assert Bordered.set_up_cost(three) < solvers._plain_iterations(three, 1e-2, 1e-6)
    assert solvers._tikhonov_kind(three, "identity", 1e-2, 1e-6) == "bordered"
    # a quick problem: plain CG's whole solve costs less than the set-up
    assert solvers._tikhonov_kind(three, "identity", 1.0, 1e-6) == "none"
    # from 9 channels a group, an application costs too much to pay
    assert Bordered.set_up_cost(nine) == math.inf
    assert solvers._tikhonov_kind(nine, "identity", 1e-2, 1e-6) == "none"
