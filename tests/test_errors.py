"""Bad input: a clear ValueError/TypeError naming the argument and echoing the value."""

import math
import re

import numpy as np
import pytest

import sparse_tconv
from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
    conv_output_shape,
    conv_transpose_matrix,
    conv_transpose_output_shape,
)

W2D = np.ones((4, 2, 3, 3))
X2D = (2, 8, 8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=np.ones((3, 3))), ValueError,
     r"weight must have at least 3 dimensions.*or as many as input_shape for a single-channel "
     r"kernel, got weight\.shape=\(3, 3\)"),
    (dict(input_shape=(2, 8)), ValueError,
     r"input_shape must be \(channels, \*spatial\) with 2 spatial dimensions"
     r".*input_shape=\(2, 8\)"),
    (dict(input_shape=(3, 8, 8)), ValueError,
     r"input_shape\[0\]=3 channels do not match.*2 \* 1 = 2"),
    (dict(input_shape=(2, 0, 8)), ValueError, r"input_shape must contain only positive sizes"),
    (dict(input_shape=(2, 8.0, 8)), TypeError, r"input_shape must contain only ints"),
    (dict(groups=0), ValueError, r"groups must be a positive integer, got groups=0"),
    (dict(groups=-2), ValueError, r"groups must be a positive integer, got groups=-2"),
    (dict(groups=3), ValueError, r"weight\.shape\[0\]=4 is not divisible by groups=3"),
    (dict(groups=2), ValueError, r"input_shape\[0\]=2 channels do not match.*2 \* 2 = 4"),
    (dict(groups=1.0), TypeError, r"groups must be an int, got groups=1\.0"),
    (dict(stride=0), ValueError, r"stride must be positive, got stride=\(0, 0\)"),
    (dict(stride=(1, -1)), ValueError, r"stride must be positive, got stride=\(1, -1\)"),
    (dict(stride=(1, 2, 3)), ValueError,
     r"stride must have one entry per spatial dimension \(2\), got 3: stride=\(1, 2, 3\)"),
    (dict(stride=1.5), TypeError,
     r"stride must be an int or a sequence of 2 ints, got stride=1\.5"),
    (dict(stride=True), TypeError, r"stride=True"),
    (dict(dilation=(0, 1)), ValueError, r"dilation must be positive, got dilation=\(0, 1\)"),
    (dict(padding=-1), ValueError, r"padding must be non-negative, got padding=-1"),
    (dict(padding=((1, -1), 0)), ValueError, r"padding must be non-negative"),
    (dict(padding=(1, 1, 1)), ValueError,
     r"padding must have one entry per spatial dimension \(2\), got 3"),
    (dict(padding=((1, 2, 3), 0)), TypeError, r"\(before, after\) pair.*\(1, 2, 3\)"),
    (dict(padding="full"), ValueError, r"'valid' or 'same', got padding='full'"),
    (dict(padding_mode="symmetric"), ValueError,
     r"padding_mode must be one of .*got padding_mode='symmetric'"),
    (dict(padding="same", stride=2), ValueError,
     r"padding='same' is not supported for strided convolutions \(stride=\(2, 2\)\).*"
     r"\(before, after\) pairs"),
    (dict(weight=np.ones((4, 2, 12, 3)), padding=1), ValueError,
     r"dilated kernel \(size 12 in spatial dimension 0\) is larger than the padded input "
     r"\(8 \+ 1 \+ 1 = 10\)"),
    (dict(dilation=(5, 1)), ValueError, r"dilated kernel \(size 11"),
    (dict(padding=8, padding_mode="reflect"), ValueError,
     r"reflect padding must be smaller than the input size.*padding=\(8, 8\) for size 8"),
    (dict(padding=9, padding_mode="circular"), ValueError,
     r"circular padding must not exceed the input size.*padding=\(9, 9\) for size 8"),
    (dict(weight=np.ones((4, 2, 3, 3), dtype=bool)), TypeError,
     r"weight must be numeric, got a boolean weight"),
    (dict(weight=np.full((4, 2, 3, 3), "a")), TypeError, r"weight must be a numeric array"),
    (dict(weight=np.ones((4, 2, 3, 3), dtype=object)), TypeError,
     r"weight must be a numeric array, got weight\.dtype=object"),
    (dict(dtype=np.int32), TypeError, r"dtype must be one of .*got dtype=int32"),
    (dict(weight=np.ones((4, 2, 3, 3), dtype=complex), dtype=np.float64), TypeError,
     r"cannot use dtype=float64 for a complex weight"),
    (dict(max_bytes="1GB"), TypeError, r"max_bytes must be an int, got max_bytes='1GB'"),
])
def test_conv_matrix_rejects(kwargs, error, match):
    args = dict(weight=W2D, input_shape=X2D)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        conv_matrix(args.pop("weight"), args.pop("input_shape"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(output_padding=2, stride=2), ValueError,
     r"output_padding must be smaller than either stride or dilation, got "
     r"output_padding=\(2, 2\), stride=\(2, 2\), dilation=\(1, 1\)"),
    (dict(output_padding=1), ValueError, r"output_padding must be smaller"),
    (dict(output_padding=-1), ValueError, r"output_padding must be non-negative"),
    (dict(input_shape=(3, 4, 4)), ValueError,
     r"input_shape\[0\]=3 channels do not match.*weight\.shape\[0\]=4"),
    (dict(groups=3), ValueError, r"weight\.shape\[0\]=4 is not divisible by groups=3"),
    (dict(padding=5), ValueError, r"the transposed convolution output would be empty"),
    (dict(padding=2, padding_mode="reflect"), ValueError,
     r"reflect padding must be smaller.*padding=\(2, 2\) for size 2"),
])
def test_conv_transpose_matrix_rejects(kwargs, error, match):
    args = dict(weight=W2D, input_shape=(4, 4, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        conv_transpose_matrix(args.pop("weight"), args.pop("input_shape"), **args)


def test_ragged_weight_is_named():
    with pytest.raises(ValueError, match=r"weight must be a rectangular numeric array: .*"
                                         r"inhomogeneous"):
        conv_matrix([[[1.0, 2.0], [3.0]]], (2, 5))


def test_validation_comes_before_allocation():
    # Geometries whose matrix could never be allocated: the argument error,
    # not a MemoryError, must come out.
    huge = (1, 10**6, 10**6)
    with pytest.raises(ValueError, match="padding_mode"):
        conv_matrix(np.ones((1, 1, 3, 3)), huge, padding_mode="bogus")
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose_matrix(np.ones((1, 1, 3, 3)), huge, output_padding=5)
    # and the size is known without building anything
    assert conv_matrix_nnz((1, 1, 3, 3), huge).nnz == 9 * (10**6 - 2) ** 2


def test_shape_functions_validate_too():
    with pytest.raises(ValueError, match="stride must be positive"):
        conv_output_shape((2, 8), (3, 2, 3), stride=0)
    with pytest.raises(ValueError, match="output_padding must be smaller"):
        conv_transpose_output_shape((2, 8), (2, 3, 3), output_padding=1)


def test_operator_arguments():
    op = ConvOperator(W2D, X2D, padding=1)
    with pytest.raises(ValueError, match=re.escape(
            "x must have shape (2, 8, 8) (one sample) or (batch, *(2, 8, 8)), "
            "got x.shape=(2, 8, 9)")):
        op.conv(np.ones((2, 8, 9)))
    with pytest.raises(ValueError, match=r"y must have shape \(4, 8, 8\)"):
        op.conv_transpose(np.ones((3, 2, 4, 8, 8)))
    with pytest.raises(ValueError,
                       match=r"threads must be a positive integer or None, got threads=0"):
        ConvOperator(W2D, X2D, threads=0)
    with pytest.raises(TypeError, match=r"threads must be an int, got threads=2\.0"):
        ConvTransposeOperator(W2D, (4, 4, 4), threads=2.0)
    with pytest.raises(ValueError, match=r"weight must have the shape of this operator's weight "
                                         r"\(4, 2, 3, 3\), got weight\.shape=\(4, 2, 3, 2\)"):
        op.with_weight(np.ones((4, 2, 3, 2)))
    with pytest.raises(ValueError, match="set_num_threads|threads must be"):
        sparse_tconv.set_num_threads(-1)


def test_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("SPARSE_TCONV_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="SPARSE_TCONV_NUM_THREADS must be a positive integer, "
                                         "at most 1024, got SPARSE_TCONV_NUM_THREADS='many'"):
        sparse_tconv.get_num_threads()
    monkeypatch.setenv("SPARSE_TCONV_NUM_THREADS", "100000")
    with pytest.raises(ValueError, match="got SPARSE_TCONV_NUM_THREADS='100000'"):
        sparse_tconv.get_num_threads()


@pytest.mark.parametrize("threads", [1025, 10**9, 10**18])
def test_more_threads_than_can_be_started_are_refused(threads, restore_threads):
    # before anything is built or started: 10**9 threads once sized arrays and started a
    # thread per row range (1.7 GB for a 300x300 layer)
    message = rf"threads must be at most 1024 .*, got threads={threads}"
    with pytest.raises(ValueError, match=message):
        ConvOperator(W2D, X2D, threads=threads)
    with pytest.raises(ValueError, match=message):
        sparse_tconv.set_num_threads(threads)


def test_more_threads_than_rows_give_the_same_products(restore_threads, monkeypatch):
    # the most threads allowed, on a layer with fewer rows than threads (split however
    # small: the threshold lowered): every range is cut to what the rows allow, and the
    # products are those of one thread
    from sparse_tconv import _parallel

    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    monkeypatch.setattr(_parallel, "SCATTER_PART_NNZ", 1)
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3))
    many, one = (ConvOperator(w, (2, 9, 9), threads=t) for t in (1024, 1))
    x, y = np.arange(many.shape[1], dtype=float), np.arange(many.shape[0], dtype=float)
    assert np.array_equal(many @ x, one @ x) and np.array_equal(many.rmatvec(y), one.rmatvec(y))


