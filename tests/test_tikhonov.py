"""sparse_tconv.solvers: normal operator, preconditioners, Tikhonov solves.

Layered as the rest of the suite:

- the Fourier convention the constructions rely on, against the built matrix;
- each preconditioner against what it claims, on dense matrices: the exact
  inverse (circulant on circular padding; DCT-II on numpy's 'symmetric'
  padding, built here from the definition; DCT-I with the reflect weights),
  the eigenvalue bound of the reflect construction, block-Jacobi's blocks;
- ``tikhonov`` against numpy's dense solve of the normal equations, on every
  padding mode, operator class, stride, groups and dtype, and the residual
  guarantee on every return path (exact, exact then refined, CG, CG
  restarted, maxiter reached, maxiter 0, ``W^H y = 0``);
- errors, messages naming the argument, inputs left unmodified;
- hypothesis over random geometries.

Iteration counts are compared (deterministic); times are not.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg

from sparse_tconv import ConvOperator, ConvTransposeOperator, _methods
from sparse_tconv import _preconditioners as pre
from sparse_tconv._fourier import circular_blocks
from sparse_tconv._geometry import conv_geometry
from sparse_tconv._preconditioning import build_preconditioner
from sparse_tconv.solvers import normal_operator, preconditioner, tikhonov

from reference import random_array, reference_conv_matrix, seed_of
from strategies import geometries

MODES = ["zeros", "reflect", "replicate", "circular"]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


def dense(op) -> np.ndarray:
    return op.matrix.toarray().astype(np.result_type(op.dtype, np.float64))


def dense_tikhonov(A, y, damp):
    """numpy's solution of ``(A^H A + damp^2 I) x = A^H y``, and the condition number."""
    G = A.conj().T @ A + damp**2 * np.eye(A.shape[1])
    return np.linalg.solve(G, A.conj().T @ y), np.linalg.cond(G)


def normal_residual(A, x, y, damp) -> float:
    """The issue's residual, from the dense matrix: ``||A^H (A x - y) + damp^2 x|| / ||A^H y||``."""
    AH = A.conj().T
    return float(np.linalg.norm(AH @ (A @ x - y) + damp**2 * x) / np.linalg.norm(AH @ y))


