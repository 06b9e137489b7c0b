"""The spectral structure of ``W^H W``: preconditioners and the exact FFT solve.

Every preconditioner here has the form ``S T^{-1} diag(K_f) T S``: a
transform ``T`` of the operator's input space (a DFT after a polyphase
split, a DCT, or none) under which the Gram matrix ``W^H W`` is block
diagonal, exactly or nearly; one small Hermitian matrix ``K_f`` per
frequency (or position) ``f``, the regularised inverse of the model's block
there; and a diagonal scaling ``S`` (or none) that corrects the model where
it is known to be wrong, at the border.  A block acts on the channels of one
group (times the stride's phases); a single-channel operator has 1 x 1
blocks, applied elementwise.

The Gram matrix lives on the operator's input: a
:class:`~sparse_tconv.ConvOperator` ``W`` has ``W^H W`` on ``(C_in, L)``; a
:class:`~sparse_tconv.ConvTransposeOperator` ``A = W^T = V^H`` (``V`` the
forward convolution with conjugated weights) has ``A^H A = V V^H`` on the
forward *output* ``(C_out, O)``, where it is Toeplitz (away from the
border) for any stride.  Blocks come from :func:`~._fourier.circular_blocks`,
whose convention (numpy's ``fftn`` sign) is: in the unnormalised ``fftn``
domain of both sides, ``Y(f) = B(-f) X(f)`` (checked by the tests against
the built matrix).

Nothing here validates user arguments: :mod:`sparse_tconv.solvers` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft
import scipy.linalg
from scipy.sparse.linalg import LinearOperator

from ._fourier import check_circulant, circular_blocks
from ._geometry import ConvGeometry, conv_geometry
from ._parallel import resolve_threads

__all__ = [
    "KINDS",
    "DEFAULT_SHIFT",
    "SpectralPreconditioner",
    "build_preconditioner",
    "auto_kind",
    "exact_solve",
    "is_exact",
]

KINDS = ("circulant", "dct2", "dct1", "kronecker", "block_jacobi")

# A kernel is separable (rank one) when its best rank-one approximation is this close.
SEPARABLE_RTOL = 1e-10
# The Kronecker construction stores one dense L x L eigenbasis per axis: refused above
# this many bytes of them, and 'auto' uses it up to this size of an axis.
_KRONECKER_MAX_BYTES = 1 << 29
_KRONECKER_AUTO_SIZE = 4096

# The default extra damping of each inexact construction, as a fraction of its model's
# largest eigenvalue: their border errors, divided by damp**2, would leave outliers.
# Measured (solve_bench): for the DCT-II 1e-3 is best or near it on blurs at damp 1e-2
# and 1e-3 (a disk blur at 1e-3: 720 iterations with 0, 90 with 1e-3, 689 plain); for
# the circulant of a kernel that is not circulant 0.1 is (random 4 -> 4 channels at
# 1e-3: over 612 iterations with 0, 233 with 0.1, 612 plain).  An exact one has none.
DEFAULT_SHIFT = {"dct2": 1e-3, "circulant": 0.1}

# Transforms of fewer elements run on one thread: pocketfft's workers gained nothing
# below this size on the project's 2-core machines (and cost 15% at 256 x 256).
_PARALLEL_FFT_SIZE = 1 << 18

# A preconditioner's eigenvalues are kept above this fraction of the largest,
# so that it stays positive definite with damp=0 where the model is singular
# (a box blur's symbol vanishes at some frequencies).
_FLOOR = 1e-10


# ---------------------------------------------------------------------------
# Transforms: samples (B, C, *P) <-> per-group vectors (B, g, m, *frequencies)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _FourierBasis:
    """A polyphase split by ``split`` onto the grid ``grid``, then its DFT.

    ``real``: real data and weights, so only ``rfftn``'s half spectrum is
    kept.  Unnormalised ``fftn`` forward and ``ifftn`` back: their product is
    the identity, and a circulant W is ``ifftn B(-f) fftn`` exactly.
    """

    channels: int
    groups: int
    split: tuple[int, ...]
    grid: tuple[int, ...]
    real: bool
    threads: int

    @property
    def block_size(self) -> int:
        return self.channels // self.groups * math.prod(self.split)

    @property
    def sample_size(self) -> tuple[int, ...]:
        return tuple(m * s for m, s in zip(self.grid, self.split))

    @property
    def frequencies(self) -> tuple[int, ...]:
        return _half(self.grid) if self.real else self.grid

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, batch = len(self.grid), x.shape[0]
        shape = [batch, self.channels]
        for m, s in zip(self.grid, self.split):
            shape += [m, s]
        # x[b, c, m s + r] -> x[b, c, r, m]: the polyphase components, (c, r) in C order
        order = [0, 1, *(3 + 2 * a for a in range(n)), *(2 + 2 * a for a in range(n))]
        phases = x.reshape(shape).transpose(order)
        axes = tuple(range(2 + n, 2 + 2 * n))
        fft = scipy.fft.rfftn if self.real else scipy.fft.fftn
        X = fft(phases, axes=axes, workers=_workers(phases, self.threads))
        return X.reshape(batch, self.groups, self.block_size, *self.frequencies)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        n, batch = len(self.grid), X.shape[0]
        X = X.reshape(batch, self.channels, *self.split, *self.frequencies)
        axes = tuple(range(2 + n, 2 + 2 * n))
        workers = _workers(X, self.threads)
        if self.real:
            phases = scipy.fft.irfftn(X, s=self.grid, axes=axes, workers=workers)
        else:
            phases = scipy.fft.ifftn(X, axes=axes, workers=workers)
        order = [0, 1]
        for a in range(n):
            order += [2 + n + a, 2 + a]
        return phases.transpose(order).reshape(batch, self.channels, *self.sample_size)


@dataclass(frozen=True)
class _CosineBasis:
    """The orthonormal DCT of type ``dct_type`` along the axes ``axes`` (spatial, 0-based)."""

    channels: int
    groups: int
    sample_size: tuple[int, ...]
    dct_type: Literal[1, 2]
    axes: tuple[int, ...]
    threads: int
    real = True

    @property
    def block_size(self) -> int:
        return self.channels // self.groups

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.axes:
            x = scipy.fft.dctn(x, type=self.dct_type, axes=[2 + a for a in self.axes],
                               norm="ortho", workers=_workers(x, self.threads))
        return x.reshape(x.shape[0], self.groups, self.block_size, *self.sample_size)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        X = X.reshape(X.shape[0], self.channels, *self.sample_size)
        if not self.axes:
            return X
        return scipy.fft.idctn(X, type=self.dct_type, axes=[2 + a for a in self.axes],
                               norm="ortho", workers=_workers(X, self.threads))


@dataclass(frozen=True)
class _DenseBasis:
    """One dense unitary matrix per spatial axis (a Kronecker product), one channel.

    ``forward`` applies ``(U_1 (x) ... (x) U_N)^H``, ``inverse`` the product
    itself; an axis whose matrix is ``None`` is left as it is (the identity).
    """

    matrices: tuple[np.ndarray | None, ...]
    sample_size: tuple[int, ...]
    channels = 1
    groups = 1
    block_size = 1

    @property
    def real(self) -> bool:
        return not any(np.iscomplexobj(U) for U in self.matrices if U is not None)

    def _apply(self, x: np.ndarray, conjugate: bool) -> np.ndarray:
        for axis, U in enumerate(self.matrices):
            if U is None:
                continue
            M = np.conj(U) if conjugate else U.T  # x_i -> sum_j x_j conj(U[j, i]), or U[i, j]
            x = np.moveaxis(np.tensordot(x, M, axes=([2 + axis], [0])), -1, 2 + axis)
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, True).reshape(x.shape[0], 1, 1, *self.sample_size)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X.reshape(X.shape[0], 1, *self.sample_size), False)


@dataclass(frozen=True)
class _PositionBasis:
    """No transform: one block per position (block-Jacobi)."""

    channels: int
    groups: int
    sample_size: tuple[int, ...]
    real = True

    @property
    def block_size(self) -> int:
        return self.channels // self.groups

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], self.groups, self.block_size, *self.sample_size)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        return X.reshape(X.shape[0], self.channels, *self.sample_size)


def _workers(x: np.ndarray, threads: int) -> int:
    return threads if x.size >= _PARALLEL_FFT_SIZE else 1


def _half(grid: tuple[int, ...]) -> tuple[int, ...]:
    """The frequencies ``rfftn`` keeps on ``grid``."""
    return (*grid[:-1], grid[-1] // 2 + 1)


def _apply_blocks(K: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``Y[b, g, :, f] = K[g, :, :, f] @ X[b, g, :, f]``, K (g, a, c, *F) broadcasting over F."""
    if K.shape[1] == K.shape[2] == 1:
        return K[None, :, :, 0] * X  # one channel per group: elementwise
    # Frequencies last, so that each multiply-add runs over all of them at once.
    return np.einsum("gac...,bgc...->bga...", K, X)


