"""The preconditioner registry (sparse_tconv._preconditioning): its contract and 'auto'.

- every registered construction, on small operators it applies to: a
  Hermitian positive definite LinearOperator of the right shape, checked on
  its dense matrix; the inverse of the damped normal matrix where it says it
  is exact;
- 'auto' (and tikhonov's choice) against a table recorded from the if-chain
  the registry replaced;
- a construction defined here, added to the registry, is a ``kind`` of
  ``preconditioner`` and an ``M`` of ``tikhonov`` with nothing else changed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator, solvers
from sparse_tconv import _preconditioning as registry
from sparse_tconv._preconditioners import _PositionBasis
from sparse_tconv._preconditioning import auto_kind
from sparse_tconv.solvers import preconditioner, tikhonov

from reference import random_array


def disk(radius: int) -> np.ndarray:
    """A defocus blur: low-pass, symmetric, not separable."""
    t = np.arange(-radius, radius + 1)
    k = (t[:, None] ** 2 + t[None, :] ** 2 <= (radius + 0.5) ** 2).astype(float)
    return k / k.sum()


def gaussian(size: int, sigma: float) -> np.ndarray:
    """A separable blur."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return np.outer(g, g) / np.outer(g, g).sum()


SHARPEN = np.array([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]])


def sharpen(channels: int = 2) -> np.ndarray:
    """A 2 -> 2 channel sharpening layer: not low-pass, not separable."""
    mix = np.array([[1.0, 0.3], [0.2, 1.0]])[:channels, :channels]
    return np.einsum("oc,kl->ockl", mix, SHARPEN)


def random_op(cls, weight_shape, input_shape, seed=0, dtype=np.float64, **settings):
    rng = np.random.default_rng(seed)
    return cls(random_array(rng, weight_shape, dtype), input_shape, **settings)


# ---------------------------------------------------------------------------
# The contract of every construction
# ---------------------------------------------------------------------------

# Small operators (at most a few hundred unknowns), each construction applying
# to several: one and two channels, convolutions and transposed ones, every
# padding mode, stride, groups, dilation, complex weights.
CONTRACT_OPERATORS = {
    "circular 1ch": lambda: random_op(ConvOperator, (1, 1, 3, 3), (1, 8, 6), padding=1,
                                      padding_mode="circular"),
    "circular 2ch stride": lambda: random_op(ConvOperator, (4, 2, 3, 3), (4, 6, 8), padding=1,
                                             stride=2, groups=2, padding_mode="circular"),
    "zeros 2ch": lambda: random_op(ConvOperator, (2, 2, 3, 3), (2, 6, 7), padding=1, seed=5),
    "reflect 2ch blur": lambda: ConvOperator(np.einsum("oc,kl->ockl", [[1.0, 0.5], [0.5, 1.0]],
                                                       disk(1)), (2, 6, 6), padding=1,
                                             padding_mode="reflect"),
    "replicate 2ch complex": lambda: random_op(ConvOperator, (2, 2, 3, 3), (2, 5, 6),
                                               padding=1, padding_mode="replicate",
                                               dtype=np.complex128, seed=3),
    "transposed 4->2 stride": lambda: random_op(ConvTransposeOperator, (4, 2, 4, 4), (4, 4, 4),
                                                stride=2, padding=1, seed=1),
    "transposed circular": lambda: random_op(ConvTransposeOperator, (4, 2, 4, 4), (4, 4, 4),
                                             stride=2, padding=1, padding_mode="circular",
                                             seed=6),
    "transposed separable": lambda: ConvTransposeOperator(gaussian(3, 1.0)[None, None],
                                                          (1, 5, 4), stride=2, padding=1,
                                                          padding_mode="zeros"),
    "separable replicate": lambda: ConvOperator(gaussian(5, 1.0)[None, None], (1, 8, 7),
                                                padding="same", padding_mode="replicate"),
    "1-D dilated": lambda: random_op(ConvOperator, (2, 1, 5), (1, 11), padding=4, dilation=2,
                                     seed=2),
    "3-D": lambda: random_op(ConvOperator, (2, 2, 3, 3, 3), (2, 4, 5, 4), padding=1, seed=4),
    "anti-diagonal zeros": lambda: ConvOperator(np.fliplr(np.diag([1.0, 2, 1]))[None, None],
                                                (1, 7, 6), padding=1),
    "anti-diagonal reflect": lambda: ConvOperator(np.fliplr(np.diag([1.0, 2, 1]))[None, None],
                                                  (1, 7, 6), padding=1, padding_mode="reflect"),
}


def dense(op) -> np.ndarray:
    return op.matrix.toarray().astype(np.result_type(op.dtype, np.float64))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(registry.CONSTRUCTIONS))
