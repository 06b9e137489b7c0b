"""The cosine constructions: the orthonormal DCT-II (``'dct2'``) and DCT-I (``'dct1'``).

Both model ``W^H W`` by the Toeplitz matrix of the kernel's autocorrelation
extended symmetrically at the border: half-sample (DCT-II, numpy's
``'symmetric'``) or whole-sample (DCT-I, PyTorch's ``'reflect'``).  They
need a Toeplitz Gram matrix: stride 1, or any transposed convolution.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np

from .._fourier import circular_blocks
from .._geometry import ConvGeometry, conv_geometry
from .._preconditioners import (
    _FLOOR,
    _CosineBasis,
    _forward_weight,
    _gram,
    _gram_side,
    _matching_scale,
    _regularised_inverse,
    _shifted_inverse,
    _total_shift,
    gram_diagonal,
)
from .base import Construction, Operator, Pieces
from .circulant import has_surrogate
from .gradient import gradient_diagonal, laplacian_symbol
from .gradient import scale as gradient_scale

__all__ = ["DCT1", "DCT2"]


class _Cosine(Construction):
    """What the two DCTs share: the model, and when 'auto' picks one."""

    dct_type: ClassVar[Literal[1, 2]]
    reflect: ClassVar[bool]
    """Whether 'auto' picks it for reflect padding (else for the other modes)."""

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """The cosine matching the padding, where the Gram matrix is Toeplitz, for a blur.

        Also for any kernel where the shifted circulant, 'auto''s next choice,
        has no grid (a stride that does not divide the input size, a dilated
        kernel wider than the input).
        """
        if (op.convolution.geometry.padding_mode == "reflect") != cls.reflect:
            return False
        if not _toeplitz(op):
            return False
        return _models_the_interior(op) or not has_surrogate(op)

    @classmethod
    def models(cls, op: Operator) -> bool:
        """Where the Gram matrix is Toeplitz and the kernel an even blur
        (:func:`_models_the_interior`): the model is then exact away from the border."""
        return _toeplitz(op) and _models_the_interior(op)

    @classmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        return _cosine(op, damp, boost, threads, cls.dct_type, correct,
                       regulariser == "gradient")


class DCT2(_Cosine):
    """The DCT-II: the half-sample symmetric extension, with the matching diagonal scaling."""

    name: ClassVar[str] = "dct2"
    # D^H D (L='gradient') is the Neumann Laplacian: diagonal in the same basis.
    regularisers: ClassVar[tuple[str, ...]] = ("identity", "gradient")
    # Measured (sparse_tconv.tools.solve_bench): best or near it on blurs at damp 1e-2 and
    # 1e-3 (a disk blur at 1e-3: 720 iterations with no shift, 90 with 1e-3, 689 plain).
    default_shift: ClassVar[float] = 1e-3
    dct_type: ClassVar[Literal[1, 2]] = 2
    reflect: ClassVar[bool] = False

    @classmethod
    def auto_applies_to(cls, op: Operator, regulariser: str) -> bool:
        """As for the identity; with the gradient also for reflect padding (the DCT-I
        does not diagonalise ``D^H D``)."""
        if regulariser != "gradient":
            return super().auto_applies_to(op, regulariser)
        return _toeplitz(op) and (_models_the_interior(op) or not has_surrogate(op))


class DCT1(_Cosine):
    """The DCT-I: the whole-sample symmetric extension, with the reflect weights.

    Not shifted: with reflect padding its bound on the preconditioned
    eigenvalues holds for any damping.
    """

    name: ClassVar[str] = "dct1"
    dct_type: ClassVar[Literal[1, 2]] = 1
    reflect: ClassVar[bool] = True


def _toeplitz(op) -> bool:
    """Whether ``op``'s Gram matrix is Toeplitz (away from the border)."""
    return op.convolution.transposed or all(s == 1 for s in op.convolution.geometry.stride)


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
    def reflect(k):
        k = np.mod(k, 2 * n)
        return np.where(k < n, k, 2 * n - 1 - k)

    # Rows farther than every lag from both borders see no reflection: only lag 0 comes
    # back.  The formula on the rows near the borders alone (a 1-D blur of 2048 samples
    # spent more on all the rows than plain CG on its whole solve).
    Q = np.repeat((lags == 0).astype(float)[None], n, axis=0)
    reach = int(np.abs(lags).max(initial=0))
    near = np.arange(n) if 2 * reach >= n else np.r_[0:reach, n - reach:n]
    i = near[:, None]
    Q[near] = 0.5 * ((reflect(i + lags) == i).astype(float) + (reflect(i - lags) == i))
    return Q


