"""scipy.sparse.linalg solvers on the operators, end to end.

Each problem is solved on the LinearOperator itself (threaded products), and
checked against an independent oracle: the truth the data were made from,
and the dense solution of the same problem by numpy (Tikhonov normal
equations, ``lstsq``, ``solve``).  Iteration counts are checked against the
textbook bound of CG on the normal equations (which LSQR and LSMR are
mathematically equivalent to): reducing the error by ``eps`` takes at most
``ceil(kappa / 2 * ln(2 / eps))`` iterations, ``kappa`` the condition number
of the (damped) matrix, computed here by a dense SVD.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import cg, gmres, lsmr, lsqr, splu, spsolve

from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel
from sparse_tconv._forms import csr as _csr
from sparse_tconv._forms import diagonals as _dia
from sparse_tconv._forms import structured as _structured
from sparse_tconv.spectral import compose
from sparse_tconv.testing import dottest

TOL = 1e-10  # atol/btol of lsqr and lsmr, rtol of cg and gmres


def relative_error(x, reference) -> float:
    return float(np.linalg.norm(np.ravel(x) - np.ravel(reference)) / np.linalg.norm(reference))


def iteration_bound(singular_values, damp=0.0, eps=TOL) -> int:
    """CG's worst-case iteration count on the (damped) normal equations."""
    top = math.hypot(singular_values[0], damp)
    bottom = math.hypot(singular_values[-1], damp)
    return math.ceil(top / bottom / 2 * math.log(2 / eps))


def least_squares(solver, A, b, damp=0.0):
    """``(x, istop, itn)`` of lsqr or lsmr with this module's tolerances."""
    if solver == "lsqr":
        x, istop, itn = lsqr(A, b, damp=damp, atol=TOL, btol=TOL, iter_lim=5000)[:3]
    else:
        x, istop, itn = lsmr(A, b, damp=damp, atol=TOL, btol=TOL, maxiter=5000)[:3]
    return x, istop, itn


# ---------------------------------------------------------------------------
# Problems (also used to write the table of results in the closing note)
# ---------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def smooth_image(n: int) -> np.ndarray:
    """Three blobs on a gentle wave: the truth that is blurred."""
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    return (
        np.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.004)
        + 0.7 * np.exp(-((xx - 0.65) ** 2 + (yy - 0.6) ** 2) / 0.002)
        + 0.5 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.85) ** 2) / 0.003)
        + 0.2 * np.sin(3 * xx)
    )


def blur_problem(mode: str, n: int = 32, noise: float = 1e-3, seed: int = 0):
    """A 7x7 Gaussian blur (sigma 1.5), 'same' padding, 0.1% noise."""
    rng = np.random.default_rng(seed)
    op = ConvOperator(gaussian_kernel(7, 1.5)[None, None], (1, n, n), padding="same",
                      padding_mode=mode)
    truth = smooth_image(n).ravel()
    clean = op.matvec(truth)
    y = clean + noise * np.linalg.norm(clean) / np.sqrt(clean.size) * rng.standard_normal(
        clean.size)
    return op, truth, y


def strided_problem(seed: int = 0, noise: float = 1e-4):
    """A 2 -> 12 channel 3x3 convolution with stride 2 (768 x 512, full column rank)."""
    rng = np.random.default_rng(seed)
    op = ConvOperator(rng.standard_normal((12, 2, 3, 3)), (2, 16, 16), stride=2, padding=1)
    truth = rng.standard_normal(op.shape[1])
    clean = op.matvec(truth)
    y = clean + noise * np.linalg.norm(clean) / np.sqrt(clean.size) * rng.standard_normal(
        clean.size)
    return op, truth, y


def upsampling_problem(seed: int = 0):
    """A 4 -> 2 channel transposed convolution, kernel 4, stride 2: 8x8 -> 16x16."""
    rng = np.random.default_rng(seed)
    op = ConvTransposeOperator(rng.standard_normal((4, 2, 4, 4)), (4, 8, 8), stride=2,
                               padding=1)
    truth = rng.standard_normal(op.shape[1])
    return op, truth, op.matvec(truth)


def near_identity_weight(rng, channels: int, scale: float) -> np.ndarray:
    """A 3x3 kernel: identity at the centre tap plus ``scale`` times noise everywhere."""
    weight = scale * rng.standard_normal((channels, channels, 3, 3))
    weight[:, :, 1, 1] += np.eye(channels)
    return weight


