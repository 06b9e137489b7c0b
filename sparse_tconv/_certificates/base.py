"""What a norm certificate is: a step that narrows the interval of a :func:`norm_bounds` run.

:func:`sparse_tconv.spectral.norm_bounds` walks the ordered registry
:data:`sparse_tconv._certificates.CERTIFICATES` once: each certificate that
applies to the run's state narrows its interval (raises ``lower`` by a
vector's Rayleigh quotient, or lowers ``upper`` by a bound that provably
holds, rounding included).  A new certificate is one module with one
:class:`Certificate` subclass, and one line in the registry.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._bounds import _Structure

__all__ = ["Interval", "Certificate"]


@dataclass
class Interval:
    """The state of one ``norm_bounds`` run, which the certificates narrow in turn."""

    structure: _Structure
    rtol: float
    maxiter: int
    lower: float = 0.0
    upper: float = float("inf")
    spent: int = 0
    """Products spent by the lower bound's Lanczos runs."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What one certificate leaves for another: the first upper bound (where the
    start vector comes from), Lanczos' last vector, the border bound tried."""

    @property
    def open(self) -> bool:
        """Whether the interval is wider than ``rtol`` (relative to its lower end)."""
        return self.upper > self.lower * (1 + self.rtol)


class Certificate(abc.ABC):
    """One step of a ``norm_bounds`` run."""

    name: ClassVar[str]
    """What the certificate is called in messages and tests."""

    @abc.abstractmethod
    def applies(self, run: Interval) -> bool:
        """Whether it runs on this state (most run only while the interval is open)."""

    @abc.abstractmethod
    def tighten(self, run: Interval) -> None:
        """Narrow ``run.lower`` or ``run.upper``; never widen them."""
