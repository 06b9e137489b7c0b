"""General Tikhonov (``tikhonov(..., L=...)``) and the safeguard of ``M='auto'``.

Every solution is checked against an independent oracle: numpy's dense solve
of ``(W^T W + damp^2 L^T L) x = W^T y`` with ``W = op.matrix.toarray()`` and,
for ``L='gradient'``, a finite-difference matrix built here with explicit
loops from the definition ``(D x)[i] = x[i+1] - x[i]`` along every spatial
axis, per channel, no boundary rows.  Residuals are recomputed from their
definition with the dense matrices.  The safeguard is checked by counting the
operator's products (never times).
"""

from __future__ import annotations

import itertools
import math
import types

import numpy as np
import pytest
import scipy.sparse
from scipy.sparse.linalg import aslinearoperator

from sparse_tconv import ConvOperator, ConvTransposeOperator, solvers
from sparse_tconv._methods import safeguard
from sparse_tconv._preconditioning.cosine import _ASYMMETRY, _axis_asymmetry, _gram_kernel
from sparse_tconv.solvers import gradient_operator, normal_operator, preconditioner, tikhonov

from reference import seed_of

MODES = ["zeros", "reflect", "replicate", "circular"]


def finite_differences(input_shape) -> np.ndarray:
    """``D`` from its definition, one row per difference, by loops (the oracle)."""
    channels, *size = input_shape
    n = int(np.prod(input_shape))

    def column(c, position):
        index = c
        for p, length in zip(position, size):
            index = index * length + p
        return index

    rows = []
    for axis in range(len(size)):
        shorter = list(size)
        shorter[axis] -= 1
        for c in range(channels):
            for position in itertools.product(*(range(m) for m in shorter)):
                row = np.zeros(n)
                following = list(position)
                following[axis] += 1
                row[column(c, following)] += 1.0
                row[column(c, position)] -= 1.0
                rows.append(row)
    return np.array(rows).reshape(-1, n)


def dense_solution(W, L, y, damp):
    return np.linalg.solve(W.T @ W + damp**2 * (L.T @ L), W.T @ y)


def residual(W, L, x, y, damp) -> float:
    """``||W^T (W x - y) + damp^2 L^T L x|| / ||W^T y||``, from the dense matrices."""
    return float(np.linalg.norm(W.T @ (W @ x - y) + damp**2 * (L.T @ (L @ x)))
                 / np.linalg.norm(W.T @ y))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def lshape():
    w = np.zeros((5, 5))
    w[:, 0] = w[-1, :] = 1
    return w / w.sum()


def anti_diagonal(mode, n=64):
    """The issue's case: a 7x7 anti-diagonal motion blur, where the DCTs lose to plain CG."""
    kernel = np.fliplr(np.eye(7)) / 7
    return ConvOperator(kernel[None, None], (1, n, n), padding="same", padding_mode=mode)


def disk(radius):
    t = np.arange(-radius, radius + 1)
    k = (t[:, None] ** 2 + t[None, :] ** 2 <= (radius + 0.5) ** 2).astype(float)
    return k / k.sum()


def choose_for_auto(monkeypatch, kind):
    """Make tikhonov's ``M='auto'`` pick ``kind``: the race then decides, as for its own picks."""
    monkeypatch.setattr(solvers, "_tikhonov_kind", lambda op, regulariser="identity",
                        *args: kind)


def count_products(op):
    """Count ``op.matvec`` calls (one per CG iteration or residual check)."""
    calls = [0]
    matvec = op.matvec

    def counting(x):
        calls[0] += 1
        return matvec(x)

    op.matvec = counting
    return calls