def same_problem(mode: str = "reflect", seed: int = 0):
    """A square 3 -> 3 channel 'same' convolution on 16x16 (non-symmetric, invertible)."""
    rng = np.random.default_rng(seed)
    op = ConvOperator(near_identity_weight(rng, 3, 0.15), (3, 16, 16), padding="same",
                      padding_mode=mode)
    truth = rng.standard_normal(op.shape[1])
    return op, truth, op.matvec(truth)


# ---------------------------------------------------------------------------
# Deconvolution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_deconvolve_a_blur_with_tikhonov(solver, mode):
    op, truth, y = blur_problem(mode)
    dottest(op)
    damp = 1e-2
    x, istop, itn = least_squares(solver, op, y, damp=damp)
    assert istop in (1, 2)  # converged, not stopped by iter_lim or conlim
    # The dense Tikhonov solution of the same problem, by numpy.
    W = op.matrix.toarray()
    tikhonov = np.linalg.solve(W.T @ W + damp**2 * np.eye(W.shape[1]), W.T @ y)
    assert relative_error(x, tikhonov) < 1e-6
    # Against the truth: far better than the blurred data themselves.
    blurred_error = relative_error(y, truth)
    assert blurred_error > 0.2
    assert relative_error(x, truth) < 0.07
    s = np.linalg.svd(W, compute_uv=False)
    assert s[0] / s[-1] > 1e5  # without damping, noise is amplified 1e5 times
    assert itn <= iteration_bound(s, damp)


@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
def test_deconvolve_a_strided_multichannel_convolution(solver):
    op, truth, y = strided_problem()
    x, istop, itn = least_squares(solver, op, y)
    assert istop in (1, 2)
    W = op.matrix.toarray()
    expected = np.linalg.lstsq(W, y, rcond=None)[0]
    assert relative_error(x, expected) < 1e-7
    s = np.linalg.svd(W, compute_uv=False)
    # noise of 1e-4 relative, amplified by at most the condition number
    assert relative_error(x, truth) < 1e-4 * s[0] / s[-1]
    assert relative_error(x, truth) < 1e-3
    assert itn <= iteration_bound(s)


# ---------------------------------------------------------------------------
# Transposed convolution: inverting an upsampling layer, and the d2l exercise
# ---------------------------------------------------------------------------


def test_invert_an_upsampling_layer_by_least_squares():
    op, truth, z = upsampling_problem()
    assert op.output_shape == (2, 16, 16) and op.shape == (512, 256)  # tall: overdetermined
    x, istop, itn = least_squares("lsqr", op, z)
    assert istop in (1, 2)
    T = op.matrix.toarray()
    np.testing.assert_allclose(x, np.linalg.lstsq(T, z, rcond=None)[0], rtol=1e-7, atol=1e-7)
    assert relative_error(x, truth) < 1e-7  # consistent data: the input itself comes back
    assert itn <= iteration_bound(np.linalg.svd(T, compute_uv=False))
    # The forward convolution with the same weights (op.T) is no inverse.
    assert relative_error(op.T.matvec(z), truth) > 0.5


def test_d2l_exercise_one_transposed_convolution_is_not_an_inverse():
    # The chapter: X of shape (10, 16, 16), a 5x5 convolution to 20 channels with
    # padding 2 and stride 3, and the transposed convolution with the same settings.
    # Is Z = tconv(conv(X)) equal to X?  It has X's shape, but with the same weights
    # Z = W^T W X, and W^T W is not the identity.
    rng = np.random.default_rng(1)
    weight = rng.random((20, 10, 5, 5))
    op = ConvOperator(weight, (10, 16, 16), padding=2, stride=3)
    x = rng.random(op.shape[1])
    y = op.matvec(x)
    z = op.conv_transpose(y.reshape(op.output_shape))
    assert z.shape == (10, 16, 16)
    assert relative_error(z, x) > 0.5

    gram = compose(op.T, op)  # W^T W, sparse
    assert gram.shape == (2560, 2560)
    identity = sp.eye_array(2560, format="csr")
    assert sp.linalg.norm(gram - identity) > np.sqrt(2560)  # ||W^T W - I||_F > ||I||_F
    W = op.matrix.toarray()
    assert np.linalg.matrix_rank(W) == 720  # 720 rows for 2560 unknowns: no left inverse

    # What least squares gives instead: the minimum-norm solution pinv(W) y, the
    # orthogonal projection of X onto the row space of W.  It reproduces y exactly
    # and is the part of X that the convolution can see, not X.
    x_ls, istop, itn = least_squares("lsqr", op, y)
    assert istop in (1, 2)
    expected = np.linalg.lstsq(W, y, rcond=None)[0]  # numpy's minimum-norm solution
    assert relative_error(x_ls, expected) < 1e-6
    assert relative_error(op.matvec(x_ls), y) < 1e-8
    assert abs(np.dot(x - x_ls, x_ls)) < 1e-6 * np.dot(x, x)  # orthogonal projection
    assert np.linalg.norm(x_ls) < np.linalg.norm(x)
    assert relative_error(x_ls, x) > 0.1

    # With as many equations as unknowns or more (2 -> 12 channels, stride 2),
    # least squares does give X back, while the transposed convolution still does not.
    op2, truth, _ = strided_problem()
    y2 = op2.matvec(truth)
    x2 = least_squares("lsqr", op2, y2)[0]
    assert relative_error(x2, truth) < 1e-7
    assert relative_error(op2.T.matvec(y2), truth) > 0.5


