"""``solve_bench``'s general section: the kernels are what they are named, each problem
builds the operator it says, its data is reproducible, PyLops is stopped at the first
iteration that meets our residual, and the command prints its table (no timing
assertions)."""

import json
import math

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator
from sparse_tconv.tools import solve_bench
from sparse_tconv.tools.compare import pylops_operator
from sparse_tconv.tools.solve_bench import (
    GENERAL_PROBLEMS,
    QUICK_GENERAL_PROBLEMS,
    RTOL,
    GeneralProblem,
    kernel,
    main,
)

# --- the kernels -----------------------------------------------------------------------------

# name: weight shape, the sum of each output channel's weights (None: not fixed)
_KERNELS = {
    "anti7": ((1, 1, 7, 7), 1.0),
    "lshape5": ((1, 1, 5, 5), 1.0),
    "vert9": ((1, 1, 9, 1), 1.0),
    "box3": ((1, 1, 3, 3), 1.0),
    "mix3": ((3, 3, 3, 3), None),
    "depthwise3": ((3, 1, 7, 7), 1.0),
    "random5": ((1, 1, 5, 5), None),
    "exp15": ((1, 1, 15), 1.0),
    "gauss3d": ((1, 1, 5, 5, 5), 1.0),
    "ball3d": ((1, 1, 5, 5, 5), 1.0),
}


@pytest.mark.parametrize("name", list(_KERNELS))
def test_kernel_shape_gain_and_reproducibility(name):
    shape, gain = _KERNELS[name]
    w = kernel(name)
    assert w.shape == shape and w.dtype == np.float64
    if gain is not None:
        np.testing.assert_allclose(w.sum(axis=tuple(range(1, w.ndim))), gain, rtol=1e-12)
    np.testing.assert_array_equal(kernel(name), w)  # seeded: the same every call


def _flips(w):
    """Whether ``w`` is unchanged by a flip of each spatial axis."""
    return [np.allclose(np.flip(w, axis), w) for axis in range(2, w.ndim)]


def _tensor_rank_one(k) -> bool:
    """Every unfolding of ``k`` has rank one: ``k`` is an outer product of vectors."""
    return all(np.linalg.matrix_rank(np.moveaxis(k, a, 0).reshape(k.shape[a], -1)) == 1
               for a in range(k.ndim))


def test_asymmetric_kernels_are_not_symmetric_under_a_flip():
    assert _flips(kernel("anti7")) == [False, False]
    assert np.allclose(np.flip(kernel("anti7"), (2, 3)), kernel("anti7"))  # anti-diagonal
    np.testing.assert_allclose(kernel("anti7")[0, 0], np.fliplr(np.eye(7)) / 7)
    assert _flips(kernel("lshape5")) == [False, False]
    assert _flips(kernel("exp15")) == [False]
    assert np.all(np.diff(kernel("exp15")[0, 0]) < 0)  # one-sided, decaying


def test_symmetric_kernels_and_separability():
    for name in ("box3", "vert9", "gauss3d", "ball3d"):
        assert all(_flips(kernel(name))), name
    assert _tensor_rank_one(kernel("gauss3d")[0, 0])
    assert not _tensor_rank_one(kernel("ball3d")[0, 0])
    assert np.count_nonzero(kernel("ball3d")) == 33  # the points within 2 of the centre
    assert not _tensor_rank_one(kernel("lshape5")[0, 0])
    assert not _tensor_rank_one(kernel("anti7")[0, 0])


def test_channel_kernels():
    mix = kernel("mix3")
    np.testing.assert_allclose(np.abs(mix).sum(axis=(1, 2, 3)), 1.0, rtol=1e-12)
    assert all(np.abs(mix[o, c]).sum() > 0 for o in range(3) for c in range(3) if o != c)
    depthwise = kernel("depthwise3")[:, 0]
    centre = depthwise[:, 3, 3]
    assert centre[0] > centre[1] > centre[2]  # sigma 1, 1.5, 2: wider, flatter
    assert all(_tensor_rank_one(k) and all(_flips(k[None, None])) for k in depthwise)


# --- the problems ----------------------------------------------------------------------------


