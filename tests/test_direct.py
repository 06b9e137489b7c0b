"""Direct kernels (naive, fast, FFT) against the matrices, against PyTorch, and their errors."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from sparse_tconv import conv_matrix, conv_transpose_matrix, direct
from sparse_tconv.direct import METHODS, conv, conv_transpose

from reference import (
    random_array,
    reference_conv_matrix,
    reference_conv_transpose_matrix,
    tolerance,
    torch_conv,
    torch_conv_transpose,
)

MODES = ["zeros", "reflect", "replicate", "circular"]
DTYPES = [np.float32, np.float64, np.complex128]
BATCH = 2


@dataclass(frozen=True)
class Case:
    name: str
    input_shape: tuple  # one sample of the function's input: x, or y for the transpose
    weight_shape: tuple
    kwargs: dict = field(default_factory=dict)

    def __str__(self):
        return self.name

    def rng(self, *salt):
        """A generator seeded by the case and ``salt`` (stable across runs)."""
        return np.random.default_rng(zlib.crc32(repr((self.name, *salt)).encode()))


FORWARD_CASES = [
    Case("1d", (3, 11), (4, 3, 3), dict(padding=1)),
    Case("1d-strided-dilated-groups", (4, 12), (6, 2, 3),
         dict(stride=2, padding=2, dilation=2, groups=2)),
    Case("1d-pairs-stride3", (2, 9), (3, 2, 4), dict(stride=3, padding=((2, 1),))),
    # k = 19 > 4 * log2(24): the FFT method transforms this kernel by FFT, not DFT.
    Case("1d-long-kernel", (2, 20), (2, 2, 19), dict(padding=1)),
    Case("2d-pairs", (2, 7, 8), (3, 2, 3, 2),
         dict(stride=(2, 1), padding=((2, 0), (1, 1)), dilation=(1, 2))),
    Case("2d-same-dilated", (2, 6, 6), (3, 2, 3, 3), dict(padding="same", dilation=(2, 1))),
    Case("2d-same-even-kernel", (2, 5, 7), (3, 2, 2, 4), dict(padding="same")),
    Case("2d-valid-depthwise", (3, 8, 9), (6, 1, 3, 3),
         dict(stride=2, padding="valid", groups=3)),
    Case("3d", (2, 5, 6, 4), (4, 1, 3, 2, 3),
         dict(stride=(2, 1, 1), padding=(1, 0, 1), dilation=(1, 2, 1), groups=2)),
]

# input_shape is y's, weight_shape PyTorch's ConvTranspose layout (C_in, C_out // groups, *k).
TRANSPOSE_CASES = [
    Case("1d-opad", (3, 5), (3, 2, 3), dict(stride=2, padding=1, output_padding=1)),
    # output_padding >= stride, allowed because it is < dilation.
    Case("1d-opad-dilation", (2, 4), (2, 2, 3), dict(padding=1, output_padding=1, dilation=2)),
    Case("1d-groups", (4, 6), (4, 3, 4),
         dict(stride=3, padding=2, output_padding=2, dilation=2, groups=2)),
    # k = 19 > 4 * log2(24): the FFT method transforms this kernel by FFT, not DFT.
    Case("1d-long-kernel", (2, 4), (2, 2, 19), dict(padding=1)),
    Case("2d-chapter", (1, 2, 2), (1, 1, 2, 2)),
    Case("2d-pairs", (2, 3, 4), (2, 3, 4, 2),
         dict(stride=(2, 1), padding=((1, 2), (0, 1)), output_padding=(1, 0), dilation=(1, 3))),
    Case("2d-same", (2, 5, 6), (2, 3, 3, 3), dict(padding="same")),
    Case("2d-depthwise", (4, 5, 4), (4, 1, 3, 3),
         dict(stride=2, padding=1, output_padding=(1, 0), groups=4)),
    Case("3d", (2, 3, 3, 4), (2, 2, 2, 3, 2),
         dict(stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 0),
              dilation=(1, 1, 2), groups=2)),
]


def _check(ours, expected, dtype):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(ours, expected, rtol=tolerance(dtype),
                               atol=tolerance(dtype) * scale)


def _matrix_apply(matrix, batch, out_sample_shape):
    return np.stack([matrix @ sample.ravel() for sample in batch]).reshape(
        len(batch), *out_sample_shape
    )


# ---------------------------------------------------------------------------
# Against the matrices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_conv_matches_conv_matrix(case, mode, method, dtype):
    rng = case.rng(mode, np.dtype(dtype).name)
    weight = random_array(rng, case.weight_shape, dtype)
    x = random_array(rng, (BATCH, *case.input_shape), dtype)
    W = conv_matrix(weight, case.input_shape, padding_mode=mode, **case.kwargs)
    out = conv(x, weight, method=method, padding_mode=mode, **case.kwargs)
    assert out.dtype == np.dtype(dtype)
    assert out.flags.c_contiguous
    expected = _matrix_apply(W, x, out.shape[1:])
    assert W.shape[0] == expected[0].size
    _check(out, expected, dtype)
    # One sample gives the batch's first row.
    single = conv(x[0], weight, method=method, padding_mode=mode, **case.kwargs)
    assert single.shape == out.shape[1:]
    _check(single, expected[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_conv_transpose_matches_conv_transpose_matrix(case, mode, method, dtype):
    rng = case.rng("T", mode, np.dtype(dtype).name)
    weight = random_array(rng, case.weight_shape, dtype)
    y = random_array(rng, (BATCH, *case.input_shape), dtype)
    M = conv_transpose_matrix(weight, case.input_shape, padding_mode=mode, **case.kwargs)
    out = conv_transpose(y, weight, method=method, padding_mode=mode, **case.kwargs)
    assert out.dtype == np.dtype(dtype)
    assert out.flags.c_contiguous
    expected = _matrix_apply(M, y, out.shape[1:])
    assert M.shape[0] == expected[0].size
    _check(out, expected, dtype)
    single = conv_transpose(y[0], weight, method=method, padding_mode=mode, **case.kwargs)
    _check(single, expected[0], dtype)


@pytest.mark.parametrize("dft_taps, dft_rows", [(0, 0), (np.inf, 0)],
                         ids=["fft-only", "dft-only"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("case", FORWARD_CASES + TRANSPOSE_CASES,
                         ids=[f"fwd-{c}" for c in FORWARD_CASES]
                         + [f"T-{c}" for c in TRANSPOSE_CASES])
def test_fft_kernel_spectrum_paths(case, dtype, dft_taps, dft_rows, monkeypatch):
    """Both ways of transforming the kernel (FFT of the zero-stuffed kernel, DFT matrix)."""
    monkeypatch.setattr(direct, "_DFT_TAPS_PER_LOG2", dft_taps)
    monkeypatch.setattr(direct, "_DFT_MIN_ROWS", dft_rows)
    transpose = case in TRANSPOSE_CASES
    rng = case.rng("spectrum", transpose, np.dtype(dtype).name)
    weight = random_array(rng, case.weight_shape, dtype)
    x = random_array(rng, case.input_shape, dtype)
    function = conv_transpose if transpose else conv
    ours = function(x, weight, method="fft", **case.kwargs)
    _check(ours, function(x, weight, method="naive", **case.kwargs), dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_conv_transpose_is_the_transpose_of_conv(case, mode, method):
    """<conv(x), y> == <x, conv_transpose(y)> with the same arguments."""
    rng = case.rng("adjoint", mode)
    weight = random_array(rng, case.weight_shape, np.float64)
    x = random_array(rng, case.input_shape, np.float64)
    kwargs = dict(case.kwargs, padding_mode=mode, method=method)
    out = conv(x, weight, **kwargs)
    y = random_array(rng, out.shape, np.float64)
    # output_padding picks the input size x had among those mapped onto out's size.
    short = conv_transpose(y, weight, **kwargs).shape
    output_padding = tuple(n - m for n, m in zip(x.shape[1:], short[1:]))
    back = conv_transpose(y, weight, output_padding=output_padding, **kwargs)
    assert back.shape == x.shape
    np.testing.assert_allclose(np.vdot(out, y), np.vdot(x, back), rtol=1e-10)


# ---------------------------------------------------------------------------
# Against PyTorch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32])  # float64 and complex: the matrix tests
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_conv_matches_torch(case, mode, method, dtype):
    pytest.importorskip("torch")
    rng = case.rng("torch", mode, np.dtype(dtype).name)
    weight = random_array(rng, case.weight_shape, dtype)
    x = random_array(rng, case.input_shape, dtype)
    kwargs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **case.kwargs}
    expected = torch_conv(x, weight, mode=mode, **kwargs)
    _check(conv(x, weight, method=method, padding_mode=mode, **kwargs), expected, dtype)


def _torch_accepts(padding):
    """torch's conv_transpose takes an int or one int per dimension, no pairs, no 'same'."""
    return isinstance(padding, int) or (
        isinstance(padding, tuple) and all(isinstance(p, int) for p in padding)
    )