@pytest.mark.parametrize("settings", [dict(stride=2**62), dict(stride=10**20),
                                      dict(stride=(2**62, 1)), dict(stride=(1, 2**63))])
def test_settings_beyond_int64_coordinates_are_refused_by_name(settings):
    # they overflowed inside the index maps (OverflowError); the sizes alone stay exact
    message = r"give padded coordinates up to .* beyond 2\*\*62: they cannot be indexed"
    for build in (lambda: sparse_tconv.conv_matrix(W2D, X2D, **settings),
                  lambda: ConvOperator(W2D, X2D, **settings)):
        with pytest.raises(ValueError, match=message):
            build()
    size = sparse_tconv.conv_matrix_nnz(W2D.shape, X2D, **settings)
    assert size.nnz <= math.prod(W2D.shape) * math.prod(X2D[1:])


def test_a_large_stride_that_int64_holds_gives_torchs_one_output():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(X2D)
    W = sparse_tconv.conv_matrix(W2D, X2D, stride=2**40)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x)[None], torch.from_numpy(W2D),
                                          stride=2**40)
    np.testing.assert_allclose(W @ x.ravel(), expected.numpy().ravel(), rtol=1e-12)


def test_a_weight_is_checked_for_its_shape_before_it_is_copied():
    # a broadcast view of 19 GB: the channel mismatch and the bad stride come out, not a
    # MemoryError from copying it
    huge = np.broadcast_to(1.0, (2**14, 2**14, 3, 3))
    with pytest.raises(ValueError, match=r"input_shape\[0\]=5 channels do not match"):
        sparse_tconv.conv_matrix(huge, (5, 6, 6))
    with pytest.raises(ValueError, match=r"stride must be positive"):
        ConvOperator(huge, (2**14, 6, 6), stride=0)
    with pytest.raises(ValueError, match=r"weight must have the shape of this operator's"):
        ConvOperator(W2D, X2D).with_weight(huge)