# ---------------------------------------------------------------------------
# gradient_operator against the loops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 7), (2, 4, 5), (1, 3, 1, 4), (3, 1), (2, 2, 3, 2)])
def test_gradient_operator_is_the_finite_difference_matrix(shape):
    D = finite_differences(shape)
    G = gradient_operator(shape)
    rng = np.random.default_rng(seed_of("gradient", str(shape)))
    x = rng.standard_normal(D.shape[1])
    r = rng.standard_normal(D.shape[0])
    assert G.shape == D.shape and G.input_shape == shape
    np.testing.assert_allclose(G.matvec(x), D @ x, atol=1e-14)
    np.testing.assert_allclose(G.rmatvec(r), D.T @ r, atol=1e-14)
    np.testing.assert_allclose(G.H @ r, D.T @ r, atol=1e-14)
    np.testing.assert_allclose(G.T @ r, D.T @ r, atol=1e-14)
    np.testing.assert_allclose(G @ np.eye(D.shape[1]), D, atol=0)
    z = x + 1j * rng.standard_normal(x.size)  # complex vectors, as CG may pass
    np.testing.assert_allclose(G.matvec(z), D @ z, atol=1e-14)


def test_gradient_gram_is_the_neumann_laplacian_in_the_dct2_basis():
    from scipy.fft import dct

    n = 9
    D = finite_differences((1, n))
    C = dct(np.eye(n), type=2, norm="ortho", axis=0)
    eigenvalues = 4 * np.sin(np.pi * np.arange(n) / (2 * n)) ** 2
    np.testing.assert_allclose(C @ D.T @ D @ C.T, np.diag(eigenvalues), atol=1e-12)


# ---------------------------------------------------------------------------
# L='gradient' against the dense solve
# ---------------------------------------------------------------------------