def test_every_construction_is_hermitian_positive_definite(name):
    construction = registry.CONSTRUCTIONS[name]
    assert construction.name == name
    built = 0
    for label, make in CONTRACT_OPERATORS.items():
        op = make()
        n = op.shape[1]
        for damp in (0.1, 1e-2):
            try:
                P = preconditioner(op, damp, name)
            except NotImplementedError:
                break  # documented: the construction does not apply to this geometry
            assert P.shape == (n, n) and P.kind == name and P.damp == damp, label
            Pd = P @ np.eye(n)
            assert rel(Pd, Pd.conj().T) < 1e-10, label
            assert np.linalg.eigvalsh((Pd + Pd.conj().T) / 2).min() > 0, label
            if construction.exact(op):
                A = dense(op)
                inverse = np.linalg.inv(A.conj().T @ A + damp**2 * np.eye(n))
                assert rel(Pd, inverse) < 1e-8, (label, damp)
            built += 1
    assert built >= 4  # each applies to at least two of the operators


def test_the_exact_constructions_are_exact_somewhere():
    # (so that the exactness check above is not empty)
    exact = {name for name, construction in registry.CONSTRUCTIONS.items()
             for make in CONTRACT_OPERATORS.values() if construction.exact(make())}
    assert exact == {"circulant", "kronecker", "lines"}


def test_auto_always_finds_a_registered_construction():
    last = registry.AUTO_ORDER[-1]
    for make in CONTRACT_OPERATORS.values():
        op = make()
        assert last.auto_applies(op)
        assert registry.auto(op).name in registry.CONSTRUCTIONS


# ---------------------------------------------------------------------------
# 'auto' as the if-chain it replaced chose
# ---------------------------------------------------------------------------


def auto_cases():
    """``(label, operator, auto's kind, tikhonov's M='auto' kind)``.

    Recorded by running the if-chain (``auto_kind`` and ``_tikhonov_kind``
    before the registry) on these operators; since tikhonov's ``M='auto'``
    preconditions only with a construction that models ``W^H W``
    (:meth:`~Construction.models`), plain CG (``'none'``) where auto's kind
    does not (a kernel that is not an even blur, not exact).
    """
    blur = disk(2)[None, None]
    separable = gaussian(5, 1.0)[None, None]
    two = np.stack([blur[0], 0.5 * blur[0]])  # (2, 1, 5, 5): two output channels
    return [
        ("circular blur", ConvOperator(blur, (1, 8, 8), padding="same",
                                       padding_mode="circular"), "circulant", "circulant"),
        ("reflect blur", ConvOperator(blur, (1, 8, 8), padding="same",
                                      padding_mode="reflect"), "dct1", "dct1"),
        ("zeros blur", ConvOperator(blur, (1, 8, 8), padding="same"), "dct2", "dct2"),
        ("separable replicate", ConvOperator(separable, (1, 8, 8), padding="same",
                                             padding_mode="replicate"),
         "kronecker", "kronecker"),
        ("separable strided", ConvOperator(separable, (1, 9, 8), padding=2, stride=2),
         "kronecker", "kronecker"),
        ("separable, too long an axis", ConvOperator(separable, (1, 5000, 3), padding="same"),
         "dct2", "dct2"),
        # sum L^3 = 256^3 is 4,400 times 15 taps * 256: the eigendecomposition costs more
        # than a whole plain CG solve (at most 500 times a product); a 1-D kernel lies on a
        # line, and with zero padding the banded factorisation is exact (it was 'dct2')
        ("1-D, 15 taps, 256 long", ConvOperator(np.exp(-np.arange(15.0))[None, None], (1, 256),
                                                padding=7), "lines", "lines"),
        ("1-D, 15 taps, 256 long, replicate",
         ConvOperator(np.exp(-np.arange(15.0))[None, None], (1, 256), padding=7,
                      padding_mode="replicate"), "lines", "lines"),
        # a 2-D kernel off one line, where the Kronecker set-up is too costly: the DCT
        ("disk, 5000 long", ConvOperator(disk(2)[None, None], (1, 5000, 5), padding="same"),
         "dct2", "dct2"),
        ("anti-diagonal", ConvOperator(np.fliplr(np.eye(7))[None, None], (1, 16, 16),
                                       padding=3), "lines", "lines"),
        ("anti-diagonal, replicate", ConvOperator(np.fliplr(np.eye(7))[None, None],
                                                  (1, 16, 16), padding=3,
                                                  padding_mode="replicate"),
         "lines", "lines"),
        ("1-D, 15 taps, 64 long", ConvOperator(np.exp(-np.arange(15.0))[None, None], (1, 64),
                                               padding=7), "kronecker", "kronecker"),
        # channel mixing, stride 1: the circulant inside, the border's block exactly
        ("sharpen 2ch", ConvOperator(sharpen(), (2, 8, 8), padding=1), "bordered", "bordered"),
        ("sharpen 2ch reflect", ConvOperator(sharpen(), (2, 8, 8), padding=1,
                                             padding_mode="reflect"), "bordered", "bordered"),
        # no circulant of a dilated kernel wider than the input: the cosine of the padding
        ("sharpen dilated", ConvOperator(sharpen(), (2, 6, 6), padding=4, dilation=4),
         "dct2", "none"),
        ("sharpen dilated reflect", ConvOperator(sharpen(), (2, 6, 6), padding=4, dilation=4,
                                                 padding_mode="reflect"), "dct1", "none"),
        ("transposed blur", ConvTransposeOperator(blur, (1, 4, 4), padding=1, stride=2),
         "dct2", "dct2"),
        # low-pass on the coarse grid, where a transposed convolution's Gram matrix lives
        ("transposed sharpen", ConvTransposeOperator(sharpen(), (2, 4, 4), padding=1, stride=2),
         "dct2", "dct2"),
        ("transposed random, stride", random_op(ConvTransposeOperator, (2, 2, 3, 3), (2, 6, 6),
                                                seed=2, padding=1, stride=2),
         "circulant", "none"),
        ("strided two outputs", ConvOperator(two, (1, 8, 8), padding=2, stride=2),
         "circulant", "none"),
        ("strided, odd size", ConvOperator(two, (1, 9, 8), padding=2, stride=2),
         "block_jacobi", "none"),
        ("strided groups, circular", random_op(ConvOperator, (4, 2, 3, 3), (4, 6, 8), padding=1,
                                               stride=2, groups=2, padding_mode="circular"),
         "circulant", "circulant"),
    ]


