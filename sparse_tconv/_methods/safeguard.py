"""The safeguard of ``M='auto'``: a short race of the chosen preconditioner against plain CG.

A preconditioner chosen from the kernel's structure can be wrong for the
kernel at hand, or right in iterations and still slower: each of its
iterations also applies the preconditioner, which on a small or cheap
operator costs as much as the operator's own products.  :func:`safeguarded`
runs preconditioned CG from the starting point and, unless it reaches
``rtol`` within :data:`ROUNDS`'s first round, plain CG from the same point;
after each round both runs have made the same number of iterations and
:func:`_decided` says which continues, from its own state:

- the preconditioner, where it is not far behind (its residual at most
  :data:`BEHIND` times plain CG's) and its rate is :data:`CLEAR` times plain
  CG's, or, at the last round, at least :data:`KEEP` times;
- plain CG, where its rate is :data:`CLEAR` times the preconditioner's, or
  at the last round.

*Rate*: the fall of ``log ||b - A x_k||`` over the second half of a run's
iterations so far, divided by the time those iterations took (the median
iteration's, so that one slow iteration does not decide).  The second half,
not the whole run: plain CG falls fast at first, where the large eigenvalues
go, and then slows down; a preconditioner that misses part of the spectrum
falls fast at first too and then stalls.  On the benchmark's problems
(:mod:`sparse_tconv.tools.solve_bench`, 2 threads) the rates after 10
iterations misled both ways (a random 3 -> 3 layer's DCT-II looked 1.8x
faster per second than plain CG, and took as many iterations at twice the
cost); after 20 they chose right.

What the race costs: the losing run's 10 or 20 iterations, and nothing
where the preconditioner meets ``rtol`` within the first round.  The clock
(:data:`_clock`) makes the choice depend on the machine's load: a ratio of
rates near :data:`KEEP` or :data:`CLEAR` may fall either side on two runs,
and a preconditioner that would lose 2x can then be kept where its early
rate was within a few percent of the bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np

from .base import Problem, pcg

__all__ = ["BEHIND", "CLEAR", "KEEP", "PROBE", "ROUNDS", "cg_steps", "safeguarded"]

_clock = time.perf_counter
"""What the race times iterations with (tests replace it with a count of iterations)."""

ROUNDS = (10, 20)
"""The iterations of each run at which the race may end (the last ends it)."""
PROBE = ROUNDS[-1]
"""The most iterations of each run before the choice."""
CLEAR = 2.5
"""A rate this many times the other's ends the race before its last round."""
BEHIND = 2.0
"""The preconditioner counts as ahead while its residual is at most this many times plain
CG's after as many iterations: plain CG falls fastest at first (a depthwise Gaussian blur's
DCT-II was level with it after 20 iterations, and finished in 54 against its 243)."""
KEEP = 0.8
"""At the last round the preconditioner goes on with at least this fraction of plain CG's rate.

Below 1: plain CG's rate keeps falling after the race (at 48 x 48 a disk
blur's DCT-II, 4.4x fewer iterations at 1.8x the time each, was level with
plain CG over iterations 10-20); the least ratio of a preconditioner that
lost in the end was 0.77 (a 7x7 anti-diagonal blur's DCT-II, replicate, 256 x 256).
"""


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
    """One CG run: its generator, iterate, relative residuals and the time of each iteration."""

    def __init__(self, problem: Problem, x: np.ndarray, M, start: float | None = None):
        self.problem, self.M = problem, M
        self.steps = cg_steps(problem, x, M)
        self.x = x
        if start is None:  # (given: the other run's, from the same x)
            start = problem.residual(x) if np.any(x) else 1.0
        self.history = [start]
        self.seconds: list[float] = []
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
            start = _clock()
            item = next(self.steps, None)
            if item is None:
                self.stopped = True
                break
            self.seconds.append(_clock() - start)
            self.x, norm = item
            self.iterations += 1
            self.history.append(norm / norm_b)
            if callback is not None:
                callback(self.x)
            if not math.isfinite(norm):
                self.stopped = True

    def rate(self) -> float:
        """How fast the residual falls, per second, over the second half of the run so far.

        ``log(h_half / h_last)`` over the time of that half (its median
        iteration's, times its length), each ``h`` the least of the residuals
        at and before it within two iterations (CG's residual is not
        monotone); inf where the run met rtol, -inf where it broke down.
        """
        if self.met:
            return math.inf
        if self.stopped or self.iterations < 2:
            return -math.inf
        half = self.iterations // 2
        fall = math.log(min(self.history[max(half - 2, 0):half + 1])
                        / min(self.history[-3:]))
        seconds = float(np.median(self.seconds[half:])) * (self.iterations - half)
        return fall / max(seconds, 1e-9)


def _faster(a: float, b: float, factor: float) -> bool:
    """Whether rate ``a`` is at least ``factor`` times rate ``b`` (a rate may be negative
    or zero: a residual that rose or stood still, or ``-inf``, a breakdown)."""
    if a <= 0.0:
        return False
    return b <= 0.0 or a >= factor * b


def _decided(chosen: _Run, plain: _Run, last: bool) -> _Run | None:
    """The run to continue, or None to race on (the rules: the module's docstring)."""
    a, b = chosen.rate(), plain.rate()
    near = min(chosen.history[-3:]) <= BEHIND * min(plain.history[-3:])
    if near and (_faster(a, b, CLEAR) or (last and _faster(a, b, KEEP))):
        return chosen
    if last or _faster(b, a, CLEAR):
        return plain
    return None


def safeguarded(problem: Problem, x: np.ndarray, M) -> tuple[np.ndarray, int, float, bool]:
    """``(x, iterations, residual, switched)``: CG with ``M``, or plain CG where it is faster.

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
    plain = None  # started only if the preconditioner misses rtol in the first round
    winner = None
    for i, count in enumerate(ROUNDS):
        chosen.advance(min(count - chosen.iterations, maxiter - _done(chosen, plain)))
        if chosen.met:
            winner = chosen
            break
        if plain is None:
            plain = _Run(problem, x, None, chosen.history[0])
        plain.advance(min(count - plain.iterations, maxiter - _done(chosen, plain)))
        if plain.met:
            winner = plain
            break
        if _done(chosen, plain) >= maxiter:
            break
        winner = _decided(chosen, plain, i == len(ROUNDS) - 1)
        if winner is not None:
            break
    if winner is None:  # maxiter ran out during the race: the lower residual
        winner = chosen if plain is None or _last(chosen) <= _last(plain) else plain
    winner.advance(maxiter - _done(chosen, plain))
    return (*_finish(problem, winner, _done(chosen, plain), maxiter), winner is not chosen)


def _done(chosen: _Run, plain: _Run | None) -> int:
    """The iterations of both runs so far."""
    return chosen.iterations + (0 if plain is None else plain.iterations)


def _last(run: _Run) -> float:
    """The run's last relative residual (inf if not finite)."""
    value = run.history[-1]
    return value if math.isfinite(value) else math.inf


def _finish(problem: Problem, run: _Run, done: int, maxiter: int) -> tuple[np.ndarray, int, float]:
    """Measure the true residual; restart CG from the run's iterate while it misses rtol."""
    value = problem.residual(run.x)
    if value <= problem.rtol or done >= maxiter or not math.isfinite(value):
        return run.x, done, value
    x, more, value = pcg(problem, run.x, run.M, maxiter - done, value)
    return x, done + more, value
