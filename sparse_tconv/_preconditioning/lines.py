"""The lines construction: kernels whose taps lie on one line, solved line by line.

A kernel whose nonzero taps all lie on a line ``t = t_0 + j v`` (``v`` a
primitive lattice direction: a motion blur along a diagonal, an
anti-diagonal or any lattice direction) reads, for every output, input
positions on one line ``p_0 + Z u`` of the input grid, ``u = d * v`` (the
dilation per axis).  With zero padding (taps outside the input dropped),
two inputs share an output only if they lie on the same line, so ``W^H W``
is block diagonal over the lines, and each block is banded: the entry
between ``p`` and ``p + k u`` is

``G_k(p) = sum_j conj(w_j) w_{j+k} [p + lo - d t_j is an output position]``

with ``b + 1`` bands, ``b`` the span of ``j``.  Ordering the unknowns line
by line makes ``W^H W + damp^2 I`` one banded Hermitian matrix of
bandwidth ``b``: a banded Cholesky factorisation (LAPACK ``pbtrf``,
``O(n b^2)``) is the exact inverse, and each application two banded
triangular solves (``O(n b)``), whatever the image size.  A 7x7
anti-diagonal motion blur has ``b = 6`` where a two-dimensional banded
ordering would have ``6 L``.

Other padding modes fold the taps outside onto positions of other lines
(the edge, or its mirror): the zero-padding model then misses couplings
between lines at the border, which it does not bound, and measured as a
preconditioner it lost to plain CG by 5-10x (the anti-diagonal with
replicate or reflect padding at 256x256, damp 5e-3: over 1,000 iterations
against plain CG's 300).  So ``'auto'`` takes it only where it is exact.

With ``L='gradient'`` the model adds the part of ``damp^2 D^H D`` within
each line: its diagonal, and the differences along the line where the line
runs along an axis.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import scipy.linalg
from scipy.sparse.linalg import LinearOperator

from .._geometry import ConvGeometry
from .._preconditioners import _FLOOR
from .base import Construction, Operator, Pieces
from .gradient import gradient_diagonal

__all__ = ["BandedLinesPreconditioner", "Lines", "kernel_line"]

# 'auto' takes it up to this bandwidth (the span of the taps along the line, in steps):
# the factorisation costs n b^2, each application 4 n b flops.
_AUTO_BANDWIDTH = 64


class Lines(Construction):
    """Line-by-line banded Cholesky: exact for a kernel on a line with zero padding."""

    name: ClassVar[str] = "lines"
    regularisers: ClassVar[tuple[str, ...]] = ("identity", "gradient")

    @classmethod
    def exact(cls, op: Operator) -> bool:
        """Where it applies and no tap is folded back: zero padding (or none)."""
        geom = _geometry(op)
        return geom is not None and _folds_nothing(geom)

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where it is exact and the band is at most 64 steps wide."""
        if not cls.exact(op):
            return False
        line = kernel_line(op.weight[0, 0])
        return line is not None and line.bandwidth <= _AUTO_BANDWIDTH

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        raise NotImplementedError(
            "kind='lines' is a banded factorisation, not a spectral preconditioner: it has "
            "no blocks (see Lines.preconditioner)"
        )

    @classmethod
    def preconditioner(cls, op: Operator, damp: float, boost: float, threads: int,
                       correct: bool, regulariser: str = "identity") -> LinearOperator:
        geom = _geometry(op)
        if geom is None:
            raise NotImplementedError(
                "kind='lines' needs a convolution (not transposed) with one input and one "
                "output channel, stride 1, and a kernel whose nonzero taps lie on one line; "
                f"got weight.shape={op.weight.shape}, "
                f"stride={op.convolution.geometry.stride}"
            )
        line = kernel_line(op.weight[0, 0])
        assert line is not None  # (_geometry checked it)
        return BandedLinesPreconditioner(geom, line, damp, boost, regulariser, cls.name,
                                         np.result_type(op.dtype, np.float64))


