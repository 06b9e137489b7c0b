"""Convolution and transposed convolution as scipy LinearOperators.

Products are threaded over row blocks of the CSR matrix, balanced by nnz.
Each block is multiplied by scipy's own serial CSR kernel (which releases the
GIL) writing into its slice of the output, so every output row is computed by
exactly the code, and in exactly the order, of ``matrix @ x``: the threaded
result is bit-for-bit the serial one, whatever the number of threads.

The transposed products (``rmatvec``, ``rmatmat``, ``conv_transpose`` of a
convolution, ``conv`` of a transposed one) run the same way on the transpose
with its columns numbered position-major, ``(position, channel)``: each row
then reads every channel of a few neighbouring positions, where the
channel-major transpose reads one element from each of ``C`` distant planes
(as many memory streams as channels; 2x slower on a 3->64 layer).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from ._build import build, refill, validate
from ._geometry import as_weight
from ._parallel import resolve_threads, run_parallel

try:  # scipy's serial CSR kernels; private, so fall back to ``matrix @ x``.
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - depends on the scipy release
    _csr_matvec = _csr_matvecs = None

__all__ = ["ConvOperator", "ConvTransposeOperator", "csr_product"]

# Below this many stored entries a product is faster on one thread.
_MIN_PARALLEL_NNZ = 1 << 16


def _row_blocks(indptr: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Split the rows into ``parts`` contiguous ranges of about equal nnz."""
    nnz, n_rows = int(indptr[-1]), len(indptr) - 1
    targets = nnz * np.arange(1, parts, dtype=np.int64) // parts
    cuts = [0, *np.searchsorted(indptr, targets).tolist(), n_rows]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def csr_product(matrix: sp.csr_array, x: np.ndarray, threads: int) -> np.ndarray:
    """``matrix @ x`` for a 1-D or 2-D ``x``, on ``threads`` threads.

    Bit-for-bit equal to scipy's serial product.  Falls back to that product
    (one thread) when ``x`` needs a wider dtype than the matrix (e.g. a
    float32 matrix times a float64 vector), since the values would otherwise
    have to be converted.
    """
    if x.dtype != matrix.dtype and np.can_cast(x.dtype, matrix.dtype, casting="safe"):
        x = x.astype(matrix.dtype)
    if (
        threads <= 1
        or x.dtype != matrix.dtype
        or matrix.nnz < _MIN_PARALLEL_NNZ
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


class _ConvOperatorBase(LinearOperator):
    """Shared machinery; ``_transposed`` says whether ``matrix`` is W or W.T."""

    _transposed: bool

    # -- construction -----------------------------------------------------

    def _build(self, weight, input_shape, dtype, threads, **geometry):
        """Validate the constructor's arguments and build the matrix."""
        w, geom = validate(weight, input_shape, transpose=self._transposed, dtype=dtype,
                           **geometry)
        matrix = build(geom, w, transpose=self._transposed, threads=resolve_threads(threads))
        self._setup(geom, w, matrix, threads)

    @classmethod
    def _from_parts(cls, geometry, weight, matrix, threads, transpose_factory=None,
                    backward_factory=None):
        op = cls.__new__(cls)
        op._setup(geometry, weight, matrix, threads, transpose_factory, backward_factory)
        return op

    def _setup(self, geometry, weight, matrix, threads, transpose_factory=None,
                backward_factory=None):
        self._geometry = geometry
        self._weight = weight
        self._matrix = matrix
        self._threads = threads
        self._tmatrix = None
        self._bmatrix = None
        # No reference to self in the factories: a cycle would keep the
        # matrices alive after the operator is dropped, until the cyclic GC runs.
        transposed = self._transposed
        if transpose_factory is None:

            def transpose_factory():
                return build(
                    geometry, weight, transpose=not transposed, threads=resolve_threads(threads)
                )

        if backward_factory is None:

            def backward_factory():
                return build(geometry, weight, transpose=not transposed,
                             threads=resolve_threads(threads), channels_last=True)

        self._transpose_factory = transpose_factory
        self._backward_factory = backward_factory
        super().__init__(dtype=matrix.dtype, shape=matrix.shape)

    def _n_threads(self) -> int:
        return resolve_threads(self._threads)

    # -- the matrices -----------------------------------------------------

    @property
    def matrix(self) -> sp.csr_array:
        """The CSR matrix this operator applies (not a copy)."""
        return self._matrix

    @property
    def transpose_matrix(self) -> sp.csr_array:
        """The CSR matrix of the transpose, built on first use and kept.

        Built directly from the geometry (as fast as the matrix itself), it
        takes as many bytes as :attr:`matrix`; ``.T`` and ``.H`` use it as
        their :attr:`matrix`.  The transposed products of this operator
        (``rmatvec``, ``rmatmat``, and :meth:`conv_transpose` or
        :meth:`conv` for the other direction) use the same matrix with its
        columns numbered position-major (see Notes of the class), built on
        first use too; when the output has one channel the two are one and
        the same array.
        """
        if self._tmatrix is None:
            if self._bmatrix is not None and self._single_output_channel():
                self._tmatrix = self._bmatrix
            else:
                self._tmatrix = self._transpose_factory()
            self._transpose_factory = None
        return self._tmatrix

    def _single_output_channel(self) -> bool:
        return self.output_shape[0] == 1

    def _backward_matrix(self) -> sp.csr_array:
        """The transpose with position-major columns (the plain one for one channel)."""
        if self._bmatrix is None:
            if self._single_output_channel():
                self._bmatrix = self.transpose_matrix
            else:
                self._bmatrix = self._backward_factory()
            self._backward_factory = None
        return self._bmatrix

    def _backward_product(self, y: np.ndarray) -> np.ndarray:
        """``matrix.T @ y`` for a 1-D ``y`` or a 2-D block of columns.

        ``y`` is reordered position-major (a copy of ``y``, small next to the
        matrix) to match the columns of :meth:`_backward_matrix`.
        """
        channels = self.output_shape[0]
        if channels > 1:
            y = y.reshape((channels, -1) + y.shape[1:]).swapaxes(0, 1).reshape(y.shape)
        return csr_product(self._backward_matrix(), y, self._n_threads())

    def _forward_product(self, x: np.ndarray) -> np.ndarray:
        return csr_product(self._matrix, x, self._n_threads())

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
        if np.iscomplexobj(self._matrix.data):
            return np.conj(self._backward_product(np.conj(y)))
        return self._backward_product(y)

    def _rmatvec(self, y):
        return self._adjoint_product(np.asarray(y).ravel())

    def _rmatmat(self, Y):
        return self._adjoint_product(np.asarray(Y))

    def _other_class(self):
        return ConvOperator if self._transposed else ConvTransposeOperator

    def _transpose_op(self):
        matrix = self._matrix
        return self._other_class()._from_parts(
            self._geometry,
            self._weight,
            self.transpose_matrix,
            self._threads,
            transpose_factory=lambda: matrix,
        )

    def _transpose(self):
        return self._transpose_op()

    def _adjoint(self):
        if not np.iscomplexobj(self._matrix.data):
            return self._transpose_op()
        matrix = self._matrix
        weight = np.conj(self._weight)
        weight.flags.writeable = False
        return self._other_class()._from_parts(
            self._geometry,
            weight,
            _conj_sharing(self.transpose_matrix),
            self._threads,
            transpose_factory=lambda: _conj_sharing(matrix),
        )

    # -- shaped application -----------------------------------------------

    def _apply_shaped(self, x, product, in_shape, out_shape, name):
        x = np.asarray(x)
        if x.shape == in_shape:
            return product(x.ravel()).reshape(out_shape)
        if x.ndim == len(in_shape) + 1 and x.shape[1:] == in_shape:
            batch = x.shape[0]
            # One pass over the matrix for the whole batch: columns are samples.
            y = product(np.ascontiguousarray(x.reshape(batch, -1).T))
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

        The index arrays (``indices``, ``indptr``) are shared with this
        operator's matrices (and transposed matrix, if built); only the values
        are computed.

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
        g, setting = self._geometry, self._threads
        matrix = refill(g, w, self._matrix, transpose=self._transposed, threads=self._n_threads())
        transposed = not self._transposed
        # Share the patterns of the transposed matrices already built, keeping
        # their index arrays only, not the old values.
        factories = {}
        for name, built, channels_last in (("transpose_factory", self._tmatrix, False),
                                           ("backward_factory", self._bmatrix, True)):
            if built is not None:
                factories[name] = _refill_factory(g, w, built, transposed, setting, channels_last)
        return type(self)._from_parts(g, w, matrix, setting, **factories)


def _refill_factory(geometry, weight, like, transpose, threads, channels_last):
    pattern = SimpleNamespace(indices=like.indices, indptr=like.indptr, shape=like.shape)

    def factory():
        return refill(geometry, weight, pattern, transpose=transpose,
                      threads=resolve_threads(threads), channels_last=channels_last)

    return factory


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
        W, as :func:`conv_matrix` builds it.
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
    run on ``threads`` threads over row blocks of equal nnz, and their results
    do not depend on the number of threads.  ``matvec``/``matmat`` are
    bit-for-bit scipy's serial ``matrix @ x``.  ``rmatvec``/``rmatmat`` (and
    :meth:`conv_transpose`) run on a second matrix, W.T with its columns
    numbered (position, channel), built on first use from the geometry and
    kept (as many bytes as ``matrix``; the same array as
    ``transpose_matrix`` when the output has one channel): each row then
    reads neighbouring memory instead of one element from each of ``C_out``
    planes.  They equal scipy's ``matrix.T @ y`` to rounding (bit for bit with
    one output channel).  ``.T``/``.H`` use ``transpose_matrix``, the
    canonical W.T, for their ``matvec``.  A product whose input needs a wider
    dtype than the matrix (a float64 vector with a float32 matrix, a complex
    vector with a real matrix) uses scipy's serial product.

    ``matmat`` reads the matrix once for all the columns (scipy's
    ``csr_matvecs`` on a C-ordered block), which costs far less per column
    than separate ``matvec`` calls.

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
        The matrix of :func:`conv_transpose_matrix`.
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