@pytest.mark.parametrize("label, op, kind, tikhonov_kind", auto_cases(),
                         ids=[case[0] for case in auto_cases()])
def test_auto_chooses_as_before(label, op, kind, tikhonov_kind):
    assert registry.auto(op).name == kind
    assert auto_kind(op) == kind
    assert solvers._tikhonov_kind(op) == tikhonov_kind
    if op.shape[1] <= 4096:
        assert preconditioner(op, 1e-2).kind == kind


# ---------------------------------------------------------------------------
# A new construction is one class and one registry line
# ---------------------------------------------------------------------------


class Identity(registry.Construction):
    """The identity, as blocks of ones at every position (a construction in a test)."""

    name: ClassVar[str] = "identity"

    @classmethod
    def blocks(cls, op, damp, boost, threads, correct):
        channels, size = op.input_shape[0], tuple(op.input_shape[1:])
        return _PositionBasis(channels, channels, size), np.ones((channels, 1, 1, *size)), None


def test_a_registered_construction_is_a_kind_and_an_m(monkeypatch):
    op = ConvOperator(sharpen(), (2, 8, 8), padding=1)
    y = op @ np.random.default_rng(0).standard_normal(op.shape[1])
    with pytest.raises(ValueError, match="kind must be one of .*got kind='identity'"):
        preconditioner(op, kind="identity")
    monkeypatch.setitem(registry.CONSTRUCTIONS, "identity", Identity)

    P = preconditioner(op, 0.1, kind="identity")
    x = np.random.default_rng(1).standard_normal(op.shape[1])
    assert P.kind == "identity" and P.shape == (op.shape[1],) * 2
    np.testing.assert_array_equal(P @ x, x)

    solution, info = tikhonov(op, y, 0.1, M="identity", rtol=1e-10)
    plain, _ = tikhonov(op, y, 0.1, M="none", rtol=1e-10)
    assert info.preconditioner == "identity" and info.converged
    np.testing.assert_allclose(solution, plain, rtol=1e-8)
    with pytest.raises(TypeError, match=r"M must be a preconditioner kind .*'identity'"):
        tikhonov(op, y, 0.1, M=3)


def test_auto_walks_the_order_it_is_given(monkeypatch):
    class AutoIdentity(Identity):
        @classmethod
        def auto_applies(cls, op):
            return op.weight.shape[0] == 2  # two output channels

        @classmethod
        def models(cls, op):
            return True  # (else tikhonov's M='auto' would run plain CG)

    monkeypatch.setitem(registry.CONSTRUCTIONS, "identity", Identity)
    monkeypatch.setattr(registry, "AUTO_ORDER", [AutoIdentity, *registry.AUTO_ORDER])
    two = ConvOperator(sharpen(), (2, 8, 8), padding=1)
    one = ConvOperator(disk(2)[None, None], (1, 8, 8), padding="same")
    assert preconditioner(two).kind == "identity" and preconditioner(one).kind == "dct2"
    assert solvers._tikhonov_kind(two) == "identity"  # not wide, not exact: auto's choice
