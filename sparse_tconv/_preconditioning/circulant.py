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
    _FLOOR,
    _fourier_pieces,
    _FourierBasis,
    _gram,
    _matching_scale,
    _regularised_inverse,
    _shifted_inverse,
    _total_shift,
    gram_diagonal,
    is_exact,
)
from .base import Construction, Operator, Pieces
from .gradient import gradient_diagonal, laplacian_symbol
from .gradient import scale as gradient_scale

__all__ = ["Circulant", "ExactCirculant", "has_surrogate"]


class Circulant(Construction):
    """The circulant of the kernel: exact for a circulant W, else shifted and corrected."""

    name: ClassVar[str] = "circulant"
    # Its model joins opposite borders, which errs more than the DCTs'.  Measured
    # (sparse_tconv.tools.solve_bench): a random 4 -> 4 channel layer at damp 1e-3 took
    # over 612 iterations with no shift, 233 with 0.1, 612 plain.
    default_shift: ClassVar[float] = 0.1
    # D^H D (L='gradient') by the periodic Laplacian, where the DFT is on the Gram side's
    # grid itself (no polyphase split): never exact, as D has no wrap-around rows.
    regularisers: ClassVar[tuple[str, ...]] = ("identity", "gradient")

    @classmethod
    def exact(cls, op: Operator) -> bool:
        return is_exact(op)

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where the kernel has a circulant on the Gram side's grid (the shifted circulant)."""
        return has_surrogate(op)

    @classmethod
    def auto_applies_to(cls, op: Operator, regulariser: str) -> bool:
        """As :meth:`auto_applies`; with the gradient only where the DFT needs no split."""
        if regulariser == "gradient" and not _unsplit(op):
            return False
        return super().auto_applies_to(op, regulariser)

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        exact = cls.exact(op)
        geom = op.convolution.geometry if exact else _circulant_geometry(op)
        basis, _, Bop = _fourier_pieces(op, geom, threads)
        H = _gram(Bop)
        if regulariser == "gradient":
            return _with_gradient(op, basis, H, damp, boost, correct)
        inverse, shift = _shifted_inverse(H, damp, boost)
        scale = None
        if correct and not exact:
            scale = _matching_scale(op, _circulant_diagonal(H, basis), shift)
        return basis, inverse, scale


class ExactCirculant(Circulant):
    """The circulant as 'auto''s first choice: where W is circulant, and it is the inverse."""

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        return cls.exact(op)


def _unsplit(op) -> bool:
    """Whether the circulant's DFT acts on the Gram side's grid with no polyphase split."""
    return op.convolution.transposed or all(s == 1 for s in op.convolution.geometry.stride)


def _with_gradient(op, basis: _FourierBasis, H: np.ndarray, damp: float, boost: float,
                   correct: bool) -> Pieces:
    """The blocks of ``W^H W + damp^2 D^H D``, ``D^H D`` by its periodic version.

    The periodic Laplacian exceeds ``D^H D`` by one wrap-around term per line;
    with ``correct``, the diagonal scaling gives the model the true diagonal
    (``1`` at the ends of a line instead of ``2``, and W's own border).
    """
    if not _unsplit(op):
        raise NotImplementedError(
            "kind='circulant' models L='gradient' only where the DFT needs no polyphase split "
            f"(stride 1, or a transposed convolution), got stride={op.convolution.geometry.stride}"
        )
    shift = _total_shift(H, 0.0, boost)  # no damp^2 I in these equations
    channels, size = op.input_shape[0], tuple(op.input_shape[1:])
    symbol = laplacian_symbol(size, basis.frequencies, "dft")
    model = _circulant_diagonal(H, basis)
    H = H + (damp * damp) * symbol[..., None, None] * np.eye(H.shape[-1])
    scale = None
    if correct:
        periodic = np.full((channels, *size), 2.0 * sum(n > 1 for n in size))
        true = gram_diagonal(op) + (damp * damp) * gradient_diagonal(channels, size)
        scale = gradient_scale(true, model + (damp * damp) * periodic, shift, _FLOOR)
    return basis, _regularised_inverse(H, shift), scale


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