# ---------------------------------------------------------------------------
# The preconditioner
# ---------------------------------------------------------------------------


class SpectralPreconditioner(LinearOperator):
    """``S T^{-1} diag(K_f) T S`` (see the module docstring); Hermitian positive definite.

    ``kind`` names the construction and ``damp`` the damping it was built
    for.  Vectors are transformed in double precision; a complex vector on a
    real transform is split into its real and imaginary parts.
    """

    def __init__(self, basis, blocks, scale, kind, damp, dtype):
        # (unannotated: scipy-stubs give LinearOperator no __init__ to check against)
        self._basis = basis
        self._blocks = blocks
        self._scale = scale
        self._sample_shape = (basis.channels, *basis.sample_size)
        self.kind = kind
        self.damp = damp
        n = math.prod(self._sample_shape)
        super().__init__(dtype=dtype, shape=(n, n))

    def solve(self, samples: np.ndarray) -> np.ndarray:
        """The preconditioner applied to a stack of samples (B, C, *P)."""
        samples = samples.astype(np.result_type(samples.dtype, np.float64), copy=False)
        if self._basis.real and np.iscomplexobj(samples):
            out = self.solve(np.concatenate([samples.real, samples.imag]))
            half = samples.shape[0]
            return out[:half] + 1j * out[half:]
        if self._scale is not None:
            samples = samples * self._scale
        out = self._basis.inverse(_apply_blocks(self._blocks, self._basis.forward(samples)))
        if self._scale is not None:
            out *= self._scale
        return out

    def _matvec(self, x):
        return self.solve(np.asarray(x).reshape(1, *self._sample_shape)).reshape(-1)

    def _matmat(self, X):
        X = np.asarray(X)
        samples = np.ascontiguousarray(X.T).reshape(X.shape[1], *self._sample_shape)
        return self.solve(samples).reshape(X.shape[1], -1).T

    def _adjoint(self):
        return self  # Hermitian