def test_problem_names_are_unique_and_say_the_class():
    for problems in (GENERAL_PROBLEMS, QUICK_GENERAL_PROBLEMS):
        names = [p.name for p in problems]
        assert len(set(names)) == len(names) == len(GENERAL_PROBLEMS)
    names = {p.name for p in GENERAL_PROBLEMS}
    assert {"anti7-zeros-256-0.005", "exp15-zeros-2048-0.001-1d", "gauss3d-zeros-32-0.01-3d",
            "disk-zeros-128-0.01-s2", "disk-zeros-128-0.01-T",
            "anti7-zeros-128-0.005-grad"} <= names
    assert {p.mode for p in GENERAL_PROBLEMS} == {"zeros", "replicate", "reflect"}
    assert {p.ndim for p in GENERAL_PROBLEMS} == {1, 2, 3}
    assert min(p.damp for p in GENERAL_PROBLEMS) == 1e-4
    assert max(p.damp for p in GENERAL_PROBLEMS) == 1e-1


@pytest.mark.parametrize("problem", QUICK_GENERAL_PROBLEMS, ids=lambda p: p.name)
def test_each_problem_builds_its_operator(problem):
    op = problem.operator()
    w = kernel(problem.blur)
    ndim = w.ndim - 2
    assert problem.ndim == ndim
    assert type(op) is (ConvTransposeOperator if problem.transposed else ConvOperator)
    channels = w.shape[0] if problem.transposed else w.shape[1] * op.groups
    assert op.groups == (3 if problem.blur in ("depthwise3", "motion3") else 1)
    assert op.input_shape == (channels,) + (problem.n,) * ndim
    assert op.stride == (problem.stride,) * ndim
    assert op.output_shape[1:] == (math.ceil(problem.n / problem.stride),) * ndim
    assert op.convolution.geometry.padding_mode == problem.mode
    # Centred: the padding pairs 'same' gives, whatever the stride.
    k = w.shape[2:]
    assert op.padding == tuple(((kk - 1) // 2, kk - 1 - (kk - 1) // 2) for kk in k)


def test_the_data_is_reproducible_and_the_noise_relative():
    for problem in (QUICK_GENERAL_PROBLEMS[0], GeneralProblem("mix3", "replicate", 10, 1e-2),
                    GeneralProblem("exp15", "zeros", 64, 1e-3),
                    GeneralProblem("ball3d", "zeros", 6, 1e-2),
                    GeneralProblem("disk", "zeros", 20, 1e-2, stride=2)):
        op = problem.operator()
        y = problem.data(op)
        assert y.shape == (op.shape[0],) and np.all(np.isfinite(y))
        np.testing.assert_array_equal(problem.operator().matvec(np.ones(op.shape[1])),
                                      op.matvec(np.ones(op.shape[1])))
        np.testing.assert_array_equal(problem.data(problem.operator()), y)
        clean = op.matvec(solve_bench.sample_image(problem.n, op.input_shape[0],
                                                   problem.ndim).ravel())
        relative = np.linalg.norm(y - clean) / np.linalg.norm(clean)
        assert 1e-4 < relative < 1e-2


@pytest.mark.parametrize("problem, reason", [
    (GeneralProblem("anti7", "zeros", 12, 5e-3), None),
    (GeneralProblem("exp15", "zeros", 30, 1e-3), None),
    (GeneralProblem("anti7", "replicate", 12, 5e-3), "replicate padding"),
    (GeneralProblem("mix3", "zeros", 12, 1e-2), "channels"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, stride=2), "stride/dilation"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, transposed=True), "transposed"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, L="gradient"), "L='gradient'"),
])
def test_pylops_skips_what_it_cannot_pose(problem, reason):
    assert solve_bench.pylops_skip(problem) == reason


@pytest.mark.parametrize("problem, reason", [
    (GeneralProblem("anti7", "zeros", 12, 5e-3), None),
    (GeneralProblem("anti7", "reflect", 12, 5e-3), None),
    (GeneralProblem("motion3", "replicate", 12, 5e-3), None),  # one kernel, every channel
    (GeneralProblem("depthwise3", "replicate", 12, 1e-2), "channels"),  # three kernels
    (GeneralProblem("mix3", "zeros", 12, 1e-2), "channels"),
    (GeneralProblem("exp15", "zeros", 30, 1e-3), "1-D"),
    (GeneralProblem("gauss3d", "zeros", 8, 1e-2), "3-D"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, stride=2), "stride"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, transposed=True), "transposed"),
    (GeneralProblem("disk", "zeros", 12, 1e-2, L="gradient"), "L='gradient'"),
])
def test_deepinv_skips_what_it_cannot_pose(problem, reason):
    assert solve_bench.deepinv_skip(problem) == reason