def gaussian(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return np.outer(g, g) / np.outer(g, g).sum()


# (class, weight shape, input shape, settings): convolutions and transposed ones,
# 1-D to 3-D, strides, groups, dilation
GEOMETRIES = [
    (ConvOperator, (1, 1, 3, 3), (1, 8, 6), dict(padding=1)),
    (ConvOperator, (4, 2, 3, 3), (4, 6, 8), dict(padding=1, stride=2, groups=2)),
    (ConvOperator, (3, 2, 4), (2, 9), dict(padding=((1, 2),), stride=3)),
    (ConvOperator, (2, 1, 5), (1, 11), dict(padding=4, dilation=2)),
    (ConvOperator, (2, 2, 3, 3, 3), (2, 4, 5, 4), dict(padding=1)),
    (ConvTransposeOperator, (4, 2, 4, 4), (4, 4, 4), dict(stride=2, padding=1)),
    (ConvTransposeOperator, (2, 3, 3), (2, 6), dict(padding=1)),
]


def make(cls, weight_shape, input_shape, settings, mode="circular", dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return cls(random_array(rng, weight_shape, dtype), input_shape, padding_mode=mode, **settings)


# ---------------------------------------------------------------------------
# The Fourier convention, against the built matrix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", GEOMETRIES[:3] + GEOMETRIES[4:5])
def test_circular_blocks_act_as_b_of_minus_f_in_the_fftn_domain(case):
    # What _preconditioners relies on: Y(f) = B(-f) X(f), with X the unnormalised fftn
    # of the polyphase components x[c, m s + r] (columns (c, r) in C order).
    cls, wshape, ishape, settings = case
    op = make(cls, wshape, ishape, settings, dtype=np.complex128, seed=1)
    geom = op._geometry
    n, M, S = geom.ndim, geom.output_size, geom.stride
    x = random_array(np.random.default_rng(2), op.input_shape, np.complex128)
    shape = [geom.in_channels] + [v for m, s in zip(M, S) for v in (m, s)]
    phases = x.reshape(shape).transpose([0, *range(2, 2 * n + 1, 2), *range(1, 2 * n, 2)])
    X = np.fft.fftn(phases, axes=range(1 + n, 1 + 2 * n))
    Y = np.fft.fftn(op.conv(x), axes=range(1, 1 + n))
    B = circular_blocks(geom, op.weight).reshape(geom.groups, *M, *circular_blocks(
        geom, op.weight).shape[2:])
    for axis, m in enumerate(M):
        B = np.take(B, (-np.arange(m)) % m, axis=1 + axis)  # B(-f)
    g = geom.groups
    Xg = X.reshape(g, -1, math.prod(M))
    Yg = Y.reshape(g, -1, math.prod(M))
    Bg = B.reshape(g, math.prod(M), *B.shape[-2:])
    np.testing.assert_allclose(np.einsum("gfac,gcf->gaf", Bg, Xg), Yg, atol=1e-12)


# ---------------------------------------------------------------------------
# Preconditioners against their claims, on dense matrices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("case", GEOMETRIES)
def test_circulant_is_the_exact_inverse_on_circular_padding(case, dtype):
    cls, wshape, ishape, settings = case
    op = make(cls, wshape, ishape, settings, dtype=dtype)
    A = dense(op)
    n = A.shape[1]
    for damp in (0.3, 1e-2):
        P = preconditioner(op, damp)
        assert P.kind == "circulant" and P.shape == (n, n)
        G = A.conj().T @ A + damp**2 * np.eye(n)
        Pd = P @ np.eye(n)
        assert rel(Pd, np.linalg.inv(G)) < 1e-9
        assert rel(P.matvec(np.eye(n)[:, 3]), Pd[:, 3]) < 1e-14  # matvec == matmat


def symmetric_padding_matrix(kernel: np.ndarray, shape) -> np.ndarray:
    """'same' correlation with numpy's 'symmetric' (half-sample) padding, column by column."""
    pads = [(k // 2, k // 2) for k in kernel.shape]
    n = math.prod(shape)
    columns = []
    for j in range(n):
        x = np.zeros(n)
        x[j] = 1.0
        windows = sliding_window_view(np.pad(x.reshape(shape), pads, mode="symmetric"),
                                      kernel.shape)
        columns.append(np.tensordot(windows, kernel, axes=kernel.ndim).ravel())
    return np.array(columns).T


def axis_symmetric_kernel(rng, shape) -> np.ndarray:
    k = rng.random(shape)
    for axis in range(k.ndim):
        k = k + np.flip(k, axis)
    return k / k.sum()


@pytest.mark.parametrize("shape, kernel_shape", [((7, 9), (5, 3)), ((13,), (5,)),
                                                 ((4, 5, 3), (3, 3, 1))])
def test_dct2_model_is_exact_for_symmetric_padding(shape, kernel_shape):
    # The half-sample symmetric extension of an axis-symmetric kernel is diagonalised
    # by the DCT-II: without the border correction the preconditioner is its inverse.
    kernel = axis_symmetric_kernel(np.random.default_rng(3), kernel_shape)
    op = ConvOperator(kernel[None, None], (1, *shape), padding="same")
    A = symmetric_padding_matrix(kernel, shape)
    n = A.shape[1]
    damp = 0.1
    P = build_preconditioner(op, damp, "dct2", correct=False, boost=0.0)
    assert rel(P @ np.eye(n), np.linalg.inv(A.T @ A + damp**2 * np.eye(n))) < 1e-12


def reflect_weights(shape) -> np.ndarray:
    """``D = diag(1/sqrt(2), 1, ..., 1, 1/sqrt(2))`` per axis, as a Kronecker product."""
    D = np.ones(1)
    for n in shape:
        d = np.ones(n)
        d[[0, -1]] = 1 / math.sqrt(2)
        D = np.kron(D, d)
    return D


@pytest.mark.parametrize("shape, kernel_shape", [((7, 9), (5, 3)), ((12,), (7,)),
                                                 ((5, 4, 6), (3, 3, 3))])
def test_dct1_with_reflect_weights_bounds_the_condition_number(shape, kernel_shape):
    # W = D^-1 S D with S diagonalised by the DCT-I; the preconditioner is
    # D^-1 (S^2 + damp^2)^-1 D^-1 and its preconditioned matrix has eigenvalues in [1, 2^N].
    kernel = axis_symmetric_kernel(np.random.default_rng(4), kernel_shape)
    op = ConvOperator(kernel[None, None], (1, *shape), padding="same", padding_mode="reflect")
    A = dense(op)
    n = A.shape[1]
    D = reflect_weights(shape)
    S = (D[:, None] * A) / D[None, :]
    assert rel(S, S.T) < 1e-14
    for damp in (1e-1, 1e-3):
        P = preconditioner(op, damp, "dct1")
        assert P.kind == "dct1" and preconditioner(op).kind in ("dct1", "kronecker")
        Pd = P @ np.eye(n)
        expected = np.linalg.inv(S @ S + damp**2 * np.eye(n)) / D[:, None] / D[None, :]
        assert rel(Pd, expected) < 1e-10
        eig = np.linalg.eigvals(Pd @ (A.T @ A + damp**2 * np.eye(n))).real
        assert eig.min() > 1 - 1e-8 and eig.max() < 2 ** len(shape) + 1e-8


@pytest.mark.parametrize("kind", ["dct2", "circulant"])
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_the_border_correction_gives_the_model_the_true_diagonal(kind, mode):
    # S M^-1 S, with S^2 = diag(M) / diag(W^H W) (damp 0, no shift): its inverse
    # S^-1 M S^-1 has the diagonal of W^H W, border included.
    kernel = np.array([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])
    kernel = np.stack([kernel, np.roll(kernel, 1, axis=1)])[:, None]  # (2, 1, 3, 3)
    op = ConvOperator(np.concatenate([kernel, 0.5 * kernel], axis=1), (2, 7, 6), padding=1,
                      padding_mode=mode)
    A = dense(op)
    P = preconditioner(op, 0.0, kind, shift=0) @ np.eye(A.shape[1])
    # (to the eigenvalue floor of 1e-10 times the largest: the model is nearly singular, and
    # inverting P costs up to 5e-7 with LAPACK's kernels of one processor or another)
    np.testing.assert_allclose(np.diag(np.linalg.inv(P)), np.diag(A.T @ A), rtol=1e-5)
    raw = preconditioner(op, 0.0, kind, shift=0, border=False) @ np.eye(A.shape[1])
    assert not np.allclose(np.diag(np.linalg.inv(raw)), np.diag(A.T @ A), rtol=1e-3)


def test_block_jacobi_inverts_the_diagonal_blocks_of_the_gram_matrix():
    op = make(ConvOperator, (4, 2, 3, 3), (4, 5, 6), dict(padding=1, groups=2), mode="reflect")
    A = dense(op)
    G = A.T @ A
    damp = 0.2
    P = preconditioner(op, damp, "block_jacobi") @ np.eye(A.shape[1])
    positions = 30
    expected = np.zeros_like(G)
    for g, i in itertools.product(range(2), range(positions)):
        index = [(g * 2 + c) * positions + i for c in range(2)]
        block = G[np.ix_(index, index)] + damp**2 * np.eye(2)
        expected[np.ix_(index, index)] = np.linalg.inv(block)
    assert rel(P, expected) < 1e-12


@pytest.mark.parametrize("size, kernel, stride, dilation, padding", [
    (9, 3, 1, 1, (1, 1)), (9, 5, 2, 1, (3, 0)), (5, 3, 3, 2, (6, 5)), (2, 5, 1, 2, (0, 9)),
    (12, 4, 3, 3, (0, 0)), (1, 1, 1, 1, (0, 0)), (7, 2, 2, 1, (0, 5)),
])
@pytest.mark.parametrize("on_input", [True, False])
def test_window_counts_mark_the_taps_that_stay_inside(size, kernel, stride, dilation, padding,
                                                       on_input):
    geom = conv_geometry((1, 1, kernel), (1, size), stride=stride, dilation=dilation,
                         padding=[padding])
    out = geom.output_size[0]
    expected = np.zeros((size if on_input else out, kernel))
    for p, t in itertools.product(range(out), range(kernel)):  # the definition
        i = p * stride + t * dilation - padding[0]
        if 0 <= i < size:
            expected[i if on_input else p, t] = 1
    np.testing.assert_array_equal(pre._window_counts(geom, 0, on_input), expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRIES)
def test_gram_diagonal_is_the_squared_column_norms(case, mode):
    cls, wshape, ishape, settings = case
    try:
        op = make(cls, wshape, ishape, settings, mode=mode, dtype=np.complex128)
    except ValueError:
        pytest.skip("padding too large for this mode")
    A = op.matrix.toarray()
    np.testing.assert_allclose(pre.gram_diagonal(op).ravel(), np.sum(np.abs(A) ** 2, axis=0),
                               rtol=1e-12)


@pytest.mark.parametrize("kind", ["circulant", "dct2", "dct1", "kronecker", "block_jacobi"])
@pytest.mark.parametrize("mode", ["zeros", "replicate", "reflect"])
def test_every_kind_is_hermitian_positive_definite(kind, mode):
    channels = 1 if kind == "kronecker" else 2  # (Kronecker: one channel in and out)
    op = make(ConvOperator, (channels, channels, 3, 3), (channels, 6, 7), dict(padding=1),
              mode=mode, dtype=np.complex128, seed=5)
    n = op.shape[1]
    for damp in (1e-2, 0.0):
        P = preconditioner(op, damp, kind)
        Pd = P @ np.eye(n)
        assert rel(Pd, Pd.conj().T) < 1e-12
        assert np.linalg.eigvalsh((Pd + Pd.conj().T) / 2).min() > 0
        assert P.H is P


def test_shift_damps_the_preconditioner_more():
    op = make(ConvOperator, (2, 2, 3, 3), (2, 8, 8), dict(padding=1), mode="zeros")
    plain = preconditioner(op, 1e-2, "circulant", shift=0) @ np.eye(op.shape[1])
    shifted = preconditioner(op, 1e-2, "circulant", shift=0.5) @ np.eye(op.shape[1])
    # Larger damping: a smaller inverse, still positive definite.
    assert np.linalg.norm(shifted, 2) < 0.1 * np.linalg.norm(plain, 2)
    assert np.linalg.eigvalsh(shifted).min() > 0


def disk(radius: int) -> np.ndarray:
    """A defocus blur: symmetric along each axis, not separable."""
    t = np.arange(-radius, radius + 1)
    k = (t[:, None] ** 2 + t[None, :] ** 2 <= (radius + 0.5) ** 2).astype(float)
    return k / k.sum()


def test_auto_kinds():
    blur, separable = disk(2)[None, None], gaussian(5, 1.0)[None, None]
    sharpen = np.array([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]])
    two = np.stack([blur[0], 0.5 * blur[0]])  # (2, 1, 5, 5): two output channels
    cases = [
        (ConvOperator(blur, (1, 8, 8), padding="same", padding_mode="circular"), "circulant"),
        (ConvOperator(blur, (1, 8, 8), padding="same", padding_mode="reflect"), "dct1"),
        (ConvOperator(blur, (1, 8, 8), padding="same"), "dct2"),
        (ConvOperator(blur, (1, 8, 8), padding="same", padding_mode="replicate"), "dct2"),
        (ConvOperator(two, (1, 8, 8), padding=2, stride=2), "circulant"),
        (ConvOperator(two, (1, 9, 8), padding=2, stride=2), "block_jacobi"),
        (ConvTransposeOperator(blur, (1, 4, 4), padding=1, stride=2), "dct2"),
        (ConvOperator(separable, (1, 8, 8), padding="same", padding_mode="replicate"),
         "kronecker"),
        (ConvOperator(separable, (1, 9, 8), padding=2, stride=2), "kronecker"),
        (ConvOperator(separable, (1, 5000, 3), padding="same"), "dct2"),  # too long an axis
        # not low-pass (a sharpening filter), stride 1: the circulant and the border's block
        (ConvOperator(np.einsum("oc,kl->ockl", [[1.0, 0.3], [0.2, 1.0]], sharpen), (2, 8, 8),
                      padding=1), "bordered"),
        (ConvOperator(np.stack([blur[0], blur[0]], axis=1), (2, 8, 8), padding=2), "dct2"),
    ]
    for op, kind in cases:
        assert preconditioner(op).kind == kind


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls, kernel, input_shape, settings", [
    (ConvOperator, np.outer([1.0, 2, 3], [1, -1, 2, 1]), (1, 7, 9), dict(padding=(1, 2))),
    (ConvOperator, np.outer([1.0, 2, 1], [3, 1, 2]), (1, 9, 8),
     dict(padding=1, stride=2, dilation=(1, 2))),
    (ConvTransposeOperator, np.outer([1.0, 2, 1, 1], [3, 1, 2, 1]), (1, 4, 5),
     dict(padding=1, stride=2, output_padding=1)),
    (ConvOperator, np.multiply.outer(np.outer([1.0, 2], [1, 1j, 2]), [1, 0.5, 2]), (1, 4, 5, 4),
     dict(padding=1)),
])
def test_kronecker_is_the_exact_inverse_for_separable_kernels(cls, kernel, input_shape,
                                                              settings, mode):
    # A separable kernel makes W a Kronecker product of 1-D convolutions in every padding
    # mode (the modes act axis by axis), and W^H W that of their Gram matrices.
    op = cls(kernel[None, None], input_shape, padding_mode=mode, **settings)
    A = dense(op)
    n = A.shape[1]
    P = preconditioner(op, 0.1, "kronecker") @ np.eye(n)
    assert rel(P, np.linalg.inv(A.conj().T @ A + 0.01 * np.eye(n))) < 1e-10
    y = np.random.default_rng(16).standard_normal(A.shape[0])
    x, info = tikhonov(op, y, 0.1, M="kronecker", rtol=1e-10)
    assert info.iterations <= 2 and info.converged


def _rank_one(rng, *sizes) -> np.ndarray:
    out = rng.standard_normal(sizes[0])
    for n in sizes[1:]:
        out = np.multiply.outer(out, rng.standard_normal(n))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls, kernel_size, input_shape, settings", [
    (ConvOperator, (3, 4), (3, 6, 7), dict(padding=(1, 2))),
    (ConvOperator, (3, 2), (2, 9, 8), dict(padding=1, stride=2, dilation=(2, 1))),
    (ConvTransposeOperator, (3, 4), (2, 4, 5), dict(padding=1, stride=2, output_padding=1)),
    (ConvOperator, (5,), (4, 11), dict(padding=2)),
    (ConvOperator, (2, 3, 2), (2, 4, 5, 3), dict(padding=1)),
])
def test_kronecker_is_the_exact_inverse_for_depthwise_separable_kernels(
        cls, kernel_size, input_shape, settings, mode):
    # A depthwise layer is one convolution per channel: W is block diagonal, and with
    # a separable kernel in each channel every block is a Kronecker product of 1-D
    # convolutions, each with its own eigenbases.
    rng = np.random.default_rng(41)
    channels = input_shape[0]
    kernel = np.stack([_rank_one(rng, *kernel_size) for _ in range(channels)])[:, None]
    try:
        op = cls(kernel, input_shape, groups=channels, padding_mode=mode, **settings)
    except ValueError:
        pytest.skip("this mode does not take this geometry")
    A = dense(op)
    n = A.shape[1]
    M = preconditioner(op, 0.1, "kronecker")
    assert rel(M @ np.eye(n), np.linalg.inv(A.conj().T @ A + 0.01 * np.eye(n))) < 1e-10
    # 'auto' picks it, or the DFT where W is circulant (also exact)
    exact = ("kronecker", "circulant") if mode == "circular" else ("kronecker",)
    y = rng.standard_normal(A.shape[0])
    x, info = tikhonov(op, y, 0.1, rtol=1e-10)
    assert info.preconditioner in exact and info.iterations <= 2 and info.converged
    assert rel(x, dense_tikhonov(A, y, 0.1)[0]) < 1e-8


