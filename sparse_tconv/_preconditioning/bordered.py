"""The bordered construction: the circulant inside, the border's own block, in turn.

The shifted circulant (:mod:`.circulant`) models ``A = W^H W + damp^2 I``
away from the border, and errs on the positions near it, where the padding
drops or folds taps: its errors there leave hundreds of outlying eigenvalues
(a random 3 -> 3 layer at 80x80 with zero padding: 75 iterations against
plain CG's 151, each costing as much again).  The border's rows of ``A``
are sparse and cheap to take from W's CSR, and the border itself, a ring
of width ``w`` (the reach of ``W^H W``'s stencil, ``d (k - 1)`` per axis)
round the input, is a thin band: its block ``A_SS``, in reverse
Cuthill-McKee order, has a banded Cholesky factor.

The two are combined as symmetric multiplicative Schwarz, each correcting
the residual the other leaves: with ``B_S = E (A_SS)^{-1} E^T`` (``E`` the
ring's columns of the identity) and ``C`` the circulant,

``I - M A = (I - B_S A) (I - C A) (I - B_S A)``,

which needs no product with the whole of A: for a residual ``r``,

``z_S = A_SS^{-1} r_S``, ``r_1 = r - A_{:S} z_S`` (zero on the ring),
``u = C r_1``, ``M r = z + u - E A_SS^{-1} (A u)_S``

(``A_{:S}`` and ``A_{S:}``, the ring's columns and rows of A, are sparse;
``(A u)_S = A_{S:} u``).  ``M`` is Hermitian: the error propagation
``I - M A`` is A-self-adjoint (the outer factors are one A-orthogonal
projection's complement, taken on both sides).  Each application costs the
circulant's transforms, two banded solves and two sparse products with the
ring's rows; the set-up, the CSR of W (for the ring's rows of ``W^H W``:
``W[:, S]^H W``), the ring's factor and the circulant's blocks, on two
threads.

Where the ring is the whole input (an image no wider than twice the reach)
``B_S = A^{-1}`` and ``M`` is the inverse.

The circulant's shift (``boost``, 0.01 of its largest eigenvalue) is
smaller than the circulant alone wants (0.1): the ring now handles the
border it had to damp.  Measured on random 3 -> 3 3x3 layers (solve_bench's
``mix3``, rtol 1e-6): 21 iterations against plain CG's 151 at 80x80 with
zero padding and damp 1e-2, 61 against 443 at 1e-3, 23 against 175 at
96x96 with replicate padding, 28 against 178 with reflect; a ring of
width 1 took 37-122, of width 3 15-64 (each solve costing twice as much).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
from scipy.sparse.linalg import LinearOperator

from .._build import build
from .._geometry import ConvGeometry, matrix_size
from .._parallel import run_parallel
from .base import Construction, Operator, Pieces
from .circulant import Circulant, has_surrogate
from .lines import _factor, rcm_band

__all__ = ["Bordered", "BorderedPreconditioner"]

# The ring's rows come from the CSR of W: the construction builds it up to this many
# bytes (and 'auto' picks it up to a quarter of them).
_CSR_BYTES = 1 << 28


class Bordered(Construction):
    """The shifted circulant and the border's exact block, as symmetric multiplicative
    Schwarz: convolutions (not transposed) of stride 1 with a circulant surrogate."""

    name: ClassVar[str] = "bordered"
    default_shift: ClassVar[float] = 0.01

    @classmethod
    def models(cls, op: Operator) -> bool:
        """Wherever it applies: ``W^H W`` inside, and exactly on the ring."""
        return _applicable(op)

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where it applies and W's CSR would take at most 64 MB (a 3 -> 3 3x3 layer up
        to about 260x260); :meth:`set_up_cost` then weighs it against plain CG."""
        return _applicable(op) and _csr_bytes(op) <= _CSR_BYTES // 4

    @classmethod
    def set_up_cost(cls, op: Operator) -> float:
        """The plain CG iterations above which it pays: ``S / (1 - (1 + a) / 5)``, the
        set-up ``S = 40 + 12 m`` products and each application ``a = 1 + 0.35 m``, ``m``
        the input channels per group, where it takes a fifth of plain CG's iterations
        (infinite where ``1 + a >= 5``: from 9 channels per group).

        Measured (normal-matrix products, 2 threads; 32x32 to 256x256, zeros and
        reflect padding): the set-up 11-62 with one channel (the fast single-channel
        products at 64x64 the most), 25-58 with 3, 39-60 with 4, 76-131 with 8, 188-249
        with 16; an application 0.74-3.2, 1.1-2.6, 1.6-2.5, 2.1-3.8 and 5.8-6.5; the
        iterations a 4.6th to an 8th of plain CG's.
        """
        if not _applicable(op):
            return math.inf
        geom: ConvGeometry = op.convolution.geometry
        m = geom.in_channels // geom.groups
        per_application = 1.0 + 0.35 * m
        if 1.0 + per_application >= 5.0:
            return math.inf
        return (40.0 + 12.0 * m) / (1.0 - (1.0 + per_application) / 5.0)

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        raise NotImplementedError(
            "kind='bordered' combines the circulant with a factorisation of the border: it "
            "has no blocks of its own (see Bordered.preconditioner)"
        )

    @classmethod
    def preconditioner(cls, op: Operator, damp: float, boost: float, threads: int,
                       correct: bool, regulariser: str = "identity") -> LinearOperator:
        if not _applicable(op):
            geom = op.convolution.geometry
            raise NotImplementedError(
                "kind='bordered' needs a convolution (not transposed) of stride 1 whose "
                f"kernel has a circulant on the input's grid; got stride={geom.stride}, "
                f"transposed={op.convolution.transposed}, input size {geom.input_size}"
            )
        nbytes = _csr_bytes(op)
        if nbytes > _CSR_BYTES:
            raise NotImplementedError(
                f"kind='bordered' takes the border's rows from W's CSR, {nbytes} bytes "
                f"here, more than {_CSR_BYTES}"
            )
        return BorderedPreconditioner(op, damp, boost, threads, cls.name)