def gradient_cases():
    # (label, class, weight shape, input shape, settings)
    return [
        ("1-D", ConvOperator, (1, 1, 5), (1, 20), dict(padding=2)),
        ("2-D", ConvOperator, (1, 1, 3, 3), (1, 9, 8), dict(padding=1)),
        ("channels", ConvOperator, (3, 2, 3, 3), (2, 6, 7), dict(padding=1)),
        ("depthwise", ConvOperator, (2, 1, 3, 3), (2, 6, 6), dict(padding=1, groups=2)),
        ("strided", ConvOperator, (2, 2, 3, 3), (2, 8, 8), dict(padding=1, stride=2)),
        ("3-D", ConvOperator, (1, 1, 3, 3, 3), (1, 4, 5, 4), dict(padding=1)),
        ("transposed", ConvTransposeOperator, (2, 3, 3, 3), (2, 5, 5),
         dict(padding=1, stride=2)),
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("label, cls, weight_shape, input_shape, kwargs", gradient_cases(),
                         ids=[case[0] for case in gradient_cases()])
def test_gradient_regularisation_matches_the_dense_solve(label, cls, weight_shape, input_shape,
                                                         kwargs, mode):
    rng = np.random.default_rng(seed_of("gradient-solve", label, mode))
    # positive weights: W maps no channel's constant to zero, the system is definite
    op = cls(rng.random(weight_shape) + 0.1, input_shape, padding_mode=mode, **kwargs)
    W = op.matrix.toarray()
    D = finite_differences(op.input_shape)
    y = rng.standard_normal(W.shape[0])
    for damp in (0.05, 0.5):
        x, info = tikhonov(op, y, damp, L="gradient", rtol=1e-10)
        assert info.method == "cg" and info.converged and info.residual <= 1e-10
        assert residual(W, D, x, y, damp) <= 1.01e-10
        assert info.residual == pytest.approx(residual(W, D, x, y, damp), rel=1e-6, abs=1e-14)
        expected = dense_solution(W, D, y, damp)
        cond = np.linalg.cond(W.T @ W + damp**2 * D.T @ D)
        assert rel(x, expected) <= 1e-10 * cond + 1e-12


@pytest.mark.parametrize("M", ["auto", "none", "circulant", "dct2", "block_jacobi"])
@pytest.mark.parametrize("mode", MODES)
def test_every_gradient_preconditioner_meets_rtol(M, mode):
    op = ConvOperator(disk(2)[None, None], (1, 12, 11), padding="same", padding_mode=mode)
    W, D = op.matrix.toarray(), finite_differences(op.input_shape)
    y = np.random.default_rng(seed_of("gradient-M", M, mode)).random(W.shape[0])
    x, info = tikhonov(op, y, 1e-2, L="gradient", M=M, rtol=1e-9)
    assert info.converged and residual(W, D, x, y, 1e-2) <= 1.01e-9
    if M != "auto":
        assert info.preconditioner == M
    assert rel(x, dense_solution(W, D, y, 1e-2)) < 1e-4


def test_auto_preconditioners_for_the_gradient():
    rng = np.random.default_rng(seed_of("gradient-auto"))
    blur = disk(2)[None, None]
    for mode, expected in [("zeros", "dct2"), ("replicate", "dct2"), ("reflect", "dct2"),
                           ("circular", "circulant")]:
        op = ConvOperator(blur, (1, 16, 16), padding="same", padding_mode=mode)
        assert preconditioner(op, 1e-2, L="gradient").kind == expected
        info = tikhonov(op, op @ rng.random(op.shape[1]), 1e-2, L="gradient")[1]
        assert info.method == "cg" and info.preconditioner in (expected, "none (safeguard)")
    strided = ConvOperator(rng.random((2, 2, 3, 3)), (2, 8, 8), padding=1, stride=2)
    assert preconditioner(strided, 1e-2, L="gradient").kind == "block_jacobi"


@pytest.mark.parametrize("kind", ["circulant", "dct2", "block_jacobi"])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_preconditioners_are_hermitian_positive_definite(kind, mode):
    rng = np.random.default_rng(seed_of("gradient-spd", kind, mode))
    op = ConvOperator(rng.random((2, 2, 3, 3)), (2, 6, 7), padding=1, padding_mode=mode)
    P = preconditioner(op, 1e-2, kind, L="gradient") @ np.eye(op.shape[1])
    np.testing.assert_allclose(P, P.T, atol=1e-12 * np.abs(P).max())
    assert np.linalg.eigvalsh((P + P.T) / 2).min() > 0


# ---------------------------------------------------------------------------
# A general L
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["array", "sparse", "operator"])
@pytest.mark.parametrize("rows", [30, 64, 90])
def test_a_general_l_matches_the_dense_solve(form, rows):
    rng = np.random.default_rng(seed_of("general-L", form, str(rows)))
    op = ConvOperator(rng.standard_normal((1, 1, 3, 3)), (1, 8, 8), padding=1,
                      padding_mode="replicate")
    W = op.matrix.toarray()
    Ld = rng.standard_normal((rows, op.shape[1]))
    L = {"array": Ld, "sparse": scipy.sparse.csr_array(Ld),
         "operator": aslinearoperator(Ld)}[form]
    y = rng.standard_normal(W.shape[0])
    x, info = tikhonov(op, y, 0.1, L=L, rtol=1e-11)
    assert info.method == "cg" and info.preconditioner == "none" and info.converged
    assert residual(W, Ld, x, y, 0.1) <= 1.01e-11
    assert rel(x, dense_solution(W, Ld, y, 0.1)) < 1e-8
    N = normal_operator(op, 0.1, L=L) @ np.eye(op.shape[1])
    np.testing.assert_allclose(N, W.T @ W + 0.01 * Ld.T @ Ld, atol=1e-12 * np.abs(N).max())


def test_normal_operator_with_the_gradient():
    op = ConvOperator(disk(1)[None, None], (1, 5, 6), padding=1, padding_mode="reflect")
    W, D = op.matrix.toarray(), finite_differences(op.input_shape)
    N = normal_operator(op, 0.3, L="gradient")
    np.testing.assert_allclose(N @ np.eye(op.shape[1]), W.T @ W + 0.09 * D.T @ D, atol=1e-14)
    np.testing.assert_allclose(normal_operator(op, 0.3) @ np.eye(op.shape[1]),
                               W.T @ W + 0.09 * np.eye(op.shape[1]), atol=1e-14)


# ---------------------------------------------------------------------------
# The residual on every return path
# ---------------------------------------------------------------------------


