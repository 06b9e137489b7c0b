"""The spectral structure of ``W^H W``: preconditioners and the exact FFT solve.

The constructions themselves (how each builds the pieces below, and when
``kind='auto'`` picks it) are the classes of :mod:`sparse_tconv._preconditioning`,
one module each, named by its registry; this module is what they share: the
transforms, :class:`SpectralPreconditioner`, the regularised inverse of the
blocks, the Gram diagonal and the border scaling, and the exact FFT solve.

Every preconditioner has the form ``S T^{-1} diag(K_f) T S``: a
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

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft
import scipy.linalg
from scipy.sparse.linalg import LinearOperator

from ._blas import one_blas_thread
from ._fourier import check_circulant, circular_blocks
from ._geometry import ConvGeometry

__all__ = [
    "SpectralPreconditioner",
    "channel_kernels",
    "exact_solve",
    "gram_diagonal",
    "is_exact",
    "kronecker_factors",
]

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

    @property
    def _unsplit(self) -> bool:
        """No polyphase split (stride 1): the samples are transformed as they are."""
        return all(s == 1 for s in self.split)

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, batch = len(self.grid), x.shape[0]
        fft = scipy.fft.rfftn if self.real else scipy.fft.fftn
        if self._unsplit:
            phases = x.reshape(batch, self.channels, *self.grid)
            axes = tuple(range(-n, 0))
        else:
            shape = [batch, self.channels]
            for m, s in zip(self.grid, self.split):
                shape += [m, s]
            # x[b, c, m s + r] -> x[b, c, r, m]: the polyphase components, (c, r) in C order
            order = [0, 1, *(3 + 2 * a for a in range(n)), *(2 + 2 * a for a in range(n))]
            phases = x.reshape(shape).transpose(order)
            axes = tuple(range(2 + n, 2 + 2 * n))
        X = fft(phases, axes=axes, workers=_workers(phases, self.threads))
        return X.reshape(batch, self.groups, self.block_size, *self.frequencies)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        n, batch = len(self.grid), X.shape[0]
        if self._unsplit:
            X = X.reshape(batch, self.channels, *self.frequencies)
            axes, workers = tuple(range(-n, 0)), _workers(X, self.threads)
            if self.real:
                return scipy.fft.irfftn(X, s=self.grid, axes=axes, workers=workers)
            return scipy.fft.ifftn(X, axes=axes, workers=workers)
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
    """The orthonormal DCT of type ``dct_type`` along the axes ``axes`` (spatial, 0-based).

    Each axis is transformed by scipy.fft, or by its dense DCT matrix where
    pocketfft is slow at that length (:func:`_dense_dct`); the results agree
    to rounding.
    """

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

    def _transform(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        fast = []
        workers = _workers(x, self.threads)
        for a in self.axes:
            n = self.sample_size[a]
            if not _dense_dct(n, self.dct_type):
                fast.append(2 + a)
                continue
            M = _dct_matrix(n, self.dct_type)
            # one BLAS thread where pocketfft would have one worker: OpenBLAS on two
            # threads, with another process busy on one of the two cores, took 14 ms
            # for what one thread did in 0.08 (n=128)
            with one_blas_thread(workers == 1):
                x = _along_axis(M.T if inverse else M, x, 2 + a)
        if fast:  # the other axes in one call
            dctn = scipy.fft.idctn if inverse else scipy.fft.dctn
            x = dctn(x, type=self.dct_type, axes=fast, norm="ortho", workers=workers)
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self._transform(x, inverse=False)
        return x.reshape(x.shape[0], self.groups, self.block_size, *self.sample_size)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        X = X.reshape(X.shape[0], self.channels, *self.sample_size)
        return self._transform(X, inverse=True)


@dataclass(frozen=True)
class _DenseBasis:
    """One dense unitary matrix per spatial axis (a Kronecker product), for each channel.

    ``matrices[c]`` holds channel ``c``'s matrices, one per axis; each channel
    is a group of its own (a depthwise layer, or one channel).  ``forward``
    applies ``(U_1 (x) ... (x) U_N)^H``, ``inverse`` the product itself; an
    axis whose matrix is ``None`` is left as it is (the identity).
    """

    matrices: tuple[tuple[np.ndarray | None, ...], ...]
    sample_size: tuple[int, ...]
    block_size = 1

    @property
    def channels(self) -> int:
        return len(self.matrices)

    @property
    def groups(self) -> int:
        return len(self.matrices)

    @property
    def real(self) -> bool:
        return not any(np.iscomplexobj(U) for per_axis in self.matrices for U in per_axis
                       if U is not None)

    def _apply(self, x: np.ndarray, conjugate: bool) -> np.ndarray:
        with one_blas_thread():  # (as the set-up: see build_preconditioner)
            if len(self.matrices) == 1:
                return _kronecker_product(self.matrices[0], x, conjugate)
            return np.concatenate([_kronecker_product(per_axis, x[:, c:c + 1], conjugate)
                                   for c, per_axis in enumerate(self.matrices)], axis=1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, True).reshape(x.shape[0], self.channels, 1, *self.sample_size)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X.reshape(X.shape[0], self.channels, *self.sample_size), False)


def _kronecker_product(matrices: tuple[np.ndarray | None, ...], x: np.ndarray,
                       conjugate: bool) -> np.ndarray:
    """``(U_1 (x) ... (x) U_N) x`` (or its adjoint) on samples ``(B, C, *P)``."""
    for axis, U in enumerate(matrices):
        if U is None:
            continue
        # x_i -> sum_j conj(U[j, i]) x_j (U^H), or sum_j U[i, j] x_j
        x = _along_axis(np.conj(U).T if conjugate else U, x, 2 + axis)
    return x


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


# pocketfft computes a DCT-I of n points through a real FFT of length 2(n - 1), a
# DCT-II through one of length n; a large prime factor of that length makes it slow,
# and a product with the dense n x n matrix (BLAS, 2n flops an element) is then
# faster.  Measured on (1, 1, n, n) float64 samples along one axis, one thread each
# (pocketfft, OpenBLAS), ms for scipy.fft / the dense matrix, FFT length factored:
#   DCT-I   n=96   2*5*19     0.057 / 0.037    n=128  2*127        0.43  / 0.077
#           n=160  2*3*53     0.25  / 0.14     n=192  2*191        1.36  / 0.22
#           n=255  2^2*127    1.33  / 0.50     n=384  2*383        3.6   / 1.7
#           n=512  2*7*73     3.5   / 3.8      n=256  2*3*5*17     0.35  / 0.49
#           n=129  2^8        0.055 / 0.085    n=257  2^9          0.21  / 0.51
#           n=640  2*3^2*71   5.1   / 7.4      n=768  2*13*59      7.7   / 12.9
#   DCT-II  n=127  127        0.37  / 0.090    n=257  257          0.95  / 0.53
#           n=509  509        3.6   / 3.9      n=1009 1009         18.6  / 28.4
#           n=128  2^7        0.040 / 0.083    n=192  2^6*3        0.084 / 0.24
# The dense product wins where the largest prime factor exceeds n / 8, up to n = 512
# (at 512 and 509 the two are about level); beyond, it loses on one thread and wins by at
# most 1.5x on two (n=640: 3.8 ms, 1009: 15 ms), and its matrix would pass 2 MiB.
_DENSE_DCT_MAX = 512


def _largest_prime_factor(m: int) -> int:
    """The largest prime factor of ``m >= 1`` (1 for 1), by trial division."""
    largest, f = 1, 2
    while f * f <= m:
        while m % f == 0:
            largest, m = f, m // f
        f += 1
    return max(largest, m)


@functools.lru_cache(maxsize=64)
def _dense_dct(n: int, dct_type: int) -> bool:
    """Whether a DCT of ``n`` points is faster as a dense product than by scipy.fft."""
    length = 2 * (n - 1) if dct_type == 1 else n
    return 2 <= n <= _DENSE_DCT_MAX and 8 * _largest_prime_factor(length) > n


@functools.lru_cache(maxsize=8)
def _dct_matrix(n: int, dct_type: int) -> np.ndarray:
    """The orthonormal DCT matrix of ``n`` points, scipy.fft's ``norm='ortho'`` (read-only).

    ``y = M x`` is ``scipy.fft.dct(x, type=dct_type, norm='ortho')``.  The
    DCT-I matrix is symmetric and its own inverse; the DCT-II's inverse is its
    transpose.
    """
    j = np.arange(n)
    k = j[:, None]
    if dct_type == 1:  # sqrt(2 / (n-1)) f_k f_j cos(pi k j / (n-1)), f = 1/sqrt 2 at both ends
        f = np.ones(n)
        f[[0, -1]] = math.sqrt(0.5)
        # integer phases reduced modulo the period, so that cos sees small arguments
        phase = k * j % (2 * n - 2)
        M = math.sqrt(2 / (n - 1)) * np.outer(f, f) * np.cos(np.pi * phase / (n - 1))
    else:  # sqrt(2 / n) f_k cos(pi k (2j + 1) / 2n), f_0 = 1/sqrt 2
        f = np.ones((n, 1))
        f[0] = math.sqrt(0.5)
        phase = k * (2 * j + 1) % (4 * n)
        M = math.sqrt(2 / n) * f * np.cos(np.pi * phase / (2 * n))
    M.setflags(write=False)
    return M


def _along_axis(M: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """``y[..., i, ...] = sum_j M[i, j] x[..., j, ...]`` along ``axis`` of ``x``."""
    if axis == x.ndim - 1:
        # one GEMM over all the leading axes: faster here than matmul, which runs one per
        # sample (3-D, 48^3: 0.31 ms against 0.51)
        return np.tensordot(x, M, axes=([axis], [1]))
    # one GEMM per leading index: faster here than tensordot, which copies x to put the
    # axis last (3-D, 48^3: 0.40 ms against 1.6)
    return np.moveaxis(M @ np.moveaxis(x, axis, -2), -2, axis)


def _half(grid: tuple[int, ...]) -> tuple[int, ...]:
    """The frequencies ``rfftn`` keeps on ``grid``."""
    return (*grid[:-1], grid[-1] // 2 + 1)


def _apply_blocks(K: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``Y[b, g, :, f] = K[g, :, :, f] @ X[b, g, :, f]``, K (g, a, c, *F) broadcasting over F."""
    if K.shape[1] == K.shape[2] == 1:
        return K[None, :, :, 0] * X  # one channel per group: elementwise
    if K.shape[1] * K.shape[2] <= _LOOP_BLOCKS:
        return _blocks_by_entry(K, X)
    # Frequencies last, so that each multiply-add runs over all of them at once.
    return np.einsum("gac...,bgc...->bga...", K, X)