TORCH_TRANSPOSE_CASES = [c for c in TRANSPOSE_CASES if _torch_accepts(c.kwargs.get("padding", 0))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", TORCH_TRANSPOSE_CASES, ids=str)
def test_conv_transpose_matches_torch(case, method, dtype):
    pytest.importorskip("torch")
    rng = case.rng("torch-T", np.dtype(dtype).name)
    weight = random_array(rng, case.weight_shape, dtype)
    y = random_array(rng, case.input_shape, dtype)
    kwargs = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1,
              **case.kwargs}
    expected = torch_conv_transpose(y, weight, **kwargs)
    _check(conv_transpose(y, weight, method=method, **kwargs), expected, dtype)


def test_torch_transpose_cases_are_not_empty():
    assert len(TORCH_TRANSPOSE_CASES) >= 5


# ---------------------------------------------------------------------------
# Dtypes, batches, inputs
# ---------------------------------------------------------------------------


def test_chapter_example_every_method():
    X = np.array([[0.0, 1.0], [2.0, 3.0]])
    K = np.array([[0.0, 1.0], [2.0, 3.0]])
    expected = np.array([[0.0, 0.0, 1.0], [0.0, 4.0, 6.0], [4.0, 12.0, 9.0]])
    for method in METHODS:
        out = conv_transpose(X[None], K[None, None], method=method)
        np.testing.assert_allclose(out[0], expected, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(np.float32, np.float32), (np.float32, np.float64), (np.int64, np.float32),
     (np.float64, np.complex64), (np.complex64, np.float32), (np.int32, np.int64)],
)
def test_result_dtype(method, x_dtype, w_dtype):
    rng = np.random.default_rng(7)
    x = (10 * rng.standard_normal((2, 6, 5))).astype(x_dtype)
    weight = (10 * rng.standard_normal((2, 2, 2, 2))).astype(w_dtype)
    # Integer weights are validated to float64, like the builders do.
    w_result = np.float64 if np.issubdtype(w_dtype, np.integer) else w_dtype
    expected_dtype = np.result_type(x_dtype, w_result)
    wc = weight.astype(np.complex128)
    # dense matrices from the loop definitions in tests/reference.py
    forward = reference_conv_matrix(wc, (2, 6, 5), 1, 1, 1, 1)[0]
    transposed = reference_conv_transpose_matrix(wc, (2, 6, 5), 1, 1, 0, 1, 1)[0]
    for function, dense in ((conv, forward), (conv_transpose, transposed)):
        out = function(x, weight, method=method, padding=1)
        assert out.dtype == expected_dtype
        reference = (dense @ x.astype(np.complex128).ravel()).reshape(out.shape)
        _check(out, reference, expected_dtype)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_not_modified(method):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6))
    weight = rng.standard_normal((3, 3, 3, 2))
    x_copy, weight_copy = x.copy(), weight.copy()
    x.flags.writeable = False  # any write into them would raise
    weight.flags.writeable = False
    for mode in MODES:
        for padding in (0, ((1, 2), (0, 1))):
            kwargs = dict(method=method, padding=padding, padding_mode=mode)
            out = conv(x, weight, **kwargs)
            conv_transpose(out, weight, **kwargs)
            conv(x[0], weight, **kwargs)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(weight, weight_copy)


