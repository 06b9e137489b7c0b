"""The safeguard of ``M='auto'``: a short race of the chosen preconditioner against plain CG.

A preconditioner chosen from the kernel's structure can be wrong for the
kernel at hand (the DCTs model a kernel symmetric about its centre; an
anti-diagonal motion blur is not), and then preconditioned CG is slower than
plain CG.  :func:`safeguarded` runs :data:`PROBE` iterations of
preconditioned CG from the starting point; if they reach ``rtol`` that is
all.  Otherwise it runs :data:`PROBE` iterations of plain CG from the same
starting point and continues the run whose residual ``||b - A x_k||`` is
lower after the same number of iterations (the least over the second half
of each probe, as CG's residual norm is not monotone), from its own state:
no iteration of the winner is repeated, and what is lost is the other run's
probe.

The comparison is per iteration, that is per product with W and W^H, not
per second: it is deterministic (the same choice on every run and machine),
and the early iterations favour plain CG anyway, whose first steps remove
the large eigenvalues fast and which then slows down (on a 48 x 48 disk blur
its residual after 10 iterations, 5e-2, projects 3x fewer iterations than it
takes), which offsets the preconditioner's own cost (a DCT pair, about one
product).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .base import Problem, pcg

__all__ = ["PROBE", "cg_steps", "safeguarded"]

PROBE = 10
"""Iterations of each run before the choice."""


def cg_steps(problem: Problem, x: np.ndarray, M) -> Iterator[tuple[np.ndarray, float]]:
    """(Preconditioned) CG on the problem's normal equations from ``x``, one step per item.

    Yields ``(x_k, ||r_k||)`` after each iteration, ``r_k`` the recursively
    updated residual ``b - A x_k``; stops on a breakdown (a non-positive or
    non-finite curvature) or a zero residual.  The same recurrences as
    ``scipy.sparse.linalg.cg``, kept as a generator so that a run can be
    paused and continued.
    """
    A = problem.normal
    r = problem.b - A.matvec(x) if np.any(x) else np.array(problem.b, copy=True)
    z = r if M is None else M.matvec(r)
    p = np.array(z, copy=True)
    rz = float(np.vdot(r, z).real)
    while rz > 0.0 and math.isfinite(rz):
        q = A.matvec(p)
        pq = float(np.vdot(p, q).real)
        if not (pq > 0.0 and math.isfinite(pq)):
            return
        alpha = rz / pq
        x = x + alpha * p
        r = r - alpha * q
        yield x, float(np.linalg.norm(r))
        z = r if M is None else M.matvec(r)
        following = float(np.vdot(r, z).real)
        p = z + (following / rz) * p
        rz = following


class _Run:
    """One CG run: its generator, iterate and relative residuals."""

    def __init__(self, problem: Problem, x: np.ndarray, M):
        self.problem, self.M = problem, M
        self.steps = cg_steps(problem, x, M)
        self.x = x
        self.history = [problem.residual(x) if np.any(x) else 1.0]
        self.iterations = 0
        self.stopped = False

    @property
    def met(self) -> bool:
        return self.history[-1] <= self.problem.rtol

    def advance(self, count: int) -> None:
        """Up to ``count`` more iterations, fewer where it meets rtol or stops."""
        callback, norm_b = self.problem.callback, self.problem.residual.norm_b
        for _ in range(count):
            if self.met or self.stopped:
                break
            item = next(self.steps, None)
            if item is None:
                self.stopped = True
                break
            self.x, norm = item
            self.iterations += 1
            self.history.append(norm / norm_b)
            if callback is not None:
                callback(self.x)
            if not math.isfinite(norm):
                self.stopped = True

    def level(self) -> float:
        """The least relative residual over the second half of the run so far (inf if it
        broke down short of rtol)."""
        if self.met:
            return 0.0
        if self.stopped:
            return math.inf
        tail = self.history[(len(self.history) + 1) // 2:]
        return min(tail) if tail else math.inf


def safeguarded(problem: Problem, x: np.ndarray, M) -> tuple[np.ndarray, int, float, bool]:
    """``(x, iterations, residual, switched)``: CG with ``M``, or plain CG where it projects faster.

    ``iterations`` counts both probes (each calls the problem's callback);
    ``switched`` says that plain CG finished the solve.  Whichever run
    continues, its true residual is measured at the end and CG restarts
    from its iterate while that misses ``rtol`` (:func:`~.base.pcg`), within
    ``maxiter`` iterations in all.
    """
    maxiter = problem.maxiter
    chosen = _Run(problem, x, M)
    if chosen.met or maxiter == 0:
        return x, 0, chosen.history[0], False
    chosen.advance(min(PROBE, maxiter))
    runs, winner = [chosen], chosen
    if not chosen.met and chosen.iterations < maxiter:
        plain = _Run(problem, x, None)
        plain.advance(min(PROBE, maxiter - chosen.iterations))
        runs.append(plain)
        if plain.level() < chosen.level():
            winner = plain
    winner.advance(maxiter - sum(run.iterations for run in runs))
    done = sum(run.iterations for run in runs)
    return (*_finish(problem, winner, done, maxiter), winner is not chosen)


def _finish(problem: Problem, run: _Run, done: int, maxiter: int) -> tuple[np.ndarray, int, float]:
    """Measure the true residual; restart CG from the run's iterate while it misses rtol."""
    value = problem.residual(run.x)
    if value <= problem.rtol or done >= maxiter or not math.isfinite(value):
        return run.x, done, value
    x, more, value = pcg(problem, run.x, run.M, maxiter - done, value)
    return x, done + more, value