# Up to this many entries a block, _apply_blocks multiplies entry by entry: measured on
# one thread, 3 x 3 blocks at 80 x 41 frequencies 31 us against einsum's 51, 4 x 4 at
# 96 x 49 76 against 130, 8 x 8 at 64 x 33 185 against 235.
_LOOP_BLOCKS = 64


def _blocks_by_entry(K: np.ndarray, X: np.ndarray) -> np.ndarray:
    """:func:`_apply_blocks` as ``a c`` multiply-adds over the frequencies per group."""
    batch, (g, a, c) = X.shape[0], K.shape[:3]
    out = np.empty((batch, g, a, *X.shape[3:]), dtype=np.result_type(K, X))
    term = np.empty(X.shape[3:], dtype=out.dtype)
    for b in range(batch):
        for group in range(g):
            for i in range(a):
                row = out[b, group, i]
                np.multiply(K[group, i, 0], X[b, group, 0], out=row)
                for j in range(1, c):
                    row += np.multiply(K[group, i, j], X[b, group, j], out=term)
    return out


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
        top = _largest_eigenvalue(H)
    return damp * damp + boost * top


def _shifted_inverse(H: np.ndarray, damp: float, boost: float) -> tuple[np.ndarray, float]:
    """``(inverse, shift)``: :func:`_regularised_inverse` with :func:`_total_shift`'s shift.

    Where no eigenvalue can fall below the floor (``shift`` at least twice the
    floor of the largest trace, which bounds every eigenvalue), the blocks'
    plain inverses, which equal the eigendecomposition's to rounding and cost a
    third of it (3 x 3 blocks at 80 x 41 frequencies: 1.4 ms against 3.9).
    """
    m = H.shape[-1]
    shift = _total_shift(H, damp, boost)
    if m == 1 or shift == 0.0 or shift < 2 * _FLOOR * float(_traces(H).max(initial=0.0)):
        return _regularised_inverse(H, shift), shift
    K = np.linalg.inv(H + shift * np.eye(m))
    K = 0.5 * (K + np.conj(np.swapaxes(K, -1, -2)))  # Hermitian to the last bit
    return np.ascontiguousarray(np.moveaxis(K, (-2, -1), (1, 2))), shift