@pytest.mark.parametrize("method", METHODS)
def test_result_does_not_share_memory_with_x(method):
    x = np.arange(12.0).reshape(1, 12)
    weight = np.ones((1, 1, 1))
    out = conv(x, weight, method=method)
    assert not np.shares_memory(out, x)
    out = conv_transpose(x, weight, method=method)
    assert not np.shares_memory(out, x)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method):
    weight = np.ones((4, 2, 3, 3))
    assert conv(np.zeros((0, 2, 6, 5)), weight, method=method, padding=1).shape == (0, 4, 6, 5)
    assert conv_transpose(np.zeros((0, 4, 6, 5)), weight, method=method,
                          stride=2).shape == (0, 2, 13, 11)


@pytest.mark.parametrize("method", METHODS)
def test_array_likes_and_non_contiguous_input(method):
    x = np.random.default_rng(5).standard_normal((3, 8, 10))[:, ::2, 1::2]
    weight = [[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, -1.0], [0.0, 2.0]]]]  # a nested list
    W = conv_matrix(weight, (1, 4, 5))
    for sample in x:  # non-contiguous samples, one input channel
        out = conv(sample[None], weight, method=method)
        _check(out.ravel(), W @ sample.ravel(), np.float64)
        back = conv_transpose(out.tolist(), weight, method=method)
        _check(back.ravel(), W.T @ out.ravel(), np.float64)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("function", [conv, conv_transpose])