def _deepinv_loads() -> bool:
    try:  # (torchvision fails with a RuntimeError on a torch it does not match)
        import deepinv  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _deepinv_loads(), reason="deepinv does not load here")
def test_deepinv_meets_rtol_on_our_equations_or_is_refused():
    problem = GeneralProblem("anti7", "reflect", 16, 5e-3)
    op = problem.operator()
    y = problem.data(op)
    run = solve_bench._DeepinvRun(problem, op, y)
    W = op.matrix.toarray()
    assert _dense_residual(W, y, problem.damp, run.x) <= RTOL
    # deepinv's adjoint of replicate padding with a 9x1 filter is not W^T
    odd = GeneralProblem("vert9", "replicate", 16, 5e-3)
    with pytest.raises(NotImplementedError, match="adjoint"):
        solve_bench._DeepinvRun(odd, odd.operator(), odd.data(odd.operator()))


# --- PyLops at equal residual ----------------------------------------------------------------


def _dense_residual(W, y, damp, x) -> float:
    """The residual of the damped normal equations, by dense linear algebra."""
    b = W.T @ y
    return float(np.linalg.norm(W.T @ (W @ x) + damp**2 * x - b) / np.linalg.norm(b))


@pytest.mark.parametrize("problem", [
    GeneralProblem("anti7", "zeros", 12, 5e-3),
    GeneralProblem("random5", "zeros", 12, 1e-2),
    GeneralProblem("disk", "zeros", 12, 1e-4),
    GeneralProblem("exp15", "zeros", 40, 1e-3),
    GeneralProblem("gauss3d", "zeros", 6, 1e-2),
], ids=lambda p: p.name)
def test_pylops_stops_at_the_first_iteration_that_meets_rtol(problem):
    pytest.importorskip("pylops")
    from pylops.optimization.basic import cgls

    op = problem.operator()
    y = problem.data(op)
    W = op.matrix.toarray()
    Op = pylops_operator(problem.config(), kernel(problem.blur))
    x_probe = np.random.default_rng(0).standard_normal(W.shape[1])
    np.testing.assert_allclose(Op.matvec(x_probe), W @ x_probe, rtol=1e-10, atol=1e-12)
    x, iterations, residual = solve_bench.pylops_equal_residual(Op, op, y, problem.damp, 5000)
    assert 0 < iterations < 5000
    assert _dense_residual(W, y, problem.damp, x) <= RTOL
    np.testing.assert_allclose(_dense_residual(W, y, problem.damp, x), residual, rtol=1e-6)
    # The same iterate as a cgls run of that many iterations, and one fewer is short.
    def run(k):
        return np.ravel(cgls(Op, y, niter=k, damp=problem.damp, tol=0.0)[0])

    np.testing.assert_allclose(run(iterations), x, rtol=1e-10, atol=1e-14)
    assert _dense_residual(W, y, problem.damp, run(iterations - 1)) > RTOL


def test_pylops_stops_at_the_cap():
    pytest.importorskip("pylops")
    problem = GeneralProblem("disk", "zeros", 12, 1e-4)
    op = problem.operator()
    Op = pylops_operator(problem.config(), kernel(problem.blur))
    _, iterations, residual = solve_bench.pylops_equal_residual(Op, op, problem.data(op),
                                                                problem.damp, 3)
    assert iterations == 3 and residual > RTOL


# --- verdicts and tables ---------------------------------------------------------------------


def _result(name, blur, plain_iterations, speedup, **extra):
    return dict(problem=name, blur=blur, plain_iterations=plain_iterations, plain_s=1.0,
                method="cg", preconditioner="dct2", iterations=10,
                tikhonov_s=1.0 / speedup, speedup=speedup, **extra)


