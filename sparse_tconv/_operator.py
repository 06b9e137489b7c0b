"""Convolution and transposed convolution as scipy LinearOperators.

An operator holds the geometry, the (read-only) weight and four matrices,
each built on first use and kept: the canonical CSR of its matrix and of the
transpose (:attr:`~ConvOperator.matrix`, :attr:`~ConvOperator.transpose_matrix`),
and the two *product forms* its products run on, one for its own matrix and
one for the transpose (:mod:`._forms`: the weight's taps for channel layers,
diagonals or the CSR matrix, chosen from the geometry once).  ``.T`` and ``.H`` share what can
be shared; :meth:`~ConvOperator.with_weight` shares the index arrays.  With
``keep_transpose=False`` the two product forms are one, which serves both
directions on its own arrays.

Whatever the form, a product's result does not depend on the number of
threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from ._build import build, refill
from ._forms import Request, Role, form_for
from ._geometry import Convolution, given_shapes, transpose_output_padding, validate
from ._parallel import resolve_threads
from ._validation import (
    INT64_MAX,
    check_positive_int,
    is_sparse,
    private_copy,
    weight_and_dtype,
)

__all__ = ["ConvOperator", "ConvTransposeOperator", "ProductFormInfo", "CONV_OPERATORS"]


class ProductFormInfo:
    """What an operator's ``matvec`` multiplies (see :attr:`ConvOperator.product_form`)."""

    __slots__ = ("name", "nbytes", "transposed", "_form")

    def __init__(self, name: str, nbytes: int, form, transposed: bool = False):
        self.name = name
        """``'structured'`` (the weight's taps, tiled GEMMs), ``'diagonals'`` (DIA),
        ``'padded_diagonals'`` (the padded frame's DIA) or ``'csr'``."""
        self.nbytes = nbytes
        """Bytes a product reads: values and index arrays."""
        self.transposed = transposed
        """Whether ``matvec`` multiplies by ``matrix.T`` (``keep_transpose=False``: the one
        form an operator and its ``.T`` share, stored for one of them)."""
        self._form = form

    @property
    def matrix(self) -> sp.sparray:
        """The scipy matrix itself (read-only), rows and columns numbered as the form
        chooses; None for the structured form, which stores the weight only
        (:attr:`ConvOperator.matrix` is the CSR).  The diagonals' whole DIA
        matrix is built on first access: their products read less (see Notes
        of :class:`ConvOperator`)."""
        return self._form.matrix

    def __repr__(self) -> str:
        return (f"ProductFormInfo(name={self.name!r}, nbytes={self.nbytes}, "
                f"transposed={self.transposed})")


def _read_only(matrix):
    """Make a built CSR matrix read-only, and return it.

    Operators share what they build (with ``.T``, ``.H``, ``with_weight``
    and the user, through :attr:`~ConvOperator.matrix`): a write into one
    would silently make the products disagree with the matrix.  (Product
    forms make themselves read-only: :meth:`~._forms.ProductForm.freeze`.)
    """
    for array in (matrix.data, matrix.indices, matrix.indptr):
        array.flags.writeable = False
    return matrix


class _Lazy:
    """A value built by ``factory`` on first use and kept.

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
                    self._value = self._factory()
                    self._factory = None
        return self._value

    @property
    def built(self):
        """The value if built, else ``None``."""
        return self._value


# The factories take everything they need as arguments and no reference to
# an operator: a cycle would keep the matrices alive after the operator is
# dropped, until the cyclic garbage collector runs.


def _csr_slot(geometry, weight, transposed, threads) -> _Lazy:
    """The canonical CSR of W (or W.T), built on first use."""
    return _Lazy(lambda: _read_only(build(geometry, weight, transposed=transposed,
                                          threads=resolve_threads(threads))))


def _form_slot(form, geometry, weight, transposed, role: Role, threads, canonical: _Lazy,
               pattern=None) -> _Lazy:
    """The product form of W (or W.T) in ``role``, built on first use (on ``pattern`` if
    given); ``threads`` is resolved then."""

    def make():
        request = Request(Convolution(geometry, weight, transposed), role,
                          resolve_threads(threads), canonical.get)
        return form.refill(pattern, request).freeze()

    return _Lazy(make)


def _refilled_csr_slot(slot: _Lazy, geometry, weight, transposed, threads) -> _Lazy | None:
    """A lazy CSR with the index arrays of ``slot``'s matrix if built, else ``None``."""
    like = slot.built
    if like is None:
        return None
    # The index arrays only: the old values are not kept alive.
    pattern = SimpleNamespace(indices=like.indices, indptr=like.indptr, shape=like.shape)
    return _Lazy(lambda: _read_only(refill(geometry, weight, pattern, transposed=transposed,
                                           threads=resolve_threads(threads))))


