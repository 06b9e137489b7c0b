"""The exact solve of a circulant W, by the DFT (polyphase split for strides)."""

from __future__ import annotations

from .._fourier import check_circulant
from .._parallel import resolve_threads
from .._preconditioners import exact_solve, is_exact
from .._preconditioning import build_preconditioner
from .base import Method, Problem, pcg

__all__ = ["FFT"]


class FFT(Method):
    """No iterations where rounding leaves the residual below ``rtol``; else CG refines
    the exact solution with the exact circulant preconditioner (a step or two)."""

    name = "fft"
    uses_m = False
    preconditioner_name = "circulant"

    @classmethod
    def auto_applies(cls, op) -> bool:
        return is_exact(op)

    @classmethod
    def check(cls, op) -> None:
        if not is_exact(op):
            check_circulant(op.convolution.geometry, "the exact solves of method='fft'",
                            "use method='cg' (or 'auto', which picks it here)")

    @classmethod
    def solve(cls, problem: Problem):
        op = problem.op
        x = exact_solve(op, problem.y, problem.damp, resolve_threads(op.threads))
        x = x.astype(problem.dtype, copy=False)
        value = problem.residual(x)
        if value <= problem.rtol or problem.maxiter == 0:
            return x, 0, value
        return pcg(problem, x, build_preconditioner(op, problem.damp, "circulant"))
