"""The Kronecker construction: one dense eigenbasis per spatial axis.

The kernel's best rank-one approximation ``sigma u_1 (x) ... (x) u_N`` makes
W the Kronecker product of one-dimensional convolutions in the operator's
own geometry, whose Gram matrices are diagonalised axis by axis: the exact
inverse for a separable kernel, in every padding mode and stride.  A
depthwise layer (each group one channel in, one out) is one such
convolution per channel, each with its own eigenbases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np
import scipy.linalg

from .._geometry import ConvGeometry, conv_geometry
from .._preconditioners import (
    _DenseBasis,
    _gram_side,
    _regularised_inverse,
    _total_shift,
    channel_kernels,
    kronecker_factors,
)
from .base import Construction, Operator, Pieces

__all__ = ["Kronecker", "SEPARABLE_RTOL"]

# A kernel is separable (rank one) when its best rank-one approximation is this close.
SEPARABLE_RTOL = 1e-10
# The Kronecker construction stores one dense L x L eigenbasis per axis: refused above
# this many bytes of them, and 'auto' uses it up to this size of an axis.
_KRONECKER_MAX_BYTES = 1 << 29
_KRONECKER_AUTO_SIZE = 4096


class Kronecker(Construction):
    """The nearest Kronecker product per channel; exact for separable single-channel and
    depthwise kernels."""

    name: ClassVar[str] = "kronecker"

    @classmethod
    def exact(cls, op: Operator) -> bool:
        return _separable(op)

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where it is exact, every axis is at most 4096 long and the dense eigenbases fit
        (:data:`_KRONECKER_MAX_BYTES`), and the eigendecompositions cost little beside the
        products (:func:`_cheap_set_up`)."""
        return (max(_gram_side(op)[1]) <= _KRONECKER_AUTO_SIZE
                and _eigenbases_nbytes(op) <= _KRONECKER_MAX_BYTES
                and _cheap_set_up(op) and _separable(op))

    @classmethod
    def set_up_cost(cls, op: Operator) -> float:
        """``2 + sum_a L_a^3 / (3 taps prod_a L_a)``: the axes' eigendecompositions (at
        BLAS speed) beside a product (measured: a 3x3 box at 240x240 about 15, a 9x1
        motion at 256x256 about 16)."""
        size = _gram_side(op)[1]
        taps = int(np.prod(op.convolution.geometry.kernel_size))
        return 2.0 + sum(n**3 for n in size) / (3.0 * taps * int(np.prod(size)))

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        return _kronecker(op, damp, boost)


# 'auto' picks it where sum_a L_a^3 (its set-up: one L_a x L_a eigendecomposition per axis)
# is at most this many times taps * prod_a L_a (one product with W).  A 15-tap 1-D blur on
# 256 samples (ratio 4,400) took 0.14 s to set up and plain CG 2 ms; a 3x3 box on 240x240
# (ratio 53) 0.04 s in all, plain CG 0.33 s.
_KRONECKER_SET_UP = 500


def _cheap_set_up(op) -> bool:
    """Whether the axes' eigendecompositions cost at most ``_KRONECKER_SET_UP`` products."""
    size = _gram_side(op)[1]
    taps = int(np.prod(op.convolution.geometry.kernel_size))
    return sum(n**3 for n in size) <= _KRONECKER_SET_UP * taps * int(np.prod(size))


def _eigenbases_nbytes(op) -> int:
    """The bytes of the dense eigenbases: one ``L_a x L_a`` matrix per axis and channel."""
    channels, size = _gram_side(op)
    return channels * sum(16 * n * n for n in size)


def _axis_matrix(op, axis: int, vector: np.ndarray) -> np.ndarray:
    """The dense one-dimensional convolution of ``vector`` along ``axis``, in op's geometry."""
    from .._build import build  # the same builder, so the padding mode folds taps alike

    geom: ConvGeometry = op.convolution.geometry
    lo, hi = geom.padding[axis]
    line = conv_geometry((1, 1, vector.size), (1, geom.input_size[axis]),
                         stride=geom.stride[axis], padding=((lo, hi),),
                         dilation=geom.dilation[axis], padding_mode=geom.padding_mode)
    # the stored output size (a transposed convolution's output_padding may trim it)
    line = dataclasses.replace(line, output_size=(geom.output_size[axis],))
    A = build(line, vector.reshape(1, 1, -1), transposed=False, threads=1).toarray()
    return A.T if op.convolution.transposed else A


def _kronecker(op, damp: float, boost: float):
    """``W^H W`` of ``sigma A_1 (x) ... (x) A_N`` per channel, diagonalised axis by axis."""
    kernels = channel_kernels(op)
    if kernels is None:
        raise NotImplementedError(
            "kind='kronecker' needs one input and one output channel per group (one "
            f"channel, or a depthwise layer), got weight.shape={op.weight.shape} with "
            f"groups={op.convolution.geometry.groups}"
        )
    channels, size = _gram_side(op)
    nbytes = _eigenbases_nbytes(op)
    if nbytes > _KRONECKER_MAX_BYTES:
        raise NotImplementedError(
            f"kind='kronecker' would store {nbytes} bytes of dense eigenvectors for "
            f"{channels} channel(s) of size {size}, more than {_KRONECKER_MAX_BYTES}"
        )
    bases, H = [], np.empty((channels, *size))
    for c, kernel in enumerate(kernels):
        per_axis, H[c] = _channel_factors(op, kernel)
        bases.append(per_axis)
    H = H.reshape(channels, *size, 1, 1)
    basis = _DenseBasis(tuple(bases), size)
    return basis, _regularised_inverse(H, _total_shift(H, damp, boost)), None


def _channel_factors(op, kernel: np.ndarray) -> tuple[tuple[np.ndarray | None, ...], np.ndarray]:
    """One channel's eigenbases per axis and eigenvalues (``*size``) of its rank-one model."""
    sigma, vectors, _ = kronecker_factors(kernel)
    bases: list[np.ndarray | None] = []
    values: list[np.ndarray] = []
    for axis, v in enumerate(vectors):
        A = _axis_matrix(op, axis, v)
        G = np.conj(A.T) @ A
        if not np.any(G - np.diag(np.diag(G))):  # a diagonal factor (a 1-tap axis): as it is
            bases.append(None)
            values.append(np.diag(G).real)
            continue
        # scipy's eigh: numpy's ran 100x slower on a 256 x 256 matrix with threaded
        # OpenBLAS on the project's machines (1 s against 12 ms)
        lam, U = scipy.linalg.eigh(G)
        bases.append(U)
        values.append(np.maximum(lam, 0.0))
    return tuple(bases), abs(sigma) ** 2 * functools.reduce(np.multiply.outer, values)


def _separable(op) -> bool:
    """One channel in and out per group, and a rank-one kernel in each (to
    :data:`SEPARABLE_RTOL`)."""
    kernels = channel_kernels(op)
    return kernels is not None and all(kronecker_factors(k)[2] <= SEPARABLE_RTOL
                                       for k in kernels)