def test_a_damping_whose_square_overflows_is_refused():
    # tikhonov ran 1080 iterations and returned NaN for damp=1e155
    from sparse_tconv.solvers import normal_operator, preconditioner, tikhonov

    op = ConvOperator(W2D, X2D, padding=1)
    y = np.ones(op.shape[0])
    for call in (lambda: tikhonov(op, y, 1e155), lambda: normal_operator(op, 1e155),
                 lambda: preconditioner(op, 1e155)):
        with pytest.raises(ValueError, match=r"damp must be at most 1e154 .*got damp=1e\+155"):
            call()


def test_more_spatial_dimensions_than_numpy_can_index_are_refused():
    # 31 spatial dimensions ran into numpy's 64-dimension limit deep in the builder
    w, shape = np.ones((1, 1) + (1,) * 31), (1,) + (1,) * 31
    for call in (lambda: sparse_tconv.conv_matrix(w, shape),
                 lambda: sparse_tconv.conv_matrix_nnz(w.shape, shape),
                 lambda: ConvTransposeOperator(w, shape)):
        with pytest.raises(ValueError, match=r"at most 30 spatial dimensions are supported"):
            call()
    # 30 still build, and give the identity of a 1x...x1 kernel
    w, shape = np.full((1, 1) + (1,) * 30, 2.0), (1,) + (1,) * 30
    assert sparse_tconv.conv_matrix(w, shape).toarray().tolist() == [[2.0]]


