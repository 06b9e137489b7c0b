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

Other padding modes fold the taps outside onto positions of other lines:
the edge (replicate), the rows inside it (reflect), the opposite side
(circular).  Those positions, the *ring*, are eliminated last.  Every
other position's column of W is its zero-padding column, so the inner
block ``A_II`` of ``A = W^H W + damp^2 I`` is the banded matrix above with
the ring left out; its factor ``L`` gives ``C = L^{-1} A_IR`` (each line
meets the ring near its two ends: one banded solve with a few columns per
line) and the Schur complement ``S = A_RR - C^H C``, sparse, whose lines
join the ring's pieces at their two ends: in reverse Cuthill-McKee order
a band, factored by banded Cholesky.  Then

``x_R = S^{-1} (b_R - C^H L^{-1} b_I)``, ``x_I = L^{-H} (L^{-1} b_I - C x_R)``

is the exact solve in every padding mode (the anti-diagonal at 256x256:
a ring of 1,018 positions with replicate padding, 3,024 with reflect).
Measured as a preconditioner, the zero-padding model alone had lost to
plain CG 5-10x on those (over 1,000 iterations against plain CG's 300).

A depthwise layer (one channel in and out per group) is one such problem per
channel; channels with the same kernel share the factorisation.

With ``L='gradient'`` the model adds the part of ``damp^2 D^H D`` within
each line: its diagonal, and the differences along the line where the line
runs along an axis (on the ring, the diagonal alone).  It is then not the
inverse, but the systems measured took 3 iterations.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse as sp
import scipy.sparse.csgraph
from scipy.sparse.linalg import LinearOperator

from .._geometry import ConvGeometry
from .._preconditioners import _FLOOR, channel_kernels
from ..direct import _padded_index
from .base import Construction, Operator, Pieces
from .gradient import gradient_diagonal

__all__ = ["BandedLinesPreconditioner", "Lines", "kernel_line"]

# 'auto' takes it up to this bandwidth (the span of the taps along the line, in steps):
# the factorisation costs n b^2, each application 4 n b flops.
_AUTO_BANDWIDTH = 64
# ... and where the ring's columns C = L^{-1} A_IR (n rows, a few columns per line) take
# at most this many bytes; the construction refuses twice as many.
_RING_BYTES = 1 << 29


class Lines(Construction):
    """Line-by-line banded Cholesky, the folded taps' ring last: exact for kernels on a
    line, one channel in and out per group, stride 1, in every padding mode."""

    name: ClassVar[str] = "lines"
    regularisers: ClassVar[tuple[str, ...]] = ("identity", "gradient")

    @classmethod
    def exact(cls, op: Operator) -> bool:
        """Wherever it applies (every padding mode)."""
        return _applicable(op) is not None

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Where it applies, every band is at most 64 steps wide, and the ring's columns
        (:func:`_ring_columns_estimate`) take at most 512 MB."""
        applicable = _applicable(op)
        if applicable is None:
            return False
        geom, lines = applicable
        return (max(line.bandwidth for line in lines) <= _AUTO_BANDWIDTH
                and sum(_ring_columns_estimate(geom, line) for line in lines) <= _RING_BYTES)

    @classmethod
    def set_up_cost(cls, op: Operator) -> float:
        """``2 + 2 (b + 1)^2 / t``, and ``15 w (b + 1) / t`` more for a ring (``t`` nonzero
        taps, ``w`` the widest padding; the largest over the channels), times ``(n /
        65536)^0.6`` above 65,536 positions per channel.

        Measured on the 7x7 anti-diagonal (``b + 1 = t = 7``, ``w = 3``): at 256x256
        about 12 products with zero padding, 42 with replicate and 56 with reflect; at
        512x512 with reflect 90-105, at 1024x1024 with zero padding 20-80.  The set-up
        writes fresh arrays of the image's size (the band, the order, the ring's
        columns), slow to touch on these machines, where the products reuse theirs.
        """
        applicable = _applicable(op)
        if applicable is None:
            return math.inf
        geom, lines = applicable
        size = max(1.0, math.prod(geom.input_size) / 65536) ** 0.6
        costs = []
        for line in lines:
            span, taps = line.bandwidth + 1, len(line.steps)
            cost = 2.0 + 2.0 * span * span / taps
            if not _folds_nothing(geom):
                cost += 15.0 * max(max(pair) for pair in geom.padding) * span / taps
            costs.append(cost)
        return size * max(costs)

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
        applicable = _applicable(op)
        if applicable is None:
            raise NotImplementedError(
                "kind='lines' needs a convolution (not transposed) with one input and one "
                "output channel per group (one channel, or a depthwise layer), stride 1, "
                "and kernels whose nonzero taps lie on one line; got "
                f"weight.shape={op.weight.shape}, groups={op.convolution.geometry.groups}, "
                f"stride={op.convolution.geometry.stride}"
            )
        geom, lines = applicable
        nbytes = sum(_ring_columns_estimate(geom, line) for line in lines)
        if nbytes > 2 * _RING_BYTES:
            raise NotImplementedError(
                f"kind='lines' would hold up to {nbytes} bytes of the folded taps' columns for "
                f"the input size {geom.input_size} with padding {geom.padding} "
                f"({geom.padding_mode!r}), more than {2 * _RING_BYTES}"
            )
        return BandedLinesPreconditioner(geom, lines, damp, boost, regulariser, cls.name,
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


def _applicable(op) -> tuple[ConvGeometry, list[KernelLine]] | None:
    """``(geometry, each channel's kernel line)`` where the construction applies to the
    operator, else None: a convolution of stride 1, one channel in and out per group,
    kernels on lines."""
    geom: ConvGeometry = op.convolution.geometry
    if op.convolution.transposed or any(s != 1 for s in geom.stride):
        return None
    lines = _channel_lines(op)
    return None if lines is None else (geom, lines)


def _channel_lines(op) -> list[KernelLine] | None:
    """Each channel's kernel line, where every group maps one channel to one and every
    kernel's taps lie on a line; else None."""
    kernels = channel_kernels(op)
    if kernels is None:
        return None
    lines = []
    for kernel in kernels:
        line = kernel_line(kernel)
        if line is None:
            return None
        lines.append(line)
    return lines


def _ring_columns_estimate(geom: ConvGeometry, line: KernelLine) -> int:
    """About the bytes of the ring's columns: ``16 n`` per packed column, a line meeting
    some ``2 (b + 1) w`` positions of the ring at its ends (``w`` the widest padding;
    none for zero padding)."""
    if _folds_nothing(geom):
        return 0
    width = max(max(pair) for pair in geom.padding)
    return 16 * math.prod(geom.input_size) * (2 * (line.bandwidth + 1) * width)


def _folds_nothing(geom: ConvGeometry) -> bool:
    """Whether the padding drops the taps outside the input (zeros, or no padding)."""
    return geom.padding_mode == "zeros" or not any(lo or hi for lo, hi in geom.padding)


class BandedLinesPreconditioner(LinearOperator):
    """``(W^H W + damp^2 I)^{-1}`` line by line, channel by channel (:class:`_LineSolver`).

    A depthwise layer's channels are independent; channels with the same kernel share
    one solver.  Vectors are solved in double precision; a complex vector on real
    factors as its real and imaginary parts.
    """

    def __init__(self, geom, lines, damp, boost, regulariser, kind, dtype):
        # (unannotated: scipy-stubs give LinearOperator no __init__ to check against)
        shared = {}  # (channels with the same kernel share a solver)
        self._solvers = []
        for line in lines:
            key = b"".join(a.tobytes() for a in (line.direction, line.taps, line.values))
            if key not in shared:
                shared[key] = _LineSolver(geom, line, damp, boost, regulariser)
            self._solvers.append(shared[key])
        self._complex = any(s.complex for s in shared.values())
        self.kind, self.damp = kind, damp
        n = len(lines) * math.prod(geom.input_size)
        super().__init__(dtype=dtype, shape=(n, n))

    def _solve(self, X: np.ndarray) -> np.ndarray:
        X = X.astype(np.result_type(X.dtype, np.float64), copy=False)
        if np.iscomplexobj(X) and not self._complex:
            return self._solve(X.real) + 1j * self._solve(X.imag)
        channels = X.reshape(len(self._solvers), -1, *X.shape[1:])
        return np.concatenate([solver.solve(x) for solver, x in zip(self._solvers, channels)])

    def _matvec(self, x):
        return self._solve(np.asarray(x).reshape(-1))

    def _matmat(self, X):
        return self._solve(np.asarray(X))

    def _adjoint(self):
        return self  # Hermitian


class _LineSolver:
    """One channel's ``(W^H W + damp^2 I)^{-1}``: a banded Cholesky factor, and for padding
    that folds taps, the Schur complement of the positions they land on.

    The unknowns the padding folds no tap onto (all, with zero padding) are
    permuted line by line (:func:`_line_order`); the factor is that of their
    permuted matrix in LAPACK's lower band storage.  The others, the *ring*
    (the edge for replicate padding, the rows inside it for reflect, the
    opposite side for circular), are eliminated last (:func:`_ring_pieces`).
    """

    def __init__(self, geom: ConvGeometry, line: KernelLine, damp: float, boost: float,
                 regulariser: str):
        step = np.asarray(geom.dilation) * line.direction
        order, line_id, back = _line_order(geom.input_size, step)
        bands = _gram_bands(geom, line)
        shift = boost * _largest_eigenvalue_bound(bands)
        if regulariser == "gradient":
            _add_gradient_part(bands, geom.input_size, step, damp)
        else:
            shift += damp * damp
        # (the folded taps' columns, once: the ring, then the rows of W that read it)
        taps = [] if _folds_nothing(geom) else list(_tap_columns(geom, line))
        ring = _ring(geom, taps)
        inner = ~ring[order]
        self._inner, line_id, back = order[inner], line_id[inner], back[inner]
        self._factor = _factor(_band_storage(bands, self._inner, line_id, back), shift)
        self._ring = np.flatnonzero(ring)
        self._coupling: sp.csr_matrix | None = None
        self._schur: tuple[np.ndarray, np.ndarray] | None = None
        if self._ring.size:
            extra = shift + (damp * damp * gradient_diagonal(1, geom.input_size).reshape(-1)[
                self._ring] if regulariser == "gradient" else 0.0)
            rows = _ring_rows(geom, line, taps, ring)
            self._coupling, self._schur = _ring_pieces(rows, self._factor, self._inner,
                                                       line_id, self._ring, extra)
        self.complex = bool(np.iscomplexobj(self._factor))

    def solve(self, X: np.ndarray) -> np.ndarray:
        """The solution for ``X`` (positions, or positions x columns)."""
        out = np.empty(X.shape, dtype=np.result_type(X.dtype, self._factor.dtype))
        y = _triangular(self._factor, X[self._inner], "N")
        if self._schur is not None and self._coupling is not None:
            C = self._coupling  # L^{-1} A_IR: the ring's part of the forward sweep
            rhs = X[self._ring] - C.conj().T @ y
            order, factor = self._schur
            x_ring = np.empty_like(rhs)
            x_ring[order] = scipy.linalg.cho_solve_banded((factor, True), rhs[order],
                                                          check_finite=False)
            out[self._ring] = x_ring
            y = y - C @ x_ring
        out[self._inner] = _triangular(self._factor, y, "C")
        return out


def _triangular(factor: np.ndarray, b: np.ndarray, trans: str) -> np.ndarray:
    """``L^{-1} b`` (``trans='N'``) or ``L^{-H} b`` (``'C'``), ``L`` in lower band storage."""
    if b.shape[0] == 0:  # (every position in the ring)
        return b.astype(np.result_type(factor, b))
    column = b.reshape(b.shape[0], -1)
    complex_ = np.iscomplexobj(factor) or np.iscomplexobj(column)
    tbtrs = scipy.linalg.lapack.ztbtrs if complex_ else scipy.linalg.lapack.dtbtrs
    x, info = tbtrs(factor, column, uplo="L", trans=trans)
    if info != 0:  # (a Cholesky factor has no zero on its diagonal)
        raise np.linalg.LinAlgError(f"banded triangular solve failed: info={info}")
    return x.reshape(b.shape)


def _line_order(size: tuple[int, ...],
                step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, line, back)``: the grid's positions line by line, each line along
    ``step``; the line of each position in that order (the flat index of the line's first
    position), and how many steps from the line's first position it is.

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
    return order, first[order], back[order]


def _gram_bands(geom: ConvGeometry, line: KernelLine) -> np.ndarray:
    """``G[k, p]``: the entry of ``W^H W`` between input ``p`` and ``p + k u`` (flat ``p``).

    ``sum_j conj(w_j) w_{j+k}`` over the taps ``j`` whose output ``p + lo -
    d t_j`` lies in the output (zero padding drops the others).  A tap's 0/1
    mask is the outer product of one mask per axis, so the sum is a
    contraction of the tap products with the axes' masks (no ``taps x n``
    array: fresh memory is slow to touch, 2 of 2.1 s of the set-up at
    1024x1024 went to such arrays).
    """
    b = line.bandwidth
    at = {int(j): w for j, w in zip(line.steps, line.values)}
    pairs = np.zeros((b + 1, len(line.steps)), dtype=np.result_type(line.values, np.float64))
    for i, (j, w) in enumerate(zip(line.steps.tolist(), line.values)):
        for k in range(b + 1 - j):
            if j + k in at:
                pairs[k, i] = np.conj(w) * at[j + k]
    masks = []  # per axis (taps, L_a): whether the tap's output along the axis exists
    for axis, (n, (lo, _), d, o) in enumerate(zip(geom.input_size, geom.padding,
                                                  geom.dilation, geom.output_size)):
        first = np.arange(n)[None, :] + lo - d * line.taps[:, axis:axis + 1]
        masks.append(((first >= 0) & (first < o)).astype(np.float64))
    axes = "abcdefghi"[:len(masks)]
    spec = "kj," + ",".join("j" + a for a in axes) + "->k" + axes
    return np.einsum(spec, pairs, *masks, optimize=True).reshape(b + 1, -1)


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


def _band_storage(bands: np.ndarray, order: np.ndarray, line: np.ndarray,
                  back: np.ndarray) -> np.ndarray:
    """LAPACK's lower band storage of the permuted matrix: ``ab[k, i] = A[i + k, i]``.

    Positions ``i`` and ``i + k`` of ``order`` on the same line, ``m =
    back[i + k] - back[i]`` steps apart (``k``, unless positions of the ring
    were left out between them): ``A[q, p] = conj(G[m, p])``; zero across the
    end of a line, and beyond the band.
    """
    n = order.size
    ab = np.zeros((len(bands), n), dtype=bands.dtype)
    flat = bands.reshape(len(bands), -1)
    for k in range(min(len(bands), n)):  # (a band wider than the grid: the rest is zero)
        apart = back[k:] - back[:n - k]
        same = (line[:n - k] == line[k:]) & (apart < len(bands))
        values = flat[np.where(same, apart, 0), order[:n - k]]
        ab[k, :n - k] = np.where(same, np.conj(values), 0)
    ab[0] = ab[0].real
    return ab


def _ring(geom: ConvGeometry, taps) -> np.ndarray:
    """Whether the padding folds a tap onto each input position (flat), from
    :func:`_tap_columns` (none for zero padding, whose taps are not listed)."""
    ring = np.zeros(math.prod(geom.input_size), dtype=bool)
    for columns, inside in taps:
        ring[columns[~inside]] = True
    return ring


def _tap_columns(geom: ConvGeometry, line: KernelLine):
    """Per nonzero tap: the input position (flat) each output reads through it, after the
    padding map, and whether that is inside the input (not padding)."""
    maps = [_padded_index(n, lo, hi, geom.padding_mode) for n, (lo, hi)
            in zip(geom.input_size, geom.padding)]
    for tap in line.taps.tolist():
        frame = [np.arange(o) + d * t for o, d, t in zip(geom.output_size, geom.dilation, tap)]
        inside = np.ones((), dtype=bool)
        for f, n, (lo, _) in zip(frame, geom.input_size, geom.padding):
            inside = np.logical_and.outer(inside, (f >= lo) & (f < lo + n))
        index = np.ix_(*(m[f] for m, f in zip(maps, frame)))
        yield np.ravel_multi_index(index, geom.input_size).reshape(-1), inside.reshape(-1)


def _ring_rows(geom: ConvGeometry, line: KernelLine, taps, ring: np.ndarray) -> sp.csr_matrix:
    """The rows of W (the true one, taps folded) of every output that reads the ring
    (``taps`` from :func:`_tap_columns`, ``ring`` the mask of :func:`_ring`)."""
    reads = np.zeros(math.prod(geom.output_size), dtype=bool)
    for columns, _ in taps:
        reads |= ring[columns]
    rows = np.flatnonzero(reads)
    cols = np.concatenate([columns[rows] for columns, _ in taps])
    values = np.repeat(line.values, rows.size)
    local = np.tile(np.arange(rows.size), len(taps))
    return sp.csr_matrix((values, (local, cols)), shape=(rows.size, ring.size))


def _ring_pieces(rows: sp.csr_matrix, factor: np.ndarray, inner: np.ndarray,
                 line_id: np.ndarray, ring: np.ndarray, extra):
    """``(C, (order, factor))``: ``C = L^{-1} A_IR``, and the Schur complement ``S =
    A_RR + extra - C^H C`` by :func:`_banded_cholesky` (``A = W^H W``, I the inner
    positions in the factor's order, R the ring; ``extra`` the shift, and the
    regulariser's diagonal; ``rows`` those of :func:`_ring_rows`).

    ``A_IR`` couples each line to the ring near its ends, so ``C`` is solved line by
    line from the first row that touches the ring, all lines in one banded solve:
    a line's columns of the ring are packed into as many slots as the line touches.
    """
    coupling = (rows.conj().T @ rows[:, ring]).tocsr()  # A[:, R]
    a_ir = coupling[inner].tocoo()
    a_rr = coupling[ring].tocoo()
    diagonal = np.arange(ring.size)
    if a_ir.nnz:
        C, s_terms = _couple(a_ir, factor, line_id)
    else:
        C, s_terms = sp.csr_matrix((inner.size, ring.size), dtype=factor.dtype), []
    S = _assembled([(a_rr.row, a_rr.col, a_rr.data),
                    (diagonal, diagonal, np.broadcast_to(extra, ring.shape)), *s_terms],
                   (ring.size, ring.size), np.result_type(factor, a_rr))
    return C, _banded_cholesky(S)


def _assembled(entries, shape, dtype) -> sp.csr_matrix:
    """The CSR matrix of ``(rows, columns, values)`` pieces, duplicates summed."""
    if not entries:
        return sp.csr_matrix(shape, dtype=dtype)
    rows, cols, values = (np.concatenate(part) for part in zip(*entries))
    return sp.csr_matrix((values.astype(dtype), (rows, cols)), shape=shape)


def _couple(a_ir, factor, line_id) -> tuple[sp.csr_matrix, list]:
    """``C = L^{-1} A_IR``, and ``S``'s terms ``-C_l^H C_l`` per line ``l`` as ``(rows,
    columns, values)``."""
    # The ring's columns of each line, in order: pairs (line, column) as one sorted key.
    width = a_ir.shape[1]
    line_of = line_id[a_ir.row]
    keys, where = np.unique(line_of * width + a_ir.col, return_inverse=True)
    lines, columns = np.divmod(keys, width)
    starts = np.flatnonzero(np.r_[True, lines[1:] != lines[:-1]])
    counts = np.diff(np.r_[starts, keys.size])
    slot = np.arange(keys.size) - np.repeat(starts, counts)
    # Pack: each line's columns into slots 0 .. count - 1, and solve all lines at once.
    packed = np.zeros((a_ir.shape[0], int(counts.max())), dtype=np.result_type(factor, a_ir))
    packed[a_ir.row, slot[where]] = a_ir.data  # (each row and column once: no duplicates)
    solved = _triangular(factor, packed, "N")
    # C as a CSR matrix of the packed array itself, a row's slots its entries: on a
    # line's rows slot j is the line's j-th ring column; rows of lines that touch no
    # ring column, and slots past a line's count, are zeros on column 0 (summed as
    # such).  The order holds each line as one run (line_id is sorted): the columns
    # are set per run and repeated over its rows (one n x slots array of indices:
    # fresh memory is slow to touch).
    bounds = np.flatnonzero(np.r_[True, line_id[1:] != line_id[:-1], True])
    run = np.searchsorted(line_id[bounds[:-1]], lines[starts])
    index = np.int32 if max(width, solved.size) < 2**31 else np.int64
    per_run = np.zeros((bounds.size - 1, packed.shape[1]), dtype=index)
    per_run[np.repeat(run, counts), slot] = columns
    C = sp.csr_matrix((solved.reshape(-1),
                       np.repeat(per_run, np.diff(bounds), axis=0).reshape(-1),
                       np.arange(0, solved.size + 1, packed.shape[1], dtype=index)),
                      shape=(a_ir.shape[0], width))
    # S's terms, line by line: the k x k block^H block of a line with k columns.
    values = [-(block.conj().T @ block).reshape(-1) for block in
              (solved[a:e, :k] for a, e, k in zip(bounds[run].tolist(),
                                                  bounds[run + 1].tolist(), counts.tolist()))]
    squares = counts * counts
    group = np.repeat(np.arange(starts.size), squares)
    within = np.arange(group.size) - np.repeat(np.cumsum(squares) - squares, squares)
    base, k = starts[group], counts[group]
    s_term = (columns[base + within // k], columns[base + within % k], np.concatenate(values))
    return C, [s_term]


def _banded_cholesky(S: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(order, factor)``: a bandwidth-reducing order of the sparse Hermitian ``S``
    (reverse Cuthill-McKee) and the lower banded Cholesky factor of ``S`` in it.

    The ring runs round the border, and the lines join its pieces at their two ends:
    in the right order a band (the 7x7 anti-diagonal with reflect padding at 256x256:
    3,024 positions), where the dense factorisation cost 0.22 s.
    """
    order, ab = rcm_band(S)
    return order, scipy.linalg.cholesky_banded(ab, lower=True, check_finite=False)


def rcm_band(S: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ab)``: the reverse Cuthill-McKee order of the sparse Hermitian ``S``, and
    ``S`` permuted to it in LAPACK's lower band storage (``ab[i - j, j] = S[i, j]``)."""
    order = scipy.sparse.csgraph.reverse_cuthill_mckee(S, symmetric_mode=True)
    permuted = S[order][:, order].tocoo()
    lower = permuted.row >= permuted.col
    offset = (permuted.row - permuted.col)[lower]
    ab = np.zeros((int(offset.max(initial=0)) + 1, S.shape[0]), dtype=S.dtype)
    ab[offset, permuted.col[lower]] = permuted.data[lower]
    return order, ab


def _factor(ab: np.ndarray, shift: float) -> np.ndarray:
    """The banded Cholesky factor of ``A + shift I``; where that is singular (no damping of
    a singular ``W^H W``), of ``A + (shift + floor) I``, the floor a 1e-10 part of the top of
    the diagonal.  ``ab`` is overwritten (its diagonal)."""
    ab[0] += shift
    if ab.shape[1] == 0:  # (every position in the ring)
        return ab
    try:
        return scipy.linalg.cholesky_banded(ab, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        top = float(ab[0].real.max(initial=0.0))
        ab[0] += _FLOOR * (top if top > 0 else 1.0)
        return scipy.linalg.cholesky_banded(ab, lower=True, check_finite=False)
