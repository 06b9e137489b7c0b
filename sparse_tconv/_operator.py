"""Convolution and transposed convolution as scipy LinearOperators.

The products do not run on the canonical CSR matrix when the layer has dense
channel blocks (zeros padding, more than one channel per group on some side):
they run on W as a BSR matrix with rows and columns numbered position-major,
``(position, channel)`` (:mod:`._bsr`), which stores one index per block
instead of one per entry (8 bytes per float64 entry instead of 12) and reads
every channel of a few neighbouring positions per block row.  The transposed
products use the BSR of W.T, built on first use.  The canonical CSR matrices
(:attr:`matrix`, :attr:`transpose_matrix`) are then built only when asked for.

Otherwise (other padding modes, one channel per group; except the diagonal
case below) the products run on the CSR matrix, threaded over row blocks balanced by nnz: each block is
multiplied by scipy's own serial CSR kernel (which releases the GIL) writing
into its slice of the output, so every output row is computed by exactly the
code, and in exactly the order, of ``matrix @ x``.  The transposed products
run the same way on the transpose with its columns numbered position-major:
each row then reads every channel of a few neighbouring positions, where the
channel-major transpose reads one element from each of ``C`` distant planes
(as many memory streams as channels; 2x slower on a 3->64 layer).

With one channel, stride 1 and an output the input's size, the products run
on W and W.T by diagonals (:mod:`._dia`, scipy's DIA format: no index
arrays), bit for bit the CSR products.

Either way a product's result does not depend on the number of threads.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from ._bsr import block_pattern, bsr_product, fill_blocks, to_position_major, uses_blocks
from ._build import build, refill, validate
from ._dia import build_diagonals, dia_product, uses_diagonals
from ._geometry import as_weight, cast_if_safe
from . import _parallel
from ._parallel import balanced_ranges as _row_blocks
from ._parallel import resolve_threads, run_parallel

try:  # scipy's serial CSR kernels; private, so fall back to ``matrix @ x``.
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - depends on the scipy release
    _csr_matvec = _csr_matvecs = None

__all__ = ["ConvOperator", "ConvTransposeOperator", "csr_product"]


def csr_product(matrix: sp.csr_array, x: np.ndarray, threads: int) -> np.ndarray:
    """``matrix @ x`` for a 1-D or 2-D ``x``, on ``threads`` threads.

    Bit-for-bit equal to scipy's serial product.  Falls back to that product
    (one thread) when ``x`` needs a wider dtype than the matrix (e.g. a
    float32 matrix times a float64 vector), since the values would otherwise
    have to be converted.
    """
    x = cast_if_safe(x, matrix.dtype)
    if (
        threads <= 1
        or x.dtype != matrix.dtype
        or matrix.nnz < _parallel.MIN_PARALLEL_NNZ
        or _csr_matvec is None
    ):
        return matrix @ x
    x = np.ascontiguousarray(x)
    # np.empty, zeroed by each thread on its own rows: the pages are touched
    # in parallel (np.zeros would fault them in one by one inside the kernel,
    # and without numpy's huge-page hint).
    out = np.empty((matrix.shape[0],) + x.shape[1:], dtype=matrix.dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    n_cols = matrix.shape[1]

    if x.ndim == 1:

        def multiply(rows):
            a, b = rows
            out[a:b] = 0  # the kernel adds into its output
            _csr_matvec(b - a, n_cols, indptr[a : b + 1], indices, data, x, out[a:b])

    else:
        n_vecs = x.shape[1]
        flat_x = x.ravel()

        def multiply(rows):
            a, b = rows
            out[a:b] = 0
            _csr_matvecs(
                b - a, n_cols, n_vecs, indptr[a : b + 1], indices, data, flat_x, out[a:b].ravel()
            )

    run_parallel(multiply, _row_blocks(indptr, threads), threads)
    return out


def _conj_sharing(matrix: sp.csr_array) -> sp.csr_array:
    """Complex conjugate sharing the index arrays."""
    out = sp.csr_array((matrix.data.conj(), matrix.indices, matrix.indptr), shape=matrix.shape)
    out.has_canonical_format = True
    return out


def _is_batch(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1


def _all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite, in one pass without a temporary.

    The sum is finite when every element is, except when finite values
    overflow it: then this says ``False``, which only costs speed.
    """
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    return bool(np.isfinite(np.sum(x)))


