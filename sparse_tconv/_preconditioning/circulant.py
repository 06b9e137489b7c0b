"""The circulant construction: a polyphase split by the stride, then the DFT.

Exact (the inverse) where W is a (subsampled) circulant; elsewhere the
Strang-type circulant of the kernel on the Gram side's grid (its
*surrogate*), shifted, with a scaling that gives it the true diagonal.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from .._geometry import ConvGeometry, conv_geometry
from .._preconditioners import (
    _fourier_pieces,
    _FourierBasis,
    _gram,
    _matching_scale,
    _regularised_inverse,
    _total_shift,
    is_exact,
)
from .base import Construction, Operator, Pieces

__all__ = ["Circulant", "ExactCirculant", "has_surrogate"]


class Circulant(Construction):
    """The circulant of the kernel: exact for a circulant W, else shifted and corrected."""

    name: ClassVar[str] = "circulant"
    # Its model joins opposite borders, which errs more than the DCTs'.  Measured
    # (sparse_tconv.tools.solve_bench): a random 4 -> 4 channel layer at damp 1e-3 took
    # over 612 iterations with no shift, 233 with 0.1, 612 plain.
    default_shift: ClassVar[float] = 0.1

    @classmethod
    def exact(cls, op: Operator) -> bool:
        return is_exact(op)

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where the kernel has a circulant on the Gram side's grid (the shifted circulant)."""
        return has_surrogate(op)

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool) -> Pieces:
        exact = cls.exact(op)
        geom = op.convolution.geometry if exact else _circulant_geometry(op)
        basis, _, Bop = _fourier_pieces(op, geom, threads)
        H = _gram(Bop)
        shift = _total_shift(H, damp, boost)
        scale = None
        if correct and not exact:
            scale = _matching_scale(op, _circulant_diagonal(H, basis), shift)
        return basis, _regularised_inverse(H, shift), scale


class ExactCirculant(Circulant):
    """The circulant as 'auto''s first choice: where W is circulant, and it is the inverse."""

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        return cls.exact(op)


def has_surrogate(op) -> bool:
    """Whether the circulant construction applies to ``op`` (its kernel has a circulant)."""
    try:
        _circulant_geometry(op)
    except NotImplementedError:
        return False
    return True


def _circulant_geometry(op) -> ConvGeometry:
    """The circulant of the operator's kernel on its Gram side's grid (NotImplementedError
    where there is none)."""
    geom: ConvGeometry = op.convolution.geometry
    if op.convolution.transposed:
        size = tuple(o * s for o, s in zip(geom.output_size, geom.stride))
    else:
        size = geom.input_size
    return _surrogate(geom, size, "kind='circulant'")


def _surrogate(geom: ConvGeometry, input_size, what: str) -> ConvGeometry:
    """The circular convolution of the same kernel on ``input_size``, output size L / s.

    Its Gram matrix is circulant and, away from the border, has the entries
    of the operator's own.  Those depend on the kernel, stride and dilation,
    and on the padding only through ``lo mod s`` (which phase of the input
    each tap reads), which the surrogate keeps.
    """
    pairs = []
    for axis, (k, s, d, L) in enumerate(zip(geom.kernel_size, geom.stride, geom.dilation,
                                            input_size)):
        if L % s:
            raise NotImplementedError(
                f"{what} needs input sizes divisible by the stride, got input size "
                f"{tuple(input_size)} with stride={geom.stride}"
            )
        reach, phase = d * (k - 1), geom.padding[axis][0] % s
        # Total padding in [reach - s + 1, reach] gives the output size L / s.
        total = max(phase, reach - s + 1)
        if total > reach:
            raise NotImplementedError(
                f"{what} is not available: in spatial dimension {axis} the kernel "
                f"(reach {reach}) is shorter than the phase {phase} of its padding "
                f"({geom.padding[axis]}) with stride {s}"
            )
        pairs.append((phase, total - phase))
    try:
        return conv_geometry(geom.weight_shape, (geom.in_channels, *input_size),
                             stride=geom.stride, padding=tuple(pairs), dilation=geom.dilation,
                             groups=geom.groups, padding_mode="circular")
    except ValueError as exc:  # a dilated kernel wider than the input would wrap twice
        raise NotImplementedError(f"{what} is not available for this geometry: {exc}") from None


def _circulant_diagonal(H: np.ndarray, basis: _FourierBasis) -> np.ndarray:
    """The diagonal of the circulant model, per unknown: its blocks' diagonals averaged.

    A half spectrum counts its frequencies twice, but for the first and
    (even grids) the middle one of the last axis.
    """
    n = len(basis.grid)
    diag = np.diagonal(H, axis1=-2, axis2=-1).real  # (g, *F, m)
    if basis.real:
        weights = np.full(basis.frequencies[-1], 2.0)
        weights[0] = 1.0
        if basis.grid[-1] % 2 == 0:
            weights[-1] = 1.0
        diag = diag * weights[:, None]
    mean = diag.sum(axis=tuple(range(1, 1 + n))) / math.prod(basis.grid)  # (g, m)
    # Unknown (c, r) of the polyphase split: broadcast over the grid, back to positions.
    per_phase = mean.reshape(basis.channels, *basis.split)
    out = np.empty((basis.channels, *basis.sample_size))
    view = out.reshape([basis.channels] + [v for m, s in zip(basis.grid, basis.split)
                                            for v in (m, s)])
    view[...] = per_phase.reshape([basis.channels] + [v for s in basis.split
                                                       for v in (1, s)])
    return out