def test_kronecker_needs_one_channel_per_group_and_a_rank_one_kernel_in_each():
    rng = np.random.default_rng(42)
    separable = np.stack([_rank_one(rng, 3, 3) for _ in range(2)])
    # one kernel of the two not separable: the per-channel model is not exact
    mixed = separable.copy()
    mixed[1] = rng.standard_normal((3, 3))
    op = ConvOperator(mixed[:, None], (2, 8, 8), padding=1, groups=2)
    assert preconditioner(op, 0.1).kind != "kronecker"
    # a depthwise multiplier (two output channels per input channel): W^H W of each
    # channel is a sum of two Kronecker products
    doubled = np.concatenate([separable, 2 * separable[::-1]])[:, None]
    op = ConvOperator(doubled, (2, 8, 8), padding=1, groups=2)
    assert preconditioner(op, 0.1).kind != "kronecker"
    with pytest.raises(NotImplementedError, match="one input and one output channel per group"):
        preconditioner(op, 0.1, "kronecker")


def test_kronecker_factors_of_separable_and_other_kernels():
    u, v, w = np.array([1.0, -2, 3]), np.array([2.0, 1]), np.array([1.0, 0.5, 0.25, 2])
    sigma, vectors, error = pre.kronecker_factors(np.multiply.outer(np.outer(u, v), w))
    assert error < 1e-14
    approx = sigma * np.multiply.outer(np.outer(*vectors[:2]), vectors[2])
    assert rel(approx, np.multiply.outer(np.outer(u, v), w)) < 1e-14
    assert pre.kronecker_factors(disk(2))[2] > 0.1
    # Not separable: the best rank one of a 2-D kernel is its leading singular pair.
    k = np.random.default_rng(17).standard_normal((4, 5))
    s = np.linalg.svd(k, compute_uv=False)
    expected = np.sqrt(np.sum(s[1:] ** 2)) / np.linalg.norm(s)
    assert pre.kronecker_factors(k)[2] == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Tikhonov against dense solves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRIES)
