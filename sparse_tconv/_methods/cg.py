"""Conjugate gradients on the normal equations, with the preconditioner ``M`` resolved to."""

from __future__ import annotations

from .base import Method, Problem, pcg

__all__ = ["CG"]


class CG(Method):
    """Preconditioned CG from ``x0``; what ``'auto'`` falls back to, for any operator."""

    name = "cg"

    @classmethod
    def auto_applies(cls, op) -> bool:
        return True

    @classmethod
    def solve(cls, problem: Problem):
        return pcg(problem, problem.start(), problem.M)
