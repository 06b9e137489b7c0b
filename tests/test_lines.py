"""The lines construction (``kind='lines'``): kernels whose taps lie on one line.

- :func:`kernel_line` against collinearity decided independently (the rank
  of the taps' offsets);
- the preconditioner against the dense inverse of ``W^H W + damp^2 I``
  built from the CSR matrix, in every padding mode, in 1-D to 3-D, dilated,
  complex; the ring it eliminates last against the columns where W differs
  from zero padding's;
- with ``L='gradient'`` against the dense inverse of ``W^H W`` plus
  ``damp^2`` times the entries of ``D^H D`` between positions of one line,
  the lines found by brute force;
- 'auto' and tikhonov's choice, and the solves against dense ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import cg

from sparse_tconv import ConvOperator, ConvTransposeOperator, solvers
from sparse_tconv._preconditioning.lines import Lines, kernel_line
from sparse_tconv.solvers import gradient_operator, normal_operator, preconditioner, tikhonov


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dense(op) -> np.ndarray:
    return op.matrix.toarray().astype(np.result_type(op.dtype, np.float64))


def line_kernel(shape, first, direction, values) -> np.ndarray:
    """A kernel with ``values[j]`` at ``first + j * direction``."""
    k = np.zeros(shape, dtype=np.result_type(np.asarray(values), np.float64))
    for j, value in enumerate(values):
        k[tuple(np.asarray(first) + j * np.asarray(direction))] = value
    return k


ANTI = line_kernel((7, 7), (0, 6), (1, -1), np.full(7, 1 / 7))

GEOMETRIES = [  # (kernel, input shape, settings)
    (ANTI, (1, 12, 11), dict(padding=3)),
    (line_kernel((3, 4), (0, 0), (1, 1), [1.0, -2.0, 0.5]), (1, 9, 7), dict(padding=(1, 2))),
    (line_kernel((5, 3), (0, 2), (2, -1), [1.0, 0.0, 3.0]), (1, 10, 9),
     dict(padding=((4, 0), (1, 1)))),  # (a zero tap inside the line)
    (line_kernel((3, 3), (0, 0), (1, 1), [1.0, 2.0, -1.0]), (1, 11, 9),
     dict(padding=2, dilation=(2, 1))),
    (line_kernel((3, 3), (0, 2), (1, -1), [2.0, 0.0, 1.0]), (1, 8, 8), dict(padding=0)),
    (line_kernel((5,), (0,), (2,), [1.0, 0.5, 0.25]), (1, 13), dict(padding=2)),
    (line_kernel((3, 3, 3), (0, 0, 2), (1, 1, -1), [1.0, 2.0, -1.0]), (1, 5, 6, 5),
     dict(padding=1)),
    (line_kernel((3, 3), (0, 2), (1, -1), [1 + 2j, 0.5j, -1.0]), (1, 7, 8), dict(padding=1)),
]


@given(st.integers(1, 3), st.integers(1, 5), st.data())
@settings(max_examples=60, deadline=None)
def test_kernel_line_finds_the_line_exactly_when_the_taps_are_collinear(ndim, count, data):
    shape = tuple(data.draw(st.integers(1, 5)) for _ in range(ndim))
    taps = data.draw(st.lists(st.tuples(*(st.integers(0, n - 1) for n in shape)),
                              min_size=count, max_size=count, unique=True))
    k = np.zeros(shape)
    for tap in taps:
        k[tap] = data.draw(st.sampled_from([1.0, -2.0, 0.5]))
    offsets = np.array(taps) - np.array(taps[0])
    collinear = np.linalg.matrix_rank(offsets) <= 1
    line = kernel_line(k)
    assert (line is not None) == collinear
    if line is None:
        return
    v = line.direction
    assert np.gcd.reduce(np.abs(v)) == 1 and v[np.flatnonzero(v)[0]] > 0
    assert np.all(np.diff(line.steps) > 0) and line.steps[0] == 0
    found = line.taps[0] + line.steps[:, None] * v
    assert sorted(map(tuple, found.tolist())) == sorted(taps)
    assert np.array_equal(line.values, k[tuple(found.T)])


def test_kernel_line_of_no_tap_and_one_tap():
    assert kernel_line(np.zeros((3, 3))) is None
    one = kernel_line(line_kernel((3, 3), (1, 2), (1, 0), [4.0]))
    assert one.bandwidth == 0 and one.taps.tolist() == [[1, 2]]


MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("damp", [0.1, 1e-3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_lines_is_the_exact_inverse_in_every_padding_mode(case, mode, damp):
    # zero padding: the lines alone; the others fold taps onto a ring of positions
    # (the edge, the rows inside it, the opposite side), eliminated last
    kernel, input_shape, kw = GEOMETRIES[case]
    try:
        op = ConvOperator(kernel[None, None], input_shape, padding_mode=mode, **kw)
    except ValueError:
        pytest.skip("this mode does not take this padding")
    A = dense(op)
    n = A.shape[1]
    M = preconditioner(op, damp, "lines")
    assert M.kind == "lines" and M.damp == damp and M.shape == (n, n)
    inverse = np.linalg.inv(A.conj().T @ A + damp**2 * np.eye(n))
    assert rel(M @ np.eye(n), inverse) < 1e-8
    # 'auto' takes it (the Kronecker construction, also exact, first for 1-D kernels;
    # the DFT, exact, first where W is circulant)
    exact = {"kronecker"} if kernel.ndim == 1 else {"lines"}
    if mode == "circular":
        exact.add("circulant")
    assert preconditioner(op, damp).kind in exact
    # complex vectors on a real factor, and several at once
    X = np.random.default_rng(case).standard_normal((n, 3)) * (1 + 0.5j)
    assert rel(M @ X, inverse @ X) < 1e-8
    assert rel(M.H @ X[:, 0], inverse @ X[:, 0]) < 1e-8


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_lines_is_exact_without_padding_in_any_mode(mode):
    op = ConvOperator(ANTI[None, None], (1, 10, 9), padding=0, padding_mode=mode)
    A = dense(op)
    n = A.shape[1]
    assert rel(preconditioner(op, 0.05) @ np.eye(n),
               np.linalg.inv(A.T @ A + 0.0025 * np.eye(n))) < 1e-8


def same_line(size, step) -> np.ndarray:
    """``S[p, q]``: whether ``q - p`` is a multiple of ``step`` (brute force)."""
    points = np.argwhere(np.ones(size, dtype=bool))
    diff = points[None, :, :] - points[:, None, :]
    lead = np.flatnonzero(step)[0]
    multiple = diff[..., lead] // step[lead]
    return np.all(diff == multiple[..., None] * np.asarray(step), axis=-1) & (
        diff[..., lead] % step[lead] == 0)


@pytest.mark.parametrize("case", [0, 1, 3, 5])
def test_lines_with_the_gradient_adds_its_part_within_the_lines(case):
    kernel, input_shape, kw = GEOMETRIES[case]
    op = ConvOperator(kernel[None, None], input_shape, **kw)
    A = dense(op)
    n, damp = A.shape[1], 0.2
    D = gradient_operator(input_shape) @ np.eye(n)
    line = kernel_line(kernel)
    step = np.asarray(kw.get("dilation", 1)) * line.direction
    model = A.T @ A + damp**2 * np.where(same_line(input_shape[1:], step), D.T @ D, 0)
    M = preconditioner(op, damp, "lines", L="gradient")
    assert rel(M @ np.eye(n), np.linalg.inv(model)) < 1e-8
    assert preconditioner(op, damp, L="gradient").kind == "lines"
    # and tikhonov solves the true system to rtol with it
    y = np.random.default_rng(7).standard_normal(A.shape[0])
    x, info = tikhonov(op, y, damp, L="gradient", rtol=1e-10)
    expected = np.linalg.solve(A.T @ A + damp**2 * D.T @ D, A.T @ y)
    assert info.preconditioner == "lines" and info.converged
    assert rel(x, expected) < 1e-7


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damp", [1e-2, 1e-3])
def test_tikhonov_solves_a_diagonal_motion_blur_in_one_iteration(damp, mode):
    op = ConvOperator(ANTI[None, None], (1, 24, 20), padding="same", padding_mode=mode)
    A = dense(op)
    y = np.random.default_rng(3).standard_normal(A.shape[0])
    x, info = tikhonov(op, y, damp, rtol=1e-10)
    exact = ("lines", "circulant") if mode == "circular" else ("lines",)  # (both exact)
    assert info.preconditioner in exact and info.iterations <= 2 and info.converged
    expected = np.linalg.solve(A.T @ A + damp**2 * np.eye(A.shape[1]), A.T @ y)
    assert rel(x, expected) < 1e-8


def test_the_ring_is_where_the_padding_folds_taps():
    # the positions whose column of W differs from zero padding's, found from the matrices
    for mode in ("reflect", "replicate", "circular"):
        op = ConvOperator(ANTI[None, None], (1, 14, 13), padding=3, padding_mode=mode)
        zeros = ConvOperator(ANTI[None, None], (1, 14, 13), padding=3)
        differs = np.abs(dense(op) - dense(zeros)).sum(axis=0) > 0
        M = preconditioner(op, 0.1, "lines")
        (solver,) = M._solvers
        assert sorted(solver._ring.tolist()) == np.flatnonzero(differs).tolist()
        assert differs.any()


@pytest.mark.parametrize("make", [
    lambda: ConvOperator(np.stack([ANTI, ANTI])[:, None], (1, 9, 9), padding=3),  # 2 outputs
    lambda: ConvOperator(ANTI[None, None], (1, 9, 9), padding=3, stride=2),
    lambda: ConvTransposeOperator(ANTI[None, None], (1, 9, 9), padding=3),
    lambda: ConvOperator(ANTI[None, None] + np.eye(7), (1, 9, 9), padding=3),  # two lines
])
def test_lines_does_not_apply_elsewhere(make):
    op = make()
    assert preconditioner(op, 1e-2).kind != "lines"
    with pytest.raises(NotImplementedError, match="kind='lines' needs"):
        preconditioner(op, 1e-2, "lines")


def test_lines_with_no_damping_of_a_singular_gram_matrix_stays_positive_definite():
    # taps at both ends of a line of length 2 read nothing at the middle: a zero column
    op = ConvOperator(line_kernel((3, 3), (0, 0), (1, 1), [1.0, 0.0, 1.0])[None, None],
                      (1, 5, 5), padding=0)
    n = op.shape[1]
    P = preconditioner(op, 0.0, "lines") @ np.eye(n)
    assert np.all(np.isfinite(P)) and np.linalg.eigvalsh((P + P.T) / 2).min() > 0


@st.composite
def line_layers(draw):
    """A single-channel stride-1 convolution whose kernel's taps lie on one line: any
    dimension, direction, dilation, padding (both sides) and mode."""
    ndim = draw(st.integers(1, 3))
    direction = [draw(st.integers(-2, 2)) for _ in range(ndim)]
    if not any(direction):
        direction[0] = 1
    count = draw(st.integers(1, 4))
    first = [(count - 1) * -d if d < 0 else 0 for d in direction]
    shape = tuple(f + (count - 1) * max(d, 0) + 1 for f, d in zip(first, direction))
    values = draw(st.lists(st.sampled_from([1.0, -0.5, 2.0, 0.0]), min_size=count,
                           max_size=count))
    if not any(values):
        values[0] = 1.0
    kernel = line_kernel(shape, first, direction, values)
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    size = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(ndim))
    mode = draw(st.sampled_from(MODES))
    return kernel, size, dict(padding=padding, dilation=dilation, padding_mode=mode)


@given(line_layers(), st.sampled_from([0.3, 1e-2]), st.sampled_from([1.0, 1.0 - 0.5j]))
@settings(max_examples=300, deadline=None)
def test_lines_is_the_exact_inverse_on_random_line_layers(layer, damp, phase):
    # (3,000 examples passed when this was written)
    kernel, size, kw = layer
    try:
        op = ConvOperator(kernel[None, None] * phase, (1, *size), **kw)
    except ValueError:
        return  # (a padding this mode does not take, or no output)
    A = dense(op)
    n = A.shape[1]
    inverse = np.linalg.inv(A.conj().T @ A + damp**2 * np.eye(n))
    assert rel(preconditioner(op, damp, "lines") @ np.eye(n), inverse) < 1e-8


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_tikhonov_runs_plain_cg_where_the_set_up_would_cost_more(mode):
    op = ConvOperator(ANTI[None, None], (1, 64, 64), padding="same", padding_mode=mode)
    y = np.random.default_rng(5).standard_normal(op.shape[0])
    # damp 1: plain CG takes a few iterations, fewer than the factorisation costs
    assert solvers._plain_iterations(op, 1.0, 1e-6) < Lines.set_up_cost(op)
    x, info = tikhonov(op, y, 1.0)
    assert info.preconditioner == "none" and info.converged
    x, info = tikhonov(op, y, 1e-3)
    assert info.preconditioner == "lines" and info.iterations <= 2 and info.converged


@pytest.mark.parametrize("damp", [0.3, 0.1, 0.03])
def test_the_plain_cg_estimate_is_within_a_factor_of_three_of_plain_cg(damp):
    op = ConvOperator(ANTI[None, None], (1, 96, 96), padding="same")
    rng = np.random.default_rng(6)
    y = op @ rng.random(op.shape[1]) + 1e-3 * rng.standard_normal(op.shape[0])
    steps = []
    cg(normal_operator(op, damp), op.rmatvec(y), rtol=1e-6, maxiter=5000,
       callback=steps.append)
    estimate = solvers._plain_iterations(op, damp, 1e-6)
    assert estimate / 3 <= len(steps) <= 3 * estimate


@pytest.mark.parametrize("mode", MODES)
def test_lines_of_a_depthwise_layer_are_the_exact_inverse(mode):
    # one line per channel: two channels share the anti-diagonal, one has a diagonal of
    # its own, so W^H W is block diagonal over the channels
    other = line_kernel((7, 7), (0, 0), (1, 1), [0.5, 1.0, -1.0, 2.0, 0.0, 1.0, 1.0])
    kernel = np.stack([ANTI, other, ANTI])[:, None]
    op = ConvOperator(kernel, (3, 10, 9), padding=3, groups=3, padding_mode=mode)
    A = dense(op)
    n = A.shape[1]
    M = preconditioner(op, 0.05, "lines")
    assert len({id(solver) for solver in M._solvers}) == 2  # the same kernel, one solver
    assert rel(M @ np.eye(n), np.linalg.inv(A.T @ A + 0.0025 * np.eye(n))) < 1e-8
    exact = {"lines", "circulant"} if mode == "circular" else {"lines"}
    assert preconditioner(op, 0.05).kind in exact
    y = np.random.default_rng(8).standard_normal((A.shape[0], 2))
    assert rel(M @ (y[:n] * (1 - 1j)), np.linalg.inv(A.T @ A + 0.0025 * np.eye(n))
               @ (y[:n] * (1 - 1j))) < 1e-8