def test_tikhonov_matches_the_dense_solve(case, mode, dtype):
    cls, wshape, ishape, settings = case
    try:
        op = make(cls, wshape, ishape, settings, mode=mode, dtype=dtype,
                  seed=seed_of(case, mode))
    except ValueError:
        pytest.skip("padding too large for this mode")
    # A single-precision operator is solved in double precision on its weights (taps
    # that land together are summed in double precision).
    A = dense(op.with_weight(op.weight, dtype=np.result_type(dtype, np.float64)))
    y = np.random.default_rng(seed_of(mode, case)).standard_normal(A.shape[0])
    for damp in (0.5, 1e-2):
        x, info = tikhonov(op, y, damp, rtol=1e-10)
        expected, cond = dense_tikhonov(A, y, damp)
        assert info.converged and info.residual <= 1e-10
        assert x.dtype == np.result_type(dtype, np.float64)
        assert info.method == ("fft" if mode == "circular" and info.method == "fft" else "cg")
        # The guarantee, measured independently, and the error it implies.
        assert normal_residual(A, x, y, damp) <= 1.01e-10 + 1e-13 * cond
        assert rel(x, expected) <= 1e-9 + 1e-10 * cond


@pytest.mark.parametrize("case", GEOMETRIES)
def test_circular_padding_is_solved_exactly_by_fft(case):
    cls, wshape, ishape, settings = case
    op = make(cls, wshape, ishape, settings, dtype=np.complex128, seed=7)
    A = dense(op)
    y = random_array(np.random.default_rng(8), A.shape[0], np.complex128)
    for damp in (1e-2, 1e-4):
        x, info = tikhonov(op, y, damp)
        assert (info.method, info.preconditioner, info.iterations) == ("fft", "circulant", 0)
        expected, cond = dense_tikhonov(A, y, damp)
        assert rel(x, expected) < 1e-12 + 1e-14 * cond
        assert info.residual < 1e-12
    # damp = 0: the minimum-norm least-squares solution, as numpy's lstsq gives it.
    x, info = tikhonov(op, y, 0.0)
    assert rel(x, np.linalg.lstsq(A, y, rcond=None)[0]) < 1e-9