def _conj_sharing(matrix: sp.csr_array) -> sp.csr_array:
    """Complex conjugate sharing the index arrays."""
    out = sp.csr_array((matrix.data.conj(), matrix.indices, matrix.indptr), shape=matrix.shape)
    out.has_canonical_format = True
    return _read_only(out)


def _rebuild_operator(cls, geometry, weight, threads, keep_transpose=True, stored=None):
    """An unpickled operator: its matrices rebuilt from the geometry and the weight.

    ``stored``: which matrix the one form of a ``keep_transpose=False``
    operator held (W.T if True), so that the products are the same bits.
    """
    weight = np.array(weight)  # unpickled arrays are writeable: own a read-only one
    weight.flags.writeable = False
    op = cls._from_slots(geometry, weight, threads, keep_transpose=keep_transpose, stored=stored)
    op._first_slot().get()
    return op


class _Product:
    """The product with one matrix, W (``transposed=False``) or W.T, on a stored form.

    The form's own :meth:`~._forms.ProductForm.multiply` where it stores that
    matrix, else its :meth:`~._forms.ProductForm.multiply_transposed` on the
    same arrays (as scipy's ``csr.T`` is a CSC matrix on the CSR's arrays).
    Which form a product reads is the plan's choice (:func:`_plan`), made
    once; what the form stores is read when it is built.
    """

    __slots__ = ("slot", "transposed")

    def __init__(self, slot: _Lazy, transposed: bool):
        self.slot, self.transposed = slot, transposed

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        form = self.slot.get()
        if form.transposed == self.transposed:
            return form.multiply(x, threads)
        return form.multiply_transposed(x, threads)


class _Route(NamedTuple):
    """How one direction's products run: vectors of the operator's dtype, and the rest."""

    vectors: _Product
    """A 1-D operand of the operator's own dtype."""
    others: _Product
    """A block of columns, or a vector of another dtype (which scipy's kernels widen)."""

    def product_for(self, x: np.ndarray, dtype: np.dtype) -> _Product:
        """The product for operand ``x`` of an operator of ``dtype``."""
        return self.vectors if x.ndim == 1 and x.dtype == dtype else self.others


def _plan(form, geometry, transposed: bool, keep_transpose: bool, dtype,
          forward: _Lazy, backward: _Lazy) -> tuple[_Route, _Route]:
    """The routes of the operator's product and of its transposed product.

    ``forward`` and ``backward`` hold the stored forms of the operator's
    matrix (W.T if ``transposed``) and of its transpose; with
    ``keep_transpose=False`` they are the one form, of either matrix, and
    each product reads it the way round it needs.  The one reader of the
    forms' policy hook: a form may serve its matrix's vectors faster through
    the other matrix's form (:meth:`~._forms.ProductForm.vectors_via_transpose`).
    """

    def route(matrix_transposed: bool, own: _Lazy, other: _Lazy) -> _Route:
        product = _Product(own, matrix_transposed)
        if keep_transpose and form.vectors_via_transpose(geometry, matrix_transposed, dtype):
            return _Route(_Product(other, matrix_transposed), product)
        return _Route(product, product)

    return route(transposed, forward, backward), route(not transposed, backward, forward)


def _first_stored(form, geometry, transposed: bool, keep_transpose: bool, dtype) -> bool:
    """Which matrix the form built with the operator stores (W.T if True), as the plan
    has it: the one the vector products read, or the one form of a lean operator."""
    if not keep_transpose:
        return form.lean_transposed(geometry, transposed)
    return transposed != form.vectors_via_transpose(geometry, transposed, dtype)


