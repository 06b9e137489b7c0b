"""Certified bounds on the spectral norm of a convolution: ``lower <= ||W||_2 <= upper``.

Upper bounds come from the structure (:mod:`._fourier`): W is a row and
column selection of a circular convolution on a large enough grid, composed
with the padding map, so ``||W|| <= ||C_N|| ||P||``, and ``||C_N||`` is the
largest singular value of its DFT blocks (exact, by small SVDs).  Lower
bounds come from the operator's own products: ``||W v|| / ||v||`` for a
vector found by Lanczos iterations on ``W^H W``, started from the circular
convolution's top singular vector.  Every computed figure is widened by a
bound on its floating-point error, so that the interval holds for the
matrix the operator actually stores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import ndimage
from scipy.linalg import lapack

from . import _frame_gram, _sparsetools
from ._fourier import check_circulant, circular_blocks
from ._geometry import ConvGeometry
from ._indexmap import mode_map

__all__ = [
    "NormBounds",
    "structure_of",
    "upper_bound",
    "exact_circulant",
    "exact_single_tap",
    "exact_interval",
    "dense_interval",
    "inertia_applies",
    "inertia_upper",
    "psd_deficit",
    "banded_cholesky_error",
    "border_upper",
    "border_is_cheap",
    "product_nnz",
    "lower_bound",
    "start_vector",
    "padding_map_norm",
    "EXTRA_GRIDS",
]

_U64 = 2.0**-53  # unit roundoff of float64
# Lanczos steps per cycle before restarting from the best Ritz vector (memory:
# this many vectors of the operator's input size), fewer where they would take
# more than _LANCZOS_BYTES (a 64-channel input of 512x512 is 134 MB a vector).
_LANCZOS_STEPS = 20
_LANCZOS_BYTES = 1 << 29
# Extra circulant grids tried (one stride apart) when the first leaves the gap open.
EXTRA_GRIDS = 6
# Explicit matrices up to this many entries (rows x columns) get a dense SVD:
# an interval as narrow as rounding, for any padding mode.
_DENSE_SVD_ENTRIES = 4_000_000
# Gram matrices up to this many stored entries get the inertia certificate
# (a sparse LDL^T factorisation of t I - G): fill-in grows with it, memory too.
_INERTIA_GRAM_NNZ = 2**23
# In three or more dimensions the factorisation's separators are planes, and its
# cost grows as their size cubed (22 s for a 4-channel 16^3 layer): only Gram
# matrices up to this order there.
_INERTIA_ORDER_3D = 4096


class NormBounds(NamedTuple):
    """A certified interval ``lower <= ||W||_2 <= upper``.

    See :func:`~sparse_tconv.spectral.norm_bounds`.
    """

    lower: float
    upper: float

    @property
    def gap(self) -> float:
        """``upper / lower - 1`` (0 for a zero operator, inf when ``lower`` is 0 alone)."""
        if self.upper == 0.0:
            return 0.0
        return self.upper / self.lower - 1.0 if self.lower > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class _Structure:
    """What the bounds read: the forward geometry and weight, and the products."""

    geometry: ConvGeometry
    weight: np.ndarray  # the forward convolution's layout, as in the geometry
    dtype: np.dtype  # of the stored matrix
    matvec: Callable[[np.ndarray], np.ndarray]  # the operator's own products
    rmatvec: Callable[[np.ndarray], np.ndarray]
    n_in: int
    transposed: bool  # the operator's matrix is W.T (its input is W's output)
    matrix: Callable[[], Any] | None  # the explicit stored matrix (CSR), if it can be had

    @functools.cached_property
    def abs_bound(self) -> float:
        """A bound on ``|| |W| ||``, the scale of every rounding margin (see :func:`_abs_bound`)."""
        return _abs_bound(self.geometry, self.weight)

    @functools.cached_property
    def padding_norm(self) -> float:
        """``||P||`` of the padding map (see :func:`padding_map_norm`)."""
        return padding_map_norm(self.geometry)

    @functools.cached_property
    def gram_entries(self) -> int | None:
        """The stored entries of the smaller Gram matrix (see :func:`_gram_entries`)."""
        return _gram_entries(self)

    @functools.cached_property
    def gram(self) -> sp.csr_array:
        """The smaller Gram matrix of the stored W (:func:`_smaller_gram`), formed once
        for every shift the inertia certificate tries."""
        assert self.matrix is not None
        return _smaller_gram(self.matrix())

    @functools.cached_property
    def most_terms(self) -> int:
        """The most stored entries in a row or a column of W: the terms of a Gram entry."""
        assert self.matrix is not None
        W = sp.csr_array(self.matrix())
        return max(int(np.diff(W.indptr).max(initial=0)),
                   int(np.bincount(W.indices, minlength=W.shape[1]).max(initial=0)))


def structure_of(op) -> _Structure:
    """The geometry, weight and products of a convolution operator (else TypeError).

    A local operator also gives its CSR matrix (built on first use); a
    distributed one does not, its matrix being the sum of its blocks.
    """
    from ._operator import _ConvOperatorBase

    local = isinstance(op, _ConvOperatorBase)
    if not local:
        try:
            from .distributed import DistributedConvOperator
        except ImportError:  # pragma: no cover - the module imports without dask
            DistributedConvOperator = ()  # type: ignore[assignment,misc]
        if not isinstance(op, DistributedConvOperator):
            raise TypeError(
                "op must be a ConvOperator, ConvTransposeOperator or DistributedConvOperator "
                f"(its geometry gives the bounds), got op of type {type(op).__name__}"
            )
    conv = op.convolution
    return _Structure(conv.geometry, conv.weight, np.dtype(op.dtype), op.matvec, op.rmatvec,
                      op.shape[1], conv.transposed, (lambda: op.matrix) if local else None)


# ---------------------------------------------------------------------------
# Upper bounds
# ---------------------------------------------------------------------------


def padding_map_norm(geom: ConvGeometry) -> float:
    """``||P||`` of the padding map (input -> padded input): 1 for zeros padding.

    P has one 1 per row (a padded coordinate copies one input element), so
    ``P^T P`` is the diagonal of copy counts and ``||P|| = sqrt(max count)``;
    P is the Kronecker product of its dimensions' maps.  Only the padded
    coordinates are mapped (O(padding) work and memory per dimension).
    """
    if geom.padding_mode == "zeros":
        return 1.0
    norm = 1.0
    for L, (lo, hi) in zip(geom.input_size, geom.padding):
        sources = _padding_sources(L, lo, hi, geom.padding_mode)
        if len(sources):
            norm *= math.sqrt(1 + int(np.unique(sources, return_counts=True)[1].max()))
    return norm


def _padding_sources(L: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """The input coordinate each of a dimension's ``lo + hi`` padded positions copies."""
    outside = np.concatenate([np.arange(-lo, 0), np.arange(L, L + hi)]).astype(np.int64)
    return mode_map(outside, L, mode) if len(outside) else outside