def _reciprocal(values: np.ndarray, shift: float) -> np.ndarray:
    """``1 / max(values + shift, _FLOOR * max(values))``; ones for a zero operator."""
    top = float(values.max(initial=0.0))
    if top == 0.0 and shift == 0.0:
        return np.ones_like(values)
    return 1.0 / np.maximum(values + shift, _FLOOR * top)


def _total_shift(H: np.ndarray, damp: float, boost: float) -> float:
    """``damp**2 + boost * lambda_max``, the largest eigenvalue of all the blocks ``H``."""
    if not boost:
        return damp * damp
    if H.shape[-1] == 1:
        top = float(H[..., 0, 0].real.max(initial=0.0))
    else:
        top = float(np.linalg.eigvalsh(H).max(initial=0.0))
    return damp * damp + boost * top


def _regularised_inverse(H: np.ndarray, shift: float) -> np.ndarray:
    """``(H_f + shift I)^{-1}`` for Hermitian PSD blocks H (g, *F, m, m), as (g, m, m, *F)."""
    if H.shape[-1] == 1:
        inverse = _reciprocal(H[..., 0, 0].real, shift)
        return np.ascontiguousarray(inverse[:, None, None])
    values, vectors = np.linalg.eigh(H)
    inverse = _reciprocal(values, shift)
    K = (vectors * inverse[..., None, :]) @ np.conj(np.swapaxes(vectors, -1, -2))
    if not np.iscomplexobj(H):
        K = K.real
    return np.ascontiguousarray(np.moveaxis(K, (-2, -1), (1, 2)))


# ---------------------------------------------------------------------------
# What an operator is: its Gram side, its forward weight, its blocks
# ---------------------------------------------------------------------------


def _gram_side(op) -> tuple[int, tuple[int, ...]]:
    """``(channels, spatial size)`` of the space ``W^H W`` acts on (the operator's input)."""
    return op.input_shape[0], tuple(op.input_shape[1:])


def _forward_weight(op) -> np.ndarray:
    """The weight of the forward convolution ``V`` with ``op == V`` or ``op == V^H``.

    A ConvTransposeOperator is ``W^T = conj(W)^H``: the adjoint of the
    convolution with the conjugated weights.
    """
    w = op.weight
    return np.conj(w) if op.convolution.transposed and np.iscomplexobj(w) else w