def _applicable(op) -> bool:
    geom: ConvGeometry = op.convolution.geometry
    return (not op.convolution.transposed and all(s == 1 for s in geom.stride)
            and has_surrogate(op))


def _csr_bytes(op) -> int:
    return matrix_size(op.convolution.geometry, op.weight.dtype, transposed=False).nbytes


def ring_mask(geom: ConvGeometry) -> np.ndarray:
    """The input positions within ``d (k - 1)`` (at least 1) of either end of some axis."""
    mask = np.zeros(geom.input_size, dtype=bool)
    for axis, (L, k, d) in enumerate(zip(geom.input_size, geom.kernel_size, geom.dilation)):
        width = max(1, d * (k - 1))
        edge = np.minimum(np.arange(L), L - 1 - np.arange(L)) < width
        shape = [1] * len(geom.input_size)
        shape[axis] = L
        mask |= edge.reshape(shape)
    return mask


class BorderedPreconditioner(LinearOperator):
    """Symmetric multiplicative Schwarz of the ring's exact block and the circulant (see
    the module docstring); Hermitian positive definite."""

    def __init__(self, op, damp, boost, threads, kind):
        # (unannotated: scipy-stubs give LinearOperator no __init__ to check against)
        parts: dict = {}

        def circulant():
            # (no border scaling: it changes the circulant's rows on the ring alone, which
            # the ring's block then solves exactly; the iterations were the same with it)
            parts["circulant"] = Circulant.preconditioner(op, damp, boost, 1, correct=False)

        # The two parts on two threads (on one, they took 15 ms for a 3 -> 3 layer at 80x80,
        # the ring two thirds); each on one thread itself, so that neither waits for the other.
        run_parallel(lambda part: part(), [lambda: self._set_up_ring(op, damp), circulant],
                     min(threads, 2))
        self._circulant = parts["circulant"]
        self._sample_shape = op.input_shape
        self.kind, self.damp = kind, damp
        n = math.prod(op.input_shape)
        super().__init__(dtype=np.result_type(op.dtype, np.float64), shape=(n, n))

    def _set_up_ring(self, op, damp: float) -> None:
        geom: ConvGeometry = op.convolution.geometry
        ring = np.broadcast_to(ring_mask(geom), (geom.in_channels, *geom.input_size))
        self._ring = np.flatnonzero(ring)
        weight = op.weight.astype(np.result_type(op.weight.dtype, np.float64), copy=False)
        W = build(geom, weight, transposed=False, threads=1)
        # The ring's rows of W^H W, from the ring's columns of W (sliced and transposed:
        # less than building W^T's CSR too).  The damping is added where they are used.
        rows = W[:, self._ring].T.tocsr().conj() @ W
        self._damp2 = damp * damp
        order, band = rcm_band(rows[:, self._ring].tocsr())
        self._factor = _factor(band, self._damp2)
        # The ring numbered in the factor's order from here on: no permutation per solve.
        self._ring = self._ring[order]
        self._rows = rows[order]  # (W^H W)_{S:}
        # (W^H W)_{:S} as the CSC transpose of the rows, multiplied without conversion
        self._rows_adjoint = self._rows.T.conj() if np.iscomplexobj(rows) else self._rows.T
        # (LAPACK's pbtrs itself: cho_solve_banded's checks took a fifth of its time)
        self._pbtrs = (scipy.linalg.lapack.zpbtrs if np.iscomplexobj(self._factor)
                       else scipy.linalg.lapack.dpbtrs)

    def _ring_solve(self, R: np.ndarray) -> np.ndarray:
        """``A_SS^{-1} R`` for R (ring, columns)."""
        if np.iscomplexobj(R) and not np.iscomplexobj(self._factor):
            return self._ring_solve(R.real) + 1j * self._ring_solve(R.imag)
        solved, info = self._pbtrs(self._factor, R, lower=1)
        assert info == 0  # (a factor of the right shape: only invalid arguments fail)
        return solved

    def _apply(self, R: np.ndarray) -> np.ndarray:
        """``M R`` for R (n, columns)."""
        R = R.astype(np.result_type(R.dtype, self._factor.dtype, np.float64), copy=False)
        S = self._ring
        z_ring = self._ring_solve(R[S])
        R1 = R - self._rows_adjoint @ z_ring  # r - A z, z on the ring ...
        R1[S] = 0.0  # ... where it is r_S - A_SS A_SS^{-1} r_S
        samples = np.ascontiguousarray(R1.T).reshape(R.shape[1], *self._sample_shape)
        U = self._circulant.solve(samples).reshape(R.shape[1], -1).T
        out = U.astype(np.result_type(U.dtype, R.dtype))  # (a copy, in n x columns order)
        AU = self._rows @ U + self._damp2 * U[S]  # (A u)_S
        out[S] += z_ring - self._ring_solve(AU)
        return out

    def _matvec(self, x):
        return self._apply(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _matmat(self, X):
        return self._apply(np.asarray(X))

    def _adjoint(self):
        return self  # Hermitian