def _circulant_grids(geom: ConvGeometry, count: int) -> list[tuple[int, ...]]:
    """Grids ``N`` (per dimension, multiples of the stride) on which W embeds in a circulant.

    W = R C_N E P: the padded input (length ``L + lo + hi``) placed at the
    start of the N grid, the strided circular correlation C_N with taps at
    ``t * dilation``, rows ``p < O`` kept.  No tap wraps when ``N >= L + lo + hi``.
    With zero padding the padded entries are zeros, so only the input's own
    ``L`` columns must not alias: a tap at input coordinate ``v`` outside
    ``[0, L)`` must land outside it mod N, which holds for ``v >= -lo`` when
    ``N >= L + lo`` and for ``v <= (O - 1) s + d (k - 1) - lo`` (the last tap
    read) when ``N`` exceeds that; and the ``O`` rows need ``N >= s O``.
    """
    per_dim = []
    for L, O, k, s, d, (lo, hi) in zip(geom.input_size, geom.output_size, geom.kernel_size,
                                       geom.stride, geom.dilation, geom.padding):
        if geom.padding_mode == "zeros":
            n = max(L + lo, (O - 1) * s + (k - 1) * d - lo + 1, s * O)
        else:
            n = L + lo + hi
        n = -(-n // s) * s
        per_dim.append(n)
    return [tuple(n + j * s for n, s in zip(per_dim, geom.stride)) for j in range(count)]


def _circulant(geom: ConvGeometry, grid: tuple[int, ...]) -> ConvGeometry:
    """The circular convolution on ``grid`` (taps at ``t * dilation``, no offset).

    Only what :func:`circular_blocks` reads is set; the offset ``lo`` is left
    out since a circular shift of the input is a permutation (same norm).
    """
    return dataclasses.replace(
        geom, input_size=grid, output_size=tuple(n // s for n, s in zip(grid, geom.stride)),
        padding=tuple((0, 0) for _ in grid), padding_mode="circular")


def _abs_bound(geom: ConvGeometry, weight: np.ndarray) -> float:
    """An upper bound on ``|| |W| ||`` (W with its entries' magnitudes), for rounding margins.

    ``|W| <= |V| P`` entrywise, and a circulant with non-negative blocks has
    its norm at frequency 0: ``|| |V| || <= || sum_t |w[:, :, t]| ||`` per group.
    """
    g = geom.groups
    # in double precision whatever the weight's: single-precision sums would round down
    magnitudes = np.abs(weight).astype(np.float64)
    a = magnitudes.reshape(g, geom.out_channels // g, geom.in_channels // g, -1).sum(-1)
    return float(max(np.linalg.norm(block, 2) for block in a)) * padding_map_norm(geom)




def _top_squares(blocks: np.ndarray, abs_bound: float) -> tuple[np.ndarray, float]:
    """``(||B||_2^2 of each block, their absolute error)``, by SVDs or Gram matrices.

    Blocks at least twice as wide as tall (or tall as wide: strided layers'
    polyphase blocks) take the largest eigenvalue of the smaller Gram matrix
    ``B B^H``, two to five times faster than an SVD.  Forming it errs by at
    most ``gamma_2n || |B| ||^2`` (``n`` terms, complex), the Hermitian
    eigensolver by a few ``m u ||B||^2``; ``|B| <= abs_bound`` entrywise
    (each entry a sum of taps of modulus-one phases).  The SVD's own error
    is in :func:`_blocks_bound`'s margin: 0 here.
    """
    m, n = blocks.shape[-2:]
    if max(m, n) < 2 * min(m, n):
        return np.linalg.svd(blocks, compute_uv=False)[..., 0] ** 2, 0.0
    adjoint = blocks.conj().swapaxes(-1, -2)
    gram = blocks @ adjoint if m <= n else adjoint @ blocks
    squares = np.linalg.eigvalsh(gram)[..., -1]
    error = (_gamma(2 * max(m, n)) + 10.0 * min(m, n) * _U64) * abs_bound ** 2
    return np.maximum(squares, 0.0), error


def _norm_margin(square: float, error: float) -> float:
    """How far ``sqrt`` of a square known to ``+-error`` may be from ``sqrt(square)``."""
    if error == 0.0:
        return 0.0
    return math.sqrt(square + error) - math.sqrt(max(0.0, square - error)) + 4 * _U64 * math.sqrt(
        square + error)


def _largest_block(blocks: np.ndarray, grid: tuple[int, ...], real: bool,
                   abs_bound: float) -> tuple[float, int, int, float]:
    """``(max over blocks of ||B||_2, group, frequency, its margin)`` by batched SVDs.

    A real weight's blocks come in conjugate pairs
    (``B(-f) = conj(B(f))``, the same singular values) on the frequency
    ``grid``, so only one of each pair is looked at.  The margin is the
    error of :func:`_top_squares` in norm (0 from an SVD).
    """
    groups, n_freq = blocks.shape[:2]
    flat = blocks.reshape(groups * n_freq, *blocks.shape[2:])
    index = np.arange(groups * n_freq)
    if real:
        index = index[np.tile(_one_of_each_pair(grid), groups)]
    squares, error = _top_squares(flat[index], abs_bound)
    top = int(np.argmax(squares))
    where = int(index[top])
    square = float(squares[top])
    return math.sqrt(square), where // n_freq, where % n_freq, _norm_margin(square, error)


def _one_of_each_pair(grid: tuple[int, ...]) -> np.ndarray:
    """A mask over the frequencies of ``grid`` (C order) keeping one of each ``(f, -f)``."""
    flat = np.arange(math.prod(grid)).reshape(grid)
    negated = flat[np.ix_(*[(-np.arange(n)) % n for n in grid])]  # the index of -f
    return (flat <= negated).ravel()


@dataclasses.dataclass
class _Upper:
    """The structural upper bound so far, and the vector it suggests for the lower bound."""

    value: float
    top: tuple[ConvGeometry, np.ndarray, int, int]  # circulant, its top block, group, frequency
    margin: float  # absolute, added to every bound (rounding)


# The circulant's blocks are formed at once (one FFT) up to this many bytes,
# else a chunk of frequencies at a time by a direct DFT over the taps (the
# blocks of a 64->64 layer on a 514^2 grid would take 17 GB).
_BLOCKS_BYTES = 1 << 28
_BLOCKS_CHUNK_BYTES = 1 << 25
# Kernels of at most this many taps take the direct DFT whatever the size: a
# matrix product over the taps, on half the frequencies for a real weight, is
# faster than numpy's FFT of the zero-filled kernels (2.6 s against 0.2 s for
# a 256->256 3x3 layer on a 16^2 grid).
_DIRECT_DFT_TAPS = 64


def _blocks_bound(geom: ConvGeometry, weight: np.ndarray, circulant: ConvGeometry,
                  abs_bound: float) -> tuple[float, np.ndarray, int, int, float]:
    """``(max block norm, top block, group, frequency, rounding margin)`` of one circulant."""
    real = not np.iscomplexobj(weight)
    g, M = circulant.groups, circulant.output_size
    opg = circulant.out_channels // g
    width = circulant.in_channels // g * math.prod(circulant.stride)
    n_freq = math.prod(M)
    taps = math.prod(circulant.kernel_size)
    if taps > _DIRECT_DFT_TAPS and g * n_freq * opg * width * 16 <= _BLOCKS_BYTES:
        blocks = circular_blocks(circulant, weight)
        value, group, freq, norm_error = _largest_block(blocks, M, real, abs_bound)
        top = blocks[group, freq]
        terms = 10.0 * math.log2(n_freq + 1)
    else:
        value, top, group, freq, norm_error = _largest_block_by_chunks(circulant, weight, real,
                                                                       abs_bound)
        terms = 4.0 * taps + 10.0
    # FFT (or the direct sum over the taps): each coefficient is a sum of taps,
    # off by (a few log2 n, or a few taps) u times the sum of their magnitudes;
    # SVD: backward stable, a few (block size) u times the block's norm.  Both
    # below (those factors) x u x |||W|||.
    size = opg + width
    margin = (terms + 10.0 * size + 10.0) * _U64 * abs_bound + norm_error
    return value, top, group, freq, margin


def _largest_block_by_chunks(circulant: ConvGeometry, weight: np.ndarray, real: bool,
                             abs_bound: float) -> tuple[float, np.ndarray, int, int, float]:
    """:func:`_largest_block` of :func:`circular_blocks`, a chunk of frequencies at a time.

    Block ``B(f) = sum_t w_t exp(-2 pi i f . m_t / M)`` over the taps ``t``
    (phase ``r_t`` and shift ``m_t`` on the polyphase grid, as
    ``circular_blocks`` places them), the angle reduced exactly in integers
    (``f . m_t mod M``).  Memory: the chunk's blocks, about
    ``_BLOCKS_CHUNK_BYTES``.
    """
    n = circulant.ndim
    g = circulant.groups
    c_out, cpg = circulant.out_channels, circulant.in_channels // g
    opg = c_out // g
    S, M = circulant.stride, circulant.output_size
    n_phase = math.prod(S)
    taps = math.prod(circulant.kernel_size)
    phase = np.zeros(taps, dtype=np.int64)
    shifts = np.zeros((taps, n), dtype=np.int64)
    for a, (k, s, d, m) in enumerate(zip(circulant.kernel_size, S, circulant.dilation, M)):
        offset = np.arange(k) * d  # no padding offset: see _circulant
        along = np.broadcast_to(
            offset.reshape([-1 if b == a else 1 for b in range(n)]),
            circulant.kernel_size).ravel()
        phase = phase * s + along % s
        shifts[:, a] = (along // s) % m
    work = np.complex128
    # T[o, c, r, t]: tap t's weights at its phase r
    placed = np.zeros((c_out, cpg, n_phase, taps), dtype=work)
    placed[:, :, phase, np.arange(taps)] = weight.reshape(c_out, cpg, taps)
    T = placed.reshape(c_out * cpg * n_phase, taps)
    keep = _one_of_each_pair(M) if real else np.ones(math.prod(M), dtype=bool)
    frequencies = np.flatnonzero(keep)
    per_freq = c_out * cpg * n_phase * 16
    chunk = max(1, _BLOCKS_CHUNK_BYTES // per_freq)
    best = (-1.0, None, 0, 0)
    error = 0.0
    M_arr = np.array(M, dtype=np.int64)
    for start in range(0, len(frequencies), chunk):
        f_flat = frequencies[start:start + chunk]
        f = np.stack(np.unravel_index(f_flat, M), axis=1)  # (nf, n)
        # exp(-2 pi i sum_a f_a m_a / M_a), each term reduced mod M_a in integers
        angle = np.zeros((len(f_flat), taps))
        for a in range(n):
            angle += ((f[:, a:a + 1] * shifts[:, a]) % M_arr[a]) / M_arr[a]
        E = np.exp(-2j * np.pi * angle)  # (nf, taps)
        blocks = (E @ T.T).reshape(len(f_flat), g, opg, cpg * n_phase)  # (nf, g, opg, width)
        squares, error = _top_squares(blocks, abs_bound)  # (nf, g)
        where = np.unravel_index(int(np.argmax(squares)), squares.shape)
        if squares[where] > best[0]:
            best = (float(squares[where]), blocks[where].copy(), int(where[1]),
                    int(f_flat[where[0]]))
    square, top, group, freq = best
    assert top is not None
    return math.sqrt(square), top, group, freq, _norm_margin(square, error)


def _merge_margin(structure: _Structure) -> float:
    """How far the stored W may be from the exact one, in norm (0 for zero padding).

    The other modes store the sum of the taps that land on one input element,
    rounded in the matrix's precision: ``|fl(sum) - sum| <= gamma_m sum |w_t|``
    with ``m`` terms, so ``||W_stored - W|| <= gamma_m || |W| ||``.
    """
    geom = structure.geometry
    if geom.padding_mode == "zeros":
        return 0.0
    m = math.prod(geom.kernel_size)
    u = float(np.finfo(structure.dtype).eps) / 2
    return m * u / (1 - m * u) * structure.abs_bound


def upper_bound(structure: _Structure, grid_index: int = 0) -> _Upper:
    """The structural upper bound ``||C_N|| ||P||`` on the ``grid_index``-th circulant grid.

    Every grid of :func:`_circulant_grids` gives a valid bound; they differ
    by a fraction of a percent on large inputs, more on small ones.
    """
    geom, weight = structure.geometry, structure.weight
    p_norm = structure.padding_norm
    circulant = _circulant(geom, _circulant_grids(geom, grid_index + 1)[grid_index])
    value, top, group, freq, margin = _blocks_bound(geom, weight, circulant,
                                                    structure.abs_bound)
    margin = margin * p_norm + _merge_margin(structure)
    return _Upper(value * p_norm, (circulant, top, group, freq), margin)


def exact_circulant(structure: _Structure) -> NormBounds | None:
    """The norm of a circulant geometry from its blocks, as a narrow interval (else None)."""
    geom, weight = structure.geometry, structure.weight
    try:
        check_circulant(geom)
    except NotImplementedError:
        return None
    value, _, _, _, margin = _blocks_bound(geom, weight, geom, structure.abs_bound)
    margin += _merge_margin(structure)
    return NormBounds(max(0.0, value - margin), value + margin)


def _selection_norm(geom: ConvGeometry) -> float:
    """``||S||`` of a one-tap layer's position map: output ``o`` reads input ``S o``.

    Per dimension, output ``o`` reads the padded coordinate ``o s - lo``: an
    input element, one the padding copies, or (zero padding) nothing.  ``S``
    has at most one 1 per row, so ``S^T S`` is the diagonal of how many
    outputs read each input element; ``S`` is the Kronecker product of its
    dimensions' maps, whose norms multiply.
    """
    norm = 1.0
    for L, O, s, (lo, _) in zip(geom.input_size, geom.output_size, geom.stride, geom.padding):
        read = np.arange(O, dtype=np.int64) * s - lo
        inside = (read >= 0) & (read < L)
        if geom.padding_mode != "zeros":
            read = np.where(inside, read, mode_map(read, L, geom.padding_mode))
        elif not inside.all():
            read = read[inside]
        if len(read) == 0:
            return 0.0
        norm *= math.sqrt(int(np.bincount(read, minlength=L).max()))
    return norm


def _active_taps(geom: ConvGeometry) -> list[np.ndarray]:
    """Per dimension, the kernel coordinates ``k`` some output reads inside the input with.

    Output ``o`` reads ``o s - lo + k d``; under zero padding a tap that
    only ever reads padding contributes nothing to W (on an input of one
    pixel, a 3x3 kernel's centre alone).  Other modes map every read inside.
    """
    return [np.flatnonzero((_frame_gram.tap_sources(L, O, s, d, lo, k, geom.padding_mode)
                            >= 0).any(axis=1))
            for L, O, k, s, d, (lo, _) in zip(geom.input_size, geom.output_size,
                                              geom.kernel_size, geom.stride, geom.dilation,
                                              geom.padding)]


def exact_single_tap(structure: _Structure) -> NormBounds | None:
    """The norm of a layer with one tap that reads the input, as a narrow interval (else None).

    A ``1x1`` kernel, or (zero padding) a kernel whose other taps only read
    padding.  W is then the Kronecker product of that tap's channel matrix
    (block diagonal over the groups) and the position map ``S`` of
    :func:`_selection_norm`: ``W[(o, p), (c, q)] = w[o, c] S[p, q]``, so
    ``||W|| = max_g ||w_g||_2 ||S||`` exactly.  The stored W holds the
    weights themselves (no taps merge); the SVD errs by a few ``(C_out +
    C_in) u ||w_g||``.
    """
    geom = structure.geometry
    active = _active_taps(geom)
    if math.prod(len(a) for a in active) != 1:
        return None
    g = geom.groups
    work = np.complex128 if np.iscomplexobj(structure.weight) else np.float64
    weight = np.asarray(structure.weight, dtype=work)
    flat_tap = int(np.ravel_multi_index(tuple(int(a[0]) for a in active), geom.kernel_size))
    tap = weight.reshape(*weight.shape[:2], -1)[:, :, flat_tap]
    blocks = tap.reshape(g, geom.out_channels // g, geom.in_channels // g)
    channel_norm = float(np.linalg.svd(blocks, compute_uv=False)[:, 0].max())
    one_tap = dataclasses.replace(
        geom, kernel_size=(1,) * geom.ndim,
        padding=tuple((lo - int(a[0]) * d, hi) for (lo, hi), a, d in zip(
            geom.padding, active, geom.dilation)))
    value = channel_norm * _selection_norm(one_tap)
    size = blocks.shape[1] + blocks.shape[2]
    margin = (10.0 * size + 10.0) * _U64 * value
    return NormBounds(max(0.0, value - margin), value + margin)


def exact_interval(structure: _Structure) -> NormBounds | None:
    """The norm where the structure gives it at once: one tap, or a circulant (else None)."""
    exact = exact_single_tap(structure)
    return exact if exact is not None else exact_circulant(structure)


def dense_interval(structure: _Structure) -> NormBounds | None:
    """The norm of a small explicit matrix from its Gram matrix's top eigenvalue, narrowly.

    ``||W||^2`` is the largest eigenvalue of the smaller of ``W^H W`` and
    ``W W^H``, which LAPACK's ``eigh`` finds alone (faster than an SVD).
    Forming the product errs by at most ``gamma_m || |W| ||^2`` (``m`` terms
    per entry), the eigensolver by a few ``n u ||G||``: both are accounted.
    """
    if structure.matrix is None:
        return None
    n_out = math.prod(structure.geometry.output_shape)
    if n_out * structure.n_in > _DENSE_SVD_ENTRIES:
        return None
    work = np.complex128 if structure.dtype.kind == "c" else np.float64
    dense = structure.matrix().toarray().astype(work)
    gram = dense.conj().T @ dense if dense.shape[1] <= dense.shape[0] else dense @ dense.conj().T
    n, m = gram.shape[0], max(dense.shape)
    top = float(scipy.linalg.eigh(gram, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])
    error = m * _U64 / (1 - m * _U64) * structure.abs_bound ** 2 + 10.0 * n * _U64 * abs(top)
    return NormBounds(math.sqrt(max(0.0, top - error)), math.sqrt(max(0.0, top + error)))


def _gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the error factor of an ``n``-term sum."""
    return n * _U64 / (1 - n * _U64)


def _smaller_gram(matrix) -> sp.csr_array:
    """``W W^H`` or ``W^H W``, whichever is smaller (the same nonzero eigenvalues)."""
    W = sp.csr_array(matrix)
    work = np.complex128 if W.dtype.kind == "c" else np.float64
    W = W.astype(work, copy=False)
    Wh = sp.csr_array(W.conj().T)
    return sp.csr_array(W @ Wh if W.shape[0] <= W.shape[1] else Wh @ W)


def product_nnz(a: sp.csr_array, b: sp.csr_array) -> int:
    """Stored entries of ``a @ b`` before cancellation, in O(rows) memory."""
    if _sparsetools.csr_matmat_maxnnz is not None:
        idx = np.int64
        return int(
            _sparsetools.csr_matmat_maxnnz(
                a.shape[0],
                b.shape[1],
                a.indptr.astype(idx),
                a.indices.astype(idx),
                b.indptr.astype(idx),
                b.indices.astype(idx),
            )
        )
    # pragma: no cover - upper bound: every multiply-add makes a new entry
    rows_b = np.diff(b.indptr).astype(np.int64)
    cols_a = np.bincount(a.indices, minlength=a.shape[1]).astype(np.int64)
    return int(min(int(cols_a @ rows_b), a.shape[0] * b.shape[1]))


def _gram_entries(structure: _Structure) -> int | None:
    """The stored entries of :func:`_smaller_gram`, without forming it; None if far too many.

    First a bound from the geometry alone (entries of W times the most a row
    or column of W can hold: ``C/groups * prod(k)`` taps, times ``||P||^2``
    copies of a padded input element); only when it is within a factor 256
    of the certificate's budget is the exact count taken from the explicit
    matrix (a pass of scipy's ``csr_matmat_maxnnz``, seconds on 10^7 entries).
    """
    geom = structure.geometry
    taps = math.prod(geom.kernel_size)
    rows, cols = math.prod(geom.output_shape), math.prod(geom.input_shape)
    if structure.transposed:
        rows, cols = cols, rows
    per_row = float((geom.in_channels // geom.groups) * taps)
    per_col = (geom.out_channels // geom.groups) * taps * structure.padding_norm ** 2
    if structure.transposed:
        per_row, per_col = per_col, per_row
    loose = geom.nnz * (per_col if rows <= cols else per_row)
    if structure.matrix is None or loose > 256 * _INERTIA_GRAM_NNZ:
        return None
    W = sp.csr_array(structure.matrix())
    Wt = sp.csr_array(W.T)
    return product_nnz(W, Wt) if W.shape[0] <= W.shape[1] else product_nnz(Wt, W)


def _nonnegative_norm(left, rights) -> float:
    """An upper bound on ``||left @ sum(c * R for c, R in rights)||_2``, all entries >= 0.

    ``||B||_2 <= sqrt(||B||_1 ||B||_inf)``, and for ``B >= 0`` the two are
    the largest column and row sums, ``1^T B`` and ``B 1``: sparse products
    with vectors, never ``B`` itself (nor the sum).  Sums of non-negative
    terms err by at most ``gamma_n`` relatively.
    """
    n = left.shape[1]
    right_rows = sum(c * (R @ np.ones(R.shape[1])) for c, R in rights)
    ones_left = np.ones(left.shape[0]) @ left
    cols = sum(c * (ones_left @ R) for c, R in rights)
    rows = left @ right_rows
    bound = math.sqrt(float(np.max(rows, initial=0.0)) * float(np.max(cols, initial=0.0)))
    return bound * (1 + 4 * _gamma(2 * n + 2))


def inertia_applies(structure: _Structure) -> bool:
    """Whether :func:`inertia_upper` is tried: an explicit matrix, a Gram matrix of at most
    ``2**23`` entries, and in three or more dimensions at most 4096 rows."""
    if structure.matrix is None:
        return False
    geom = structure.geometry
    spatial_dims = sum(1 for L in geom.input_size if L > 1)
    order = min(math.prod(geom.output_shape), math.prod(geom.input_shape))
    if spatial_dims >= 3 and order > _INERTIA_ORDER_3D:
        return False
    entries = structure.gram_entries
    return entries is not None and entries <= _INERTIA_GRAM_NNZ


def inertia_upper(structure: _Structure, t: float) -> float | None:
    """A certified upper bound just above ``sqrt(t)`` if ``||W||^2 <= t``, else None.

    Sylvester's inertia: ``t I - G`` (``G`` the smaller Gram matrix of the
    stored W) is positive semi-definite exactly when no eigenvalue of ``G``
    exceeds ``t``; :func:`psd_deficit` tests it.  Hence ``lambda_max(G) <=
    t + deficit + (rounding of G and of the shift)``.  None when the matrix
    is not explicit, the Gram matrix is too large, or the factorisation
    fails (then some eigenvalue exceeds ``t``, rounding aside).
    """
    if not inertia_applies(structure):
        return None
    G = structure.gram
    n = G.shape[0]
    deficit = psd_deficit(sp.csr_array(t * sp.identity(n, dtype=G.dtype, format="csr") - G))
    if deficit is None:
        return None
    # |fl(W W^H) - W W^H| <= gamma_m |W| |W|^H; abs_bound is for the exact W,
    # the stored one is within rounding of it.
    gram_error = _gamma(structure.most_terms) * (structure.abs_bound * (1 + 1e-6)) ** 2
    shift_error = _U64 * (t + float(np.abs(G.diagonal()).max(initial=0.0)))
    top = t + deficit + gram_error + shift_error
    return math.sqrt(top) * (1 + 2 * _U64) + 2 * _merge_margin(structure)


def psd_deficit(M: sp.csr_array) -> float | None:
    """``e >= 0`` with ``M >= -e I`` for a Hermitian ``M``, if its factorisation shows it.

    A sparse LU factorisation without pivoting (SuperLU with a symmetric
    ordering and diagonal pivots, so ``L U = P M P^T``) with positive
    pivots ``D`` gives the PSD matrix ``S = L D L^H`` and

    ``P M P^T = S + L (U - D L^H) - E``,

    with ``|E| <= gamma_n |L| |U|`` (the LU's backward error), so ``e =
    ||L (U - D L^H)|| + ||E||``, each norm bounded from non-negative
    matrices by :func:`_nonnegative_norm`: a few units of roundoff times
    ``n ||M||``.  None when the ordering was not symmetric, a pivot is not
    positive, or the fill-in does not fit in memory.
    """
    n = M.shape[0]
    # Its CSR arrays read as CSC are its transpose: the same matrix up to the
    # rounding of its entries, which the callers cover for it and its transpose alike.
    csc = sp.csc_matrix((M.data, M.indices, M.indptr), shape=M.shape)
    try:
        lu = spla.splu(csc, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                       options=dict(SymmetricMode=True))
    except (RuntimeError, MemoryError):  # singular, or the fill-in does not fit
        return None
    if not np.array_equal(lu.perm_r, lu.perm_c):  # SuperLU pivoted off the diagonal
        return None
    L, U = lu.L, sp.csr_array(lu.U)  # L is CSC: its arrays read as CSR are L^T
    pivots = U.diagonal()
    if not np.all(pivots.real > 0):
        return None
    # L^H, with arrays of its own: scipy sorts L's indices in place on use, and
    # a real array's conj() is the array itself.
    DLh = sp.csr_array((np.conj(L.data, out=np.empty_like(L.data)), L.indices.copy(),
                        L.indptr.copy()), shape=L.shape)
    DLh.data *= np.repeat(pivots.real, np.diff(DLh.indptr))  # D L^H: row i times d_i
    absL, absU, absDLh = abs(L), abs(U), abs(DLh)
    # |fl(U - D L^H) - (U - D L^H)| <= gamma_2 (|U| + |D L^H|), entrywise.
    asymmetry = [(1.0, abs(U - DLh)), (_gamma(2), absU), (_gamma(2), absDLh)]
    return (_nonnegative_norm(absL, asymmetry)
            + _gamma(2 * n) * _nonnegative_norm(absL, [(1.0, absU)]))


def banded_cholesky_error(ab: np.ndarray) -> float | None:
    """``||E||`` bounded, where ``L L^H = A + E``, for ``A`` in LAPACK's lower band storage.

    ``ab`` (``(kd + 1, n)``, Fortran order, real or complex double) is
    factorised in place by ``?pbtrf``.  If every pivot is positive,
    ``|E| <= gamma_(kd+1) |L| |L^H|`` (Higham, Thm 10.3), so ``||E|| <=
    gamma_(kd+2) ||L||_F^2`` (the sum of squares rounded up) and ``A >=
    -||E|| I``; None otherwise (A is not positive definite, rounding aside).
    """
    pbtrf = lapack.zpbtrf if np.iscomplexobj(ab) else lapack.dpbtrf
    factor, info = pbtrf(ab, lower=1, overwrite_ab=1)
    if info != 0:
        return None
    values = factor.reshape(-1, order="F")
    squares = float(np.vdot(values, values).real) * (1 + _gamma(values.size))
    return _gamma(ab.shape[0] + 1) * squares


# The border certificate factorises when its tiled band costs at most this many
# operations per try (about 80 s at the machine's rate on 2 cores: a 64-channel
# layer at 512x512 takes 2.6e12, a 16-channel volume at 16^3 4.4e12), and
# factorises the whole t I - G, not the frame, where that costs at most
# _BORDER_CHEAP (a fraction of a second).
_BORDER_OPERATIONS = 6e12
_BORDER_CHEAP = 3e10
# The wide frame is at least this deep: the top singular vectors of reflect
# and replicate layers decay into the interior, and the rest's bound (see
# border_upper) only costs what is left of them at the frame's inner edge: a
# 32->32 reflect layer at 32x32 is certified to 2.75% at depth 2, 0.05% at
# depth 4 (and no better at 6 or 8, at twice and four times the cost).
_FRAME_DEPTH = 4


def border_frame(geom: ConvGeometry, wide: bool) -> np.ndarray:
    """The input elements near the borders that reflect or replicate padding copies.

    A boolean mask over the input (channel-major): along each padded
    dimension the coordinates the padding copies (``wide=False``), or every
    coordinate from the border to the deepest of them and at least
    ``_FRAME_DEPTH`` (4) and the kernel's extent plus one deep
    (``wide=True``: a tighter certificate, at about twice the frame).  An
    element outside the frame is read only by the taps that read it under
    zero padding, so W's columns there are zero padding's.
    """
    inside = np.zeros(tuple(geom.input_size), dtype=bool)
    for d, (L, (lo, hi)) in enumerate(zip(geom.input_size, geom.padding)):
        copied: list[int] = np.unique(_padding_sources(L, lo, hi, geom.padding_mode)).tolist()
        near = np.zeros(L, dtype=bool)
        near[copied] = True
        if wide:
            # wider kernels reach further in: a 5x5 reflect layer needs 6
            depth = max(_FRAME_DEPTH, (geom.kernel_size[d] - 1) * geom.dilation[d] + 2)
            low = [c for c in copied if 2 * c < L]
            high = [c for c in copied if 2 * c >= L]
            if low:
                near[: max(depth, max(low) + 1)] = True
            if high:
                near[max(0, min(L - depth, min(high))):] = True
        inside |= near.reshape([-1 if e == d else 1 for e in range(geom.ndim)])
    return np.broadcast_to(inside, (geom.in_channels, *geom.input_size)).ravel()


class _ShiftedGram:
    """``A(t)``: ``t I - G`` on chosen positions of W's input, and ``rest I`` beside the frame.

    ``keep`` holds the frame F and the positions N that share an output
    with it (``in_frame`` tells them apart, in ``np.argwhere(keep)``
    order); blocks couple F with F and with N, N's diagonal blocks are
    ``rest I`` and N's other pairs are not formed.  With F every position
    (N empty) this is ``t I - G`` itself, for any padding mode.
    """

    def __init__(self, keep: np.ndarray, in_frame: np.ndarray,
                 counts: list[_frame_gram.AxisCounts], products: list[np.ndarray]):
        """``products``: each group's :func:`~._frame_gram.tap_products`."""
        self.channels = math.isqrt(products[0].shape[1])
        self.groups, self.in_frame, self.counts, self.products = (
            len(products), in_frame, counts, products)
        self.band = _frame_gram.position_band(
            keep, lambda i, j: in_frame[i] | in_frame[j], tuple(a.reach for a in counts),
            self.channels)

    @property
    def operations(self) -> float:
        """The factorisation's operations and the blocks' assembly (a GEMM of the
        pairs' tap-pair coefficients against the taps' products), all groups."""
        taps = self.products[0].shape[0]  # pairs of taps
        assembly = _assembly_operations(len(self.band.pairs[0]), taps, self.channels)
        return (self.band.operations + assembly) * self.groups

    def deficit(self, t: float, rest: float) -> float | None:
        """A bound on ``-lambda_min(A(t))`` of the computed matrix (Cholesky's backward
        error), or None if a pivot is not positive; the worst group's."""
        band, C = self.band, self.channels
        m, K = band.per_tile, band.K
        work = self.products[0].dtype
        positions_at = np.full(band.n_tiles * m, -1, dtype=np.int64)
        positions_at[band.rank] = np.arange(len(band.rank))
        diagonal = np.repeat(np.arange(m), C), np.tile(np.arange(C), m)
        # a pair's block, and its tap pairs' coefficients (integers, then as floats)
        per_pair = C * C * work.itemsize + 16 * self.products[0].shape[0]
        chunk = max(1, _frame_gram._CHUNK_BYTES // per_pair)
        first, second = band.pairs
        worst = 0.0
        for products in self.products:

            def fill(J: int, row: np.ndarray, products=products) -> None:
                view = row.reshape(K + 1, m, C, m, C)
                stop = band.starts[J + 1]
                for start in range(band.starts[J], stop, chunk):
                    part = slice(start, min(start + chunk, stop))
                    i, j = first[part], second[part]
                    blocks = _frame_gram.gram_blocks(self.counts, products, band.positions[i],
                                                     band.positions[j])
                    ri, rj = band.rank[i], band.rank[j]
                    view[ri // m - J, ri % m, :, rj % m, :] = -blocks
                at = positions_at[J * m:(J + 1) * m]
                # the last tile's empty slots: t, which adds t per row to ||L||_F^2
                # as every row does (1.0 would not scale with the weights)
                shift = np.where(at < 0, t, np.where(self.in_frame[at], t, rest))
                view[0, diagonal[0], diagonal[1], diagonal[0], diagonal[1]] += np.repeat(shift, C)

            factorised = _frame_gram.streamed_cholesky(band.below, band.tile, work, fill,
                                                       scale=t)
            if factorised is None:
                return None
            squares, flushed = factorised
            entries = band.n_tiles * (K + 1) * band.tile ** 2
            # gamma_(m+2): LAPACK and BLAS multiply by reciprocals where Higham's
            # Theorem 10.3 divides
            worst = max(worst, _gamma(band.terms + 2) * squares * (1 + _gamma(entries))
                        + flushed)
        return worst


def _assembly_operations(pairs: float, tap_pairs: int, channels: int) -> float:
    """The blocks' assembly in GEMM-operation equivalents: each pair's tap-pair
    coefficients are built elementwise (memory-bound: counted 40 each; an 11x11
    single-channel blur at 48x48 spent 15 s there), then one GEMM row each."""
    return pairs * tap_pairs * (40.0 + 2.0 * channels ** 2)


def _natural_band_operations(geom: ConvGeometry, reach: tuple[int, ...]) -> float:
    """``n kd^2`` of ``t I - G`` in row-major order: the whole band's cost, roughly, before
    its order is looked for (reverse Cuthill-McKee does better on long thin inputs only)."""
    cpg = geom.in_channels // geom.groups
    kd, stride = 0, 1
    for L, r in zip(reversed(geom.input_size), reversed(reach)):
        kd += min(L - 1, r) * stride
        stride *= L
    return float(math.prod(geom.input_size) * cpg) * ((kd + 1) * cpg) ** 2 * geom.groups


def border_is_cheap(structure: _Structure) -> bool:
    """Whether :func:`border_upper` would factorise the whole ``t I - G`` within
    ``_BORDER_CHEAP`` operations (by its row-major estimate): a fraction of a second,
    where the inertia certificate's SuperLU takes seconds (128 channels at 4x4)."""
    geom = structure.geometry
    if geom.padding_mode not in ("reflect", "replicate"):
        return False
    reach = tuple(min(L - 1, (k - 1) * d)
                  for L, k, d in zip(geom.input_size, geom.kernel_size, geom.dilation))
    pairs = math.prod(geom.input_size) * math.prod(2 * r + 1 for r in reach) / 2
    cpg = geom.in_channels // geom.groups
    assembly = _assembly_operations(pairs, math.prod(geom.kernel_size) ** 2, cpg) * geom.groups
    return _natural_band_operations(geom, reach) + assembly <= _BORDER_CHEAP


def border_upper(structure: _Structure, lower: float, widenings, refine_above: float = 0.0,
                 embedding: _Upper | None = None) -> float | None:
    """A certified upper bound from a banded Cholesky factorisation of ``t I - W^H W``
    on the frame of :func:`border_frame`, or on every position where that is cheap.

    Split W's columns into the frame F, the rest's positions N that share an
    output with the frame, and the rest D.  The rest's columns are zero
    padding's, so ``G_RR = W_R^H W_R <= u^2 I`` for ``R = N + D``, with ``u``
    the structural bound of the zero-padded convolution
    (:func:`upper_bound`), and ``G_FD = 0``.  Hence for ``t > u^2``

    ``t I - G >= A(t) = [[t I - G_FF, -G_FN], [-G_NF, (t - u^2) I]]``

    (and ``(t - u^2) I`` on D), so ``||W||^2 <= t`` once ``A(t)``, a band
    around the border, is positive semi-definite: by Schur's complement on
    its diagonal N block this is the frame's ``t I - G_FF - G_FN G_NF / (t -
    u^2)``.  The rest's bound is loose where W's top singular vectors reach
    deep into the input (small grids), so where the whole ``t I - G`` costs
    at most ``_BORDER_CHEAP`` operations F is every position instead (no rest,
    no ``u``), and where the frame is refused at ``rtol`` the whole is tried up
    to ``_BORDER_OPERATIONS``.

    ``A(t)`` is assembled from the taps' channel blocks (:mod:`._frame_gram`,
    no CSR of W) and factorised by a streamed tiled Cholesky: if it
    completes, ``A(t) >= -||E|| I`` with ``||E|| <= gamma_(m+2) ||L||_F^2``
    (Higham, Thm 10.3, with LAPACK's reciprocals), which is added to ``t`` with the roundings of the
    Gram blocks and the shift.  Tried at ``t = (max(lower, u) (1 + c))^2``
    for each ``c`` in ``widenings`` until one holds, then twice halfway back
    towards the last that did not where ``c > refine_above``: the tightest
    that holds is returned.  None for the other padding modes, or when every
    factorisation within ``_BORDER_OPERATIONS`` is refused.

    ``embedding``, the layer's own bound :func:`upper_bound` (grid 0), saves
    forming ``u``: its circulant ``C_N`` on the padded grid also embeds the
    zero-padded layer without aliasing, so ``u = ||C_N||`` is its bound
    divided by ``||P||``.
    """
    geom = structure.geometry
    if geom.padding_mode not in ("reflect", "replicate"):
        return None
    frame = border_frame(geom, wide=True).reshape(geom.in_channels, *geom.input_size)[0]
    counts = _frame_gram.axis_counts(geom)
    reach = tuple(axis.reach for axis in counts)
    g = geom.groups
    opg, cpg, taps = geom.out_channels // g, geom.in_channels // g, math.prod(geom.kernel_size)
    weight = np.asarray(structure.weight).reshape(g, opg, cpg, taps)
    products = [_frame_gram.tap_products(np.moveaxis(weight[group], 2, 0)) for group in range(g)]
    complex_factor = 2 if products[0].dtype.kind == "c" else 1
    # an entry: opg terms per pair of taps, then taps^2 pairs with integer weights,
    # each at most the same entry of |W|^H |W|
    gram_error = _gamma(complex_factor * (opg + taps * taps + 2))
    whole = None
    if _natural_band_operations(geom, reach) <= 10 * _BORDER_OPERATIONS:
        everywhere = np.ones(geom.input_size, dtype=bool)
        whole = _ShiftedGram(everywhere, everywhere.ravel(), counts, products)
    systems = []
    if (whole is None or whole.operations > _BORDER_CHEAP) and frame.any() and not frame.all():
        # the frame and the positions within reach of it along every dimension
        keep = ndimage.binary_dilation(frame, structure=np.ones([2 * r + 1 for r in reach], bool))
        framed = _ShiftedGram(keep, frame[keep], counts, products)
        if framed.operations <= _BORDER_OPERATIONS:
            systems.append(framed)
    if whole is not None and whole.operations <= _BORDER_OPERATIONS:
        systems.append(whole)
    if not systems:
        return None
    if embedding is None:
        embedding = upper_bound(structure, 0)
    # value = ||C_N|| ||P||, margin = its rounding times ||P|| plus the merge margin
    u = (embedding.value + embedding.margin) / structure.padding_norm * (1 + 4 * _U64)
    u2 = u * u * (1 + 4 * _U64)  # >= u^2
    abs_sq = (structure.abs_bound * (1 + 1e-6)) ** 2

    def certified(system: _ShiftedGram, c: float) -> float | None:
        has_rest = not system.in_frame.all()
        t = (max(lower, u if has_rest else 0.0) * (1 + c)) ** 2
        rest = (t - u2) * (1 - 4 * _U64)  # <= t - u^2
        if has_rest and not rest > 0:  # the rest's bound must stay below the shift
            return None
        deficit = system.deficit(t, rest)
        if deficit is None:
            return None
        storage_error = 2 * _U64 * (t + abs_sq)
        top = (t + deficit + gram_error * abs_sq + storage_error) * (1 + 8 * _U64)
        return math.sqrt(top) * (1 + 2 * _U64) + _merge_margin(structure)

    for number, system in enumerate(systems):
        last = number == len(systems) - 1
        # a system that is not the last gets the widenings up to rtol (refine_above)
        tries = [c for c in widenings if last or c <= refine_above]
        failed = 0.0
        for c in tries:
            best = certified(system, c)
            if best is None:
                failed = c
                continue
            # two halvings of the step between the last refused widening and this one,
            # where it is wider than refine_above (each costs a factorisation)
            for _ in range(2 if c > refine_above else 0):
                middle = (failed + c) / 2
                tighter = certified(system, middle)
                if tighter is None:
                    failed = middle
                else:
                    best, c = tighter, middle
            return best
    return None


# ---------------------------------------------------------------------------
# Lower bounds
# ---------------------------------------------------------------------------


def start_vector(structure: _Structure, upper: _Upper) -> np.ndarray:
    """The circulant's top singular vector, restricted to the operator's input.

    A plane wave at the top block's frequency times that block's top right
    singular vector: on the circulant it attains ``||C_N||``; cut to the
    input it loses only what the borders lose.  With groups, the other
    groups' channels hold a seeded random vector of the same norm.
    """
    circulant, block, group, freq = upper.top
    geom = structure.geometry
    _, _, vh = np.linalg.svd(block)
    u = vh[0].conj()  # (channels of the group x polyphase components)
    M = circulant.output_size
    f = np.unravel_index(freq, M)
    g = geom.groups
    cpg = geom.in_channels // g
    S = geom.stride
    # x_{c,r}[m] = u[c, r] exp(-2 pi i f m / M): numpy's fftn gives B(-f).
    waves = np.ones((), dtype=np.complex128)
    for a, m in enumerate(M):
        waves = np.multiply.outer(waves, np.exp(-2j * np.pi * f[a] * np.arange(m) / m))
    phases = u.reshape(cpg, *S)  # (c, r_1..r_N)
    # x[c, m_1 s_1 + r_1, ...] on the grid: interleave (m_d, r_d) per dimension.
    n = geom.ndim
    full = np.multiply.outer(phases, waves)  # (c, r_1..r_N, m_1..m_N)
    order = [0] + [x for d in range(n) for x in (1 + n + d, 1 + d)]
    grid = full.transpose(order).reshape(cpg, *circulant.input_size)
    wave = np.zeros((geom.in_channels, *geom.input_size), dtype=np.complex128)
    # The input sits at positions lo, lo + 1, ... of the grid (mod N with zero padding).
    window = np.ix_(*[(lo + np.arange(L)) % n for (lo, _), L, n in
                      zip(geom.padding, geom.input_size, circulant.input_size)])
    wave[group * cpg:(group + 1) * cpg] = grid[(slice(None), *window)]
    if g > 1:
        # W^H W is block diagonal over the groups: a Krylov space started in one
        # group never leaves it, and with reflect or replicate padding another
        # group's border can hold the norm (a 4-group layer's Lanczos bound
        # stalled 6% low).  The other groups get a seeded random start of the
        # same size.
        others = np.ones(geom.in_channels, dtype=bool)
        others[group * cpg:(group + 1) * cpg] = False
        noise = np.random.default_rng(0).standard_normal((int(others.sum()), *geom.input_size))
        own = float(np.linalg.norm(wave[group * cpg:(group + 1) * cpg]))
        wave[others] = noise * (own / max(float(np.linalg.norm(noise)), 1e-300))
    x: np.ndarray = wave.ravel() if structure.dtype.kind == "c" else wave.real.ravel()
    if not np.any(x):  # a degenerate phase: any vector will do
        x = np.random.default_rng(0).standard_normal(x.shape)
    if structure.transposed:  # the operator's input is W's output: start from W x
        x = structure.rmatvec(x)
    return x


def _rayleigh_lower(structure: _Structure, v: np.ndarray) -> float:
    """``||A v|| / ||v||`` with A the operator, minus its rounding: a rigorous lower bound.

    Computed with a double-precision vector: a single-precision operator then
    multiplies in double precision (scipy widens), so the error is
    ``gamma_m || |A| || ||v||`` with ``m`` the entries of a row.
    """
    work = np.complex128 if structure.dtype.kind == "c" else np.float64
    v = v.astype(work, copy=False)
    norm_v = float(np.linalg.norm(v))
    if norm_v == 0.0:
        return 0.0
    value = float(np.linalg.norm(structure.matvec(v))) / norm_v
    geom = structure.geometry
    m = (max(geom.in_channels, geom.out_channels) // geom.groups) * math.prod(geom.kernel_size)
    # The product's error, and the two norms' and the division's (a few ulps each);
    # the products may run on the taps unmerged (the structured form), so the
    # stored matrix's merged entries may be off by their rounding (_merge_margin).
    return max(0.0, value * (1 - 1e-12) - 2 * m * _U64 * structure.abs_bound
               - _merge_margin(structure))


def lower_bound(structure: _Structure, start: np.ndarray, target: float,
                maxiter: int) -> tuple[float, int, np.ndarray]:
    """Lanczos on ``A^H A`` from ``start`` until the lower bound reaches ``target``.

    Restarted every few steps from the best Ritz vector; returns the best
    rigorous lower bound seen (see :func:`_rayleigh_lower`), the number of
    products with ``A^H A`` spent and the last vector (to go on from).
    """
    # The iterations run in the operator's own precision (its fast products);
    # only the bounds are evaluated in double precision.
    work = structure.dtype if structure.dtype.kind in "fc" else np.dtype(np.float64)
    v = start.astype(work)
    if not np.any(v):  # (W x = 0 for the transpose's start): any vector will do
        v = np.random.default_rng(0).standard_normal(v.shape).astype(work)
    best = _rayleigh_lower(structure, v)
    spent = 0
    most_steps = max(2, min(_LANCZOS_STEPS, _LANCZOS_BYTES // max(1, v.nbytes)))
    while spent < maxiter and best < target:
        steps = min(most_steps, maxiter - spent)
        v, used = _lanczos_cycle(structure, v, steps, work, target)
        spent += used
        if not np.all(np.isfinite(v)) or not np.any(v):  # A^H A v = 0: nothing to refine
            break
        value = _rayleigh_lower(structure, v)
        # Less than 1% of the way to the target in a whole cycle: the rest of
        # the gap is the upper bound's, which more products cannot close.
        stalled = value - best < 0.01 * (target - best)
        best = max(best, value)
        if stalled:
            break
    return best, spent, v


def _lanczos_cycle(structure: _Structure, v0: np.ndarray, steps: int, work,
                   target: float) -> tuple:
    """At most ``steps`` Lanczos steps on ``A^H A`` (full reorthogonalisation).

    Stops early once the top Ritz value (the Rayleigh quotient of the Ritz
    vector, ``||A v||^2`` in exact arithmetic) passes ``target^2`` with room
    to spare for the rigorous evaluation.  Returns the top Ritz vector and
    the number of products with ``A^H A``.
    """
    basis = np.empty((steps, len(v0)), dtype=work)  # one row per Lanczos vector
    basis[0] = v0 / np.linalg.norm(v0)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = structure.rmatvec(structure.matvec(basis[j])).astype(work, copy=False)
        alphas.append(float(np.vdot(basis[j], w).real))
        done = basis[: j + 1]
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthonormal
            w = w - done.T @ (done.conj() @ w)
        beta = float(np.linalg.norm(w))
        # (an invariant subspace: A^H A v lies in the basis, or A v = 0)
        if j == steps - 1 or beta <= 1e-14 * max(abs(alphas[-1]), 1e-300):
            break
        if _top_ritz_value(alphas, betas) >= (target * (1 + 1e-6)) ** 2:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    _, vectors = np.linalg.eigh(T)
    return vectors[:, -1].astype(work) @ basis[:k], k


def _top_ritz_value(alphas: list[float], betas: list[float]) -> float:
    """The largest eigenvalue of the Lanczos tridiagonal matrix built so far."""
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    return float(np.linalg.eigvalsh(T)[-1])