def test_a_blur_is_deconvolved_with_far_fewer_iterations():
    n = 48
    y = np.random.default_rng(9).random(n * n)
    for blur, mode, kind, most in [(disk(3), "zeros", "dct2", 1 / 4),
                                   (disk(3), "replicate", "dct2", 1 / 2),
                                   (disk(3), "reflect", "dct1", 1 / 20),
                                   (gaussian(7, 1.5), "replicate", "kronecker", 1 / 50)]:
        op = ConvOperator(blur[None, None], (1, n, n), padding="same", padding_mode=mode)
        plain = tikhonov(op, y, 1e-2, M=None)[1]
        # 'auto''s choice (the safeguard's race, which may drop it, decides by time)
        assert preconditioner(op, 1e-2).kind == kind
        fast = tikhonov(op, y, 1e-2, M=kind)[1]
        assert fast.preconditioner == kind and plain.preconditioner == "none"
        assert plain.converged and fast.converged
        assert fast.iterations <= most * plain.iterations


def test_shaped_data_give_a_shaped_solution_and_nothing_is_modified():
    op = ConvOperator(gaussian(3, 1.0)[None, None].repeat(2, axis=0), (1, 10, 10),
                      padding="same")
    y = np.random.default_rng(10).standard_normal(op.output_shape)
    x0 = np.ones(op.input_shape)
    y_copy, x0_copy = y.copy(), x0.copy()
    y.flags.writeable = x0.flags.writeable = False  # any write raises
    x, info = tikhonov(op, y, 1e-2, x0=x0)
    assert x.shape == op.input_shape and info.converged
    np.testing.assert_array_equal(y, y_copy)
    np.testing.assert_array_equal(x0, x0_copy)
    flat, _ = tikhonov(op, y.ravel(), 1e-2, x0=x0.ravel())
    assert flat.shape == (op.shape[1],) and rel(flat, x) < 1e-5


