"""The inertia certificate: ``t I - W^H W`` positive semi-definite, by a sparse LDL^H."""

from __future__ import annotations

from .. import _bounds
from .base import Certificate, Interval

__all__ = ["Inertia"]


class Inertia(Certificate):
    """Certifies ``upper`` just above ``lower``: Lanczos has run to its stall, so the
    lower bound is usually close, and the first try holds."""

    name = "inertia"
    widenings = (0.1, 0.5, 0.9)
    """Fractions of ``rtol`` above the lower bound tried, in turn."""

    def applies(self, run: Interval) -> bool:
        return run.open

    def tighten(self, run: Interval) -> None:
        for widening in self.widenings:
            if not run.open:
                break
            t = (run.lower * (1 + widening * run.rtol)) ** 2
            certified = _bounds.inertia_upper(run.structure, t)
            if certified is not None:
                run.upper = min(run.upper, certified)