def paths():
    # (label, operator, L name, damp, tikhonov settings, expected preconditioner)
    blur = disk(3)[None, None]
    return [
        ("fft exact", ConvOperator(blur, (1, 24, 24), padding="same", padding_mode="circular"),
         None, 1e-2, {}, "circulant"),
        ("preconditioned, kept", ConvOperator(blur, (1, 48, 48), padding="same"),
         None, 1e-2, {}, "dct2"),
        ("plain", ConvOperator(blur, (1, 24, 24), padding="same"), None, 1e-2,
         dict(M=None), "none"),
        ("switched", anti_diagonal("zeros"), None, 5e-3, dict(auto="dct1"), "none (safeguard)"),
        ("given kind", anti_diagonal("replicate", 24), None, 5e-3, dict(M="dct2"), "dct2"),
        ("gradient, kept", ConvOperator(blur, (1, 48, 48), padding="same",
                                        padding_mode="replicate"),
         "gradient", 1e-2, {}, "dct2"),
        ("gradient, circular", ConvOperator(blur, (1, 24, 24), padding="same",
                                            padding_mode="circular"),
         "gradient", 1e-2, {}, None),
        ("gradient, switched", anti_diagonal("zeros"), "gradient", 5e-3, dict(auto="dct2"),
         "none (safeguard)"),
        ("asymmetric, reflect", ConvOperator(lshape()[None, None], (1, 24, 24), padding="same",
                                             padding_mode="reflect"), None, 5e-3, {},
         "bordered"),
        ("kernel on a line, reflect", anti_diagonal("reflect", 24), None, 5e-3, {}, "lines"),
        ("kernel on a line, gradient", anti_diagonal("replicate", 24), "gradient", 5e-3, {},
         "lines"),
    ]


@pytest.mark.parametrize("label, op, L, damp, kwargs, expected", paths(),
                         ids=[case[0] for case in paths()])
def test_the_residual_meets_rtol_on_every_return_path(label, op, L, damp, kwargs, expected,
                                                      monkeypatch):
    rng = np.random.default_rng(seed_of("paths", label))
    if "auto" in kwargs:  # what 'auto' picks, to reach the safeguard's switch
        choose_for_auto(monkeypatch, kwargs.pop("auto"))
    W = op.matrix.toarray()
    R = np.eye(op.shape[1]) if L is None else finite_differences(op.input_shape)
    y = op @ rng.random(op.shape[1]) + 1e-3 * rng.standard_normal(op.shape[0])
    for rtol in (1e-6, 1e-10):
        x, info = tikhonov(op, y, damp, L=L, rtol=rtol, **kwargs)
        assert info.converged
        if expected is not None:
            assert info.preconditioner == expected
        assert residual(W, R, x, y, damp) <= 1.01 * rtol
        assert info.residual == pytest.approx(residual(W, R, x, y, damp), rel=1e-5, abs=1e-15)


@pytest.mark.parametrize("maxiter", [0, 3, 10, 15, 20, 21, 25, 43])
@pytest.mark.parametrize("kind", ["dct1", "dct2"])
def test_maxiter_bounds_the_probes_and_is_reported(maxiter, kind, monkeypatch):
    # the race cut short in every round, in either run; dct1 loses it, dct2 less clearly
    op = anti_diagonal("zeros", 32)
    W = op.matrix.toarray()
    y = op @ np.random.default_rng(seed_of("maxiter-probe")).random(op.shape[1])
    choose_for_auto(monkeypatch, kind)
    seen = []
    x, info = tikhonov(op, y, 5e-3, maxiter=maxiter, callback=seen.append)
    assert info.iterations == len(seen) <= maxiter and not info.converged
    assert info.residual > 1e-6
    assert info.residual == pytest.approx(residual(W, np.eye(W.shape[1]), x, y, 5e-3), rel=1e-8)


