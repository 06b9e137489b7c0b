"""Conjugate gradients on the normal equations, with the preconditioner ``M`` resolved to."""

from __future__ import annotations

from .base import Method, Problem, pcg
from .safeguard import safeguarded

__all__ = ["CG"]


class CG(Method):
    """Preconditioned CG from ``x0``; what ``'auto'`` falls back to, for any operator."""

    name = "cg"
    regularisers = ("identity", "gradient", "operator")

    @classmethod
    def auto_applies(cls, op) -> bool:
        return True

    @classmethod
    def solve(cls, problem: Problem):
        if problem.safeguard and problem.M is not None:
            x, iterations, value, problem.switched = safeguarded(problem, problem.start(),
                                                                 problem.M)
            return x, iterations, value
        return pcg(problem, problem.start(), problem.M)
