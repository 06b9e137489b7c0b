"""The lower bound: Lanczos on ``W^H W`` with the operator's own products."""

from __future__ import annotations

from .. import _bounds
from .base import Certificate, Interval

__all__ = ["Lanczos"]


class Lanczos(Certificate):
    """Raises ``lower`` to a Rayleigh quotient's square root, aiming at ``upper / (1 + rtol)``.

    It runs first from the circulant embedding's top vector; later in the
    registry, once the upper bound has come down, it runs on from its last
    vector with the products left of ``maxiter``.
    """

    name = "Lanczos"

    def applies(self, run: Interval) -> bool:
        if "lanczos" not in run.notes:
            return True
        return run.open and run.spent < run.maxiter

    def tighten(self, run: Interval) -> None:
        target = run.upper / (1 + run.rtol)
        if "lanczos" not in run.notes:
            start = _bounds.start_vector(run.structure, run.notes["embedding"])
            lower, spent, last = _bounds.lower_bound(run.structure, start, target, run.maxiter)
            run.spent += spent
        else:
            lower, spent, last = _bounds.lower_bound(run.structure, run.notes["lanczos"],
                                                     target, run.maxiter - run.spent)
            run.spent += spent
        run.notes["lanczos"] = last
        run.lower = max(run.lower, lower)
