"""The interface every product form implements, and the reorderings they share.

A *product form* is how an operator stores one matrix (W or W.T) for its
products: the canonical CSR, dense channel blocks (BSR) or diagonals (DIA).
The operator holds one form for its own products (:attr:`Role.FORWARD`) and
one for its transpose (:attr:`Role.BACKWARD`), or, with
``keep_transpose=False``, one form only (:attr:`Role.LEAN`) whose
:meth:`~ProductForm.multiply_transposed` serves the other direction on the
same arrays.  It chooses their kind from the geometry once
(:func:`sparse_tconv._forms.form_for`), asks for each with a
:class:`Request`, and otherwise only calls the methods below: a new form is
one new module with one new class, added to ``sparse_tconv._forms.FORMS``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from .._geometry import ConvGeometry, Convolution

__all__ = ["ProductForm", "Canonical", "Role", "Request", "to_position_major",
           "from_position_major"]

Canonical = Callable[[], sp.csr_array]
"""Gets (building it on first use) the canonical CSR of the form's own matrix."""


class Role(enum.Enum):
    """What a stored form serves in its operator."""

    FORWARD = "forward"
    """The operator's own matrix, for its products."""
    BACKWARD = "backward"
    """The transpose of the operator's matrix, for ``rmatvec`` (a form may number
    its columns otherwise there, as the CSR form does)."""
    LEAN = "lean"
    """The one form of a ``keep_transpose=False`` operator: both directions on its
    arrays, building nothing more for either."""


@dataclass(frozen=True, eq=False)
class Request:
    """What an operator asks a form for: one matrix of a convolution, in one role.

    Each form reads what it needs of it: every form the matrix
    (``convolution``, whose ``transposed`` says W or W.T) and ``threads``;
    the CSR and diagonal forms also the role and ``canonical`` (the CSR form
    shares the canonical CSR, the diagonals run a batch of columns on it).
    """

    convolution: Convolution
    role: Role = Role.FORWARD
    threads: int = 1
    canonical: Canonical | None = None
    """The canonical CSR of the matrix, built on first use (None: not offered)."""

    @property
    def geometry(self) -> ConvGeometry:
        return self.convolution.geometry

    @property
    def weight(self) -> np.ndarray:
        return self.convolution.weight

    @property
    def transposed(self) -> bool:
        return self.convolution.transposed

    def canonical_matrix(self) -> sp.csr_array:
        """The canonical CSR of the requested matrix (built on first use)."""
        if self.canonical is None:
            raise ValueError("this request offers no canonical matrix")
        return self.canonical()


class ProductForm(abc.ABC):
    """One matrix of an operator (W or W.T) as its products read it.

    ``matrix`` is the scipy matrix multiplied, rows and columns numbered as
    the form chooses; :meth:`multiply` takes and returns vectors in the
    canonical (channel-major) numbering.  ``transposed`` says whether the
    matrix is W.T; ``backward`` whether the form serves the products of the
    transpose of its operator's own matrix (``rmatvec``), which some forms
    number differently.
    """

    name: ClassVar[str]
    """What the form is called in :attr:`ConvOperator.product_form` and the benchmarks."""

    shared_with_transpose: ClassVar[bool] = True
    """Whether an operator's backward form serves as the forward form of its ``.T``.

    True when the form numbers its matrix the same way in both roles, so
    that one build serves both operators.
    """

    # A scipy CSR, BSR or DIA array: the stubs' common base has none of
    # data/indices/indptr/offsets, so the formats' own attributes are used as Any.
    matrix: Any
    transposed: bool

    @staticmethod
    @abc.abstractmethod
    def applies(geometry: ConvGeometry) -> bool:
        """Whether operators of this geometry multiply through this form."""

    @classmethod
    @abc.abstractmethod
    def predict_nbytes(cls, geometry: ConvGeometry, dtype: np.dtype, *,
                       transposed: bool) -> int:
        """The :attr:`nbytes` :meth:`build` will give for W (``transposed=False``) or
        W.T of ``dtype``, computed from the geometry alone."""

    @classmethod
    @abc.abstractmethod
    def build(cls, request: Request) -> ProductForm:
        """The form of the requested matrix, for a validated weight."""

    @classmethod
    def vectors_via_transpose(cls, geometry: ConvGeometry, transposed: bool, dtype) -> bool:
        """Whether a vector times the matrix ``transposed`` (W.T if True) of ``dtype``
        runs faster as the other matrix's form's :meth:`multiply_transposed` than
        as this matrix's own :meth:`multiply`.  False by default."""
        return False

    @classmethod
    def lean_transposed(cls, geometry: ConvGeometry, transposed: bool) -> bool:
        """Which matrix a ``keep_transpose=False`` operator whose own matrix is W
        (``transposed=False``) or W.T stores: W.T if True.  Its own by default; a
        form may prefer the orientation on which both directions run faster."""
        return transposed

    @property
    def pattern(self) -> object | None:
        """What :meth:`refill` shares: the index arrays, no values (None: nothing to share)."""
        return None

    @classmethod
    def refill(cls, pattern: object | None, request: Request) -> ProductForm:
        """The form for a new weight on the :attr:`pattern` of a form already built.

        Only the values are computed; without a pattern, the form is built.
        """
        return cls.build(request)

    @abc.abstractmethod
    def multiply(self, x: np.ndarray, threads: int) -> np.ndarray:
        """The matrix times a 1-D ``x`` or a 2-D block of columns, on ``threads`` threads."""

    @abc.abstractmethod
    def multiply_transposed(self, y: np.ndarray, threads: int) -> np.ndarray:
        """The plain transpose of the matrix (no conjugation) times a 1-D ``y`` or a
        2-D block of columns, on the form's own arrays, in the canonical numbering.

        What a ``keep_transpose=False`` operator runs instead of a second form;
        its result does not depend on ``threads``.
        """

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays a product reads (what bounds its speed)."""
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def freeze(self) -> ProductForm:
        """Make every array of the form read-only (it is shared), and return it."""
        for array in self._arrays():
            array.flags.writeable = False
        return self

    def _arrays(self) -> list[np.ndarray]:
        m = self.matrix
        return [m.data, m.indices, m.indptr]


def to_position_major(v: np.ndarray, channels: int) -> np.ndarray:
    """Reorder rows from ``(channel, position)`` to ``(position, channel)`` (a copy)."""
    if channels == 1:
        return np.ascontiguousarray(v)
    rest = v.shape[1:]
    positions = v.shape[0] // channels  # not -1: v may have no columns
    return np.ascontiguousarray(v.reshape((channels, positions) + rest).swapaxes(0, 1)).reshape(
        v.shape)


def from_position_major(v: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`to_position_major`."""
    if channels == 1:
        return v
    rest = v.shape[1:]
    positions = v.shape[0] // channels
    return np.ascontiguousarray(v.reshape((positions, channels) + rest).swapaxes(0, 1)).reshape(
        v.shape)