def _traces(H: np.ndarray) -> np.ndarray:
    """The (real) traces of the Hermitian blocks ``H`` (..., m, m)."""
    return np.einsum("...ii->...", H).real


def _largest_eigenvalue(H: np.ndarray) -> float:
    """The largest eigenvalue of the Hermitian PSD blocks ``H`` (..., m, m): that of the
    64 blocks of largest trace, then of the others whose trace (an upper bound) exceeds
    it (3 x 3 blocks at 80 x 41 frequencies: 0.7 ms against 2.5 for all of them)."""
    H = H.reshape(-1, *H.shape[-2:])
    traces = _traces(H)
    first = np.argsort(traces)[::-1][:64]
    top = float(np.linalg.eigvalsh(H[first]).max(initial=0.0))
    rest = np.flatnonzero(traces > top)
    rest = rest[~np.isin(rest, first)]
    if rest.size:
        top = max(top, float(np.linalg.eigvalsh(H[rest]).max(initial=0.0)))
    return top


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


def channel_kernels(op) -> np.ndarray | None:
    """The kernel of each channel (C, *k) where every group maps one channel to one (a
    single channel, or a depthwise layer without a multiplier); else None.

    W is then block diagonal, one convolution per channel, and so is ``W^H W``.
    """
    geom = op.convolution.geometry
    if not geom.in_channels == geom.out_channels == geom.groups:
        return None
    return op.weight[:, 0]


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
    V = np.zeros((L if on_input else O, k))
    for t in range(k):
        # outputs p in [first, end) read input p s + t d - lo inside [0, L)
        first = max(0, -(-(lo - t * d) // s))
        end = min(O, (L - 1 + lo - t * d) // s + 1)
        if end > first:
            if on_input:
                V[first * s + t * d - lo:(end - 1) * s + t * d - lo + 1:s, t] = 1.0
            else:
                V[first:end, t] = 1.0
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
# Kernels, and the preconditioner of a registered construction
# ---------------------------------------------------------------------------


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
    top = float((np.abs(Bop) ** 2).sum(axis=(-2, -1)).max(initial=0.0))  # >= sigma_max^2
    if not (damp > 0 and top <= _SOLVE_CONDITION * damp * damp):
        return _filter_by_svd(Bop, damp, rcond)
    inverse = _damped_pseudo_inverse(Bop, damp)
    if not np.iscomplexobj(Bop):
        inverse = inverse.real
    return np.ascontiguousarray(np.moveaxis(inverse, (-2, -1), (1, 2)))


# The exact solve's filter comes from the normal equations of each block where their
# condition number, at most 1 + sigma_max^2 / damp^2, is at most this (their rounding
# error then about 1e-8 relative at worst; measured against the SVD's, 3e-15 to 2e-13 on
# random 4 x 4 blocks at damp 1e-2 and 1e-3), else from the SVD: the exact solve of a
# 4 -> 4 layer at 96x96 spent 31 of its 54 ms in the SVD.
_SOLVE_CONDITION = 1e8


def _damped_pseudo_inverse(Bop: np.ndarray, damp: float) -> np.ndarray:
    """``(B^H B + damp^2 I)^{-1} B^H`` per block, through the smaller of its two
    normal matrices (``B^H (B B^H + damp^2 I)^{-1}`` for a wide block)."""
    a, c = Bop.shape[-2:]
    Bh = np.conj(np.swapaxes(Bop, -1, -2))
    if c <= a:
        return np.linalg.solve(Bh @ Bop + damp * damp * np.eye(c), Bh)
    return np.conj(np.swapaxes(np.linalg.solve(Bop @ Bh + damp * damp * np.eye(a), Bop),
                               -1, -2))


def _filter_by_svd(Bop: np.ndarray, damp: float, rcond: float) -> np.ndarray:
    """:func:`_filter` from the blocks' SVD (any damping, the pseudo-inverse at 0)."""
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
