"""The registry of tikhonov's solve methods (sparse_tconv._methods): each method's
contract against a dense solve, 'auto', and a new method added as one class."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator, _methods
from sparse_tconv.solvers import tikhonov

from reference import seed_of

_PROBLEMS = [
    (ConvOperator, (2, 2, 3, 3), (2, 8, 8), dict(padding=1, padding_mode="circular")),
    (ConvOperator, (2, 2, 3, 3), (2, 8, 8), dict(padding=1)),
    (ConvOperator, (3, 2, 3, 3), (2, 8, 10), dict(padding=1, stride=2,
                                                  padding_mode="reflect")),
    (ConvTransposeOperator, (2, 2, 4, 4), (2, 5, 5), dict(padding=1, stride=2)),
]


def _dense_solution(op, y, damp):
    W = op.matrix.toarray()
    return np.linalg.solve(W.conj().T @ W + damp**2 * np.eye(W.shape[1]), W.conj().T @ y)


@pytest.mark.parametrize("name", sorted(_methods.METHODS))
@pytest.mark.parametrize("cls, weight_shape, input_shape, kwargs", _PROBLEMS)
def test_every_method_solves_where_it_applies_and_says_where_not(name, cls, weight_shape,
                                                                  input_shape, kwargs):
    rng = np.random.default_rng(seed_of("methods", name, str(kwargs)))
    op = cls(rng.standard_normal(weight_shape), input_shape, **kwargs)
    y = rng.standard_normal(op.shape[0])
    method = _methods.METHODS[name]
    try:
        method.check(op)
    except NotImplementedError:
        with pytest.raises(NotImplementedError):
            tikhonov(op, y, 1e-2, method=name)
        return
    x, info = tikhonov(op, y, 1e-2, method=name, rtol=1e-10)
    assert info.method == name and info.converged and info.residual <= 1e-10
    expected = _dense_solution(op, y, 1e-2)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_auto_picks_the_exact_solve_where_w_is_circulant_and_cg_elsewhere():
    rng = np.random.default_rng(seed_of("methods-auto"))
    for (cls, weight_shape, input_shape, kwargs), expected in zip(
            _PROBLEMS, ["fft", "cg", "cg", "cg"]):
        op = cls(rng.standard_normal(weight_shape), input_shape, **kwargs)
        assert tikhonov(op, rng.standard_normal(op.shape[0]), 1e-2)[1].method == expected
        assert _methods.auto(op).name == expected
    assert _methods.AUTO_ORDER[-1].auto_applies(op)  # the last entry applies to any operator


def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch):
    class Dense(_methods.Method):
        """The normal equations solved by a dense factorisation (small problems)."""

        name = "dense"
        uses_m = False
        preconditioner_name = "none"

        @classmethod
        def solve(cls, problem):
            x = _dense_solution(problem.op, problem.y, problem.damp)
            return x, 0, problem.residual(x)

    monkeypatch.setitem(_methods.METHODS, "dense", Dense)
    rng = np.random.default_rng(seed_of("methods-new"))
    op = ConvOperator(rng.standard_normal((2, 2, 3, 3)), (2, 8, 8), padding=1)
    x, info = tikhonov(op, rng.standard_normal(op.shape[0]), 1e-2, method="dense")
    assert info.method == "dense" and info.residual <= 1e-10 and info.converged
    with pytest.raises(ValueError, match=r"method must be one of .*'dense'"):
        tikhonov(op, np.ones(op.shape[0]), 1e-2, method="other")