class _ConvOperatorBase(LinearOperator):
    """Shared machinery; ``_transposed`` says whether ``matrix`` is W or W.T.

    Four matrices, each built on first use (and shared with ``.T``):
    ``_matrix_slot`` and ``_tmatrix_slot``, the canonical CSR of this
    operator's matrix and of its transpose; ``_forward_slot`` and
    ``_backward_slot``, the product forms of the same two matrices, of the
    kind ``_form`` (a :class:`~._forms.ProductForm` subclass).  With
    ``keep_transpose=False`` the two form slots are one: a form of W or of
    W.T (its ``transposed``), whose ``multiply`` or ``multiply_transposed``
    serves each direction.  ``_routes`` (:func:`_plan`) says which form and
    which way round each product reads; the products only follow it.
    """

    _transposed: bool

    # -- construction -----------------------------------------------------

    def _build(self, weight, input_shape, dtype, threads, max_bytes, keep_transpose,
               **settings):
        """Validate the constructor's arguments and build the product form."""
        if not isinstance(keep_transpose, (bool, np.bool_)):
            raise TypeError(f"keep_transpose must be True or False, "
                            f"got keep_transpose={keep_transpose!r}")
        keep_transpose = bool(keep_transpose)
        w, geom = validate(weight, input_shape, transposed=self._transposed, dtype=dtype,
                           **settings)
        if threads is not None:
            resolve_threads(threads)  # a bad setting fails here, not at the first product
        form = form_for(geom)
        stored = _first_stored(form, geom, self._transposed, keep_transpose, w.dtype)
        _check_form_size(form, geom, w.dtype, stored, max_bytes, self._transposed)
        self._setup(geom, w, threads, keep_transpose)
        # Built now, not on first use: construction is where the cost is expected.
        self._first_slot().get()

    def __reduce__(self):
        # The geometry and the weight travel; the matrices are rebuilt on
        # unpickling (the product form at once, as by the constructor, the
        # others on first use): faster than sending them, at 1 ns per entry.
        stored = None if self._keep_transpose else self._forward_slot.get().transposed
        return _rebuild_operator, (type(self), self._geometry, self._weight, self._threads,
                                   self._keep_transpose, stored)

    @classmethod
    def _from_slots(cls, geometry, weight, threads, keep_transpose=True, **slots):
        op = cls.__new__(cls)
        op._setup(geometry, weight, threads, keep_transpose, **slots)
        return op

    def _setup(self, geometry, weight, threads, keep_transpose=True, matrix=None, tmatrix=None,
               forward=None, backward=None, stored=None, pattern=None):
        self._geometry = geometry
        self._weight = weight
        self._threads = threads
        self._keep_transpose = keep_transpose
        self._form = form_for(geometry)
        transposed = self._transposed
        self._matrix_slot = matrix or _csr_slot(geometry, weight, transposed, threads)
        self._tmatrix_slot = tmatrix or _csr_slot(geometry, weight, not transposed, threads)
        if not keep_transpose:
            # One form for both directions (and for .T): of W or W.T, as the form prefers.
            if forward is None:
                if stored is None:
                    stored = _first_stored(self._form, geometry, transposed, False, weight.dtype)
                canonical = self._matrix_slot if stored == transposed else self._tmatrix_slot
                forward = _form_slot(self._form, geometry, weight, stored, Role.LEAN, threads,
                                     canonical, pattern)
            self._forward_slot = self._backward_slot = forward
        else:
            self._forward_slot = forward or _form_slot(self._form, geometry, weight,
                                                       transposed, Role.FORWARD, threads,
                                                       self._matrix_slot)
            self._backward_slot = backward or _form_slot(self._form, geometry, weight,
                                                         not transposed, Role.BACKWARD,
                                                         threads, self._tmatrix_slot)
        rows, cols = math.prod(self.output_shape), math.prod(self.input_shape)
        super().__init__(dtype=weight.dtype, shape=(rows, cols))
        self._routes = _plan(self._form, geometry, transposed, keep_transpose, self.dtype,
                             self._forward_slot, self._backward_slot)

    def _n_threads(self) -> int:
        return resolve_threads(self._threads)

    # -- the matrices -----------------------------------------------------

    @property
    def matrix(self) -> sp.csr_array:
        """The canonical CSR matrix of this operator (read-only, not a copy).

        That of :func:`conv_matrix` (or :func:`conv_transpose_matrix`).  When
        the products run on the structured form or on diagonals (see Notes
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

    @property
    def product_form(self) -> ProductFormInfo:
        """What ``matvec`` multiplies: the form's name, its bytes and its scipy matrix.

        ``name`` is ``'structured'`` (the weight's taps, multiplied as tiled
        GEMMs), ``'diagonals'`` (a DIA matrix), ``'padded_diagonals'`` (the
        padded frame's DIA matrix) or ``'csr'`` (the canonical
        :attr:`matrix`); see Notes of :class:`ConvOperator`.
        ``nbytes`` is what a product reads, the figure that bounds its speed.
        """
        form = self._forward_slot.get()
        return ProductFormInfo(form.name, form.nbytes, form, form.transposed != self._transposed)

    @property
    def keep_transpose(self) -> bool:
        """Whether the transposed products run on a second form of their own (the default).

        ``False``: one form serves ``matvec``, ``rmatvec`` and ``.T`` (see
        Notes of :class:`ConvOperator`).
        """
        return self._keep_transpose

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays of every matrix this operator holds now.

        The product forms built so far, and :attr:`matrix` and
        :attr:`transpose_matrix` if built; an array shared by two of them
        (or with ``.T``) counts once.  The weight is not counted.
        """
        arrays: dict[int, np.ndarray] = {}
        for slot in (self._forward_slot, self._backward_slot):
            form = slot.built
            if form is not None:
                arrays.update((id(a), a) for a in form._arrays())
        for slot in (self._matrix_slot, self._tmatrix_slot):
            m = slot.built
            if m is not None:
                arrays.update((id(a), a) for a in (m.data, m.indices, m.indptr))
        return sum(a.nbytes for a in _distinct_buffers(arrays.values()))

    def _first_slot(self) -> _Lazy:
        """The form built with the operator: the one its vector products run on."""
        return self._routes[0].vectors.slot

    def _forward_product(self, x: np.ndarray) -> np.ndarray:
        """This operator's matrix times a 1-D ``x`` or a 2-D block of columns."""
        return self._routes[0].product_for(x, self.dtype)(x, self._n_threads())

    def _backward_product(self, y: np.ndarray) -> np.ndarray:
        """``matrix.T @ y`` for a 1-D ``y`` or a 2-D block of columns."""
        return self._routes[1].product_for(y, self.dtype)(y, self._n_threads())

    # -- geometry ---------------------------------------------------------

    @property
    def convolution(self) -> Convolution:
        """What this operator multiplies: a frozen record of its geometry, its
        weight (forward layout) and its direction (``transposed``), with ``.T``.

        What the solvers, norm bounds and files read of an operator.
        """
        return Convolution(self._geometry, self._weight, self._transposed)

    @property
    def weight(self) -> np.ndarray:
        """The weight (read-only), in PyTorch's layout for this operator's class."""
        return self._weight

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample of ``matvec``."""
        return given_shapes(self._geometry, self._transposed)[0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output sample of ``matvec``."""
        return given_shapes(self._geometry, self._transposed)[1]

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

    # scipy's public products check the shapes with a bare "dimension
    # mismatch"; these check them first, naming the sample shape a length
    # stands for, and leave the rest to scipy.

    def matvec(self, x):
        self._check_operand(x, adjoint=False, block=False)
        return super().matvec(x)

    def rmatvec(self, x):
        self._check_operand(x, adjoint=True, block=False)
        return super().rmatvec(x)

    def matmat(self, X):
        self._check_operand(X, adjoint=False, block=True)
        return super().matmat(X)

    def rmatmat(self, X):
        self._check_operand(X, adjoint=True, block=True)
        return super().rmatmat(X)

    def dot(self, x):
        if not (isinstance(x, LinearOperator) or np.isscalar(x)) and np.ndim(x) not in (1, 2):
            self._raise_shape_error(np.shape(x), adjoint=False)
        return super().dot(x)

    def _check_operand(self, x, *, adjoint: bool, block: bool) -> None:
        """Raise a ValueError naming the expected length if ``x`` cannot be multiplied."""
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        n = self.shape[0] if adjoint else self.shape[1]
        ok = len(shape) == 2 and shape[0] == n if block else shape in ((n,), (n, 1))
        if not ok:
            if block and shape == (n,):
                name, product = ("y", "rmatmat") if adjoint else ("x", "matmat")
                raise ValueError(f"{name} has shape {shape}: {product} takes a 2-D array of "
                                 f"shape ({n}, K); use {product[:-3]}vec for a vector")
            self._raise_shape_error(shape, adjoint=adjoint)
        if is_sparse(x):
            name = "y" if adjoint else "x"
            raise TypeError(f"{name} must be a dense array, got a scipy sparse "
                            f"{type(x).__name__}; pass {name}.toarray()")

    def _raise_shape_error(self, shape, *, adjoint: bool):
        n = self.shape[0] if adjoint else self.shape[1]
        sample = self.output_shape if adjoint else self.input_shape
        side, name = ("output_shape", "y") if adjoint else ("input_shape", "x")
        forward_shaped = "conv_transpose" if self._transposed else "conv"
        backward_shaped = "conv" if self._transposed else "conv_transpose"
        if not adjoint:
            shaped = f"op.{forward_shaped}({name})"
        elif np.iscomplexobj(self._weight):  # the adjoint is .H's own product
            shaped = f"op.H.{backward_shaped}({name})"
        else:
            shaped = f"op.{backward_shaped}({name})"
        product = "rmatvec/rmatmat" if adjoint else "matvec/matmat"
        raise ValueError(
            f"{name} has shape {shape}; a {type(self).__name__} with {side} {sample} takes "
            f"vectors of length {n} (or ({n}, K) arrays) in {product}; use {shaped} for "
            f"shaped input"
        )

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
        slots = dict(matrix=self._tmatrix_slot, tmatrix=self._matrix_slot)
        if not self._keep_transpose:  # the one form serves .T too
            slots.update(forward=self._forward_slot)
        elif self._form.shared_with_transpose:  # the two product forms swap roles
            slots.update(forward=self._backward_slot, backward=self._forward_slot)
        return self._other_class()._from_slots(self._geometry, self._weight, self._threads,
                                               self._keep_transpose, **slots)

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
            self._keep_transpose,
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
        if in_shape[0] == 1 and x.shape == in_shape[1:]:
            # One channel, written without its axis: one dimension fewer than a
            # sample, two fewer than a batch, so never mistaken for either.
            y = product(x.ravel())
            return y.reshape(out_shape[1:] if out_shape[0] == 1 else out_shape)
        squeezed = f", {in_shape[1:]} (one channel, its axis left out)" if in_shape[0] == 1 else ""
        raise ValueError(
            f"{name} must have shape {in_shape} (one sample){squeezed} or (batch, *{in_shape}), "
            f"got {name}.shape={x.shape}"
        )

    def conv(self, x) -> np.ndarray:
        """The convolution applied to one sample or a batch of samples.

        Parameters
        ----------
        x : array_like, shape (C_in, L_1, ..., L_N), (B, C_in, L_1, ..., L_N) or (L_1, ..., L_N)
            The forward convolution's input (``C_in, *L`` is
            ``ConvOperator.input_shape``, ``ConvTransposeOperator.output_shape``).
            With one input channel (``C_in == 1``) a single sample may leave
            its channel axis out: ``(L_1, ..., L_N)``.

        Returns
        -------
        ndarray, shape (C_out, O_1, ..., O_N) or (B, C_out, O_1, ..., O_N)
            For a sample written without its channel axis, the result is
            written without its own when ``C_out == 1``: ``(O_1, ..., O_N)``.

        Raises
        ------
        ValueError
            If ``x`` is shaped like neither one sample nor a batch.

        Notes
        -----
        The rule for a single channel is unambiguous: a sample without its
        channel axis has one dimension fewer than a sample and two fewer
        than a batch.  There is no batch form without the channel axis.

        Examples
        --------
        A 3x3 blur of a 2-D image, with and without the channel axes:

        >>> import numpy as np
        >>> from sparse_tconv import ConvOperator
        >>> op = ConvOperator(np.full((1, 1, 3, 3), 1 / 9), (1, 8, 8), padding=1)
        >>> image = np.arange(64.0).reshape(8, 8)
        >>> op.conv(image).shape, op.conv(image[None]).shape, op.conv(image[None, None]).shape
        ((8, 8), (1, 8, 8), (1, 1, 8, 8))
        >>> np.array_equal(op.conv(image), op.conv(image[None])[0])
        True
        >>> ConvOperator(np.ones((4, 1, 3, 3)), (1, 8, 8)).conv(image).shape  # 4 channels out
        (4, 6, 6)
        """
        geom = self._geometry
        product = self._backward_product if self._transposed else self._forward_product
        return self._apply_shaped(x, product, geom.input_shape, geom.output_shape, "x")

    def conv_transpose(self, y) -> np.ndarray:
        """The transposed convolution applied to one sample or a batch.

        Parameters
        ----------
        y : array_like, shape (C_out, O_1, ..., O_N), (B, C_out, O_1, ..., O_N) or (O_1, ..., O_N)
            The forward convolution's output shape.  With one such channel
            (``C_out == 1``) a single sample may leave its channel axis out.

        Returns
        -------
        ndarray, shape (C_in, L_1, ..., L_N) or (B, C_in, L_1, ..., L_N)
            Plain transpose (no conjugation), as ``conv_transpose{N}d``.  For
            a sample written without its channel axis, the result is written
            without its own when ``C_in == 1``: ``(L_1, ..., L_N)``.

        Raises
        ------
        ValueError
            If ``y`` is shaped like neither one sample nor a batch.

        Notes
        -----
        As for :meth:`conv`: the channel axis may be left out of a single
        sample (not of a batch) when that side has one channel, and the
        result then leaves out its own if it has one channel.

        Examples
        --------
        >>> import numpy as np
        >>> from sparse_tconv import ConvTransposeOperator
        >>> op = ConvTransposeOperator(np.ones((1, 1, 2, 2)), (1, 4, 4), stride=2)
        >>> op.conv_transpose(np.ones((4, 4))).shape, op.conv_transpose(np.ones((1, 4, 4))).shape
        ((8, 8), (1, 8, 8))
        >>> op.T.conv_transpose(np.ones((4, 4))).shape  # the same convolution, seen from .T
        (8, 8)
        """
        geom = self._geometry
        product = self._forward_product if self._transposed else self._backward_product
        return self._apply_shaped(y, product, geom.output_shape, geom.input_shape, "y")

    def with_weight(self, weight, *, dtype=None):
        """A new operator for new weights of the same shape and geometry.

        The index arrays (``indices``, ``indptr``) of every matrix this
        operator has built (the forms its products run on, and ``matrix`` or
        ``transpose_matrix`` if asked for) are shared; only the values are
        computed: now for the forward product's matrix, on first use for the
        others.  The new operator has the same ``keep_transpose``; with
        False, its one form stores the same matrix (W or W.T) as this one's.

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
        arr, target = weight_and_dtype(weight, dtype)
        if arr.shape != self._weight.shape:
            raise ValueError(
                f"weight must have the shape of this operator's weight {self._weight.shape}, "
                f"got weight.shape={arr.shape}"
            )
        w = private_copy(arr, target)
        geom, threads, transposed = self._geometry, self._threads, self._transposed
        mslot = (_refilled_csr_slot(self._matrix_slot, geom, w, transposed, threads)
                 or _csr_slot(geom, w, transposed, threads))
        tslot = (_refilled_csr_slot(self._tmatrix_slot, geom, w, not transposed, threads)
                 or _csr_slot(geom, w, not transposed, threads))
        slots = dict(matrix=mslot, tmatrix=tslot)
        lean = self._forward_slot.built if not self._keep_transpose else None
        if lean is not None:  # the one form, stored as before, on its pattern
            slots.update(stored=lean.transposed, pattern=lean.pattern)
        elif self._keep_transpose:
            # The product forms already built lend their patterns (index arrays
            # only, not the old values).
            roles = (("forward", self._forward_slot, transposed, Role.FORWARD, mslot),
                     ("backward", self._backward_slot, not transposed, Role.BACKWARD, tslot))
            for name, old, matrix_transposed, role, canonical in roles:
                if old.built is not None:
                    slots[name] = _form_slot(self._form, geom, w, matrix_transposed, role,
                                             threads, canonical, pattern=old.built.pattern)
        op = type(self)._from_slots(geom, w, threads, self._keep_transpose, **slots)
        op._first_slot().get()  # the new values are computed now, as by the constructor
        return op


def _distinct_buffers(arrays: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The arrays that own their memory, each once (a view counts as its base)."""
    seen: dict[int, np.ndarray] = {}
    for a in arrays:
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        seen[id(base)] = base
    return list(seen.values())