def test_d2l_exercise_one_with_torch_layers():
    # The same with torch's layers: ConvTranspose2d with the Conv2d's weight gives W^T W X.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    weight = rng.random((20, 10, 5, 5))
    conv = torch.nn.Conv2d(10, 20, kernel_size=5, padding=2, stride=3, bias=False,
                           dtype=torch.float64)
    tconv = torch.nn.ConvTranspose2d(20, 10, kernel_size=5, padding=2, stride=3, bias=False,
                                     dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        tconv.weight.copy_(torch.from_numpy(weight))
        X = torch.from_numpy(rng.random((1, 10, 16, 16)))
        Z = tconv(conv(X)).numpy()
    assert Z.shape == X.shape
    gram = compose(ConvOperator(weight, (10, 16, 16), padding=2, stride=3).T,
                   ConvOperator(weight, (10, 16, 16), padding=2, stride=3))
    np.testing.assert_allclose(gram @ X.numpy().ravel(), Z.ravel(), rtol=1e-12)
    assert relative_error(Z, X.numpy()) > 0.5


# ---------------------------------------------------------------------------
# cg, gmres, splu / spsolve
# ---------------------------------------------------------------------------


def test_cg_on_the_normal_equations():
    op, truth, y = strided_problem()
    normal = op.H @ op  # W^T W, matrix-free: two threaded products per iteration
    b = op.rmatvec(y)
    iterations = []
    x, info = cg(normal, b, rtol=TOL, maxiter=5000, callback=lambda xk: iterations.append(1))
    assert info == 0
    W = op.matrix.toarray()
    assert relative_error(x, np.linalg.lstsq(W, y, rcond=None)[0]) < 1e-7
    assert relative_error(x, truth) < 1e-3
    s = np.linalg.svd(W, compute_uv=False)
    assert len(iterations) <= iteration_bound(s)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_gmres_on_a_square_same_convolution(mode):
    op, truth, y = same_problem(mode)
    assert op.shape == (768, 768)
    iterations = []
    x, info = gmres(op, y, rtol=TOL, restart=30, maxiter=100,
                    callback=lambda r: iterations.append(r), callback_type="pr_norm")
    assert info == 0
    assert relative_error(x, np.linalg.solve(op.matrix.toarray(), y)) < 1e-7
    assert relative_error(x, truth) < 1e-7
    assert len(iterations) < 768  # far fewer than the unknowns


def test_splu_and_spsolve_on_a_small_invertible_convolution():
    rng = np.random.default_rng(3)
    weight = 0.2 * rng.standard_normal((2, 2, 3, 3))
    weight[:, :, 1, 1] += np.array([[2.0, 1.0], [0.0, 2.0]])
    op = ConvOperator(weight, (2, 10, 10), padding="same")
    W = op.matrix
    dense = W.toarray()
    assert np.linalg.cond(dense) < 10
    truth = rng.standard_normal(W.shape[1])
    y = W @ truth
    lu = splu(sp.csc_array(W))
    x_lu = lu.solve(y)
    x_sp = spsolve(sp.csc_array(W), y)
    for x in (x_lu, x_sp):
        np.testing.assert_allclose(x, np.linalg.solve(dense, y), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(x, truth, rtol=1e-10, atol=1e-10)
    # The LU factors can solve the transposed convolution too.
    np.testing.assert_allclose(lu.solve(y, trans="T"), np.linalg.solve(dense.T, y),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# The solvers run on the threaded products
# ---------------------------------------------------------------------------


@pytest.fixture
def product_log(monkeypatch):
    """Record every product, and every entry into its threaded branch.

    A product is logged as ``(big enough to thread, threads, in the form's dtype)``:
    a CSR product (also the diagonals' batches) when its matrix has
    ``MIN_PARALLEL_NNZ`` entries, a structured one (the tiled GEMMs of a
    convolution, which W.T's products of stride 1 are too) when its layer does
    ``_MIN_PARALLEL_MACS`` multiply-adds.
    """
    log = {"products": [], "threaded": []}
    for module, name in ((_csr, "csr_product"), (_dia, "csr_product")):
        real_product = getattr(module, name)

        def counting_product(matrix, x, threads, *rest, real_product=real_product):
            log["products"].append((matrix.nnz >= _parallel.MIN_PARALLEL_NNZ, threads,
                                    x.dtype == matrix.dtype))
            return real_product(matrix, x, threads, *rest)

        monkeypatch.setattr(module, name, counting_product)
    for name in ("conv_samples", "conv_transpose_samples"):
        real_conv = getattr(_structured, name)

        def counting_conv(x, weight, geom, out, threads, *rest, real_conv=real_conv):
            macs = (x.shape[-1] * math.prod(geom.output_size) * geom.out_channels
                    * (geom.in_channels // geom.groups) * math.prod(geom.kernel_size))
            log["products"].append((macs >= _structured._MIN_PARALLEL_MACS, threads,
                                    x.dtype == weight.dtype))
            return real_conv(x, weight, geom, out, threads, *rest)

        monkeypatch.setattr(_structured, name, counting_conv)
    for module, name in ((_csr, "run_parallel"), (_structured, "run_parallel")):
        real_parallel = getattr(module, name)

        def counting_parallel(func, items, threads, real_parallel=real_parallel):
            log["threaded"].append(threads)
            return real_parallel(func, items, threads)

        monkeypatch.setattr(module, name, counting_parallel)
    return log


def _threaded_problem(form):
    """A 'same' 3x3 convolution near the identity, and data from torch.

    ``"structured"``: 16 -> 16 channels on 48x48 (past the structured form's
    threading threshold); ``"csr"``: 8 depthwise channels on 96x96 (past the
    CSR products').
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    if form == "structured":
        channels, size, groups = 16, 48, 1
        weight = near_identity_weight(rng, channels, 0.05)
    else:
        channels, size, groups = 8, 96, 8
        weight = 0.05 * rng.standard_normal((channels, 1, 3, 3))
        weight[:, 0, 1, 1] += 1
    op = ConvOperator(weight, (channels, size, size), padding=1, groups=groups, threads=2)
    assert op.product_form.name == form
    truth = rng.standard_normal(op.input_shape)
    y = torch.nn.functional.conv2d(torch.from_numpy(truth[None]), torch.from_numpy(weight),
                                   padding=1, groups=groups)[0].numpy().ravel()
    return op, truth.ravel(), y


@pytest.mark.parametrize("form", ["structured", "csr"])
@pytest.mark.parametrize("solver", ["lsqr", "lsmr", "cg", "gmres"])
def test_solver_iterations_take_the_threaded_path(solver, form, product_log):
    op, truth, y = _threaded_problem(form)
    op.rmatvec(y)  # build the transposed products' form (for CSR a threaded fill) first
    product_log["products"].clear()
    product_log["threaded"].clear()
    if solver in ("lsqr", "lsmr"):
        x, istop, itn = least_squares(solver, op, y)
        assert istop in (1, 2)
        min_products = 2 * itn  # one matvec and one rmatvec per iteration
    elif solver == "cg":
        iterations = []
        x, info = cg(op.H @ op, op.rmatvec(y), rtol=TOL, maxiter=500,
                     callback=lambda xk: iterations.append(1))
        assert info == 0
        min_products = 2 * len(iterations)
    else:
        iterations = []
        x, info = gmres(op, y, rtol=TOL, restart=30, maxiter=50,
                        callback=lambda r: iterations.append(r), callback_type="pr_norm")
        assert info == 0
        min_products = len(iterations)
    assert relative_error(x, truth) < 1e-7  # torch made the data: an independent oracle
    products = product_log["products"]
    assert len(products) >= max(min_products, 5)
    # Every product ran on 2 threads, on a matrix (or layer) big enough, in its dtype ...
    assert all(big and threads == 2 and same_dtype for big, threads, same_dtype in products)
    # ... and entered the threaded branch (one run_parallel per product).
    assert product_log["threaded"] == [2] * len(products)