def test_general_verdicts():
    results = [
        _result("a", "disk", 300, 4.0, pylops_skip=None, pylops_iterations=300,
                pylops_s=2.0, pylops_converged=True, vs_pylops=8.0),
        _result("b", "anti7", 250, 0.8, pylops_skip="replicate padding"),
        _result("c", "mix3", 250, 3.5, pylops_skip="channels"),
        _result("d", "disk", 50, 1.0, pylops_skip="transposed"),
    ]
    rows = solve_bench.general_verdicts(results)
    per = {(r["problem"], r["figure"], r["target"]): r["met"] for r in rows}
    assert per[("a", "speedup", ">= 0.9")] and not per[("b", "speedup", ">= 0.9")]
    assert per[("c", "speedup", ">= 1.5")] and ("a", "speedup", ">= 1.5") not in per
    assert per[("a", "vs_pylops", ">= 1.0")] and len([r for r in rows
                                                      if r["figure"] == "vs_pylops"]) == 1
    share = rows[-1]
    assert share["problem"] == "3 with plain it >= 200" and share["value"] == pytest.approx(2 / 3)
    assert share["met"]
    assert all("plain it" not in r["problem"] for r in solve_bench.general_verdicts(results[3:]))


def test_general_table_leaves_the_pylops_column_out_when_missing():
    shown = "\n".join(solve_bench.format_general([_result("a", "disk", 30, 2.0,
                                                          pylops_skip="channels")]))
    assert "pylops it" in shown and "n/a: channels" in shown
    hidden = "\n".join(solve_bench.format_general([_result("a", "disk", 30, 2.0)]))
    assert "pylops" not in hidden and "dinv" not in hidden


def test_general_table_has_a_deepinv_column_where_it_loads():
    rows = [_result("a", "disk", 30, 2.0, pylops_skip="channels", deepinv_skip=None,
                    deepinv_tol=1e-7, deepinv_s=5.0, deepinv_converged=True, vs_deepinv=10.0),
            _result("b", "disk", 30, 2.0, pylops_skip="channels", deepinv_skip="3-D")]
    lines = solve_bench.format_general(rows)
    header = lines[1]
    assert header.endswith(f"{'dinv tol':>10}{'s':>9}{'vs dinv':>10}")
    a, b = lines[2], lines[3]
    column = header.index("dinv tol")
    assert a[column:].split() == ["1e-07", "5.000", "10.0x"]
    assert b[column:].strip() == "n/a: 3-D"
    verdicts = solve_bench.general_verdicts(rows)
    assert [v["met"] for v in verdicts if v["figure"] == "vs_deepinv"] == [True]


# --- the command -----------------------------------------------------------------------------


def test_quick_general_section_prints_its_table(tmp_path, capsys, monkeypatch):
    # A few classes: a PyLops one, a multi-channel one, a transposed one, L='gradient'.
    few = [p for p in QUICK_GENERAL_PROBLEMS if p.name in (
        "anti7-zeros-24-0.005", "mix3-zeros-24-0.01", "disk-zeros-24-0.01-T",
        "disk-zeros-24-0.01-grad")]
    assert len(few) == 4
    monkeypatch.setattr(solve_bench, "QUICK_GENERAL_PROBLEMS", few)
    js = tmp_path / "general.json"
    assert main(["--quick", "--section", "general", "--repeat", "1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "general problems" in out and "targets:" in out
    assert all(p.name in out for p in few)
    assert ("dinv tol" in out) if _deepinv_loads() else ("note: deepinv" in out)
    report = json.loads(js.read_text())
    assert report["results"] == [] and len(report["general"]) == 4
    for r in report["general"]:
        assert r["residual"] <= RTOL or not r["converged"]
        assert r["speedup"] > 0
    if any("pylops not installed" in n for n in report["notes"]):
        assert "pylops it" not in out
    else:
        pylops = [r for r in report["general"] if r["pylops_skip"] is None]
        assert [r["problem"] for r in pylops] == ["anti7-zeros-24-0.005"]
        assert pylops[0]["pylops_residual"] <= RTOL and pylops[0]["vs_pylops"] > 0
        assert any(v["figure"] == "vs_pylops" for v in report["targets"])