def _check_form_size(form, geometry, dtype, transposed, max_bytes, given_transposed) -> None:
    """Refuse, before building, a product form no machine could hold, or larger than ``max_bytes``.

    ``transposed`` says which matrix the form stores, ``given_transposed``
    which convolution the caller described (for the shapes the error names).
    """
    if max_bytes is not None:
        max_bytes = check_positive_int(max_bytes, "max_bytes")
    nbytes = form.predict_nbytes(geometry, dtype, transposed=transposed)
    if nbytes > INT64_MAX:
        given, _ = given_shapes(geometry, given_transposed)
        raise ValueError(
            f"the operator's product form ({form.name}) would need {nbytes:.3g} bytes "
            f"(nnz={geometry.nnz:.3g}), more than any address space (2**63 bytes): "
            f"input_shape={given}, weight.shape={geometry.weight_shape}")
    if max_bytes is not None and nbytes > max_bytes:
        raise MemoryError(
            f"the operator's product form ({form.name}) would need {nbytes} bytes "
            f"(nnz={geometry.nnz}, {np.dtype(dtype)} values), more than max_bytes={max_bytes}"
        )


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
    max_bytes : int, optional
        Raise :class:`MemoryError` before allocating if the product form the
        constructor builds (see Notes and :attr:`product_form`) would need
        more bytes than this.  What later products or :attr:`matrix` build on
        first use is not counted.
    keep_transpose : bool, optional
        Default True: the transposed products (``rmatvec``, ``.T``,
        :meth:`conv_transpose`) run on a second product form of the
        transpose, built on first use.  False: one form serves both
        directions, halving the memory an operator holds once it has
        multiplied both ways (see Notes, *One form for both directions*).

    Attributes
    ----------
    matrix : scipy.sparse.csr_array
        W, as :func:`conv_matrix` builds it (built on first use when the
        products run on the structured form or diagonals, see Notes).
    transpose_matrix : scipy.sparse.csr_array
        W.T, built directly on first use (same bytes as ``matrix``).
    input_shape, output_shape : tuple of int
        ``(C_in, *L)`` and ``(C_out, *O)``.
    shape : tuple of int
        ``(prod(output_shape), prod(input_shape))``.
    dtype : numpy.dtype
        That of ``matrix``.
    product_form : ProductFormInfo
        What ``matvec`` multiplies: ``'structured'``, ``'diagonals'``,
        ``'padded_diagonals'`` or ``'csr'``, its bytes and the scipy matrix (see
        Notes).
    nbytes : int
        Bytes of every matrix the operator holds now.
    keep_transpose : bool
        As given.

    Raises
    ------
    ValueError, TypeError
        As for :func:`conv_matrix` (a product form no machine can hold
        included), and for an invalid ``threads`` (at most 1024) or
        ``max_bytes``.
    MemoryError
        If ``max_bytes`` is exceeded, or this machine cannot allocate the
        product form.

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

    *Structured (channel layers).*  With more than one channel per group on
    some side (any padding mode, stride, dilation, N), the operator stores
    the weight alone, as one ``(C_out/groups) x (C_in/groups * taps)`` block
    per group (and, for stride 1, the flipped weight of the transposed
    product): hundreds of kB where the CSR matrix takes gigabytes, built in
    well under a millisecond.  ``W @ x`` pads ``x`` by the padding mode once,
    then, tile by tile of output rows (about 1 MB of windows), gathers every
    tap's window into one matrix and multiplies it by the weight in one GEMM
    (numpy ``matmul``, BLAS, on one BLAS thread per library thread).  ``W.T @
    y`` is, for stride 1, the same computation with the flipped weight over
    the padded frame, folded back onto the input (reflect, replicate and
    circular padding add each padded element onto the one it copies); for
    other strides one GEMM per tile gives every tap's windows, added into the
    frame tap by tap, tiles that write disjoint rows at once.  A batch of
    columns runs as one wider GEMM per tile.  The tiles depend on the
    geometry alone, so the results do not depend on the number of threads;
    they equal ``matrix @ x`` to rounding (the CSR matrix adds up the taps
    that padding folds onto one input element first).  ``matrix`` and
    ``transpose_matrix`` are built only when read.  (The explicit zeros of
    zero padding are multiplied: an infinite weight gives NaN where the CSR
    product, which stores no such entry, does not.)

    *Diagonals.*  With one channel, stride 1, zeros padding and an output as
    large as the input (``'same'``-like padding, every dilated kernel shorter
    than its dimension), each kernel tap is one diagonal of W, with
    explicit zeros where a tap falls into the padding (scipy's DIA layout,
    values and no index).  Away from the borders of the first dimension a
    diagonal's values repeat with that dimension's flat stride, so the
    operator stores, for W and for W.T, the border rows' values and one
    period of the interior's (a few MB at any size: 16 MB against 170 MB for
    the whole DIA matrix of a 9x9 blur of 512x512, which
    ``product_form.matrix`` builds when asked) and multiplies with scipy's
    serial DIA kernel, a chunk of rows per call (the period stays in cache),
    threads taking disjoint chunks.  A block of
    several columns (``matmat``, a batch) runs on ``matrix`` (or
    ``transpose_matrix``), built on first use: scipy's multi-vector CSR
    kernel reads it once for all the columns, 1.2x faster per column than
    the DIA kernel on transposed columns, for 12 more bytes per entry; so does a
    vector with a NaN or infinity (the diagonals' stored zeros would carry it,
    times zero, to rows that do not read it).  The results are bit for bit
    scipy's CSR products with ``matrix``/``transpose_matrix``.  Taps of weight
    zero are left out of the stored diagonals.

    *Padded diagonals.*  With one channel and stride 1 but another padding
    (reflect, replicate, circular, or zeros that change the size), ``W = C P``:
    ``P`` pads the vector into a frame and ``C``, the frame's convolution, is
    a sum of diagonals on the frame's grid, stored as above (a few MB at any
    size).  ``matvec`` pads, multiplies and keeps the output's positions;
    ``rmatvec`` widens ``y`` onto the frame, multiplies by the diagonals of
    ``C.T`` and folds the padding back.  A block of columns runs column by
    column; a vector with a NaN or infinity runs on ``matrix``.  The results
    equal the CSR products to rounding (the CSR adds the taps that padding
    sends to one element first) and do not depend on the number of threads.

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
    scipy's serial product, or the structured form in the wider dtype.

    *One form for both directions* (``keep_transpose=False``).  The
    operator stores one product form, of W or of W.T, and ``.T`` shares it;
    the products of the other direction run on the same arrays, so after
    ``matvec`` and ``rmatvec`` it holds one form instead of two (0.5x the
    bytes; ``nbytes`` tells).  The structured form is the same either way
    (its one form serves both directions, as the default's two do).  The
    transposed product of the CSR matrix adds each entry's product into its
    column's output, reading the matrix in its stored order (scipy's serial
    CSC kernel).  Parts of rows that write disjoint outputs run at once, in
    phases, from a partition fixed by the matrix: results do not depend on
    the number of threads, and equal the default's to rounding (bit for bit
    with diagonals, whose one form holds the banded diagonals of both W and
    W.T: a few MB, and the transposed product sums in the order of scipy's
    DIA kernel on W.T's diagonals, as the default).  Diagonals run a block
    of columns column by column on the diagonals (no CSR matrix is built for
    it); a vector with a NaN or infinity still goes to ``matrix``, built on
    first use.

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
        max_bytes=None,
        keep_transpose=True,
    ):
        self._build(
            weight,
            input_shape,
            dtype,
            threads,
            max_bytes,
            keep_transpose,
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
    threads, max_bytes : int, optional
        As for :class:`ConvOperator`.
    keep_transpose : bool, optional
        As for :class:`ConvOperator`.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array
        The matrix of :func:`conv_transpose_matrix` (built on first use when
        the products run on the structured form or diagonals, see
        :class:`ConvOperator`).
    transpose_matrix : scipy.sparse.csr_array
        The forward convolution's matrix, built on first use.
    input_shape, output_shape : tuple of int
        ``(C_in, *O)`` and ``(C_out, *L)``.

    Raises
    ------
    ValueError, TypeError, MemoryError
        As for :func:`conv_transpose_matrix` and :class:`ConvOperator`.

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
        max_bytes=None,
        keep_transpose=True,
    ):
        self._build(
            weight,
            input_shape,
            dtype,
            threads,
            max_bytes,
            keep_transpose,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )

    @property
    def output_padding(self) -> tuple[int, ...]:
        # From the sizes: the transpose of a ConvOperator keeps the forward
        # geometry, whose own output_padding is 0 whatever its sizes.
        return transpose_output_padding(self._geometry)


CONV_OPERATORS = (ConvOperator, ConvTransposeOperator)
"""The local operators, for ``isinstance`` checks (the distributed one is apart)."""