def _product_form(geometry) -> str:
    """Which matrices the products run on (see :class:`_ConvOperatorBase`)."""
    if uses_blocks(geometry):
        return "blocks"
    if uses_diagonals(geometry):
        return "diagonals"
    return "csr"


def _freeze(value):
    """Mark every array of a built matrix (or tuple of them) read-only, and return it.

    Operators share what they build (with ``.T``, ``.H``, ``with_weight``
    and the user, through :attr:`matrix`): a write into one would silently
    make the products disagree with the matrix.
    """
    if isinstance(value, tuple):
        for item in value:
            _freeze(item)
        return value
    for name in ("data", "indices", "indptr", "offsets", "source"):
        array = getattr(value, name, None)
        if isinstance(array, np.ndarray):
            array.flags.writeable = False
    return value


class _Lazy:
    """A value built by ``factory`` on first use and kept, read-only.

    Operators that share a matrix (an operator and its ``.T``) hold the same
    ``_Lazy``, so whichever builds it first builds it for both.
    """

    __slots__ = ("_value", "_factory", "_lock")

    def __init__(self, factory=None, value=None):
        self._value, self._factory = value, factory
        self._lock = threading.Lock()

    def get(self):
        if self._value is None:
            with self._lock:  # two threads asking at once build it once
                if self._value is None:
                    self._value = _freeze(self._factory())
                    self._factory = None
        return self._value

    @property
    def built(self):
        """The value if built, else ``None``."""
        return self._value


