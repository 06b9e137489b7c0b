"""ConvOperator / ConvTransposeOperator: LinearOperator behaviour and exact products."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator, lsqr

import sparse_tconv
from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    _parallel,
    _sparsetools,
    conv_matrix,
    conv_transpose_matrix,
)
from sparse_tconv._forms import csr as _csr
from sparse_tconv._forms import structured as _structured

from reference import random_array, reference_conv_matrix, transposed_product
from strategies import shrink_tiles

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]
GEOMETRY = dict(stride=(2, 1), padding=[(1, 2), 1], dilation=(1, 2), groups=2)
WEIGHT_SHAPE, INPUT_SHAPE = (4, 3, 3, 2), (6, 9, 8)


def _operator_and_dense(dtype, seed=0, mode="zeros"):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, WEIGHT_SHAPE, dtype)
    op = ConvOperator(weight, INPUT_SHAPE, padding_mode=mode, **GEOMETRY)
    dense, _, _ = reference_conv_matrix(weight, INPUT_SHAPE, GEOMETRY["stride"],
                                        GEOMETRY["padding"], GEOMETRY["dilation"],
                                        GEOMETRY["groups"], mode)
    return rng, op, dense


def _tol(dtype):
    return 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_match_dense(dtype):
    rng, op, dense = _operator_and_dense(dtype)
    assert isinstance(op, LinearOperator)
    assert op.shape == dense.shape and op.dtype == np.dtype(dtype)
    x = random_array(rng, op.shape[1], dtype)
    y = random_array(rng, op.shape[0], dtype)
    X = random_array(rng, (op.shape[1], 3), dtype)
    Y = random_array(rng, (op.shape[0], 3), dtype)
    tol = dict(rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_allclose(op.matvec(x), dense @ x, **tol)
    np.testing.assert_allclose(op.rmatvec(y), dense.conj().T @ y, **tol)
    np.testing.assert_allclose(op.matmat(X), dense @ X, **tol)
    np.testing.assert_allclose(op.rmatmat(Y), dense.conj().T @ Y, **tol)
    np.testing.assert_allclose(op @ x[:, None], (dense @ x)[:, None], **tol)
    # float32 stays float32, complex64 stays complex64, in every product
    for result in (op.matvec(x), op.rmatvec(y), op.matmat(X), op.rmatmat(Y),
                   op.conv(x.reshape(INPUT_SHAPE)), op.conv_transpose(y.reshape(op.output_shape))):
        assert result.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_and_adjoint_operators(dtype):
    rng, op, dense = _operator_and_dense(dtype, seed=1, mode="reflect")
    T, H = op.T, op.H
    assert isinstance(T, ConvTransposeOperator) and isinstance(H, ConvTransposeOperator)
    assert T.shape == H.shape == dense.T.shape
    assert T.input_shape == op.output_shape and T.output_shape == op.input_shape
    y = random_array(rng, op.shape[0], dtype)
    np.testing.assert_allclose(T.matvec(y), dense.T @ y, rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_allclose(H.matvec(y), dense.conj().T @ y, rtol=_tol(dtype),
                               atol=_tol(dtype))
    # .T is the plain transpose: its matrix is W.T, entry for entry
    WT = op.matrix.T.tocsr()
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(T.matrix, name), getattr(WT, name))
    # .T.T is the forward convolution again, on the very same matrix
    TT = T.T
    assert isinstance(TT, ConvOperator) and TT.matrix is op.matrix
    assert TT.input_shape == op.input_shape and TT.output_shape == op.output_shape
    HH = H.H
    x = random_array(rng, op.shape[1], dtype)
    np.testing.assert_allclose(HH.matvec(x), op.matvec(x), rtol=_tol(dtype), atol=_tol(dtype))


def test_conv_transpose_operator_T_is_the_forward_conv():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3, 3, 3))
    kwargs = dict(stride=2, padding=1, output_padding=1)
    top = ConvTransposeOperator(weight, (4, 5, 5), **kwargs)
    assert top.output_shape == (3, 10, 10)
    forward = conv_matrix(weight, (3, 10, 10), stride=2, padding=1)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(top.T.matrix, name), getattr(forward, name))
    x = rng.standard_normal((3, 10, 10))
    y = top.conv(x)
    np.testing.assert_allclose(y, (forward @ x.ravel()).reshape(4, 5, 5), rtol=1e-13, atol=1e-13)
    # .T multiplies by the plain transpose of top.matrix
    np.testing.assert_allclose(y.ravel(), top.matrix.T @ x.ravel(), rtol=1e-13, atol=1e-13)
    assert top.output_padding == (1, 1)


def test_shaped_batches_equal_single_samples():
    rng, op, _ = _operator_and_dense(np.float64, seed=3)
    batch = rng.standard_normal((5, *INPUT_SHAPE))
    out = op.conv(batch)
    assert out.shape == (5, *op.output_shape) and out.flags.c_contiguous
    # A batch runs as one matmat (its samples the columns of the tiles' GEMMs),
    # a sample as one matvec: equal to rounding.
    for b in range(5):
        np.testing.assert_allclose(out[b], op.conv(batch[b]), rtol=1e-13, atol=1e-13)
    back = op.conv_transpose(out)
    assert back.shape == batch.shape
    for b in range(5):
        np.testing.assert_allclose(back[b], op.conv_transpose(out[b]), rtol=1e-13, atol=1e-13)


@pytest.fixture
def thread_small(monkeypatch):
    """Thread even a small matrix, on both product paths."""
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)


@pytest.fixture
def small_tiles(monkeypatch):
    """Cut even a small layer into tiles of one output row, which threads split."""
    shrink_tiles(monkeypatch)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [(1, 1), (1, 2)])
def test_threaded_structured_products_are_bit_for_bit_serial(threads, dtype, stride,
                                                             small_tiles):
    # Zeros padding, 3 -> 6 channels: the products run on the weight's taps (tiled
    # GEMMs); stride 1 also runs W.T's products as a convolution by the flipped weight.
    rng = np.random.default_rng(4)
    weight = random_array(rng, (6, 3, 3, 3), dtype)
    op = ConvOperator(weight, (3, 11, 12), padding=1, stride=stride, threads=threads)
    serial = ConvOperator(weight, (3, 11, 12), padding=1, stride=stride, threads=1)
    assert op.product_form.name == "structured"
    W, WT = op.matrix, op.transpose_matrix
    x = random_array(rng, op.shape[1], dtype)
    y = random_array(rng, op.shape[0], dtype)
    X = random_array(rng, (op.shape[1], 4), dtype)
    Y = np.asfortranarray(random_array(rng, (op.shape[0], 4), dtype))
    # the canonical CSR's products to rounding ...
    tol = dict(rtol=_tol(dtype), atol=_tol(dtype))
    np.testing.assert_allclose(op.matvec(x), W @ x, **tol)
    np.testing.assert_allclose(op.rmatvec(y), (WT @ y.conj()).conj(), **tol)
    np.testing.assert_allclose(op.T.matvec(y), WT @ y, **tol)
    np.testing.assert_allclose(op.matmat(X), W @ X, **tol)
    np.testing.assert_allclose(op.rmatmat(Y), (WT @ Y.conj()).conj(), **tol)
    # ... and the same bits whatever the number of threads
    for name, args in (("matvec", x), ("rmatvec", y), ("matmat", X), ("rmatmat", Y)):
        np.testing.assert_array_equal(getattr(op, name)(args), getattr(serial, name)(args),
                                      err_msg=name)
    np.testing.assert_array_equal(op.T.matvec(y), serial.T.matvec(y))


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_shape, input_shape, kwargs", [
    # depthwise: the transposed products run on W.T with position-major columns
    ((3, 1, 3, 3), (3, 11, 12), dict(groups=3)),
    # one channel: on the canonical W.T
    ((1, 1, 3, 3), (1, 11, 12), dict()),
], ids=["depthwise", "one-channel"])
def test_threaded_csr_products_are_bit_for_bit_serial(threads, dtype, weight_shape, input_shape,
                                                      kwargs, thread_small):
    # One-entry blocks, reflect padding folding taps together: the products run on
    # the CSR matrices.
    rng = np.random.default_rng(4)
    weight = random_array(rng, weight_shape, dtype)
    op = ConvOperator(weight, input_shape, padding=1, stride=(1, 2), padding_mode="reflect",
                      threads=threads, **kwargs)
    assert op.product_form.name == "csr"
    channels = op.output_shape[0]
    W, WT = op.matrix, op.transpose_matrix
    x = random_array(rng, op.shape[1], dtype)
    y = random_array(rng, op.shape[0], dtype)
    X = random_array(rng, (op.shape[1], 4), dtype)
    Y = np.asfortranarray(random_array(rng, (op.shape[0], 4), dtype))
    np.testing.assert_array_equal(op.matvec(x), W @ x)
    np.testing.assert_array_equal(op.matmat(X), W @ X)
    # The transposed products run on W.T with position-major columns.
    np.testing.assert_array_equal(op.rmatvec(y),
                                  transposed_product(W, y.conj(), channels).conj())
    np.testing.assert_array_equal(op.rmatmat(Y),
                                  transposed_product(W, Y.conj(), channels).conj())
    np.testing.assert_allclose(op.rmatvec(y), (WT @ y.conj()).conj(), rtol=_tol(dtype),
                               atol=_tol(dtype))
    np.testing.assert_array_equal(op.T.matvec(y), WT @ y)


def test_threaded_product_on_a_real_size_layer(restore_threads, monkeypatch):
    # Above the threading threshold, at the library's own tile sizes: the tiles are
    # dealt to both threads, and the results are the serial ones, bit for bit.
    rng = np.random.default_rng(5)
    op = ConvOperator(rng.standard_normal((16, 16, 3, 3)), (16, 48, 48), padding=1, threads=2)
    serial = ConvOperator(op.weight, (16, 48, 48), padding=1, threads=1)
    assert op.product_form.name == "structured"
    seen = []
    real = _structured.run_parallel
    monkeypatch.setattr(_structured, "run_parallel",
                        lambda f, items, threads: (seen.append(threads), real(f, items, threads)))
    x = rng.standard_normal(op.shape[1])
    y = rng.standard_normal(op.shape[0])
    X = rng.standard_normal((op.shape[1], 7))
    got = op.matvec(x), op.rmatvec(y), op.matmat(X)
    assert seen == [2, 2, 2]  # W.T's products too (stride 1: gathered by the flipped weight)
    np.testing.assert_array_equal(got[0], serial.matvec(x))
    np.testing.assert_array_equal(got[1], serial.rmatvec(y))
    np.testing.assert_array_equal(got[2], serial.matmat(X))
    np.testing.assert_allclose(got[0], op.matrix @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], op.transpose_matrix @ y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[2], op.matrix @ X, rtol=1e-12, atol=1e-12)


def test_row_blocks_balance_nnz():
    indptr = np.array([0, 10, 10, 11, 30, 31, 60])
    blocks = _parallel.balanced_ranges(indptr, 3)
    assert blocks[0][0] == 0 and blocks[-1][1] == 6
    assert all(a < b for a, b in blocks)
    assert all(b1[1] == b2[0] for b1, b2 in zip(blocks, blocks[1:]))
    assert len(_parallel.balanced_ranges(indptr, 50)) <= 6  # never an empty block


def test_threads_follow_the_global_setting(monkeypatch, restore_threads, small_tiles):
    seen = []
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    for module in (_csr, _structured):  # the CSR and the structured products
        real = module.run_parallel
        monkeypatch.setattr(module, "run_parallel",
                            lambda f, items, threads, real=real: (seen.append(threads),
                                                                  real(f, items, threads)))
    for weight, kwargs in ((np.ones((2, 2, 3)), {}),  # structured
                           (np.ones((2, 1, 3)), dict(groups=2))):  # depthwise: CSR
        seen.clear()
        op = ConvOperator(weight, (2, 50), **kwargs)
        pinned = ConvOperator(weight, (2, 50), threads=3, **kwargs)
        x = np.ones(op.shape[1])
        sparse_tconv.set_num_threads(4)
        op.matvec(x)
        pinned.matvec(x)
        monkeypatch.setenv("SPARSE_TCONV_NUM_THREADS", "5")
        sparse_tconv.set_num_threads(None)
        op.matvec(x)
        monkeypatch.delenv("SPARSE_TCONV_NUM_THREADS")
        assert seen == [4, 3, 5], op.product_form.name
        assert op.threads is None and pinned.threads == 3


def test_mixed_dtypes_fall_back_to_scipy():
    # The CSR form (depthwise): scipy's serial product on the canonical matrix.
    rng = np.random.default_rng(6)
    op = ConvOperator(rng.standard_normal((2, 1, 3)).astype(np.float32), (2, 9), groups=2)
    assert op.product_form.name == "csr"
    x64 = rng.standard_normal(op.shape[1])
    result = op.matvec(x64)
    assert result.dtype == np.float64  # as scipy: float32 matrix times float64 vector
    np.testing.assert_array_equal(result, op.matrix @ x64)
    for xi in (np.arange(op.shape[1], dtype=np.int16), np.arange(op.shape[1])):
        expected = op.matrix @ xi  # int16 fits float32 exactly, int64 does not
        assert op.matvec(xi).dtype == expected.dtype
        np.testing.assert_array_equal(op.matvec(xi), expected)
    xc = x64 + 1j
    # a complex vector widens: scipy's serial products on both sides
    np.testing.assert_array_equal(op.matvec(xc), op.matrix @ xc)
    y = op.matrix @ xc
    assert op.rmatvec(y).dtype == np.complex128
    np.testing.assert_allclose(op.rmatvec(y), op.matrix.T @ y, rtol=1e-13)


def test_mixed_dtypes_widen_on_the_structured_form():
    # The structured form widens as scipy does: a float32 weight times a float64
    # vector multiplies in float64 (the weight's values exactly), so zeros padding
    # (no taps folded into one entry) gives the CSR product to float64 rounding.
    rng = np.random.default_rng(6)
    op = ConvOperator(rng.standard_normal((3, 2, 3)).astype(np.float32), (2, 9), padding=1)
    assert op.product_form.name == "structured"
    x64 = rng.standard_normal(op.shape[1])
    result = op.matvec(x64)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, op.matrix @ x64, rtol=1e-13, atol=1e-13)
    for xi in (np.arange(op.shape[1], dtype=np.int16), np.arange(op.shape[1])):
        expected = op.matrix @ xi  # int16 fits float32 exactly, int64 does not
        assert op.matvec(xi).dtype == expected.dtype
        np.testing.assert_allclose(op.matvec(xi), expected, rtol=1e-6)
    xc = x64 + 1j
    assert op.matvec(xc).dtype == np.complex128
    np.testing.assert_allclose(op.matvec(xc), op.matrix @ xc, rtol=1e-13, atol=1e-13)
    y = op.matrix @ xc
    assert op.rmatvec(y).dtype == np.complex128
    np.testing.assert_allclose(op.rmatvec(y), op.matrix.T @ y, rtol=1e-13, atol=1e-13)


def test_without_scipy_private_kernels(monkeypatch):
    monkeypatch.setattr(_sparsetools, "csr_matvec", None)
    monkeypatch.setattr(_sparsetools, "csr_matvecs", None)
    monkeypatch.setattr(_sparsetools, "csc_matvec", None)
    monkeypatch.setattr(_sparsetools, "csc_matvecs", None)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    rng = np.random.default_rng(7)
    for mode in ("zeros", "circular"):  # depthwise and strided single-channel: the CSR form
        for weight_shape, input_shape, kwargs in (((2, 1, 3), (2, 10), dict(groups=2)),
                                                  ((1, 1, 3), (1, 10), dict(stride=2))):
            op = ConvOperator(rng.standard_normal(weight_shape), input_shape, padding=1,
                              padding_mode=mode, threads=2, **kwargs)
            assert op.product_form.name == "csr"
            x = rng.standard_normal(op.shape[1])
            y = rng.standard_normal(op.shape[0])
            np.testing.assert_array_equal(op.matvec(x), op.matrix @ x)
            np.testing.assert_allclose(op.rmatvec(y), op.matrix.T @ y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_product_identity(dtype):
    # <W u, v> == <u, W^H v>, for real and complex operators
    rng, op, _ = _operator_and_dense(dtype, seed=8, mode="circular")
    u = random_array(rng, op.shape[1], dtype)
    v = random_array(rng, op.shape[0], dtype)
    lhs = np.vdot(v, op.matvec(u))
    rhs = np.vdot(op.rmatvec(v), u)
    assert abs(lhs - rhs) <= 1e3 * np.finfo(np.dtype(dtype)).eps * abs(lhs)


@pytest.mark.parametrize("weight_shape, groups", [((4, 3, 3, 3), 1), ((3, 1, 3, 3), 3)],
                         ids=["structured", "csr-depthwise"])
@pytest.mark.parametrize("transposed", [False, True])
def test_with_weight_shares_the_pattern(transposed, weight_shape, groups):
    rng = np.random.default_rng(9)
    w1, w2 = rng.standard_normal((2, *weight_shape))
    kwargs = dict(stride=2, padding=1, padding_mode="zeros", groups=groups)
    out_channels, in_channels = weight_shape[0], weight_shape[1] * groups
    if transposed:
        op = ConvTransposeOperator(w1, (out_channels, 5, 5), output_padding=1, **kwargs)
        fresh = conv_transpose_matrix(w2, (out_channels, 5, 5), output_padding=1, **kwargs)
        fresh_T = conv_matrix(w2, (in_channels, 10, 10), **kwargs)
    else:
        op = ConvOperator(w1, (in_channels, 10, 10), **kwargs)
        fresh = conv_matrix(w2, (in_channels, 10, 10), **kwargs)
        fresh_T = conv_transpose_matrix(w2, (out_channels, 5, 5), output_padding=1, **kwargs)
    # build every matrix, so that all their patterns are shared
    _ = op.matrix, op.transpose_matrix
    y = rng.standard_normal(op.shape[0])
    op.rmatvec(y)
    new = op.with_weight(w2)
    fresh_op = type(op)(w2, op.input_shape, output_padding=1, **kwargs) if transposed else \
        ConvOperator(w2, op.input_shape, **kwargs)
    np.testing.assert_array_equal(new.rmatvec(y), fresh_op.rmatvec(y))
    for slot in ("_forward_slot", "_backward_slot"):  # the product forms
        new_form, old_form = getattr(new, slot).get(), getattr(op, slot).get()
        assert type(new_form) is type(old_form)
        if new_form.matrix is not None:  # a scipy matrix: its pattern is shared
            assert np.shares_memory(new_form.matrix.indices, old_form.matrix.indices)
            assert not np.shares_memory(new_form.matrix.data, old_form.matrix.data)
        else:  # the structured form: the new weight alone
            assert not any(np.shares_memory(a, b)
                           for a in new_form._arrays() for b in old_form._arrays())
    assert type(new) is type(op)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(new.matrix, name), getattr(fresh, name))
        np.testing.assert_array_equal(getattr(new.transpose_matrix, name),
                                      getattr(fresh_T, name))
    for a, b in ((new.matrix, op.matrix), (new.transpose_matrix, op.transpose_matrix)):
        assert np.shares_memory(a.indices, b.indices) and np.shares_memory(a.indptr, b.indptr)
        assert not np.shares_memory(a.data, b.data)
    np.testing.assert_array_equal(op.weight, w1)  # the old operator is untouched
    assert new.with_weight(w1.astype(np.complex64)).dtype == np.complex64


def test_weight_is_copied_and_read_only():
    weight = np.ones((2, 1, 3))
    op = ConvOperator(weight, (1, 5))
    weight[:] = 5.0
    assert op.weight.max() == 1.0 and not op.weight.flags.writeable
    assert op.matrix.data.max() == 1.0


def test_scipy_solvers_accept_the_operator():
    rng = np.random.default_rng(10)
    op = ConvOperator(rng.standard_normal((3, 2, 3, 3)), (2, 8, 8), padding=1)
    b = rng.standard_normal(op.shape[0])
    on_op = lsqr(op, b, atol=1e-12, btol=1e-12)[0]
    on_matrix = lsqr(sp.csr_array(op.matrix), b, atol=1e-12, btol=1e-12)[0]
    np.testing.assert_allclose(on_op, on_matrix, rtol=1e-8, atol=1e-10)
    composed = aslinearoperator(op.T) @ op  # scipy composition keeps working
    x = rng.standard_normal(op.shape[1])
    np.testing.assert_allclose(composed.matvec(x), op.matrix.T @ (op.matrix @ x))


def test_dropped_operators_free_their_matrices_at_once():
    # No reference cycles: the matrices go when the last reference does,
    # without waiting for the cyclic garbage collector.
    import gc
    import weakref

    rng = np.random.default_rng(11)
    op = ConvOperator(rng.standard_normal((2, 2, 3)), (2, 9))
    derived = [op.with_weight(rng.standard_normal((2, 2, 3))), op.T, op.H, op.T.T]
    _ = derived[0].transpose_matrix
    gc.disable()
    try:
        refs = [weakref.ref(d) for d in derived]
        del derived
        assert all(r() is None for r in refs)
        ref = weakref.ref(op)
        del op
        assert ref() is None
    finally:
        gc.enable()


# -- shapes: errors that name the sample shape, and one channel without its axis


@pytest.mark.parametrize("complex_weight", [False, True])
def test_wrong_lengths_name_the_expected_length_and_sample_shape(complex_weight):
    weight = np.ones((2, 1, 3, 3)) * (1j if complex_weight else 1)
    op = ConvOperator(weight, (1, 32, 32), padding=1)  # 1024 -> 2048
    fwd = (r"a ConvOperator with input_shape \(1, 32, 32\) takes vectors of length 1024 "
           r"\(or \(1024, K\) arrays\) in matvec/matmat; use op\.conv\(x\) for shaped input")
    adj = (r"a ConvOperator with output_shape \(2, 32, 32\) takes vectors of length 2048 "
           r"\(or \(2048, K\) arrays\) in rmatvec/rmatmat; use op\."
           + (r"H\.conv_transpose\(y\)" if complex_weight else r"conv_transpose\(y\)"))
    image = np.ones((32, 32))
    for call in (lambda: op @ image, lambda: op.dot(image), lambda: op.matmat(image),
                 lambda: op.matvec(image)):
        with pytest.raises(ValueError, match=r"x has shape \(32, 32\); " + fwd):
            call()
    with pytest.raises(ValueError, match=r"x has shape \(1, 32, 32\); " + fwd):
        op @ image[None]  # a sample, not a vector: scipy's 'expected 1-d or 2-d' otherwise
    with pytest.raises(ValueError, match=r"x has shape \(1023,\); " + fwd):
        op.matvec(np.ones(1023))
    with pytest.raises(ValueError, match=r"x has shape \(1024,\): matmat takes a 2-D array "
                                         r"of shape \(1024, K\); use matvec for a vector"):
        op.matmat(np.ones(1024))  # matmat wants 2-D
    for call in (lambda: op.rmatvec(np.ones(1024)), lambda: op.rmatmat(np.ones((1024, 2)))):
        with pytest.raises(ValueError, match=r"y has shape \(1024(, 2)?,?\); " + adj):
            call()
    # .T and .H are ConvTransposeOperators: their input is the output_shape
    tfwd = (r"a ConvTransposeOperator with input_shape \(2, 32, 32\) takes vectors of length "
            r"2048 .* use op\.conv_transpose\(x\) for shaped input")
    for call in (lambda: op.T @ np.ones(1024), lambda: op.H @ np.ones((1024, 3)),
                 lambda: op.T.dot(np.ones((2, 32, 32)))):
        with pytest.raises(ValueError, match=r"x has shape \(.*\); " + tfwd):
            call()
    # right lengths still work, as vectors, columns and blocks
    x = np.ones(1024)
    assert (op @ x).shape == (2048,) and (op @ x[:, None]).shape == (2048, 1)
    assert op.matmat(np.ones((1024, 0))).shape == (2048, 0)


@pytest.mark.parametrize("keep_transpose", [True, False])
@pytest.mark.parametrize("weight_shape, input_shape, kwargs", [
    ((1, 1, 3, 3), (1, 8, 7), dict(padding=1)),  # 1 -> 1: both sides without channel axes
    ((3, 1, 3, 3), (1, 8, 7), dict(stride=2)),  # 1 -> 3: the result keeps its axis
    ((1, 1, 5), (1, 20), dict(padding=2, padding_mode="reflect")),  # 1-D
])
def test_one_channel_without_its_axis_equals_the_channel_form(weight_shape, input_shape,
                                                               kwargs, keep_transpose):
    rng = np.random.default_rng(12)
    op = ConvOperator(rng.standard_normal(weight_shape), input_shape,
                      keep_transpose=keep_transpose, **kwargs)
    x = rng.standard_normal(input_shape[1:])
    full = op.conv(x[None])
    squeezed = op.conv(x)
    expected = full[0] if op.output_shape[0] == 1 else full
    assert squeezed.shape == expected.shape
    np.testing.assert_array_equal(squeezed, expected)
    dense, _, _ = reference_conv_matrix(op.weight, input_shape, op.stride, op.padding,
                                        op.dilation, op.groups, op.padding_mode)
    np.testing.assert_allclose(squeezed.ravel(), dense @ x.ravel(), rtol=1e-12, atol=1e-12)
    # the transposed convolution and the transposed operator follow the same rule
    y = rng.standard_normal(op.output_shape)
    back = op.conv_transpose(y)
    if op.output_shape[0] == 1:
        np.testing.assert_array_equal(op.conv_transpose(y[0]), back[0])
        np.testing.assert_array_equal(op.T.conv_transpose(y[0]), back[0])
        np.testing.assert_array_equal(op.T.conv(x), squeezed)
    else:
        with pytest.raises(ValueError, match=r"y must have shape \(3, 3, 3\) \(one sample\) or"):
            op.conv_transpose(y[0])
    np.testing.assert_array_equal(op.T.conv_transpose(y), back)
    # no batch form without the channel axis: (B, L1, L2) is neither a sample nor a batch
    if len(input_shape) == 3:
        with pytest.raises(ValueError, match=r"x must have shape \(1, 8, 7\) \(one sample\), "
                                             r"\(8, 7\) \(one channel, its axis left out\) or"):
            op.conv(rng.standard_normal((4, 8, 7)))


@pytest.mark.parametrize("input_size, kwargs", [
    (8, dict(stride=2)),  # the stride does not divide: the transpose needs output_padding 1
    (9, dict(stride=3, padding=1, dilation=2)),
    (10, dict(stride=4, padding=((2, 0),))),
])
def test_the_transpose_of_a_conv_operator_reports_its_output_padding(input_size, kwargs):
    # Rebuilding the transpose from its own reported arguments gives the same matrix.
    weight = np.random.default_rng(0).standard_normal((2, 1, 3))
    transposed = ConvOperator(weight, (1, input_size), **kwargs).T
    rebuilt = ConvTransposeOperator(weight, transposed.input_shape,
                                    output_padding=transposed.output_padding, **kwargs)
    assert rebuilt.shape == transposed.shape
    assert (rebuilt.matrix != transposed.matrix).nnz == 0


@pytest.mark.parametrize("cls", [ConvOperator, ConvTransposeOperator])
def test_the_convolution_record_says_what_the_operator_multiplies(cls):
    # the record the solvers, bounds and files read: shapes and direction as the operator's,
    # the weight the operator's own (read-only), and .T the other direction
    weight = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    op = cls(weight, (4, 9, 7), stride=2,
             padding=1, groups=2)
    conv = op.convolution
    assert conv.transposed is (cls is ConvTransposeOperator)
    assert (conv.input_shape, conv.output_shape) == (op.input_shape, op.output_shape)
    assert conv.weight is op.weight and not conv.weight.flags.writeable
    assert conv.T.transposed is not conv.transposed and conv.T.geometry is conv.geometry
    assert (conv.T.input_shape, conv.T.output_shape) == (op.output_shape, op.input_shape)
    assert op.T.convolution.transposed is conv.T.transposed
    assert (op.T.convolution.input_shape, op.T.convolution.output_shape) == (
        conv.T.input_shape, conv.T.output_shape)
    with pytest.raises(AttributeError):
        conv.transposed = True  # frozen