# ---------------------------------------------------------------------------
# The safeguard
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["zeros", "replicate"])
@pytest.mark.parametrize("L, kind", [(None, "dct1"), ("gradient", "dct2")])
def test_the_safeguard_drops_a_preconditioner_that_loses(mode, L, kind, monkeypatch):
    # The DCTs model a kernel even along every axis (and the DCT-I reflect padding); the
    # anti-diagonal motion is odd along each, and DCT-preconditioned CG takes 1.6-12x the
    # iterations of plain CG.  'auto' no longer picks them there: made to, the race must
    # drop them.
    op = anti_diagonal(mode)
    y = op @ np.random.default_rng(seed_of("safeguard", mode)).random(op.shape[1])
    counted = count_products(op)
    dct, dct_info = tikhonov(op, y, 5e-3, L=L, M=kind)
    dct_products, counted[0] = counted[0], 0
    plain, plain_info = tikhonov(op, y, 5e-3, L=L, M=None)
    plain_products, counted[0] = counted[0], 0
    choose_for_auto(monkeypatch, kind)
    seen = []
    x, info = tikhonov(op, y, 5e-3, L=L, callback=seen.append)
    assert dct_products > 1.2 * plain_products  # the case the safeguard exists for
    assert info.preconditioner == "none (safeguard)" and info.converged
    assert info.iterations == len(seen)
    # no more products than plain CG's plus the probe of the preconditioned run (2 spare:
    # scipy's cg and the safeguard's own recurrences round differently; 0 used when written)
    assert counted[0] <= plain_products + safeguard.PROBE + 2
    assert info.residual <= 1e-6
    assert rel(x, plain) < 1e-4


def colour_blur(n):
    """3 -> 3 channels: a disk blur with 10% cross-talk (an even blur: the DCTs model it)."""
    weight = np.einsum("oc,kl->ockl", 0.7 * np.eye(3) + 0.1, disk(2))
    return ConvOperator(weight, (3, n, n), padding="same")


@pytest.mark.parametrize("label, make, kind, data", [
    ("complex data, kept", lambda: ConvOperator(disk(3)[None, None], (1, 20, 20),
                                                padding="same"), "dct2", "complex"),
    ("complex data, dropped", lambda: anti_diagonal("zeros", 20), "dct1", "complex"),
    ("x0, kept", lambda: ConvOperator(disk(3)[None, None], (1, 20, 20), padding="same"),
     "dct2", "x0"),
    ("x0, dropped", lambda: anti_diagonal("replicate", 20), "dct1", "x0"),
    ("channels", lambda: colour_blur(12), "dct2", "real"),
    ("channels, complex", lambda: colour_blur(12), "dct2", "complex"),
])
def test_a_raced_solve_is_the_dense_solution(label, make, kind, data, monkeypatch):
    op = make()
    W = op.matrix.toarray()
    rng = np.random.default_rng(seed_of("raced", label))
    y = rng.standard_normal(op.shape[0])
    if data == "complex":
        y = y + 1j * rng.standard_normal(op.shape[0])
    x0 = rng.standard_normal(op.shape[1]) if data == "x0" else None
    choose_for_auto(monkeypatch, kind)
    seen = []
    x, info = tikhonov(op, y, 5e-3, x0=x0, rtol=1e-9, callback=seen.append)
    assert info.converged and info.iterations == len(seen)
    assert info.preconditioner in (kind, "none (safeguard)")
    assert residual(W, np.eye(W.shape[1]), x, y, 5e-3) <= 1.01e-9
    assert rel(x, dense_solution(W.astype(y.dtype), np.eye(W.shape[1]), y, 5e-3)) < 1e-5


def test_the_safeguard_keeps_a_preconditioner_that_wins():
    op = ConvOperator(disk(3)[None, None], (1, 48, 48), padding="same")
    y = op @ np.random.default_rng(seed_of("safeguard-keeps")).random(op.shape[1])
    counted = count_products(op)
    _, dct_info = tikhonov(op, y, 1e-2, M="dct2")
    dct_products, counted[0] = counted[0], 0
    _, plain_info = tikhonov(op, y, 1e-2, M=None)
    plain_products, counted[0] = counted[0], 0
    _, info = tikhonov(op, y, 1e-2)
    assert info.preconditioner == "dct2" and info.converged
    # the cost of the safeguard: plain CG's probe
    assert counted[0] <= dct_products + safeguard.PROBE + 2
    assert counted[0] < plain_products / 3