class KernelLine:
    """A kernel's nonzero taps on one line: ``taps[i] = first + steps[i] * direction``."""

    __slots__ = ("direction", "taps", "steps", "values")

    def __init__(self, direction: np.ndarray, taps: np.ndarray, steps: np.ndarray,
                 values: np.ndarray):
        self.direction, self.taps, self.steps, self.values = direction, taps, steps, values

    @property
    def bandwidth(self) -> int:
        """The span of the taps along the line, in steps: the Gram matrix's bandwidth."""
        return int(self.steps[-1] - self.steps[0])


def kernel_line(kernel: np.ndarray) -> KernelLine | None:
    """The line the kernel's nonzero taps lie on, or None where they do not lie on one.

    The direction is primitive (its entries' gcd is 1), its first nonzero
    entry positive; the taps are sorted along it.  One tap lies on a line
    along the first axis; a kernel with no nonzero tap on none.
    """
    taps = np.argwhere(kernel != 0)
    if len(taps) == 0:
        return None
    offsets = taps - taps[0]
    if len(taps) == 1:
        direction = np.eye(kernel.ndim, dtype=np.int64)[0]
    else:
        span = offsets[np.argmax(np.abs(offsets).sum(axis=1))]
        direction = span // math.gcd(*(int(a) for a in span))
    lead = int(np.flatnonzero(direction)[0])
    if direction[lead] < 0:
        direction = -direction
    steps = offsets[:, lead] // direction[lead]
    if not np.array_equal(offsets, steps[:, None] * direction[None, :]):
        return None
    order = np.argsort(steps, kind="stable")
    return KernelLine(direction, taps[order], steps[order] - steps[order[0]],
                      kernel[tuple(taps[order].T)])


def _geometry(op) -> ConvGeometry | None:
    """The operator's geometry where the construction applies to it, else None."""
    geom: ConvGeometry = op.convolution.geometry
    if (op.convolution.transposed or geom.in_channels != 1 or geom.out_channels != 1
            or any(s != 1 for s in geom.stride)):
        return None
    return geom if kernel_line(op.weight[0, 0]) is not None else None


def _folds_nothing(geom: ConvGeometry) -> bool:
    """Whether the padding drops the taps outside the input (zeros, or no padding)."""
    return geom.padding_mode == "zeros" or not any(lo or hi for lo, hi in geom.padding)


class BandedLinesPreconditioner(LinearOperator):
    """``(W^H W + damp^2 I)^{-1}`` (zero padding) as a banded Cholesky factor, line by line.

    The unknowns are permuted line by line (:func:`_line_order`); the factor
    is that of the permuted matrix in LAPACK's lower band storage.  Vectors
    are solved in double precision; a complex vector on a real factor as its
    real and imaginary parts.
    """

    def __init__(self, geom, line, damp, boost, regulariser, kind, dtype):
        # (unannotated: scipy-stubs give LinearOperator no __init__ to check against)
        step = np.asarray(geom.dilation) * line.direction
        self._order, line_id = _line_order(geom.input_size, step)
        bands = _gram_bands(geom, line)
        shift = boost * _largest_eigenvalue_bound(bands)
        if regulariser == "gradient":
            _add_gradient_part(bands, geom.input_size, step, damp)
        else:
            shift += damp * damp
        self._factor = _factor(_band_storage(bands, self._order, line_id), shift)
        self.kind, self.damp = kind, damp
        n = self._order.size
        super().__init__(dtype=dtype, shape=(n, n))

    def _solve(self, X: np.ndarray) -> np.ndarray:
        X = X.astype(np.result_type(X.dtype, np.float64), copy=False)
        if np.iscomplexobj(X) and not np.iscomplexobj(self._factor):
            return self._solve(X.real) + 1j * self._solve(X.imag)
        permuted = scipy.linalg.cho_solve_banded((self._factor, True), X[self._order],
                                                 check_finite=False)
        out = np.empty_like(permuted)
        out[self._order] = permuted
        return out

    def _matvec(self, x):
        return self._solve(np.asarray(x).reshape(-1))

    def _matmat(self, X):
        return self._solve(np.asarray(X))

    def _adjoint(self):
        return self  # Hermitian


