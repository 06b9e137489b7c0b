"""The operators' product forms: how W and W.T are stored for the products.

Each form is a :class:`~.base.ProductForm` subclass in a module of its own;
:data:`FORMS` lists them in order of preference and :func:`form_for` picks
the first that applies to a geometry.  To add a form (a float32-specific
layout, a GPU one), write its module and put its class in :data:`FORMS`.
"""

from __future__ import annotations

from .._geometry import ConvGeometry
from .base import Canonical, ProductForm, Request, Role, from_position_major, to_position_major
from .csr import CsrForm, csr_product
from .diagonals import DiagonalForm
from .padded import PaddedDiagonalForm
from .structured import StructuredForm

__all__ = [
    "FORMS",
    "form_for",
    "ProductForm",
    "Canonical",
    "Request",
    "Role",
    "CsrForm",
    "DiagonalForm",
    "PaddedDiagonalForm",
    "StructuredForm",
    "csr_product",
    "to_position_major",
    "from_position_major",
]

FORMS: tuple[type[ProductForm], ...] = (StructuredForm, DiagonalForm, PaddedDiagonalForm,
                                         CsrForm)
"""Every product form, the preferred first; :class:`CsrForm` applies to any geometry."""


def form_for(geometry: ConvGeometry) -> type[ProductForm]:
    """The form operators of this geometry multiply through."""
    return next(form for form in FORMS if form.applies(geometry))