def _flipped(blocks: np.ndarray, grid: tuple[int, ...], half: bool) -> np.ndarray:
    """``B(-f)`` from :func:`circular_blocks`'s ``B(f)``, shaped (g, *frequencies, a, c).

    With ``half``, only the frequencies ``rfftn`` keeps.
    """
    g, _, a, c = blocks.shape
    B = blocks.reshape(g, *grid, a, c)
    for axis, m in enumerate(grid):
        B = np.take(B, (-np.arange(m)) % m, axis=1 + axis)
    if half:
        B = B[(slice(None),) * len(grid) + (slice(0, grid[-1] // 2 + 1),)]
    return B


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


def _fourier_pieces(op, geom: ConvGeometry, threads: int):
    """``(T_in, T_out, Bop)`` with ``op == T_out^{-1} diag(Bop) T_in`` for circulant ``geom``."""
    w = _forward_weight(op)
    real = not np.iscomplexobj(w)
    M = geom.output_size
    fine = _FourierBasis(geom.in_channels, geom.groups, geom.stride, M, real, threads)
    coarse = _FourierBasis(geom.out_channels, geom.groups, (1,) * geom.ndim, M, real, threads)
    B = _flipped(circular_blocks(geom, w), M, real)  # (g, *F, opg, cpg * S)
    if op.convolution.transposed:  # op == V^H: from the coarse grid to the fine one
        return coarse, fine, np.conj(np.swapaxes(B, -1, -2))
    return fine, coarse, B


def _gram(Bop: np.ndarray) -> np.ndarray:
    """``Bop^H Bop``, block by block."""
    return np.conj(np.swapaxes(Bop, -1, -2)) @ Bop


def is_exact(op) -> bool:
    """Whether W is a (subsampled) circulant, block diagonalised exactly by the DFT."""
    try:
        check_circulant(op.convolution.geometry)
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------------------
# The diagonal of W^H W, and the scaling that matches a model's to it
# ---------------------------------------------------------------------------


def _window_counts(geom: ConvGeometry, axis: int, on_input: bool) -> np.ndarray:
    """Zeros padding, one axis: ``V[i, t] = 1`` when tap t links position i to the other side.

    Rows are input positions (``on_input``: a column of W) or output
    positions (a row of W).
    """
    L, O = geom.input_size[axis], geom.output_size[axis]
    k, s, d = geom.kernel_size[axis], geom.stride[axis], geom.dilation[axis]
    lo = geom.padding[axis][0]
    p, t = np.meshgrid(np.arange(O), np.arange(k), indexing="ij")
    i = p * s + t * d - lo
    valid = (i >= 0) & (i < L)
    V = np.zeros((L if on_input else O, k))
    V[(i if on_input else p)[valid], t[valid]] = 1.0  # each (position, tap) at most once
    return V


def gram_diagonal(op) -> np.ndarray:
    """``diag(W^H W)`` on the operator's input, shaped like one input sample.

    For zeros padding from the kernel, dimension by dimension (no matrix);
    otherwise the squared column norms of the matrix (taps that land on one
    element add up before they are squared).
    """
    geom: ConvGeometry = op.convolution.geometry
    if geom.padding_mode != "zeros":
        from .spectral import column_norms  # spectral sits above the operators, as this does

        return column_norms(op).astype(np.float64).reshape(op.input_shape) ** 2
    power = np.abs(op.weight.astype(np.complex128 if np.iscomplexobj(op.weight)
                                    else np.float64)) ** 2
    g = geom.groups
    if op.convolution.transposed:  # rows of W: sum over the input channels of each output channel
        power = power.sum(axis=1)
    else:  # columns of W: sum over the output channels of each group
        opg, cpg = geom.out_channels // g, geom.in_channels // g
        power = power.reshape(g, opg, cpg, *geom.kernel_size).sum(axis=1)
        power = power.reshape(geom.in_channels, *geom.kernel_size)
    for axis in range(geom.ndim):
        V = _window_counts(geom, axis, on_input=not op.convolution.transposed)
        power = np.moveaxis(np.tensordot(power, V, axes=([1 + axis], [1])), -1, 1 + axis)
    return power


def _matching_scale(op, model_diagonal: np.ndarray, shift: float) -> np.ndarray:
    """``S = sqrt((diag(M) + shift) / (diag(W^H W) + shift))``, M the model.

    ``S M_shift^{-1} S`` then has the inverse of the true diagonal where the
    model's is wrong (the border): a Jacobi correction of the model.
    """
    true = gram_diagonal(op) + shift
    top = float(true.max(initial=0.0))
    true = np.maximum(true, _FLOOR * top if top > 0 else 1.0)
    return np.sqrt((model_diagonal + shift) / true)


# ---------------------------------------------------------------------------
# The constructions
# ---------------------------------------------------------------------------


def _circulant(op, damp: float, boost: float, threads: int, correct: bool):
    exact = is_exact(op)
    geom = op.convolution.geometry if exact else _circulant_geometry(op)
    basis, _, Bop = _fourier_pieces(op, geom, threads)
    H = _gram(Bop)
    shift = _total_shift(H, damp, boost)
    scale = None
    if correct and not exact:
        scale = _matching_scale(op, _circulant_diagonal(H, basis), shift)
    return basis, _regularised_inverse(H, shift), scale


def _circulant_geometry(op) -> ConvGeometry:
    """The circulant of the operator's kernel on its Gram side's grid (NotImplementedError
    where there is none)."""
    geom: ConvGeometry = op.convolution.geometry
    if op.convolution.transposed:
        size = tuple(o * s for o, s in zip(geom.output_size, geom.stride))
    else:
        size = geom.input_size
    return _surrogate(geom, size, "kind='circulant'")


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


def _gram_kernel(op):
    """The Toeplitz kernel of ``W^H W``: values (g, m, m, *lags) and the lags per axis.

    ``G[c, c'](t) = (W^H W)[(c, i), (c', i + t)]`` away from the border,
    for every lag with no wrap-around, from the blocks of a small circular
    convolution (``sum_t G(t) exp(-i theta t) = B^H B(theta)``; ``B B^H`` for a
    transposed convolution, whose lags are those of the stride-1 kernel that
    are multiples of the stride, counted on the coarse grid).
    """
    geom: ConvGeometry = op.convolution.geometry
    if not op.convolution.transposed and any(s > 1 for s in geom.stride):
        raise NotImplementedError(
            "the cosine preconditioners need a Toeplitz Gram matrix, and a strided "
            f"convolution's (stride={geom.stride}) is Toeplitz only per polyphase component; "
            "use kind='circulant' or 'block_jacobi'"
        )
    reach = [d * (k - 1) for k, d in zip(geom.kernel_size, geom.dilation)]
    grid = tuple(2 * r + 1 for r in reach)
    small = conv_geometry(geom.weight_shape, (geom.in_channels, *grid),
                          padding=tuple((0, r) for r in reach), dilation=geom.dilation,
                          groups=geom.groups, padding_mode="circular")
    B = circular_blocks(small, _forward_weight(op))  # (g, F, opg, cpg)
    H = _gram(np.conj(np.swapaxes(B, -1, -2)) if op.convolution.transposed else B)
    g, _, m, _ = H.shape
    H = np.moveaxis(H.reshape(g, *grid, m, m), (-2, -1), (1, 2))
    G = np.fft.ifftn(H, axes=tuple(range(3, 3 + geom.ndim)))
    if not np.iscomplexobj(op.weight):
        G = G.real
    lags = []
    for axis, (r, E, s) in enumerate(zip(reach, grid, geom.stride)):
        lag = np.arange(E)
        lag = np.where(lag <= r, lag, lag - E)  # index j holds lag j mod E
        step = s if op.convolution.transposed else 1
        keep = np.flatnonzero(lag % step == 0)
        G = np.take(G, keep, axis=3 + axis)
        lags.append(lag[keep] // step)
    return G, lags


def _reflection_counts(n: int, lags: np.ndarray) -> np.ndarray:
    """``Q[i, j]``: the diagonal of the DCT-II model's shift by ``+-lags[j]`` at position i.

    The model extends the grid by half-sample symmetry (period ``2 n``); the
    shift by t reaches back to i when one of i + t, i - t reflects onto i.
    Averaged over the two signs, as the model's symbol is.
    """
    i = np.arange(n)[:, None]

    def reflect(k):
        k = np.mod(k, 2 * n)
        return np.where(k < n, k, 2 * n - 1 - k)

    return 0.5 * ((reflect(i + lags) == i).astype(float) + (reflect(i - lags) == i))


def _cosine(op, damp: float, boost: float, threads: int, dct_type: Literal[1, 2],
            correct: bool):
    """DCT blocks ``Lambda_f = sum_t G(t) prod_a cos(pi f_a t_a / N_a)`` (solvers: Notes)."""
    channels, size = _gram_side(op)
    G, lags = _gram_kernel(op)
    # Axes the kernel does not reach along need no transform: the model is constant there.
    axes = tuple(a for a, (n, lag) in enumerate(zip(size, lags)) if n > 1 and lag.size > 1)
    lam = G
    for axis, (n, lag) in enumerate(zip(size, lags)):
        if axis in axes:
            N = n - 1 if dct_type == 1 else n
            cos = np.cos(np.pi * np.outer(np.arange(n), lag) / N)
        else:
            cos = np.ones((1, lag.size))
        lam = np.moveaxis(np.tensordot(lam, cos, axes=([3 + axis], [1])), -1, 3 + axis)
    H = np.moveaxis(lam, (1, 2), (-2, -1))  # (g, *F, m, m), Hermitian PSD
    shift = _total_shift(H, damp, boost)
    basis = _CosineBasis(channels, op.convolution.geometry.groups, size, dct_type, axes, threads)
    scale = None
    if correct and dct_type == 1:
        scale = _reflect_weights(op, axes)
    elif correct:
        scale = _matching_scale(op, _cosine_diagonal(G, lags, size, axes), shift)
    return basis, _regularised_inverse(H, shift), scale


def _cosine_diagonal(G, lags, size, axes) -> np.ndarray:
    """The diagonal of the DCT-II model, per unknown (C, *size)."""
    m = G.shape[1]
    diag = np.stack([G[:, c, c] for c in range(m)], axis=1).real  # (g, m, *lags)
    for axis, (n, lag) in enumerate(zip(size, lags)):
        Q = _reflection_counts(n, lag) if axis in axes else np.ones((1, lag.size))
        diag = np.moveaxis(np.tensordot(diag, Q, axes=([2 + axis], [1])), -1, 2 + axis)
    channels = diag.shape[0] * m
    return np.broadcast_to(diag.reshape(channels, *diag.shape[2:]), (channels, *size))


def _reflect_weights(op, axes) -> np.ndarray | None:
    """``D^{-1}`` (``D`` transposed): sqrt(2) at both ends of each reflected, transformed axis.

    With reflect padding (whole-sample symmetric) and an axis-symmetric
    kernel, ``W = D^{-1} S D`` with S symmetric and diagonalised by the
    orthonormal DCT-I, ``D = diag(1/sqrt(2), 1, ..., 1, 1/sqrt(2))`` per axis.
    """
    geom: ConvGeometry = op.convolution.geometry
    channels, size = _gram_side(op)
    if geom.padding_mode != "reflect":
        return None
    weights = np.ones((channels, *size))
    for a in axes:
        if 0 in geom.padding[a]:
            continue  # no reflection read at one end: not this structure
        ends = np.ones(size[a])
        # W = D^{-1} S D: W^H W = D S D^{-2} S D ~ D S^2 D; a transposed one's is the inverse.
        ends[[0, -1]] = math.sqrt(0.5) if op.convolution.transposed else math.sqrt(2.0)
        weights *= ends.reshape([size[a] if b == a else 1 for b in range(-1, len(size))])
    return weights


def kronecker_factors(weight: np.ndarray):
    """``(sigma, vectors, error)``: the best rank-one ``sigma u_1 (x) ... (x) u_N`` of a kernel.

    Unit vectors ``u_a`` from the leading singular vectors of the kernel's
    unfoldings, refined by a few sweeps of alternating least squares (exact
    at once for a separable kernel); ``error`` is the relative Frobenius
    distance to the kernel.
    """
    k = np.asarray(weight, dtype=np.result_type(weight.dtype, np.float64))
    n = k.ndim
    vectors = [scipy.linalg.svd(np.moveaxis(k, a, 0).reshape(k.shape[a], -1))[0][:, 0]
               for a in range(n)]

    def project(skip):  # k contracted with conj(u_b) along every axis b but skip
        out = k
        for b in reversed(range(n)):
            if b != skip:
                out = np.tensordot(out, np.conj(vectors[b]), axes=([b], [0]))
        return out

    for _ in range(3 if n > 2 else 0):
        for a in range(n):
            v = project(a)
            vectors[a] = v / np.linalg.norm(v)
    sigma = project(0) @ np.conj(vectors[0])
    approx = sigma * vectors[0]
    for v in vectors[1:]:
        approx = np.multiply.outer(approx, v)
    norm = float(np.linalg.norm(k))
    error = float(np.linalg.norm(k - approx) / norm) if norm else 0.0
    return sigma, vectors, error


def _axis_matrix(op, axis: int, vector: np.ndarray) -> np.ndarray:
    """The dense one-dimensional convolution of ``vector`` along ``axis``, in op's geometry."""
    from ._build import build  # the same builder, so the padding mode folds taps alike

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
    """``W^H W`` of ``sigma A_1 (x) ... (x) A_N``, diagonalised axis by axis."""
    geom: ConvGeometry = op.convolution.geometry
    if geom.in_channels != 1 or geom.out_channels != 1:
        raise NotImplementedError(
            "kind='kronecker' needs one input and one output channel, got weight.shape="
            f"{op.weight.shape}"
        )
    channels, size = _gram_side(op)
    nbytes = sum(16 * n * n for n in size)
    if nbytes > _KRONECKER_MAX_BYTES:
        raise NotImplementedError(
            f"kind='kronecker' would store {nbytes} bytes of dense eigenvectors for the input "
            f"size {size}, more than {_KRONECKER_MAX_BYTES}"
        )
    sigma, vectors, _ = kronecker_factors(op.weight[0, 0])
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
    H = abs(sigma) ** 2 * functools.reduce(np.multiply.outer, values)
    H = H.reshape(1, *size, 1, 1)
    basis = _DenseBasis(tuple(bases), size)
    return basis, _regularised_inverse(H, _total_shift(H, damp, boost)), None


def _block_jacobi(op, damp: float, boost: float):
    """The ``m x m`` diagonal blocks of ``W^H W`` at every position, from the matrix."""
    channels, size = _gram_side(op)
    groups = op.convolution.geometry.groups
    m, positions = channels // groups, math.prod(size)
    H = np.zeros((groups, positions, m, m), dtype=np.result_type(op.dtype, np.float64))
    if m == 1:
        H[:, :, 0, 0] = gram_diagonal(op).reshape(groups, positions)
    else:
        # Rows (c, i) of W^T are the columns of W: the blocks are their inner products.
        T = op.transpose_matrix
        rows = [T[c * positions:(c + 1) * positions] for c in range(channels)]
        for g in range(groups):
            for a in range(m):
                for b in range(a, m):
                    left, right = rows[g * m + a], rows[g * m + b]
                    value = np.asarray(left.conj().multiply(right).sum(axis=1)).ravel()
                    H[g, :, a, b] = value
                    H[g, :, b, a] = np.conj(value)
    basis = _PositionBasis(channels, groups, size)
    H = H.reshape(groups, *size, m, m)
    return basis, _regularised_inverse(H, _total_shift(H, damp, boost)), None


def auto_kind(op) -> str:
    """The construction ``kind='auto'`` picks (measured: ``sparse_tconv.tools.solve_bench``).

    The exact circulant where W is one; the exact Kronecker product for a
    separable single-channel kernel (every axis at most 4096 long); for a
    low-pass kernel (a blur) with a Toeplitz Gram matrix, the cosine
    transform whose symmetric extension matches the padding (whole-sample,
    DCT-I, for reflect; half-sample, DCT-II, for the others); otherwise the
    (shifted) circulant of the kernel, else block-Jacobi.
    """
    geom: ConvGeometry = op.convolution.geometry
    if is_exact(op):
        return "circulant"
    if _separable(op) and max(_gram_side(op)[1]) <= _KRONECKER_AUTO_SIZE:
        return "kronecker"
    toeplitz = op.convolution.transposed or all(s == 1 for s in geom.stride)
    cosine = "dct1" if geom.padding_mode == "reflect" else "dct2"
    if toeplitz and _low_pass(op):
        return cosine
    try:
        _circulant_geometry(op)
    except NotImplementedError:  # no circulant of this kernel on this grid
        return cosine if toeplitz else "block_jacobi"
    return "circulant"


def _low_pass(op) -> bool:
    """Whether the Gram symbol's largest eigenvalue at frequency 0 is within 10% of the top.

    True for blurs (non-negative weights put the top at 0): the DCTs' model
    of the border then errs where the symbol is large.  Random kernels, whose
    symbol is small at scattered frequencies, do better with the shifted
    circulant (``sparse_tconv.tools.solve_bench``).
    """
    G, _ = _gram_kernel(op)  # (g, m, m, *lags), the lags in wrap-around order
    n = G.ndim - 3
    H = np.moveaxis(np.fft.fftn(G, axes=tuple(range(3, 3 + n))), (1, 2), (-2, -1))
    H = (H + np.conj(np.swapaxes(H, -1, -2))) / 2  # Hermitian up to rounding
    top = np.linalg.eigvalsh(H)[..., -1]  # (g, *frequencies)
    return bool(top[(slice(None),) + (0,) * n].max() >= 0.9 * top.max())


def _separable(op) -> bool:
    """One channel in and out, and a rank-one kernel (to :data:`SEPARABLE_RTOL`)."""
    if op.weight.shape[:2] != (1, 1):
        return False
    return kronecker_factors(op.weight[0, 0])[2] <= SEPARABLE_RTOL


def build_preconditioner(op, damp: float, kind: str, *, boost: float | None = None,
                         correct: bool = True) -> SpectralPreconditioner:
    """The :class:`SpectralPreconditioner` ``kind`` (one of :data:`KINDS`) for damp.

    The blocks are inverted with ``damp**2 + boost * lambda_max`` (a
    preconditioner damped more than the system, ``lambda_max`` the largest
    eigenvalue of the model; default :data:`DEFAULT_SHIFT`, else 0);
    ``correct=False`` leaves out the border
    correction (the DCT-II's and the surrogate circulant's diagonal match,
    the DCT-I's reflect weights), for the benchmark's comparison.
    """
    threads = resolve_threads(op.threads)
    if boost is None:
        boost = 0.0 if kind == "circulant" and is_exact(op) else DEFAULT_SHIFT.get(kind, 0.0)
    if kind == "circulant":
        basis, blocks, scale = _circulant(op, damp, boost, threads, correct)
    elif kind == "kronecker":
        basis, blocks, scale = _kronecker(op, damp, boost)
    elif kind in ("dct1", "dct2"):
        dct_type: Literal[1, 2] = 1 if kind == "dct1" else 2
        basis, blocks, scale = _cosine(op, damp, boost, threads, dct_type, correct)
    else:
        basis, blocks, scale = _block_jacobi(op, damp, boost)
    return SpectralPreconditioner(basis, blocks, scale, kind, damp,
                                  np.result_type(op.dtype, np.float64))


# ---------------------------------------------------------------------------
# The exact solve
# ---------------------------------------------------------------------------


def _filter(Bop: np.ndarray, damp: float, rcond: float) -> np.ndarray:
    """Per block, ``V diag(s / (s^2 + damp^2)) U^H`` of ``Bop = U diag(s) V^H``, as (g, c, a, *F).

    With ``damp == 0`` the pseudo-inverse: singular values at most ``rcond``
    times the largest of all blocks are dropped (the minimum-norm solution).
    """
    if Bop.shape[-2:] == (1, 1):  # one channel: the filter of the number itself
        b = Bop[..., 0, 0]
        power = np.abs(b) ** 2
        if damp > 0:
            inverse = np.conj(b) / (power + damp * damp)
        else:
            keep = power > (rcond * float(np.sqrt(power.max(initial=0.0)))) ** 2
            inverse = np.where(keep, np.conj(b) / np.where(keep, power, 1.0), 0.0)
        return np.ascontiguousarray(inverse[:, None, None])
    U, s, Vh = np.linalg.svd(Bop, full_matrices=False)
    if damp > 0:
        phi = s / (s * s + damp * damp)
    else:
        keep = s > rcond * float(s.max(initial=0.0))
        phi = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    inverse = (np.conj(np.swapaxes(Vh, -1, -2)) * phi[..., None, :]) @ np.conj(
        np.swapaxes(U, -1, -2))
    if not np.iscomplexobj(Bop):
        inverse = inverse.real
    return np.ascontiguousarray(np.moveaxis(inverse, (-2, -1), (1, 2)))


def exact_solve(op, y: np.ndarray, damp: float, threads: int) -> np.ndarray:
    """``argmin ||W x - y||^2 + damp^2 ||x||^2`` for a circulant W, by FFT.

    With ``damp == 0`` the minimum-norm least-squares solution.  ``y`` is
    flat and in double precision; so is the result.
    """
    geom: ConvGeometry = op.convolution.geometry
    check_circulant(geom, "the exact FFT solve")
    inside, outside, Bop = _fourier_pieces(op, geom, threads)
    inverse = _filter(Bop, damp, np.finfo(np.float64).eps * max(op.shape))
    samples = y.reshape(1, *op.output_shape)
    split = inside.real and np.iscomplexobj(samples)
    if split:  # a real transform: the real and imaginary parts as two samples
        samples = np.concatenate([samples.real, samples.imag])
    x = inside.inverse(_apply_blocks(inverse, outside.forward(samples)))
    return (x[0] + 1j * x[1] if split else x[0]).reshape(-1)
