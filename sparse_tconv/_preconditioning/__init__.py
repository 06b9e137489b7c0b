"""The preconditioner constructions, one module each, and the registry that names them.

Each construction is a :class:`~.base.Construction` subclass in a module of
its own; :data:`CONSTRUCTIONS` maps the ``kind`` of
:func:`sparse_tconv.solvers.preconditioner` to it, and :data:`AUTO_ORDER` is
what ``kind='auto'`` walks: the first entry that applies to an operator wins.
To add a construction, write its module and put its class in
:data:`CONSTRUCTIONS` (and in :data:`AUTO_ORDER`, for 'auto' to pick it).
The kinds are read from the registry at call time, so nothing else changes.

The shared machinery (the transforms, :class:`SpectralPreconditioner`, the
regularised inverse of the blocks, the border scaling) is in
:mod:`sparse_tconv._preconditioners`, which does not import this package.
"""

from __future__ import annotations

from scipy.sparse.linalg import LinearOperator

from .._blas import one_blas_thread
from .._parallel import resolve_threads
from .base import Construction, Operator
from .block_jacobi import BlockJacobi
from .bordered import Bordered
from .circulant import Circulant, ExactCirculant
from .cosine import DCT1, DCT2
from .gradient import REGULARISERS
from .kronecker import Kronecker
from .lines import Lines

__all__ = [
    "AUTO_ORDER",
    "CONSTRUCTIONS",
    "Construction",
    "REGULARISERS",
    "auto",
    "auto_kind",
    "build_preconditioner",
    "construction",
    "kinds",
    "resolve",
]

CONSTRUCTIONS: dict[str, type[Construction]] = {
    cls.name: cls for cls in (Circulant, DCT2, DCT1, Kronecker, Lines, Bordered, BlockJacobi)
}
"""Every construction by its kind, in the order error messages list them."""

AUTO_ORDER: list[type[Construction]] = [
    ExactCirculant,  # W circulant: the inverse, by the DFT
    Kronecker,  # a separable single-channel kernel: the inverse, axis by axis
    Lines,  # a kernel on one line: the inverse, line by line, the folded taps' ring last
    DCT1,  # a blur with a Toeplitz Gram matrix: the cosine matching the padding
    DCT2,
    Bordered,  # channel mixing: the circulant inside, the border's block solved exactly
    Circulant,  # the shifted circulant, where the kernel has one on the grid
    BlockJacobi,  # anything else
]
"""What ``kind='auto'`` asks, in order (:meth:`~.base.Construction.auto_applies`).

The last entry applies to every operator.
"""


def kinds() -> tuple[str, ...]:
    """The registered kinds, as they are now (``'auto'`` not among them)."""
    return tuple(CONSTRUCTIONS)


def construction(kind: str) -> type[Construction]:
    """The construction registered as ``kind`` (a KeyError for an unknown one)."""
    return CONSTRUCTIONS[kind]


def auto(op: Operator, regulariser: str = "identity") -> type[Construction]:
    """The first entry of :data:`AUTO_ORDER` that applies to ``op`` (and models ``regulariser``)."""
    return next(cls for cls in AUTO_ORDER if cls.auto_applies_to(op, regulariser))


def resolve(kind: str, op: Operator, regulariser: str = "identity") -> type[Construction]:
    """The construction ``kind`` names for ``op``: :func:`auto`'s choice for ``'auto'``."""
    return auto(op, regulariser) if kind == "auto" else construction(kind)


def auto_kind(op) -> str:
    """The construction ``kind='auto'`` picks: the first of the registry's ``AUTO_ORDER``."""
    return auto(op).name


def build_preconditioner(op, damp: float, kind: str, *, boost: float | None = None,
                         correct: bool = True,
                         regulariser: str = "identity") -> LinearOperator:
    """The preconditioner of the construction registered as ``kind``: its
    :meth:`~.base.Construction.preconditioner` (a :class:`SpectralPreconditioner`
    for the spectral ones).

    The blocks are inverted with ``damp**2 + boost * lambda_max`` (a
    preconditioner damped more than the system, ``lambda_max`` the largest
    eigenvalue of the model; default: the construction's ``default_shift``,
    0 where it is exact for ``op``); ``correct=False`` leaves out the border
    correction (the DCT-II's and the surrogate circulant's diagonal match,
    the DCT-I's reflect weights), for the benchmark's comparison.
    ``regulariser='gradient'`` approximates ``(W^H W + damp^2 D^H D)^{-1}``
    instead (NotImplementedError from a construction that does not model it).
    """
    method = construction(kind)
    if regulariser not in method.regularisers:
        models = [name for name, cls in CONSTRUCTIONS.items() if regulariser in cls.regularisers]
        raise NotImplementedError(
            f"kind={kind!r} does not model L={regulariser!r}; the kinds that do: {models}"
        )
    threads = resolve_threads(op.threads)
    if boost is None:
        # (exact() is asked only of a shifted construction: Kronecker's costs an SVD)
        boost = method.default_shift if method.default_shift and not method.exact(op) else 0.0
    # LAPACK on one thread: OpenBLAS's threads spin for a while after a threaded call,
    # and took the cores from the products that follow (the Kronecker set-up of a 3x3
    # box at 240x240 and its one iteration: 43-250 ms in five runs, 27-34 with one).
    with one_blas_thread():
        return method.preconditioner(op, damp, boost, threads, correct, regulariser)
