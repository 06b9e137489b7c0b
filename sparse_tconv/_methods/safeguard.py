"""The safeguard of ``M='auto'``: a short race of the chosen preconditioner against plain CG.

A preconditioner chosen from the kernel's structure can be wrong for the
kernel at hand.  :func:`safeguarded` runs preconditioned CG from the starting
point and, unless it reaches ``rtol`` within :data:`ROUNDS`'s first round,
plain CG from the same point; after each round both runs have made the same
number of iterations, and :func:`_decided` compares their residuals
``||b - A x_k|| / ||b||`` (the least of each run's last three: CG's residual
is not monotone):

- after the first round, the preconditioner continues where its residual is
  at most :data:`EARLY_KEEP` times plain CG's, plain CG where it is at most
  :data:`EARLY_KEEP` times the preconditioner's;
- after the last, the preconditioner continues where its residual is at most
  :data:`BEHIND` times plain CG's, else plain CG.

The winner continues from its own state: nothing is repeated, and what the
race costs is the loser's iterations, none where the preconditioner meets
``rtol`` in the first round (the exact constructions).  Nor does plain CG
start while the preconditioned run is on course to meet ``rtol`` within
:data:`PROBE` more iterations (:func:`_on_course`), for up to :data:`AHEAD`
iterations: a race costs plain CG at least a round, which a run that close
to the end cannot win back (the DCT-II of a disk blur at damp 1e-1, 12
iterations, raced 10 more of plain CG's).  A run that falls off course, or
is still short of ``rtol`` after :data:`AHEAD`, is raced as any other: plain
CG catches up round by round, and the comparisons read the preconditioned
run's residuals at the same iterations, so the choice is the one the race
would have made from the start.

The comparison is per iteration, not per second, so that the choice is the
same on every run and machine.  Per second was tried: over a window of 20
iterations the rates of the two runs did not predict the winner (plain CG
falls fastest at first and then slows down; the DCT-II of a disk blur at
damp 1e-3, shifted, starts slowly and then takes 82 iterations to plain CG's
922), and it dropped 10x winners.  What the per-iteration comparison leaves
out is the preconditioner's own cost, about one product: ``M='auto'`` only
races constructions that model ``W^H W`` (``Construction.models``), whose
iterations are that much better.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .base import Problem, pcg

__all__ = ["AHEAD", "BEHIND", "EARLY_KEEP", "PROBE", "ROUNDS", "cg_steps", "safeguarded"]

ROUNDS = (10, 20)
"""The iterations of each run at which the race may end (the last ends it)."""
PROBE = ROUNDS[-1]
"""The most iterations of plain CG before the choice."""
AHEAD = 40
"""The most iterations the preconditioned run makes alone while on course (:func:`_on_course`)
before the race."""
EARLY_KEEP = 0.2
"""After the first round, a residual this many times the other's decides."""
BEHIND = 1.3
"""After the last round, the preconditioner continues while its residual is at most this
many times plain CG's.

Measured at 20 iterations (2 threads): the DCTs of even blurs that went on to win were at
0.13-1.01 times plain CG's residual (a disk blur at damp 1e-3, 192x192 to 512x512, 9-11x
fewer iterations in the end; a depthwise Gaussian layer, 1.01, 54 iterations against 243);
the DCTs made to precondition an anti-diagonal motion blur, which lost 2-10x, at 1.7-27.
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
    """One CG run: its generator, iterate and relative residuals."""

    def __init__(self, problem: Problem, x: np.ndarray, M, start: float | None = None):
        self.problem, self.M = problem, M
        self.steps = cg_steps(problem, x, M)
        self.x = x
        if start is None:  # (given: the other run's, from the same x)
            start = problem.residual(x) if np.any(x) else 1.0
        self.history = [start]
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

    def level(self, at: int | None = None) -> float:
        """The least relative residual of the last three iterations up to iteration ``at``
        (default: now); 0 where it met rtol, inf where the run broke down short of rtol or
        its residual is not finite."""
        if at is None or at >= self.iterations:
            history, broken = self.history, self.stopped
        else:
            history, broken = self.history[:at + 1], False
        if history[-1] <= self.problem.rtol:
            return 0.0
        recent = history[-3:]
        if broken or not all(math.isfinite(value) for value in recent):
            return math.inf
        return min(recent)


def _on_course(run: _Run) -> bool:
    """Whether the run's residual meets rtol within :data:`PROBE` more iterations, falling
    on at the slower of its mean rate so far and its rate over the last round (CG's
    residual falls fastest at first)."""
    level, k = run.level(), run.iterations
    if level == 0.0:
        return True
    span = min(k, ROUNDS[0])
    references = (run.history[0], run.history[k - span])
    if not (k and 0.0 < level < min(references) and math.isfinite(max(references))):
        return False  # (not falling, broken down, or not finite)
    rate = max(math.log(level / references[0]) / k, math.log(level / references[1]) / span)
    return math.log(run.problem.rtol / level) / rate <= PROBE


def _decided(chosen: _Run, plain: _Run, last: bool, at: int | None = None) -> _Run | None:
    """The run to continue, or None to race on (the rules: the module's docstring), on the
    runs' levels at iteration ``at`` (default: now)."""
    a, b = chosen.level(at), plain.level(at)
    if a <= (BEHIND if last else EARLY_KEEP) * b:
        return chosen
    if last or b <= EARLY_KEEP * a:
        return plain
    return None


def safeguarded(problem: Problem, x: np.ndarray, M) -> tuple[np.ndarray, int, float, bool]:
    """``(x, iterations, residual, switched)``: CG with ``M``, or plain CG where it is ahead.

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
    # The preconditioned run alone, while it stays on course to meet rtol.
    chosen.advance(min(ROUNDS[0], maxiter))
    while (not chosen.met and chosen.iterations < min(AHEAD, maxiter)
           and _on_course(chosen)):
        chosen.advance(min(ROUNDS[0], maxiter - chosen.iterations))
    winner = chosen if chosen.met else None
    plain = None
    # The race: plain CG from the same point, compared round by round at as many
    # iterations of both (the preconditioned run may be ahead: its level then).
    for i, count in enumerate(ROUNDS):
        if winner is not None or _done(chosen, plain) >= maxiter:
            break
        chosen.advance(min(count - chosen.iterations, maxiter - _done(chosen, plain)))
        if chosen.met:
            winner = chosen
            break
        if plain is None:
            plain = _Run(problem, x, None, chosen.history[0])
        plain.advance(min(count - plain.iterations, maxiter - _done(chosen, plain)))
        if plain.met:
            winner = plain
        elif _done(chosen, plain) < maxiter:
            winner = _decided(chosen, plain, i == len(ROUNDS) - 1, count)
    if winner is None:  # maxiter ran out during the race: the lower residual
        winner = chosen if plain is None or chosen.level() <= plain.level() else plain
    winner.advance(maxiter - _done(chosen, plain))
    return (*_finish(problem, winner, _done(chosen, plain), maxiter), winner is not chosen)


def _done(chosen: _Run, plain: _Run | None) -> int:
    """The iterations of both runs so far."""
    return chosen.iterations + (0 if plain is None else plain.iterations)


def _finish(problem: Problem, run: _Run, done: int, maxiter: int) -> tuple[np.ndarray, int, float]:
    """Measure the true residual; restart CG from the run's iterate while it misses rtol."""
    value = problem.residual(run.x)
    if value <= problem.rtol or done >= maxiter or not math.isfinite(value):
        return run.x, done, value
    x, more, value = pcg(problem, run.x, run.M, maxiter - done, value)
    return x, done + more, value
