"""Reflect and replicate layers: ``t I - W^H W`` by a banded Cholesky factorisation, on a
frame around the border or on every position.

Past the inertia certificate's size, and ahead of it where the whole
factorisation is cheap (see :func:`sparse_tconv._bounds.border_upper`).
"""

from __future__ import annotations

from .. import _bounds
from .base import Certificate, Interval

__all__ = ["Border"]


class Border(Certificate):
    """A frame of input elements near the border factorised, the rest bounded by zero
    padding's bound; or, where it is cheap, every element."""

    name = "border"

    def applies(self, run: Interval) -> bool:
        structure = run.structure
        return run.open and (not _bounds.inertia_applies(structure)
                             or _bounds.border_is_cheap(structure))

    def tighten(self, run: Interval) -> None:
        # half of rtol first: where the frame is deep enough that holds, in one
        # factorisation; then just inside rtol, and wider ones (refined) where
        # neither holds.  Where the whole t I - G is cheap (an exact test, no
        # rest) a tenth of rtol comes first, as the inertia certificate's did.
        tries = [run.rtol / 2, 0.9 * run.rtol, max(run.rtol, 0.02), 0.05, 0.075, 0.1, 0.25]
        if _bounds.border_is_cheap(run.structure):
            tries.append(run.rtol / 10)
        widenings = sorted(set(tries))
        border = _bounds.border_upper(run.structure, run.lower, widenings,
                                      refine_above=run.rtol, embedding=run.notes.get("embedding"))
        run.notes["border"] = border
        if border is not None:
            run.upper = min(run.upper, border)