def test_unknown_method(function):
    with pytest.raises(ValueError, match=r"method must be one of \('naive', 'fast', 'fft'\), "
                                         r"got method='direct'"):
        function(np.ones((1, 4)), np.ones((1, 1, 2)), method="direct")
    with pytest.raises(ValueError, match="got method=None"):
        function(np.ones((1, 4)), np.ones((1, 1, 2)), method=None)


def re_shape(shape):
    """``repr(shape)`` escaped for a regular expression."""
    return repr(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 4)])
def test_x_with_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"x must be one sample .* 1 spatial dimensions? .*"
                                         rf"got x.shape={re_shape(shape)}"):
        conv(np.ones(shape), np.ones((1, 1, 2)))
    with pytest.raises(ValueError, match=rf"y must be one sample .*got y.shape={re_shape(shape)}"):
        conv_transpose(np.ones(shape), np.ones((1, 1, 2)))


def test_x_with_wrong_channels():
    weight = np.ones((4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"x has 5 channels but the weight .* expects 6: "
                                         r"x.shape=\(2, 5, 4, 4\)"):
        conv(np.ones((2, 5, 4, 4)), weight, groups=2)
    with pytest.raises(ValueError, match=r"y has 3 channels but the weight .* expects 4: "
                                         r"y.shape=\(3, 4, 4\)"):
        conv_transpose(np.ones((3, 4, 4)), weight)


def test_x_with_empty_spatial_size():
    with pytest.raises(ValueError, match=r"x must have positive spatial sizes, "
                                         r"got x.shape=\(1, 0\)"):
        conv(np.ones((1, 0)), np.ones((1, 1, 1)))


def test_non_numeric_x():
    with pytest.raises(TypeError, match="x must be a numeric array, got x.dtype=<U1"):
        conv(np.array([["a", "b"]]), np.ones((1, 1, 1)))


def test_geometry_errors_come_from_the_shared_validation():
    x, weight = np.ones((2, 6, 6)), np.ones((2, 2, 3, 3))
    with pytest.raises(ValueError, match="weight must have at least 3 dimensions"):
        conv(np.ones((1, 4)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="stride must be positive"):
        conv(x, weight, stride=0)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        conv(x, weight, padding="same", stride=2)
    with pytest.raises(ValueError, match="reflect padding must be smaller than the input"):
        conv(x, weight, padding=6, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        conv(x, weight, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        conv(x, weight, groups=0)
    with pytest.raises(TypeError, match="dilation must be an int"):
        conv(x, weight, dilation=1.5)
    with pytest.raises(ValueError, match="output_padding must be smaller than either stride"):
        conv_transpose(x, weight, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="dilated kernel .* is larger than the padded input"):
        conv(np.ones((2, 2, 2)), weight)
    with pytest.raises(TypeError, match="weight must be numeric, got a boolean weight"):
        conv(x, weight.astype(bool))
