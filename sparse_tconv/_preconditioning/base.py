"""The interface every preconditioner construction implements.

A *construction* turns an operator ``W`` and a damping into the three pieces
of :class:`~sparse_tconv._preconditioners.SpectralPreconditioner`, ``S
T^{-1} diag(K_f) T S``: the transform ``T`` (a *basis*), the blocks ``K_f``
and the border scaling ``S`` (or ``None``).  The solvers only call the
methods below, through the registry (:mod:`sparse_tconv._preconditioning`):
a new construction is one new module with one new class, added to
:data:`~sparse_tconv._preconditioning.CONSTRUCTIONS` (and, for ``'auto'`` to
pick it, to :data:`~sparse_tconv._preconditioning.AUTO_ORDER`).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeAlias

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .._preconditioners import SpectralPreconditioner

if TYPE_CHECKING:
    from .._operator import ConvOperator, ConvTransposeOperator

__all__ = ["Basis", "Construction", "Operator", "Pieces"]

Operator: TypeAlias = "ConvOperator | ConvTransposeOperator"


class Basis(Protocol):
    """A transform ``T`` of samples ``(B, C, *P)`` to per-group vectors ``(B, g, m, *F)``.

    ``forward`` applies ``T``, ``inverse`` its inverse; ``real`` says that
    ``T`` maps real samples to real (or half-spectrum) vectors, so that a
    complex sample is transformed as its real and imaginary parts.
    """

    @property
    def channels(self) -> int: ...

    @property
    def sample_size(self) -> tuple[int, ...]: ...

    @property
    def real(self) -> bool: ...

    def forward(self, x: np.ndarray) -> np.ndarray: ...

    def inverse(self, X: np.ndarray) -> np.ndarray: ...


Pieces: TypeAlias = "tuple[Basis, np.ndarray, np.ndarray | None]"
"""``(basis, blocks, scale)``: ``T``, the blocks ``K_f`` as (g, m, m, *F), and ``S`` or None."""


class Construction(abc.ABC):
    """One way of approximating ``(W^H W + damp^2 I)^{-1}``; stateless (class methods only)."""

    name: ClassVar[str]
    """The ``kind`` that names it in :func:`sparse_tconv.solvers.preconditioner`."""

    default_shift: ClassVar[float] = 0.0
    """The ``shift`` used when none is given, where :meth:`exact` is False.

    A fraction of the model's largest eigenvalue added to ``damp**2``: an
    inexact model's border errors, divided by ``damp**2``, would leave
    outlying eigenvalues.
    """

    regularisers: ClassVar[tuple[str, ...]] = ("identity",)
    """What it models besides ``W^H W``: ``'identity'`` (``damp^2 I``), ``'gradient'``
    (``damp^2 D^H D``, :mod:`~sparse_tconv._preconditioning.gradient`)."""

    @classmethod
    def exact(cls, op: Operator) -> bool:
        """Whether the construction is the inverse of ``W^H W + damp^2 I`` for ``op``.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.

        Returns
        -------
        bool
            True only where it holds for every damping; then no shift is applied.
        """
        return False

    @classmethod
    def models(cls, op: Operator) -> bool:
        """Whether the construction models ``W^H W`` itself for ``op``: exactly, or exactly
        away from the border.

        :func:`~sparse_tconv.solvers.tikhonov`'s ``M='auto'`` preconditions
        only with a construction that does; elsewhere it runs plain CG.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.

        Returns
        -------
        bool
            :meth:`exact` unless a subclass says more.
        """
        return cls.exact(op)

    @classmethod
    def set_up_cost(cls, op: Operator) -> float:
        """About what building the preconditioner for ``op`` costs, in products with the
        normal matrix (one with W and one with ``W^H``: one plain CG iteration).

        :func:`~sparse_tconv.solvers.tikhonov`'s ``M='auto'`` runs plain CG where
        plain CG's solve is expected to cost less.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.

        Returns
        -------
        float
            2 unless a subclass says more (the transforms of a kernel-sized array
            and the blocks: about a product).
        """
        return 2.0

    @classmethod
    def auto_applies(cls, op: Operator) -> bool:
        """Whether ``kind='auto'`` picks this construction for ``op``.

        Asked in the order of :data:`~sparse_tconv._preconditioning.AUTO_ORDER`,
        and only where no earlier entry applied.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.

        Returns
        -------
        bool
            False unless a subclass says otherwise (never picked by 'auto').
        """
        return False

    @classmethod
    def auto_applies_to(cls, op: Operator, regulariser: str) -> bool:
        """Whether ``kind='auto'`` picks this construction for ``op`` and ``regulariser``.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.
        regulariser : {'identity', 'gradient'}
            What the system adds to ``W^H W`` (times ``damp**2``).

        Returns
        -------
        bool
            :meth:`auto_applies` where the construction models ``regulariser``.
        """
        return regulariser in cls.regularisers and cls.auto_applies(op)

    @classmethod
    def preconditioner(cls, op: Operator, damp: float, boost: float, threads: int,
                       correct: bool, regulariser: str = "identity") -> LinearOperator:
        """The preconditioner for ``op`` and ``damp`` (the arguments of :meth:`blocks`).

        By default the :class:`~sparse_tconv._preconditioners.SpectralPreconditioner`
        of :meth:`blocks`; a construction that is not spectral (a factorisation)
        returns its own LinearOperator, Hermitian positive definite, with the
        attributes ``kind`` and ``damp``.
        """
        if regulariser == "identity":  # (a construction need not know of the others)
            pieces = cls.blocks(op, damp, boost, threads, correct)
        else:
            pieces = cls.blocks(op, damp, boost, threads, correct, regulariser)
        return SpectralPreconditioner(*pieces, cls.name, damp,
                                      np.result_type(op.dtype, np.float64))

    @classmethod
    @abc.abstractmethod
    def blocks(cls, op: Operator, damp: float, boost: float, threads: int,
               correct: bool, regulariser: str = "identity") -> Pieces:
        """The pieces of the preconditioner for ``op`` and ``damp``.

        Parameters
        ----------
        op : ConvOperator or ConvTransposeOperator
            W.
        damp : float
            The damping of the system.
        boost : float
            The blocks are inverted with ``damp**2 + boost * lambda_max``
            (``lambda_max`` the largest eigenvalue of the construction's model).
        threads : int
            Threads for the transforms.
        correct : bool
            Whether to apply the construction's border correction (if it has one).
        regulariser : str, optional
            One of :attr:`regularisers` (passed only when not ``'identity'``):
            the blocks then approximate ``(W^H W + damp^2 D^H D)^{-1}``.

        Returns
        -------
        Pieces
            ``(basis, blocks, scale)``.

        Raises
        ------
        NotImplementedError
            Where the construction does not apply to ``op``'s geometry.
        """