def _cosine(op, damp: float, boost: float, threads: int, dct_type: Literal[1, 2],
            correct: bool, gradient: bool = False):
    """DCT blocks ``Lambda_f = sum_t G(t) prod_a cos(pi f_a t_a / N_a)`` (solvers: Notes).

    With ``gradient`` (DCT-II only), ``damp^2 D^H D`` is added exactly: its
    eigenvalues ``sum_a 4 sin^2(pi f_a / (2 n_a))`` on every channel's diagonal.
    """
    channels, size = _gram_side(op)
    G, lags = _gram_kernel(op)
    # Axes the kernel does not reach along need no transform: the model is constant there
    # (but for the gradient, which couples neighbours along every axis).
    axes = tuple(a for a, (n, lag) in enumerate(zip(size, lags))
                 if n > 1 and (lag.size > 1 or gradient))
    lam = G
    for axis, (n, lag) in enumerate(zip(size, lags)):
        if axis in axes:
            lam = _cosine_sums(lam, 3 + axis, lag, n, n - 1 if dct_type == 1 else n)
        else:
            lam = lam.sum(axis=3 + axis, keepdims=True)
    H = np.moveaxis(lam, (1, 2), (-2, -1))  # (g, *F, m, m), Hermitian PSD
    basis = _CosineBasis(channels, op.convolution.geometry.groups, size, dct_type, axes, threads)
    if gradient:
        shift = _total_shift(H, 0.0, boost)  # no damp^2 I in these equations
        frequencies = H.shape[1:-2]
        H = H + (damp * damp) * laplacian_symbol(size, frequencies, "dct2")[..., None, None] \
            * np.eye(H.shape[-1])
        scale = None
        if correct:
            extra = (damp * damp) * gradient_diagonal(channels, size)
            scale = gradient_scale(gram_diagonal(op) + extra,
                                   _cosine_diagonal(G, lags, size, axes) + extra, shift, _FLOOR)
        return basis, _regularised_inverse(H, shift), scale
    inverse, shift = _shifted_inverse(H, damp, boost)
    scale = None
    if correct and dct_type == 1:
        scale = _reflect_weights(op, axes)
    elif correct:
        scale = _matching_scale(op, _cosine_diagonal(G, lags, size, axes), shift)
    return basis, inverse, scale


def _cosine_sums(values: np.ndarray, axis: int, lag: np.ndarray, n: int, N: int) -> np.ndarray:
    """``sum_j values[.., j, ..] cos(pi f lag_j / N)`` for ``f < n``, in place of ``axis``.

    By lags folded onto ``|t|`` and one FFT of length ``2 N`` (a multiple
    of it past the longest lag): ``O(n log n)``, where the table of cosines
    costs ``n`` times the lags (the 29 lags of a 15-tap blur on 2048 samples:
    0.5 ms, a quarter of plain CG's whole solve).
    """
    values = np.moveaxis(values, axis, -1)
    reach = int(np.abs(lag).max(initial=0))
    folded = np.zeros((*values.shape[:-1], reach + 1), dtype=values.dtype)
    for j, t in enumerate(np.abs(lag)):
        folded[..., t] += values[..., j]
    repeats = -(-(reach + 1) // (2 * N))

    def transform(v):  # sum_t v_t exp(-i pi f t / N), f < n
        return np.fft.fft(v, n=2 * N * repeats, axis=-1)[..., :n * repeats:repeats]

    if np.iscomplexobj(folded):  # cos = (exp(-i.) + exp(+i.)) / 2
        sums = (transform(folded) + np.conj(transform(np.conj(folded)))) / 2
    else:
        sums = transform(folded).real
    return np.moveaxis(sums, -1, axis)


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


# Above it no DCT: the kernels measured there lost to plain CG with one (2 threads, damp
# 5e-3 to 1e-2): an L-shaped 5x5 (asymmetry 0.52; 0.6x with the DCT-I, reflect, 160x160), a
# 7x7 anti-diagonal motion (1.26; 0.36-0.47x with the DCT-II, zeros and replicate, 256x256),
# random 3 -> 3 and 4 -> 4 layers (0.75, 0.77; 0.5x).  Every symmetric blur, and any real
# single-channel 1-D or separable kernel (whose autocorrelation is even), is at 0.
_ASYMMETRY = 0.25


def _models_the_interior(op) -> bool:
    """Whether the DCTs model ``W^H W`` away from the border: a blur, even along every axis.

    The cosine symbol is the mean of the true one over the reflections of
    the frequency axes, so it is the true symbol only where the Gram kernel
    is even along every axis (``G(.., -t_a, ..) = G(.., t_a, ..)``).  An
    anti-diagonal motion blur's is odd along each axis alone: its DCT model
    smears the blur over both diagonals, and DCT-preconditioned CG took
    twice plain CG's iterations.
    """
    G, _ = _gram_kernel(op)  # (both tests read it)
    return _low_pass(G) and _axis_asymmetry(G) <= _ASYMMETRY


def _axis_asymmetry(G: np.ndarray) -> float:
    """``max_a ||G - G flipped along lag axis a|| / ||G||`` for the Gram kernel G (g, m, m,
    *lags) of :func:`_gram_kernel`, lags in wrap-around order (0: even)."""
    top = float(np.linalg.norm(G))
    if top == 0.0:
        return 0.0
    worst = 0.0
    for axis in range(3, G.ndim):
        flipped = np.take(G, (-np.arange(G.shape[axis])) % G.shape[axis], axis=axis)
        worst = max(worst, float(np.linalg.norm(G - flipped)) / top)
    return worst


def _low_pass(G: np.ndarray) -> bool:
    """Whether the Gram symbol's largest eigenvalue at frequency 0 is within 10% of the top.

    True for blurs (non-negative weights put the top at 0): the DCTs' model
    of the border then errs where the symbol is large.  Random kernels, whose
    symbol is small at scattered frequencies, do better with the shifted
    circulant (``sparse_tconv.tools.solve_bench``).
    """
    n = G.ndim - 3  # G: (g, m, m, *lags), the lags in wrap-around order
    H = np.moveaxis(np.fft.fftn(G, axes=tuple(range(3, 3 + n))), (1, 2), (-2, -1))
    H = (H + np.conj(np.swapaxes(H, -1, -2))) / 2  # Hermitian up to rounding
    top = np.linalg.eigvalsh(H)[..., -1]  # (g, *frequencies)
    return bool(top[(slice(None),) + (0,) * n].max() >= 0.9 * top.max())