def fake_run(level):
    """What the race reads of a run: its level (its least recent residual)."""
    return types.SimpleNamespace(level=lambda at=None: level)


@pytest.mark.parametrize("levels, last, expected", [
    ((5e-3, 1e-2), False, None),  # ahead, not clearly: race on
    ((1e-3, 1e-2), True, "chosen"),
    ((1e-3, 1e-1), False, "chosen"),  # clearly ahead after the first round
    ((1e-1, 1e-3), False, "plain"),  # clearly behind
    ((1.2e-2, 1e-2), True, "chosen"),  # within BEHIND at the last round
    ((1.4e-2, 1e-2), True, "plain"),
    ((math.inf, 1e-2), True, "plain"),  # the preconditioned run broke down
    ((1e-2, math.inf), False, "chosen"),  # plain CG's did
])
def test_the_race_ends_on_a_clear_lead_or_at_its_last_round(levels, last, expected):
    chosen, plain = fake_run(levels[0]), fake_run(levels[1])
    winner = safeguard._decided(chosen, plain, last)
    assert winner is {"chosen": chosen, "plain": plain, None: None}[expected]
    assert safeguard.EARLY_KEEP < 1.2 < safeguard.BEHIND < 1.4  # the cases above straddle


def test_a_run_level_is_its_least_recent_residual():
    problem = types.SimpleNamespace(rtol=1e-30)
    run = safeguard._Run.__new__(safeguard._Run)
    run.problem, run.stopped = problem, False
    run.history = [1.0, 0.5, 0.1, 0.3, 0.2]  # not monotone: the least of the last three
    assert run.level() == 0.1
    run.history.append(float("nan"))
    assert run.level() == math.inf
    run.history, run.stopped = [1.0, 0.5], True
    assert run.level() == math.inf  # broke down short of rtol
    run.history, run.stopped = [1.0, 1e-31], False
    assert run.level() == 0.0  # met rtol


def history_run(history, rtol=1e-6):
    """A run as :func:`safeguard._on_course` reads it: its residuals after 0, 1, ... iterations."""
    run = safeguard._Run.__new__(safeguard._Run)
    run.problem, run.stopped = types.SimpleNamespace(rtol=rtol), False
    run.history, run.iterations = list(history), len(history) - 1
    return run


@pytest.mark.parametrize("label, history, expected", [
    ("10x per 3 iterations: 1e-6 near iteration 18", 10.0 ** -(np.arange(11) / 3), True),
    ("10x per 10 iterations: 1e-6 at 60", 10.0 ** -(np.arange(11) / 10), False),
    ("fast, then slow over the last round: the slower rate counts",
     np.r_[10.0 ** -(np.arange(11) / 2), 10.0 ** -(5 + np.arange(1, 11) / 40)], False),
    ("fast, then as fast", 10.0 ** -(np.arange(21) / 4), True),
    ("not falling", np.ones(11), False),
    ("risen", np.r_[1.0, np.full(10, 2.0)], False),
    ("broken down: not finite", np.r_[10.0 ** -np.arange(10), np.nan], False),
    ("met", np.r_[10.0 ** -np.arange(7), 1e-7], True),
])
def test_a_run_on_course_meets_rtol_within_the_probe(label, history, expected):
    assert safeguard._on_course(history_run(history)) is expected


def dct_then_auto(radius: int, damp: float, seed: str):
    """A disk blur at 48x48: ``(info, products)`` of tikhonov with the DCT-II by name (no
    race), then with ``M='auto'``."""
    op = ConvOperator(disk(radius)[None, None], (1, 48, 48), padding="same")
    y = op @ np.random.default_rng(seed_of(seed)).random(op.shape[1])
    counted = count_products(op)
    _, dct_info = tikhonov(op, y, damp, M="dct2")
    dct_products, counted[0] = counted[0], 0
    _, info = tikhonov(op, y, damp)
    return (dct_info, dct_products), (info, counted[0])


