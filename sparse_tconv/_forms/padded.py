"""The product form of single-channel stride-1 layers, any padding: the padded frame's diagonals.

``W = C P``: ``P`` pads the input by the padding mode (zeros, or copies of
mirrored, edge or wrapped elements) into a frame of ``Lp = L + lo + hi``
positions per dimension, and ``C`` is the convolution of the frame that
reads no padding.  The frame has no border, so on the frame's own grid
(flat indices, rows of ``prod(Lp[1:])``) tap ``t`` links position ``i`` to
``i + offset(t)`` with one value for every row: ``C``, computed at every
position of the frame, is the matrix of the frame's convolution with zero
padding ``(0, reach)``, whose diagonals :class:`~.diagonals.BandedDiagonals`
stores as its border rows and one period of its interior (a few kB to MB),
taps of weight zero left out.  The output is the first ``O`` positions
along every dimension of that product; the others read past the frame and
are dropped.  ``W.T y = P.T C.T y``: ``y`` is widened by zeros onto the
frame's grid, multiplied by the diagonals of ``C.T``, and folded back by
``P.T`` (each padded element added onto the element it copies).

Where :class:`~.diagonals.DiagonalForm` serves a layer (zeros padding, the
output the input's size) it stays: its diagonals need no frame.  This form
takes the other single-channel layers of stride 1 (reflect, replicate,
circular, or a zeros padding that changes the size), which the canonical
CSR served: that streams ``taps`` entries of 12 bytes per position on every
product (38 MB for a 7x7 kernel on 256x256), where these products read the
two vectors and the frame (a 7x7 motion blur with replicate padding in a
CG loop: 1.4 ms per pair of products against 3.4 ms).

The products equal the CSR's to rounding (the CSR adds the taps that the
padding sends to one element before multiplying; here each tap multiplies
its copy), and do not depend on the number of threads (scipy's DIA kernel
on pieces of rows fixed by the geometry).  A vector with a NaN or an
infinity goes to the canonical CSR, as on the diagonal form: the stored
zeros would carry it to rows that do not read it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _parallel
from .._geometry import ConvGeometry
from .._validation import cast_if_safe
from ..direct import _padded_size
from .base import Role
from .csr import csr_product
from .diagonals import BandedDiagonals, BandedForm, DiagonalForm, _all_finite, _Layout
from .structured import _fold_into, _pad_frame, _scratch

__all__ = ["PaddedDiagonalForm", "frame_geometry"]


def frame_geometry(geom: ConvGeometry) -> ConvGeometry:
    """The convolution ``C`` of the padded frame on the frame's grid: the frame's own size
    in and out, zero padding ``(0, reach)`` (so that the offsets grow with the tap)."""
    frame = _padded_size(geom)
    reach = [(k - 1) * d for k, d in zip(geom.kernel_size, geom.dilation)]
    return dataclasses.replace(geom, input_size=frame, output_size=frame,
                               padding=tuple((0, r) for r in reach), padding_mode="zeros",
                               output_padding=(0,) * geom.ndim)


class PaddedDiagonalForm(BandedForm):
    """W (or W.T) of a single-channel stride-1 convolution as the diagonals of its padded
    frame's convolution (see the module)."""

    name = "padded_diagonals"

    def __init__(self, geometry: ConvGeometry, weight: np.ndarray, banded: BandedDiagonals,
                 transposed: bool, canonical, lean: bool = False):
        self._geometry = geometry
        self._frame = frame_geometry(geometry)
        self._weight = weight
        self.banded = banded  # C (for W) or C.T (for W.T): the form's own products
        self.transposed = transposed
        self._canonical = canonical
        self.lean = lean
        self.matrix = None  # no scipy matrix: the operator's CSR is built when read

    @staticmethod
    def applies(geometry) -> bool:
        """One channel in and out, stride 1, where the diagonal form does not apply."""
        geom = geometry
        return (geom.in_channels == geom.out_channels == 1
                and all(s == 1 for s in geom.stride)
                and not DiagonalForm.applies(geom))

    @classmethod
    def predict_nbytes(cls, geometry, dtype, *, transposed) -> int:
        itemsize = np.dtype(dtype).itemsize
        return _Layout.of(frame_geometry(geometry), transposed, itemsize).nbytes(itemsize)

    @classmethod
    def build(cls, request):
        geom, weight = request.geometry, np.ascontiguousarray(request.weight)
        banded = BandedDiagonals(frame_geometry(geom), weight, transposed=request.transposed,
                                 threads=request.threads)
        return cls(geom, weight, banded, request.transposed, request.canonical_matrix,
                   request.role is Role.LEAN)

    def _diagonals(self, transposed: bool) -> BandedDiagonals:
        """The diagonals of C (``transposed=False``) or C.T, the other built on first use."""
        if transposed == self.transposed:
            return self.banded
        return self._other_diagonals(
            lambda: BandedDiagonals(self._frame, self._weight, transposed=transposed))

    def _product(self, v: np.ndarray, threads: int, transposed: bool) -> np.ndarray:
        """W @ v (``transposed=False``) or W.T @ v, for a 1-D ``v`` or a block of columns."""
        banded = self._diagonals(transposed)
        v = cast_if_safe(v, banded.dtype)
        if v.dtype != banded.dtype or not _all_finite(v):
            matrix = self._canonical()  # the form's own matrix
            if transposed == self.transposed:
                return csr_product(matrix, v, threads)
            return matrix.T @ v  # (scipy's serial CSC kernel, as on the diagonal form)
        geom = self._geometry
        frame = tuple(self._frame.input_size)
        columns = 1 if v.ndim == 1 else v.shape[1]
        if banded.shape[0] * len(banded.offsets) < _parallel.MIN_PARALLEL_NNZ:
            threads = 1
        if not transposed:  # W x: the first O positions of C (P x)
            padded = _pad_frame(v.reshape((1, *geom.input_size, columns)), geom)
            out = np.empty((*geom.output_size, columns), dtype=banded.dtype)
            kept = tuple(slice(0, n) for n in geom.output_size)
            for j in range(columns):
                full = banded.matvec(np.ascontiguousarray(padded[0, ..., j]).reshape(-1), threads)
                out[..., j] = full.reshape(frame)[kept]
        else:  # W.T y = P.T (C.T y widened onto the frame)
            # (per-thread scratch arrays, as the structured form's frames: fresh
            # frame-sized arrays fault their pages in on every product)
            wide = _scratch("widened", (*frame, columns), banded.dtype)
            wide.fill(0)
            wide[tuple(slice(0, n) for n in geom.output_size)] = v.reshape(
                (*geom.output_size, columns))
            sums = _scratch("sums", (1, *frame, columns), banded.dtype)
            for j in range(columns):
                column = np.ascontiguousarray(wide[..., j]).reshape(-1)
                sums[0, ..., j] = banded.matvec(column, threads).reshape(frame)
            out = np.empty((1, *geom.input_size, columns), dtype=banded.dtype)
            _fold_into(sums, geom, out)
        n = math.prod(out.shape[:-1])
        return out.reshape(n) if v.ndim == 1 else out.reshape(n, columns)

    def multiply(self, x, threads):
        return self._product(x, threads, self.transposed)

    def multiply_transposed(self, y, threads):
        return self._product(y, threads, not self.transposed)