class _ConvOperatorBase(LinearOperator):
    """Shared machinery; ``_transposed`` says whether ``matrix`` is W or W.T.

    Four matrices, each built on first use (and shared with ``.T``):
    ``_matrix_slot`` and ``_tmatrix_slot``, the canonical CSR of this
    operator's matrix and of its transpose; ``_forward_slot`` and
    ``_backward_slot``, the forms the products run on.  With dense channel
    blocks (:func:`~._bsr.uses_blocks`) those are ``(pattern, BSR)`` pairs,
    position-major; for one channel and stride 1 (:func:`~._dia.uses_diagonals`)
    DIA matrices; in both cases the canonical CSR is only built when asked
    for.  Otherwise the forward form is the canonical CSR itself and the
    backward one the transpose with position-major columns.  ``_form`` says
    which: ``"blocks"``, ``"diagonals"`` or ``"csr"``.
    """

    _transposed: bool

    # -- construction -----------------------------------------------------

    def __reduce__(self):
        # The geometry and the weight travel; the matrices are rebuilt on
        # unpickling (the product form at once, as by the constructor, the
        # others on first use): faster than sending them, at 1 ns per entry.
        return _rebuild_operator, (type(self), self._geometry, self._weight, self._threads)

    def _build(self, weight, input_shape, dtype, threads, **geometry):
        """Validate the constructor's arguments and build the product form."""
        w, geom = validate(weight, input_shape, transpose=self._transposed, dtype=dtype,
                           **geometry)
        self._setup(geom, w, threads)
        # Built now, not on first use: construction is where the cost is expected.
        self._forward_slot.get()

    @classmethod
    def _from_slots(cls, geometry, weight, threads, **slots):
        op = cls.__new__(cls)
        op._setup(geometry, weight, threads, **slots)
        return op

    def _setup(self, geometry, weight, threads, matrix=None, tmatrix=None, forward=None,
               backward=None):
        self._geometry = geometry
        self._weight = weight
        self._threads = threads
        self._form = _product_form(geometry)
        # No reference to self in the factories: a cycle would keep the
        # matrices alive after the operator is dropped, until the cyclic GC runs.
        direction = self._transposed

        def build_csr(transpose, channels_last=False):
            return lambda: build(geometry, weight, transpose=transpose,
                                 threads=resolve_threads(threads), channels_last=channels_last)

        def build_blocks(transpose):
            def factory():
                pattern = block_pattern(geometry, transpose=transpose,
                                        threads=resolve_threads(threads))
                return pattern, fill_blocks(pattern, geometry, weight, transpose=transpose,
                                            threads=resolve_threads(threads))

            return factory

        self._matrix_slot = matrix or _Lazy(build_csr(direction))
        self._tmatrix_slot = tmatrix or _Lazy(build_csr(not direction))
        if self._form == "blocks":
            self._forward_slot = forward or _Lazy(build_blocks(direction))
            self._backward_slot = backward or _Lazy(build_blocks(not direction))
        elif self._form == "diagonals":
            self._forward_slot = forward or _Lazy(
                lambda: build_diagonals(geometry, weight, transpose=direction,
                                        threads=resolve_threads(threads)))
            self._backward_slot = backward or _Lazy(
                lambda: build_diagonals(geometry, weight, transpose=not direction,
                                        threads=resolve_threads(threads)))
        else:
            self._forward_slot = forward or self._matrix_slot
            if backward is None:
                # With one output channel position-major is the canonical order.
                tslot = self._tmatrix_slot
                one_channel = self.output_shape[0] == 1
                backward = _Lazy(tslot.get if one_channel else
                                 build_csr(not direction, channels_last=True))
            self._backward_slot = backward
        rows, cols = math.prod(self.output_shape), math.prod(self.input_shape)
        super().__init__(dtype=weight.dtype, shape=(rows, cols))

    def _n_threads(self) -> int:
        return resolve_threads(self._threads)

    # -- the matrices -----------------------------------------------------

    @property
    def matrix(self) -> sp.csr_array:
        """The canonical CSR matrix of this operator (not a copy).

        That of :func:`conv_matrix` (or :func:`conv_transpose_matrix`).  When
        the products run on dense channel blocks or on diagonals (see Notes
        of :class:`ConvOperator`) it is built on first use and kept.
        """
        return self._matrix_slot.get()

    @property
    def transpose_matrix(self) -> sp.csr_array:
        """The canonical CSR matrix of the transpose, built on first use and kept.

        Built directly from the geometry (as fast as :attr:`matrix`), it takes
        as many bytes; it is the :attr:`matrix` of ``.T`` and ``.H``.
        """
        return self._tmatrix_slot.get()

    def _forward_matrix(self):
        """The scipy matrix ``matvec`` reads: BSR, DIA or the canonical CSR."""
        form = self._forward_slot.get()
        return form[1] if self._form == "blocks" else form

    def _forward_nbytes(self) -> int:
        """Bytes of the matrix ``matvec`` reads (what bounds its speed)."""
        matrix = self._forward_matrix()
        if self._form == "diagonals":
            return matrix.data.nbytes + matrix.offsets.nbytes
        return matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes

    def _forward_product(self, x: np.ndarray) -> np.ndarray:
        """This operator's matrix times a 1-D ``x`` or a 2-D block of columns."""
        if self._form == "blocks":
            return bsr_product(self._forward_matrix(), x, self._n_threads(), self.groups)
        if self._form == "diagonals":
            # csr_matvecs reads the matrix once for all columns; the stored
            # zeros of the diagonals would spread a NaN or infinity of x
            # (times zero) to rows that do not read it.
            if _is_batch(x) or not _all_finite(x):
                return csr_product(self._matrix_slot.get(), x, self._n_threads())
            return dia_product(self._forward_matrix(), x, self._n_threads())
        return csr_product(self._forward_matrix(), x, self._n_threads())

    def _backward_product(self, y: np.ndarray) -> np.ndarray:
        """``matrix.T @ y`` for a 1-D ``y`` or a 2-D block of columns.

        ``y`` is reordered position-major (a copy of ``y``, small next to the
        matrix) to match the columns of the backward form.
        """
        if self._form == "blocks":
            return bsr_product(self._backward_slot.get()[1], y, self._n_threads(), self.groups)
        if self._form == "diagonals":
            if _is_batch(y) or not _all_finite(y):
                return csr_product(self._tmatrix_slot.get(), y, self._n_threads())
            return dia_product(self._backward_slot.get(), y, self._n_threads())
        y = to_position_major(y, self.output_shape[0])
        return csr_product(self._backward_slot.get(), y, self._n_threads())

    # -- geometry ---------------------------------------------------------

    @property
    def weight(self) -> np.ndarray:
        """The weight (read-only), in PyTorch's layout for this operator's class."""
        return self._weight

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample of ``matvec``."""
        g = self._geometry
        return g.output_shape if self._transposed else g.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output sample of ``matvec``."""
        g = self._geometry
        return g.input_shape if self._transposed else g.output_shape

    @property
    def stride(self) -> tuple[int, ...]:
        return self._geometry.stride

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` per spatial dimension ('same'/'valid' resolved)."""
        return self._geometry.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self._geometry.dilation

    @property
    def groups(self) -> int:
        return self._geometry.groups

    @property
    def padding_mode(self) -> str:
        return self._geometry.padding_mode

    @property
    def threads(self):
        """The ``threads=`` setting (``None``: follow :func:`get_num_threads`)."""
        return self._threads

    # -- products ---------------------------------------------------------

    def _matvec(self, x):
        return self._forward_product(np.asarray(x).ravel())

    def _matmat(self, X):
        return self._forward_product(np.asarray(X))

    def _adjoint_product(self, y):
        # W^H y = conj(W^T conj(y)); for a real matrix simply W^T y.
        if np.iscomplexobj(self._weight):
            return np.conj(self._backward_product(np.conj(y)))
        return self._backward_product(y)

    def _rmatvec(self, y):
        return self._adjoint_product(np.asarray(y).ravel())

    def _rmatmat(self, Y):
        return self._adjoint_product(np.asarray(Y))

    def _other_class(self):
        return ConvOperator if self._transposed else ConvTransposeOperator

    def _transpose_op(self):
        other = self._other_class()
        if self._form != "csr":  # the two product forms swap roles
            return other._from_slots(self._geometry, self._weight, self._threads,
                                     matrix=self._tmatrix_slot, tmatrix=self._matrix_slot,
                                     forward=self._backward_slot, backward=self._forward_slot)
        return other._from_slots(self._geometry, self._weight, self._threads,
                                 matrix=self._tmatrix_slot, tmatrix=self._matrix_slot)

    def _transpose(self):
        return self._transpose_op()

    def _adjoint(self):
        if not np.iscomplexobj(self._weight):
            return self._transpose_op()
        weight = np.conj(self._weight)
        weight.flags.writeable = False
        mslot, tslot = self._matrix_slot, self._tmatrix_slot
        # The canonical matrices share their index arrays; product forms are
        # built from the conjugated weight on first use.
        return self._other_class()._from_slots(
            self._geometry,
            weight,
            self._threads,
            matrix=_Lazy(lambda: _conj_sharing(tslot.get())),
            tmatrix=_Lazy(lambda: _conj_sharing(mslot.get())),
        )

    # -- shaped application -----------------------------------------------

    def _apply_shaped(self, x, product, in_shape, out_shape, name):
        x = np.asarray(x)
        if x.shape == in_shape:
            return product(x.ravel()).reshape(out_shape)
        if x.ndim == len(in_shape) + 1 and x.shape[1:] == in_shape:
            batch = x.shape[0]
            # One pass over the matrix for the whole batch: columns are samples.
            y = product(np.ascontiguousarray(x.reshape(batch, math.prod(in_shape)).T))
            return np.ascontiguousarray(y.T).reshape((batch, *out_shape))
        raise ValueError(
            f"{name} must have shape {in_shape} (one sample) or (batch, *{in_shape}), "
            f"got {name}.shape={x.shape}"
        )

    def conv(self, x) -> np.ndarray:
        """The convolution applied to one sample or a batch of samples.

        Parameters
        ----------
        x : array_like, shape (C_in, L_1, ..., L_N) or (B, C_in, L_1, ..., L_N)
            The forward convolution's input (``C_in, *L`` is
            ``ConvOperator.input_shape``, ``ConvTransposeOperator.output_shape``).

        Returns
        -------
        ndarray, shape (C_out, O_1, ..., O_N) or (B, C_out, O_1, ..., O_N)

        Raises
        ------
        ValueError
            If ``x`` is shaped like neither one sample nor a batch.
        """
        g = self._geometry
        product = self._backward_product if self._transposed else self._forward_product
        return self._apply_shaped(x, product, g.input_shape, g.output_shape, "x")

    def conv_transpose(self, y) -> np.ndarray:
        """The transposed convolution applied to one sample or a batch.

        Parameters
        ----------
        y : array_like, shape (C_out, O_1, ..., O_N) or (B, C_out, O_1, ..., O_N)
            The forward convolution's output shape.

        Returns
        -------
        ndarray, shape (C_in, L_1, ..., L_N) or (B, C_in, L_1, ..., L_N)
            Plain transpose (no conjugation), as ``conv_transpose{N}d``.

        Raises
        ------
        ValueError
            If ``y`` is shaped like neither one sample nor a batch.
        """
        g = self._geometry
        product = self._forward_product if self._transposed else self._backward_product
        return self._apply_shaped(y, product, g.output_shape, g.input_shape, "y")

    def with_weight(self, weight, *, dtype=None):
        """A new operator for new weights of the same shape and geometry.

        The index arrays (``indices``, ``indptr``) of every matrix this
        operator has built (the forms its products run on, and ``matrix`` or
        ``transpose_matrix`` if asked for) are shared; only the values are
        computed: now for the forward product's matrix, on first use for the
        others.

        Parameters
        ----------
        weight : array_like
            Same shape as :attr:`weight`.
        dtype : dtype, optional
            As for the constructor; default: that of ``weight``.

        Returns
        -------
        operator of the same class

        Raises
        ------
        ValueError
            If the weight's shape differs.
        """
        w = as_weight(weight, dtype)
        if w.shape != self._weight.shape:
            raise ValueError(
                f"weight must have the shape of this operator's weight {self._weight.shape}, "
                f"got weight.shape={w.shape}"
            )
        g, setting, direction = self._geometry, self._threads, self._transposed
        # Share the patterns already built, keeping their index arrays only,
        # not the old values.
        slots = dict(
            matrix=_refill_slot(self._matrix_slot, g, w, direction, setting, False),
            tmatrix=_refill_slot(self._tmatrix_slot, g, w, not direction, setting, False),
        )
        if self._form == "blocks":
            slots["forward"] = _refill_blocks_slot(self._forward_slot, g, w, direction, setting)
            slots["backward"] = _refill_blocks_slot(self._backward_slot, g, w, not direction,
                                                    setting)
        elif self._form == "diagonals":
            pass  # no index arrays to share: the defaults compute the diagonals anew
        elif self.output_shape[0] > 1:  # else the backward form is the transpose itself
            slots["backward"] = _refill_slot(self._backward_slot, g, w, not direction, setting,
                                             True)
        op = type(self)._from_slots(g, w, setting, **slots)
        op._forward_slot.get()  # the new values are computed now, as by the constructor
        return op


def _rebuild_operator(cls, geometry, weight, threads):
    """An unpickled operator: its matrices rebuilt from the geometry and the weight."""
    weight = np.array(weight)  # unpickled arrays are writeable: own a read-only one
    weight.flags.writeable = False
    op = cls._from_slots(geometry, weight, threads)
    op._forward_slot.get()
    return op


def _refill_slot(slot, geometry, weight, transpose, threads, channels_last):
    """A lazy CSR with the pattern of ``slot``'s matrix if built, else ``None``."""
    like = slot.built
    if like is None:
        return None
    pattern = SimpleNamespace(indices=like.indices, indptr=like.indptr, shape=like.shape)

    def factory():
        return refill(geometry, weight, pattern, transpose=transpose,
                      threads=resolve_threads(threads), channels_last=channels_last)

    return _Lazy(factory)


def _refill_blocks_slot(slot, geometry, weight, transpose, threads):
    """A lazy block form with the pattern of ``slot``'s if built, else ``None``."""
    if slot.built is None:
        return None
    pattern = slot.built[0]
    return _Lazy(lambda: (pattern, fill_blocks(pattern, geometry, weight, transpose=transpose,
                                               threads=resolve_threads(threads))))


class ConvOperator(_ConvOperatorBase):
    """N-d convolution ``y = W x`` as a :class:`scipy.sparse.linalg.LinearOperator`.

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in // groups, k_1, ..., k_N)
        PyTorch's Conv layout.  Copied; the argument is not modified.
    input_shape : sequence of int
        One sample, ``(C_in, L_1, ..., L_N)``.
    stride, padding, dilation, groups, padding_mode, dtype
        As for :func:`conv_matrix`.
    threads : int, optional
        Threads for products and builds.  Default ``None``: the value of
        :func:`get_num_threads` at the time of each product (set by
        :func:`set_num_threads` or ``SPARSE_TCONV_NUM_THREADS``, else every
        CPU).  Results do not depend on it.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array
        W, as :func:`conv_matrix` builds it (built on first use when the
        products run on dense channel blocks, see Notes).
    transpose_matrix : scipy.sparse.csr_array
        W.T, built directly on first use (same bytes as ``matrix``).
    input_shape, output_shape : tuple of int
        ``(C_in, *L)`` and ``(C_out, *O)``.
    shape : tuple of int
        ``(prod(output_shape), prod(input_shape))``.
    dtype : numpy.dtype
        That of ``matrix``.

    Raises
    ------
    ValueError, TypeError
        As for :func:`conv_matrix`, and for an invalid ``threads``.

    See Also
    --------
    conv_matrix, ConvTransposeOperator

    Notes
    -----
    ``matvec``/``matmat`` multiply by W; ``rmatvec``/``rmatmat`` by the
    adjoint ``W^H = conj(W).T``; ``.T`` is the transposed convolution (a
    :class:`ConvTransposeOperator` whose ``matrix`` is ``W.T``) and ``.H``
    the adjoint; ``op.T.T`` has the forward geometry again.  All four products
    run on ``threads`` threads and their results do not depend on the number
    of threads.

    *Dense channel blocks.*  With zeros padding and more than one channel per
    group on some side, the entries linking one output position to one input
    position form a dense ``(C_out/groups) x (C_in/groups)`` block per group
    (one kernel tap's weights).  The operator then stores W as a BSR matrix of
    these blocks, rows and columns numbered (position, channel), built at
    construction (8 bytes per float64 entry plus one index per block, against
    12 for the CSR matrix) and multiplies through it; the transposed products
    use the BSR matrix of W.T, built on first use (as many bytes again).
    ``matrix`` and ``transpose_matrix`` are built only when asked for.  A
    ``matvec`` is scipy's serial BSR kernel over block-row ranges (bit for bit
    scipy's ``blocks @ x`` on the reordered vector), a ``matmat`` a sum of
    dense products per block row (numpy ``matmul``: BLAS); both equal
    ``matrix @ x`` to rounding, and a batch equals its columns multiplied one
    by one to rounding.

    *Diagonals.*  With one channel, stride 1, zeros padding and an output as
    large as the input (``'same'``-like padding, every dilated kernel shorter
    than its dimension), each kernel tap is one diagonal of W: the operator
    stores W and W.T as scipy DIA matrices (8 bytes per value, with explicit
    zeros where a tap falls into the padding, no index) and multiplies with
    scipy's serial DIA kernel on one row range per thread.  A block of
    several columns (``matmat``, a batch) runs on ``matrix`` (or
    ``transpose_matrix``), built on first use: scipy's multi-vector CSR
    kernel reads it once for all the columns, 1.5x faster per column than
    the DIA kernel column by column, for 12 more bytes per entry; so does a
    vector with a NaN or infinity (the diagonals' stored zeros would carry it,
    times zero, to rows that do not read it).  The results are bit for bit
    scipy's CSR products with ``matrix``/``transpose_matrix``.

    *CSR.*  Otherwise ``matvec``/``matmat`` are bit-for-bit scipy's serial
    ``matrix @ x`` (``csr_matvecs`` reads the matrix once for all the columns
    of a C-ordered block).  ``rmatvec``/``rmatmat`` (and
    :meth:`conv_transpose`) run on W.T with its columns numbered (position,
    channel), built on first use and kept (as many bytes as ``matrix``; the
    same array as ``transpose_matrix`` when the output has one channel), and
    equal scipy's ``matrix.T @ y`` to rounding (bit for bit with one output
    channel).

    A product whose input needs a wider dtype than the matrix (a float64
    vector with a float32 matrix, a complex vector with a real matrix) uses
    scipy's serial product.

    *Sharing.*  Every array the operator builds (``matrix``,
    ``transpose_matrix`` and the product forms) is read-only: it is shared
    with ``.T``, ``.H``, the operators of :meth:`with_weight` and whoever
    holds ``op.matrix``, and a write into it would make ``op @ x`` disagree
    with ``op.matrix @ x``.  ``op.matrix.copy()`` gives a matrix of your own.

    *Pickling.*  Operators (``.T`` and ``.H`` too) pickle and deep-copy:
    the geometry, the weight and the ``threads`` setting travel, and the
    matrices are rebuilt on unpickling (the product form at once, the others
    on first use), which takes about as long as reading them would.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_tconv import ConvOperator
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((20, 10, 5, 5)), (10, 16, 16),
    ...                   stride=3, padding=2)
    >>> op.shape, op.output_shape
    ((720, 2560), (20, 6, 6))
    >>> x = rng.standard_normal((10, 16, 16))
    >>> y = op.conv(x)
    >>> np.allclose(y.ravel(), op.matvec(x.ravel()))
    True
    >>> op.conv_transpose(y).shape, op.T.output_shape
    ((10, 16, 16), (10, 16, 16))
    """

    _transposed = False

    def __init__(
        self,
        weight,
        input_shape,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        padding_mode="zeros",
        dtype=None,
        threads=None,
    ):
        self._build(
            weight,
            input_shape,
            dtype,
            threads,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )


class ConvTransposeOperator(_ConvOperatorBase):
    """N-d transposed convolution as a :class:`scipy.sparse.linalg.LinearOperator`.

    Parameters
    ----------
    weight : array_like, shape (C_in, C_out // groups, k_1, ..., k_N)
        PyTorch's ConvTranspose layout.  Copied; not modified.
    input_shape : sequence of int
        One sample of the transposed convolution's input, ``(C_in, *O)``.
    stride, padding, output_padding, dilation, groups, padding_mode, dtype
        As for :func:`conv_transpose_matrix`.
    threads : int, optional
        As for :class:`ConvOperator`.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array
        The matrix of :func:`conv_transpose_matrix` (built on first use when
        the products run on dense channel blocks, see
        :class:`ConvOperator`).
    transpose_matrix : scipy.sparse.csr_array
        The forward convolution's matrix, built on first use.
    input_shape, output_shape : tuple of int
        ``(C_in, *O)`` and ``(C_out, *L)``.

    Raises
    ------
    ValueError, TypeError
        As for :func:`conv_transpose_matrix`.

    See Also
    --------
    conv_transpose_matrix, ConvOperator

    Notes
    -----
    ``.T`` is the forward convolution (a :class:`ConvOperator`); products
    behave as described for :class:`ConvOperator`.  ``conv_transpose(y)``
    applies this operator to shaped samples and ``conv(x)`` its transpose.

    Examples
    --------
    The chapter's shape round trip: a stride-3 convolution takes 10x16x16 to
    20x6x6; the transposed convolution with the same settings goes back.

    >>> import numpy as np
    >>> from sparse_tconv import ConvTransposeOperator
    >>> w = np.ones((20, 10, 5, 5))
    >>> op = ConvTransposeOperator(w, (20, 6, 6), stride=3, padding=2)
    >>> op.output_shape
    (10, 16, 16)
    >>> op.conv_transpose(np.ones((4, 20, 6, 6))).shape
    (4, 10, 16, 16)
    """

    _transposed = True

    def __init__(
        self,
        weight,
        input_shape,
        *,
        stride=1,
        padding=0,
        output_padding=0,
        dilation=1,
        groups=1,
        padding_mode="zeros",
        dtype=None,
        threads=None,
    ):
        self._build(
            weight,
            input_shape,
            dtype,
            threads,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )

    @property
    def output_padding(self) -> tuple[int, ...]:
        return self._geometry.output_padding
