"""What a Tikhonov solve method is, and the problem every method is handed.

:func:`sparse_tconv.solvers.tikhonov` sets up the damped normal equations
``(W^H W + damp^2 L^H L) x = W^H y`` once (a :class:`Problem`; ``L = I``
unless given), then hands them
to the method its ``method=`` names, or to the first of the registry's
``AUTO_ORDER`` that applies.  A method is one :class:`Method` subclass in a
module of its own, and one line in the registry.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.sparse.linalg import LinearOperator, cg

__all__ = ["Method", "Problem", "Residual", "pcg"]


class Residual:
    """``||b - (W^H W + damp^2 L^H L) x|| / ||b||`` with ``b = W^H y``, as CG measures it."""

    def __init__(self, normal: LinearOperator, b: np.ndarray):
        self.normal, self.b = normal, b
        self.norm_b = float(np.linalg.norm(b))

    def __call__(self, x: np.ndarray) -> float:
        return float(np.linalg.norm(self.b - self.normal.matvec(x))) / self.norm_b


@dataclass
class Problem:
    """The damped normal equations of one solve, on a double-precision operator."""

    op: Any
    """The operator (ConvOperator or ConvTransposeOperator), in double precision."""
    y: np.ndarray
    damp: float
    normal: LinearOperator
    """``W^H W + damp^2 L^H L`` (``L = I`` when :attr:`L` is None)."""
    b: np.ndarray
    """``W^H y``."""
    residual: Residual
    dtype: np.dtype
    x0: np.ndarray | None
    rtol: float
    maxiter: int
    callback: Callable | None
    M: LinearOperator | None
    """The preconditioner the caller's ``M`` resolved to (None: plain CG)."""
    L: LinearOperator | None = None
    """The regulariser (None: the identity)."""
    regulariser: str = "identity"
    """``'identity'``, ``'gradient'`` or ``'operator'`` (any other ``L``)."""
    safeguard: bool = False
    """Whether ``M`` was chosen by ``'auto'``: CG may then drop it for plain CG
    (:mod:`~sparse_tconv._methods.safeguard`)."""
    switched: bool = False
    """Set by a method that dropped ``M`` for plain CG."""

    def start(self) -> np.ndarray:
        """The starting point: ``x0``, else zeros."""
        if self.x0 is None:
            return np.zeros(self.op.shape[1], dtype=self.dtype)
        return self.x0.astype(self.dtype)


def pcg(problem: Problem, x: np.ndarray, M, maxiter: int | None = None,
        value: float | None = None) -> tuple[np.ndarray, int, float]:
    """``(x, iterations, residual)``: scipy's CG, restarted until the true residual meets rtol.

    CG updates its residual by a recurrence, which drifts from ``b - A x``
    by rounding; after it stops, the true residual is measured and, if it
    misses ``rtol``, CG restarts from ``x`` (it recomputes ``b - A x``) with
    the iterations left (of ``maxiter``, default ``problem.maxiter``).
    ``value`` is ``x``'s relative residual where the caller measured it already.
    """
    rtol, callback = problem.rtol, problem.callback
    maxiter = problem.maxiter if maxiter is None else maxiter
    done = 0
    if value is None:
        value = problem.residual(x) if np.any(x) else 1.0  # (b - A 0 = b)
    while value > rtol and done < maxiter:
        count = [0]

        def step(xk, count=count):
            count[0] += 1
            if callback is not None:
                callback(xk)

        x, _ = cg(problem.normal, problem.b, x0=x, rtol=rtol, atol=0.0,
                  maxiter=maxiter - done, M=M, callback=step)
        done += count[0]
        value = problem.residual(x)
        if count[0] == 0 or not math.isfinite(value):
            break  # no progress possible (a breakdown, or rounding at the limit)
    return x, done, value


class Method(abc.ABC):
    """One way of solving the damped normal equations."""

    name: ClassVar[str]
    """The ``method=`` of :func:`~sparse_tconv.solvers.tikhonov` that picks it."""
    uses_m: ClassVar[bool] = True
    """Whether the caller's ``M`` is resolved and handed over (else ignored)."""
    preconditioner_name: ClassVar[str] = ""
    """What ``info.preconditioner`` reports for a method that ignores ``M``."""
    regularisers: ClassVar[tuple[str, ...]] = ("identity",)
    """The ``L`` it solves with: ``'identity'`` (``L=None``), ``'gradient'``, ``'operator'``."""

    @classmethod
    def auto_applies(cls, op) -> bool:
        """Whether ``method='auto'`` picks it for ``op`` (the earlier entries did not)."""
        return False

    @classmethod  # noqa: B027 - not abstract: most methods solve any operator
    def check(cls, op) -> None:
        """Raise if the method cannot solve ``op``'s equations (asked by name)."""

    @classmethod
    @abc.abstractmethod
    def solve(cls, problem: Problem) -> tuple[np.ndarray, int, float]:
        """``(x, iterations, residual)``, the residual measured with the operator's products."""