def test_complex_data_on_a_real_operator():
    op = make(ConvOperator, (2, 2, 3, 3), (2, 6, 6), dict(padding=1), mode="replicate")
    A = dense(op)
    y = random_array(np.random.default_rng(11), A.shape[0], np.complex128)
    x, info = tikhonov(op, y, 1e-1, rtol=1e-12)
    assert x.dtype == np.complex128 and info.converged
    assert rel(x, dense_tikhonov(A, y, 1e-1)[0]) < 1e-9
    circular = make(ConvOperator, (2, 2, 3, 3), (2, 6, 6), dict(padding=1))
    x, info = tikhonov(circular, y, 1e-1)
    assert info.method == "fft" and rel(x, dense_tikhonov(dense(circular), y, 1e-1)[0]) < 1e-11


def test_single_precision_operators_are_solved_in_double_precision():
    op = make(ConvOperator, (1, 1, 5, 5), (1, 12, 12), dict(padding=2), mode="zeros",
              dtype=np.float32)
    A = dense(op)  # the float32 values, exactly
    y = np.random.default_rng(12).standard_normal(A.shape[0]).astype(np.float32)
    x, info = tikhonov(op, y, 1e-2, rtol=1e-12)
    assert x.dtype == np.float64 and info.residual <= 1e-12
    assert normal_residual(A, x, y.astype(np.float64), 1e-2) < 1e-11


# ---------------------------------------------------------------------------
# The residual guarantee on every return path
# ---------------------------------------------------------------------------


def blur_problem(mode="zeros", n=24, seed=13):
    op = ConvOperator(gaussian(5, 1.2)[None, None], (1, n, n), padding="same",
                      padding_mode=mode)
    return op, np.random.default_rng(seed).random(op.shape[0])


def test_maxiter_reached_is_reported():
    op, y = blur_problem()
    seen = []
    x, info = tikhonov(op, y, 1e-3, M=None, maxiter=3, callback=seen.append)
    assert info.iterations == 3 and len(seen) == 3 and not info.converged
    assert info.residual > 1e-6
    assert info.residual == pytest.approx(normal_residual(dense(op), x, y, 1e-3), rel=1e-8)
    x, info = tikhonov(op, y, 1e-3, maxiter=0)
    assert info.iterations == 0 and not info.converged and not np.any(x)
    assert info.residual == pytest.approx(1.0)


def test_maxiter_zero_still_solves_circular_padding_directly():
    op, y = blur_problem("circular")
    x, info = tikhonov(op, y, 1e-2, maxiter=0)
    assert info.method == "fft" and info.converged and info.iterations == 0


def test_an_inexact_direct_solve_is_refined_by_cg(monkeypatch):
    op, y = blur_problem("circular")
    real = pre.exact_solve

    def perturbed(*args):  # a direct solve 1% off: CG must take over
        x = real(*args)
        return x * (1 + 0.01 * np.random.default_rng(14).standard_normal(x.size))

    monkeypatch.setattr(_methods.fft, "exact_solve", perturbed)
    x, info = tikhonov(op, y, 1e-2, rtol=1e-9)
    assert info.method == "fft" and 1 <= info.iterations <= 5 and info.converged
    assert normal_residual(dense(op), x, y, 1e-2) <= 1.01e-9