def _line_order(size: tuple[int, ...], step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, line)``: the grid's positions line by line, each line along ``step``, and
    the line of each position in that order (the flat index of the line's first position).

    A position's line starts where one more step back leaves the grid.
    """
    grid = np.indices(size).reshape(len(size), -1)
    back = np.full(grid.shape[1], np.iinfo(np.int64).max)
    for axis, (n, s) in enumerate(zip(size, step.tolist())):
        if s > 0:
            back = np.minimum(back, grid[axis] // s)
        elif s < 0:
            back = np.minimum(back, (n - 1 - grid[axis]) // -s)
    first = np.ravel_multi_index(tuple(grid - back * step[:, None]), size)
    order = np.lexsort((back, first))
    return order, first[order]


def _gram_bands(geom: ConvGeometry, line: KernelLine) -> np.ndarray:
    """``G[k, p]``: the entry of ``W^H W`` between input ``p`` and ``p + k u`` (flat ``p``).

    ``sum_j conj(w_j) w_{j+k}`` over the taps ``j`` whose output ``p + lo -
    d t_j`` lies in the output (zero padding drops the others): one GEMM of
    the tap products with the taps' 0/1 masks.
    """
    b = line.bandwidth
    at = {int(j): w for j, w in zip(line.steps, line.values)}
    pairs = np.zeros((b + 1, len(line.steps)), dtype=np.result_type(line.values, np.float64))
    for i, (j, w) in enumerate(zip(line.steps.tolist(), line.values)):
        for k in range(b + 1 - j):
            if j + k in at:
                pairs[k, i] = np.conj(w) * at[j + k]
    masks = np.empty((len(line.steps), math.prod(geom.input_size)))
    for i, tap in enumerate(line.taps):
        mask = np.ones((), dtype=bool)
        for n, (lo, _), d, o, t in zip(geom.input_size, geom.padding, geom.dilation,
                                       geom.output_size, tap.tolist()):
            first = np.arange(n) + lo - d * t
            mask = np.multiply.outer(mask, (first >= 0) & (first < o))
        masks[i] = mask.reshape(-1)
    return pairs @ masks


def _add_gradient_part(bands: np.ndarray, size: tuple[int, ...], step: np.ndarray,
                       damp: float) -> None:
    """Add ``damp^2`` times the part of ``D^H D`` within the lines: its diagonal, and
    ``-1`` between neighbours where the line runs along an axis (a unit step)."""
    bands[0] += (damp * damp) * gradient_diagonal(1, size).reshape(-1)
    if len(bands) > 1 and np.abs(step).sum() == 1:
        bands[1] -= damp * damp  # (pairs that leave the grid are dropped by _band_storage)


def _largest_eigenvalue_bound(bands: np.ndarray) -> float:
    """Gershgorin's bound on the largest eigenvalue of the banded Hermitian matrix."""
    magnitude = np.abs(bands)
    return float((magnitude[0] + 2 * magnitude[1:].sum(axis=0)).max(initial=0.0))


def _band_storage(bands: np.ndarray, order: np.ndarray, line: np.ndarray) -> np.ndarray:
    """LAPACK's lower band storage of the permuted matrix: ``ab[k, i] = A[i + k, i]``.

    ``A[q, p] = conj(G[k, p])`` for ``q = p + k u`` on the same line (the next
    positions of the order); zero across the end of a line.
    """
    n = order.size
    ab = np.zeros((len(bands), n), dtype=bands.dtype)
    for k, band in enumerate(bands):
        same = line[:n - k] == line[k:]
        ab[k, :n - k] = np.where(same, np.conj(band[order[:n - k]]), 0)
    ab[0] = ab[0].real
    return ab


def _factor(ab: np.ndarray, shift: float) -> np.ndarray:
    """The banded Cholesky factor of ``A + shift I``; where that is singular (no damping of
    a singular ``W^H W``), of ``A + (shift + floor) I``, the floor a 1e-10 part of the top of
    the diagonal."""
    ab = ab.copy()
    ab[0] += shift
    try:
        return scipy.linalg.cholesky_banded(ab, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        top = float(ab[0].real.max(initial=0.0))
        ab[0] += _FLOOR * (top if top > 0 else 1.0)
        return scipy.linalg.cholesky_banded(ab, lower=True, check_finite=False)
