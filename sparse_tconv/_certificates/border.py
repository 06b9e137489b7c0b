"""Reflect and replicate layers past the inertia certificate's size."""

from __future__ import annotations

from .. import _bounds
from .base import Certificate, Interval

__all__ = ["Border"]


class Border(Certificate):
    """The frame of copied input elements certified apart, the rest by zero padding's bound."""

    name = "border"

    def applies(self, run: Interval) -> bool:
        return run.open and not _bounds.inertia_applies(run.structure)

    def tighten(self, run: Interval) -> None:
        # half of rtol first: where the frame is deep enough that holds, in one
        # factorisation; wider ones (then refined) where it does not
        widenings = (run.rtol / 2, max(run.rtol, 0.02), 0.05, 0.075, 0.1, 0.25)
        border = _bounds.border_upper(run.structure, run.lower, widenings,
                                      refine_above=run.rtol)
        run.notes["border"] = border
        if border is not None:
            run.upper = min(run.upper, border)