def test_cg_restarts_until_the_true_residual_meets_rtol(monkeypatch):
    op, y = blur_problem("replicate")
    calls = []

    def early_cg(A, b, x0=None, *, maxiter=None, **kwargs):  # stops after 4 iterations
        calls.append(maxiter)
        return cg(A, b, x0=x0, maxiter=min(4, maxiter), **kwargs)

    monkeypatch.setattr(_methods.base, "cg", early_cg)
    x, info = tikhonov(op, y, 1e-2, rtol=1e-8, M="dct2")
    assert len(calls) >= 2 and info.converged
    assert calls[1] == calls[0] - 4  # the iterations left
    assert normal_residual(dense(op), x, y, 1e-2) <= 1.01e-8


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_data_the_adjoint_annihilates_give_zero(mode):
    # W^H y = 0: x = 0 solves the normal equations exactly, by either method.
    op = ConvOperator(gaussian(3, 1.0)[None, None], (1, 6, 6), padding=1, padding_mode=mode)
    x, info = tikhonov(op, np.zeros(op.shape[0]), 1e-2, x0=np.ones(op.shape[1]))
    method = "fft" if mode == "circular" else "cg"
    assert not np.any(x) and info == (method, info.preconditioner, 0, 0.0, True)


@pytest.mark.parametrize("M", ["circulant", "dct2", "dct1", "kronecker", "block_jacobi", "none"])
def test_every_preconditioner_meets_rtol(M):
    op, y = blur_problem("zeros")
    x, info = tikhonov(op, y, 1e-2, M=M, rtol=1e-9)
    assert info.converged and info.preconditioner == M
    assert normal_residual(dense(op), x, y, 1e-2) <= 1.01e-9


def test_a_preconditioner_operator_can_be_passed():
    op, y = blur_problem("reflect")
    M = preconditioner(op, 1e-2, "dct1")
    x, info = tikhonov(op, y, 1e-2, M=M)
    assert info.preconditioner == "custom" and info.converged
    x2, _ = tikhonov(op, y, 1e-2, M=aslinearoperator(M @ np.eye(op.shape[1])))
    assert rel(x, x2) < 1e-5


# ---------------------------------------------------------------------------
# normal_operator
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", GEOMETRIES)
def test_normal_operator_is_the_damped_gram_matrix(case):
    cls, wshape, ishape, settings = case
    op = make(cls, wshape, ishape, settings, mode="zeros", dtype=np.complex128)
    A = dense(op)
    N = normal_operator(op, 0.3)
    n = A.shape[1]
    expected = A.conj().T @ A + 0.09 * np.eye(n)
    assert rel(N @ np.eye(n), expected) < 1e-13
    assert rel(N.matvec(np.eye(n)[:, 2]), expected[:, 2]) < 1e-13
    assert N.H is N and N.dtype == op.dtype and N.op is op and N.damp == 0.3


def test_normal_operator_of_a_real_operator_on_complex_vectors():
    op = make(ConvOperator, (2, 2, 3), (2, 7), dict(padding=1), mode="reflect")
    A = dense(op)
    v = random_array(np.random.default_rng(15), (A.shape[1], 3), np.complex128)
    N = normal_operator(op, 0.1)
    expected = (A.T @ A + 0.01 * np.eye(A.shape[1])) @ v
    assert rel(N.matmat(v), expected) < 1e-13 and rel(N.matvec(v[:, 0]), expected[:, 0]) < 1e-13


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_errors_name_the_argument():
    op, y = blur_problem()
    W = op.matrix
    with pytest.raises(TypeError, match="op must be a ConvOperator.*csr_array"):
        tikhonov(W, y, 0.1)
    with pytest.raises(TypeError, match="op must be a ConvOperator"):
        normal_operator(aslinearoperator(W))
    with pytest.raises(TypeError, match="op must be a ConvOperator"):
        preconditioner("op")
    with pytest.raises(ValueError, match="damp must be non-negative and finite, got damp=-1"):
        tikhonov(op, y, -1.0)
    with pytest.raises(TypeError, match="damp must be a real number, got damp='0.1'"):
        normal_operator(op, "0.1")
    with pytest.raises(ValueError, match="rtol must be positive, got rtol=0.0"):
        tikhonov(op, y, 0.1, rtol=0.0)
    with pytest.raises(ValueError, match="maxiter must be a non-negative int, got maxiter=-1"):
        tikhonov(op, y, 0.1, maxiter=-1)
    with pytest.raises(TypeError, match="callback must be callable or None, got callback=3"):
        tikhonov(op, y, 0.1, callback=3)
    with pytest.raises(ValueError, match=r"y must have shape \(576,\) or \(1, 24, 24\).*"
                                         r"y.shape=\(575,\)"):
        tikhonov(op, y[:-1], 0.1)
    with pytest.raises(ValueError, match=r"x0 must have shape \(576,\)"):
        tikhonov(op, y, 0.1, x0=np.zeros(3))
    with pytest.raises(ValueError, match=r"y must be finite, got y.ravel\(\)\[5\]=nan"):
        bad = y.copy()
        bad[5] = np.nan
        tikhonov(op, bad, 0.1)
    with pytest.raises(TypeError, match="y must be a numeric array, got y.dtype=bool"):
        tikhonov(op, y > 0, 0.1)
    with pytest.raises(ValueError, match="kind must be one of .*'dct2'.*got kind='dct3'"):
        preconditioner(op, kind="dct3")
    with pytest.raises(ValueError, match="M must be one of .*'kronecker'.*got M='jacobi'"):
        tikhonov(op, y, 0.1, M="jacobi")
    with pytest.raises(TypeError, match="M must be a preconditioner kind.*got M of type int"):
        tikhonov(op, y, 0.1, M=3)
    with pytest.raises(ValueError, match=r"M must have shape \(576, 576\).*M.shape=\(3, 3\)"):
        tikhonov(op, y, 0.1, M=aslinearoperator(np.eye(3)))
    with pytest.raises(ValueError, match="method must be one of .*got method='lsqr'"):
        tikhonov(op, y, 0.1, method="lsqr")
    with pytest.raises(NotImplementedError, match="method='fft' need circular padding"):
        tikhonov(op, y, 0.1, method="fft")
    with pytest.raises(ValueError, match="shift must be non-negative and finite"):
        preconditioner(op, shift=-0.1)
    strided = ConvOperator(np.ones((1, 1, 3, 3)), (1, 8, 8), stride=2, padding=1)
    with pytest.raises(NotImplementedError, match="cosine preconditioners need a Toeplitz"):
        preconditioner(strided, kind="dct2")
    odd = ConvOperator(np.ones((1, 1, 3, 3)), (1, 9, 8), stride=2, padding=1)
    with pytest.raises(NotImplementedError, match="divisible by the stride.*\\(9, 8\\)"):
        preconditioner(odd, kind="circulant")