def test_operands_and_weights_of_the_wrong_kind_say_what_to_pass():
    import scipy.sparse as sp

    op = ConvOperator(W2D, X2D, padding=1)
    n = op.shape[1]
    with pytest.raises(ValueError, match=rf"x has shape \({n},\): matmat takes a 2-D array of "
                                         rf"shape \({n}, K\); use matvec for a vector"):
        op.matmat(np.ones(n))
    with pytest.raises(TypeError, match=r"x must be a dense array, got a scipy sparse "
                                        r"csr_array; pass x.toarray\(\)"):
        op.matvec(sp.csr_array(np.ones((n, 1))))
    with pytest.raises(TypeError, match=r"weight must be a dense array, got a scipy sparse"):
        sparse_tconv.conv_matrix(sp.csr_array(np.ones((3, 3))), (6, 6))
    with pytest.raises(TypeError, match=r"got a masked array: its mask would be ignored"):
        sparse_tconv.conv_matrix(np.ma.masked_array(np.ones((3, 3))), (6, 6))
    with pytest.raises(TypeError, match=r"weight must be a numeric array, got "
                                        r"weight.dtype=timedelta64\[s\]"):
        sparse_tconv.conv_matrix(np.ones((3, 3)).astype("m8[s]"), (6, 6))


def test_more_edges_name_their_argument(monkeypatch):
    from sparse_tconv import direct, spectral, testing

    with pytest.raises(ValueError, match=r"input_shape=\(3, 1099511627776, 1099511627776\) "
                                         r"gives .* DFT block entries"):
        spectral.conv_singular_values(np.ones((3, 3, 3, 3)), (3, 2**40, 2**40), padding=1,
                                      padding_mode="circular")
    with pytest.raises(ValueError, match=r"batch must be a positive integer, got batch=0"):
        testing.assert_conv_matches_reference(np.ones((2, 3, 3, 3)), (3, 6, 6), batch=0)
    with pytest.raises(TypeError, match=r"transpose must be a bool, got transpose='yes'"):
        testing.assert_conv_matches_reference(np.ones((2, 3, 3, 3)), (3, 6, 6), transpose="yes")

    def refuse(*args):  # numpy's own MemoryError, simulated (a real one depends on the machine)
        raise MemoryError("Unable to allocate 96.0 GiB")

    monkeypatch.setitem(direct._FORWARD, "fast", refuse)
    with pytest.raises(MemoryError, match=r"the 'fast' kernel on x.shape=\(3, 8, 8\) needs "
                                          r"arrays this machine could not allocate"):
        direct.conv(np.ones((3, 8, 8)), np.ones((2, 3, 3, 3)))