def test_a_run_on_course_is_not_raced():
    # the DCT-II of a disk blur at damp 1e-1 meets rtol in about a dozen iterations: a race
    # would add at least a round of plain CG
    (dct_info, dct_products), (info, products) = dct_then_auto(3, 1e-1, "on-course")
    assert info.preconditioner == "dct2" and info.converged
    assert dct_info.iterations > safeguard.ROUNDS[0]  # past the first round, yet no race:
    assert products <= dct_products + 2  # no plain CG iterations (2 spare, as above)


def test_a_run_ahead_is_raced_at_the_same_iterations():
    # The DCT-II of a disk blur at damp 1e-3 runs ahead while on course, then falls off
    # it short of rtol: plain CG then catches up and is compared at 10 iterations with
    # the DCT's residual at 10, as a race from the start would (and costs no more).
    (dct_info, dct_products), (info, products) = dct_then_auto(4, 1e-3, "ahead")
    assert dct_info.iterations > safeguard.AHEAD  # past what it may run alone
    assert info.preconditioner == "dct2" and info.converged
    assert products <= dct_products + safeguard.ROUNDS[0] + 2


def test_a_run_level_at_an_earlier_iteration():
    run = history_run([1.0, 0.5, 0.1, 0.3, 0.2, 0.25], rtol=0.15)
    run.stopped = True  # broke down at its last iteration, not before
    assert run.level(2) == 0.0  # met rtol at iteration 2
    run.problem.rtol = 1e-3
    assert run.level(1) == 0.5 and run.level(3) == 0.1 and run.level(4) == 0.1
    assert run.level(5) == run.level() == math.inf
    assert run.level(99) == math.inf


def test_an_exact_preconditioner_ends_within_its_probe():
    # a separable kernel: the Kronecker construction is the inverse, no plain probe runs
    t = np.exp(-(np.arange(7) - 3.0) ** 2 / 4)
    op = ConvOperator(np.outer(t, t)[None, None], (1, 32, 32), padding="same",
                      padding_mode="replicate")
    y = op @ np.random.default_rng(seed_of("safeguard-exact")).random(op.shape[1])
    _, info = tikhonov(op, y, 1e-2)
    assert info.preconditioner == "kronecker" and info.iterations <= 2 and info.converged


def test_a_given_kind_is_not_raced():
    op = anti_diagonal("zeros", 32)
    y = op @ np.random.default_rng(seed_of("safeguard-given")).random(op.shape[1])
    assert tikhonov(op, y, 5e-3, M="dct2")[1].preconditioner == "dct2"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_errors_name_l_and_its_shapes():
    op = ConvOperator(disk(1)[None, None], (1, 8, 8), padding=1)
    y = np.ones(op.shape[0])
    with pytest.raises(ValueError, match=r"L must be one of \('gradient',\), got L='laplace'"):
        tikhonov(op, y, 0.1, L="laplace")
    with pytest.raises(ValueError, match=r"L must have 64 columns .*got L.shape=\(5, 63\)"):
        tikhonov(op, y, 0.1, L=np.ones((5, 63)))
    with pytest.raises(ValueError, match=r"L must have 64 columns .*got L.shape=\(64, 3\)"):
        tikhonov(op, y, 0.1, L=aslinearoperator(np.ones((64, 3))))
    with pytest.raises(ValueError, match="L must be a 2-D numeric array"):
        tikhonov(op, y, 0.1, L=np.ones(64))
    with pytest.raises(TypeError, match="L must be None, 'gradient', a LinearOperator.*list"):
        tikhonov(op, y, 0.1, L=[[1.0] * 64])
    with pytest.raises(NotImplementedError, match="method='fft' solves with L=None only"):
        tikhonov(ConvOperator(disk(1)[None, None], (1, 8, 8), padding=1,
                              padding_mode="circular"), y, 0.1, L="gradient", method="fft")
    with pytest.raises(NotImplementedError, match="kind='dct1' does not model L='gradient'"):
        tikhonov(op, y, 0.1, L="gradient", M="dct1")
    with pytest.raises(NotImplementedError, match="kind='kronecker' does not model"):
        preconditioner(op, 0.1, "kronecker", L="gradient")
    with pytest.raises(NotImplementedError, match="M='dct2': the preconditioner kinds model"):
        tikhonov(op, y, 0.1, L=np.eye(64), M="dct2")
    with pytest.raises(ValueError, match=r"L must be one of \('gradient',\)"):
        preconditioner(op, 0.1, L="identity")
    with pytest.raises(ValueError, match="L must be one of"):
        normal_operator(op, 0.1, L="grad")
    with pytest.raises(ValueError, match="input_shape must be .* at least one spatial"):
        gradient_operator((3,))
    with pytest.raises(TypeError, match="input_shape must be a sequence of ints"):
        gradient_operator(5)
    with pytest.raises(ValueError, match="input_shape must contain only positive sizes"):
        gradient_operator((1, 0, 3))