# ---------------------------------------------------------------------------
# Random geometries
# ---------------------------------------------------------------------------


@given(geometries(), st.integers(0, 2**32 - 1))
def test_tikhonov_meets_rtol_on_random_geometries(g, seed):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], np.float64)
    kwargs = {k: g[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    op = ConvOperator(weight, g["input_shape"], **kwargs)
    A = reference_conv_matrix(weight, g["input_shape"], g["stride"], g["padding"],
                              g["dilation"], g["groups"], g["padding_mode"])[0]
    y = rng.standard_normal(A.shape[0])
    x, info = tikhonov(op, y, 0.1, rtol=1e-9)
    assert info.converged
    if np.any(A.T @ y):
        assert normal_residual(A, x, y, 0.1) <= 1.01e-9
        expected, cond = dense_tikhonov(A, y, 0.1)
        assert rel(x, expected) < 1e-12 + 2e-9 * cond


@given(geometries(), st.sampled_from(["circulant", "block_jacobi", "dct2", "dct1", "kronecker"]),
       st.integers(0, 2**32 - 1))
def test_preconditioners_are_positive_definite_on_random_geometries(g, kind, seed):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], np.complex128)
    kwargs = {k: g[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    op = ConvOperator(weight, g["input_shape"], **kwargs)
    try:
        P = preconditioner(op, 0.1, kind)
    except NotImplementedError:
        return  # documented: the construction does not apply to this geometry
    n = op.shape[1]
    Pd = P @ np.eye(n)
    assert np.allclose(Pd, Pd.conj().T, atol=1e-12 * np.abs(Pd).max())
    assert np.linalg.eigvalsh((Pd + Pd.conj().T) / 2).min() > 0
    if kind == "circulant" and pre.is_exact(op):
        A = op.matrix.toarray()
        assert rel(Pd, np.linalg.inv(A.conj().T @ A + 0.01 * np.eye(n))) < 1e-8


def test_cg_with_a_preconditioner_reads_it_as_scipy_does():
    # The preconditioner is a plain LinearOperator: scipy's cg takes it as M=.
    op, y = blur_problem("replicate")
    M = preconditioner(op, 1e-2)
    assert isinstance(M, LinearOperator) and M.dtype == np.float64
    x, info = cg(normal_operator(op, 1e-2), op.rmatvec(y), rtol=1e-8, M=M)
    assert info == 0


@pytest.mark.parametrize("shape", [(1, 50, 4, 4), (2, 30, 2, 5), (1, 40, 5, 3)],
                         ids=["square", "wide", "tall"])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("damp", [1e-2, 1e-3])
def test_the_exact_filter_from_normal_equations_is_the_svds(shape, complex_, damp):
    from sparse_tconv._preconditioners import _filter, _filter_by_svd

    rng = np.random.default_rng(sum(shape))
    B = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0)
    B /= np.abs(B).sum(axis=(-2, -1), keepdims=True).max()
    # V diag(s / (s^2 + damp^2)) U^H, from numpy's SVD, against (B^H B + damp^2 I)^{-1} B^H
    reference = _filter_by_svd(B, damp, 1e-15)
    assert np.linalg.norm(_filter(B, damp, 1e-15) - reference) <= 1e-10 * np.linalg.norm(
        reference)