# ---------------------------------------------------------------------------
# What M='auto' preconditions with
# ---------------------------------------------------------------------------


def gram_asymmetry(op) -> float:
    """``max_a ||G - G reversed along axis a|| / ||G||`` with G read off the dense
    ``W^T W`` of the circular convolution (its column at the centre: the kernel's
    autocorrelation), the oracle of the cosine constructions' evenness test."""
    n = op.input_shape[1]
    circular = ConvOperator(op.weight, op.input_shape, padding="same", padding_mode="circular")
    W = circular.matrix.toarray()
    G = (W.T @ W)[:, (n // 2) * n + n // 2].reshape(n, n)  # lags centred at (n/2, n/2)
    G = np.roll(G, (-(n // 2), -(n // 2)), axis=(0, 1))  # lag 0 at index 0
    flips = [np.roll(G[::-1], 1, axis=0), np.roll(G[:, ::-1], 1, axis=1)]
    return max(np.linalg.norm(G - F) for F in flips) / np.linalg.norm(G)


@pytest.mark.parametrize("label, weight, mode, kind", [
    ("disk", disk(3)[None, None], "zeros", "dct2"),
    ("disk, reflect", disk(3)[None, None], "reflect", "dct1"),
    # a kernel on one line: W^H W is banded line by line, the folded taps' ring last
    ("anti-diagonal", np.fliplr(np.eye(7))[None, None] / 7, "zeros", "lines"),
    ("anti-diagonal, reflect", np.fliplr(np.eye(7))[None, None] / 7, "reflect", "lines"),
    # other kernels, stride 1: the circulant inside, the border's block exactly
    ("L-shape", lshape()[None, None], "replicate", "bordered"),
    ("random 3 -> 3", np.random.default_rng(0).standard_normal((3, 3, 3, 3)), "zeros",
     "bordered"),
    ("colour blur with cross-talk", np.einsum("oc,kl->ockl", 0.7 * np.eye(3) + 0.1, disk(2)),
     "zeros", "dct2"),
    ("separable", np.outer(disk(2)[2], np.ones(5))[None, None], "replicate", "kronecker"),
])
def test_auto_preconditions_where_the_construction_models_the_gram_matrix(label, weight, mode,
                                                                         kind):
    op = ConvOperator(weight, (weight.shape[1], 24, 24), padding="same", padding_mode=mode)
    assert solvers._tikhonov_kind(op) == kind
    # the cosine constructions' evenness test against the dense Gram matrix
    asymmetry = _axis_asymmetry(_gram_kernel(op)[0])
    if weight.shape[:2] == (1, 1):
        assert asymmetry == pytest.approx(gram_asymmetry(op), abs=1e-12)
    assert (asymmetry <= _ASYMMETRY) == (kind in ("dct1", "dct2", "kronecker"))
