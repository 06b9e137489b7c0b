"""conv_matrix / conv_transpose_matrix against the loop reference, and their structure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from sparse_tconv import (
    conv_matrix,
    conv_matrix_nnz,
    conv_output_shape,
    conv_transpose_matrix,
    conv_transpose_matrix_nnz,
    conv_transpose_output_shape,
)
from sparse_tconv._build import build, refill
from sparse_tconv._geometry import validate

from reference import (
    position_major,
    random_array,
    reference_conv_matrix,
    reference_conv_transpose_matrix,
    seed_of,
    tolerance,
)

MODES = ["zeros", "reflect", "replicate", "circular"]
DTYPES = [np.float32, np.float64, np.complex64, np.complex128]


@dataclass(frozen=True)
class Case:
    name: str
    input_shape: tuple
    weight_shape: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1

    @property
    def ndim(self):
        return len(self.input_shape) - 1

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def per_dim(self, value):
        return [value] * self.ndim if isinstance(value, int) else list(value)

    def explicit_padding(self):
        """(before, after) pairs, resolving 'same'/'valid' from their definitions."""
        if self.padding == "valid":
            return [(0, 0)] * self.ndim
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.per_dim(self.dilation),
                                                   self.weight_shape[2:])]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) if isinstance(p, int) else tuple(p) for p in self.per_dim(self.padding)]


CASES = [
    Case("1d", (2, 7), (3, 2, 3), padding=1),
    Case("1d-even-kernel-strided-dilated-groups", (2, 9), (2, 1, 4), stride=2,
         padding=[(2, 1)], dilation=2, groups=2),
    Case("1d-kernel-as-large-as-input", (1, 5), (2, 1, 5)),
    Case("1d-stride-larger-than-kernel", (1, 10), (1, 1, 2), stride=4, padding=[(0, 3)]),
    Case("2d-asymmetric", (4, 5, 6), (2, 2, 3, 2), stride=(2, 1), padding=[(1, 2), (0, 1)],
         dilation=(1, 2), groups=2),
    Case("2d-1x1", (3, 4, 4), (5, 3, 1, 1)),
    Case("2d-chapter-like", (2, 6, 5), (4, 2, 3, 3), stride=3, padding=2),
    Case("2d-depthwise", (3, 5, 5), (6, 1, 3, 3), stride=2, padding=1, groups=3),
    Case("2d-same-even-kernel", (2, 5, 6), (2, 2, 4, 3), padding="same", dilation=(1, 2)),
    Case("2d-valid", (2, 5, 4), (3, 2, 2, 3), padding="valid"),
    Case("2d-kernel-larger-than-input", (1, 3, 3), (1, 1, 5, 5), padding=1),
    Case("3d", (2, 3, 4, 5), (2, 2, 2, 3, 2), stride=(1, 2, 1), padding=[1, 0, (1, 0)]),
    Case("4d", (1, 3, 3, 4, 3), (2, 1, 2, 1, 2, 2), padding=(1, 0, 1, 0), dilation=(1, 1, 2, 1)),
]


def _seed(*parts):
    return seed_of(*(str(p) for p in parts))


def _csr_pattern(matrix):
    dense = np.zeros(matrix.shape, dtype=bool)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    dense[rows, matrix.indices] = True
    return dense


def _assert_canonical(matrix):
    """Sorted, duplicate-free columns in every row, checked on the raw arrays."""
    assert isinstance(matrix, sp.csr_array)
    indptr, indices = matrix.indptr, matrix.indices
    assert indptr[0] == 0 and indptr[-1] == len(indices) == len(matrix.data)
    assert np.all(np.diff(indptr) >= 0)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(indptr))
    same_row = rows[1:] == rows[:-1]
    assert np.all(np.diff(indices.astype(np.int64))[same_row] > 0)
    assert indices.size == 0 or (indices.min() >= 0 and indices.max() < matrix.shape[1])
    assert matrix.has_canonical_format


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conv_matrix_matches_reference(case, mode, dtype):
    rng = np.random.default_rng(_seed(case.name, mode, dtype))
    weight = random_array(rng, case.weight_shape, dtype)
    W = conv_matrix(weight, case.input_shape, padding_mode=mode, **case.kwargs())
    dense, pattern, out_shape = reference_conv_matrix(
        weight, case.input_shape, case.stride, case.explicit_padding(), case.dilation,
        case.groups, mode,
    )
    assert W.shape == dense.shape
    assert W.dtype == np.dtype(dtype)
    np.testing.assert_allclose(W.toarray(), dense, rtol=tolerance(dtype), atol=tolerance(dtype))
    np.testing.assert_array_equal(_csr_pattern(W), pattern)
    _assert_canonical(W)
    assert W.indices.dtype == np.int32 and W.indptr.dtype == np.int32
    assert conv_output_shape(case.input_shape, case.weight_shape, **case.kwargs()) == out_shape
    size = conv_matrix_nnz(case.weight_shape, case.input_shape, padding_mode=mode,
                           dtype=dtype, **case.kwargs())
    assert size.nnz == W.nnz == pattern.sum()
    assert size.nbytes == W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    assert size.shape == W.shape


def _output_padding(case):
    """The output_padding whose transposed convolution has the case's input size."""
    shape = conv_output_shape(case.input_shape, case.weight_shape, **case.kwargs())
    return shape, tuple(
        n - ((o - 1) * s - lo - hi + d * (k - 1) + 1)
        for n, o, s, (lo, hi), d, k in zip(
            case.input_shape[1:], shape[1:], case.per_dim(case.stride), case.explicit_padding(),
            case.per_dim(case.dilation), case.weight_shape[2:],
        )
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conv_transpose_matrix_is_the_transpose(case, mode, dtype):
    rng = np.random.default_rng(_seed("T", case.name, mode, dtype))
    weight = random_array(rng, case.weight_shape, dtype)
    y_shape, output_padding = _output_padding(case)
    M = conv_transpose_matrix(weight, y_shape, output_padding=output_padding, padding_mode=mode,
                              **case.kwargs())
    W = conv_matrix(weight, case.input_shape, padding_mode=mode, **case.kwargs())
    WT = W.T.tocsr()  # scipy's own transposition, sorted
    assert M.shape == WT.shape
    np.testing.assert_array_equal(M.indptr, WT.indptr)
    np.testing.assert_array_equal(M.indices, WT.indices)
    np.testing.assert_array_equal(M.data, WT.data)  # same sums, same order: bit-for-bit
    _assert_canonical(M)
    assert conv_transpose_output_shape(y_shape, case.weight_shape, output_padding=output_padding,
                                       **case.kwargs()) == tuple(case.input_shape)
    size = conv_transpose_matrix_nnz(case.weight_shape, y_shape, output_padding=output_padding,
                                     padding_mode=mode, **case.kwargs())
    assert size.nnz == M.nnz and size.shape == M.shape


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_position_major_columns(case, mode, transpose):
    # build(..., channels_last=True) is the matrix with its columns renumbered
    # (channel, position) -> (position, channel), rows sorted: scipy's relabel+sort.
    rng = np.random.default_rng(_seed("cl", case.name, mode, transpose))
    weight = rng.standard_normal(case.weight_shape)
    w, geom = validate(weight, case.input_shape, transposed=False, padding_mode=mode,
                       **case.kwargs())
    plain = build(geom, w, transposed=transpose, threads=2)
    fast = build(geom, w, transposed=transpose, threads=2, channels_last=True)
    channels = geom.out_channels if transpose else geom.in_channels
    expected = position_major(plain, channels)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(expected, name))
    _assert_canonical(fast)
    again = refill(geom, 2 * w, fast, transposed=transpose, threads=1, channels_last=True)
    np.testing.assert_array_equal(again.data, 2 * fast.data)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conv_transpose_matrix_matches_scatter_reference(case, mode):
    rng = np.random.default_rng(_seed("scatter", case.name, mode))
    weight = rng.standard_normal(case.weight_shape)
    y_shape, output_padding = _output_padding(case)
    M = conv_transpose_matrix(weight, y_shape, output_padding=output_padding, padding_mode=mode,
                              **case.kwargs())
    dense, out_shape = reference_conv_transpose_matrix(
        weight, y_shape, case.stride, case.explicit_padding(), output_padding, case.dilation,
        case.groups, mode,
    )
    assert out_shape == tuple(case.input_shape)
    np.testing.assert_allclose(M.toarray(), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride, dilation, output_padding", [(1, 2, 1), (2, 3, 2), (1, 3, 2)])
def test_output_padding_beyond_stride(stride, dilation, output_padding):
    # PyTorch allows output_padding < dilation even when it is >= stride: the
    # last outputs then receive nothing from the input.
    rng = np.random.default_rng(stride * 10 + dilation)
    weight = rng.standard_normal((2, 3, 3))
    M = conv_transpose_matrix(weight, (2, 4), stride=stride, dilation=dilation,
                              output_padding=output_padding)
    dense, _ = reference_conv_transpose_matrix(weight, (2, 4), stride, 0, output_padding,
                                               dilation, 1)
    np.testing.assert_allclose(M.toarray(), dense, rtol=1e-12)
    _assert_canonical(M)


def test_pattern_depends_only_on_geometry():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 2, 3, 3))
    sparse_weight = weight * (rng.random(weight.shape) < 0.5)
    sparse_weight[0] = 0.0
    kwargs = dict(stride=2, padding=1, padding_mode="reflect")
    W1 = conv_matrix(weight, (2, 7, 6), **kwargs)
    W2 = conv_matrix(sparse_weight, (2, 7, 6), **kwargs)
    np.testing.assert_array_equal(W1.indptr, W2.indptr)
    np.testing.assert_array_equal(W1.indices, W2.indices)
    assert np.count_nonzero(W2.data) < W2.nnz  # zeros are stored, not dropped


def test_reflect_merges_taps_on_one_element():
    # Kernel 5, reflect padding 2 on an input of 3: the window of output 0
    # reads inputs 2, 1, 0, 1, 2, so its row holds three entries, each the sum
    # of the taps that read that element.
    weight = np.array([[[1.0, 10.0, 100.0, 1000.0, 10000.0]]])
    W = conv_matrix(weight, (1, 3), padding=2, padding_mode="reflect")
    dense, _, _ = reference_conv_matrix(weight, (1, 3), 1, 2, 1, 1, "reflect")
    np.testing.assert_array_equal(W.toarray(), dense)
    # Row 0 reads padded coordinates -2..2 = inputs 2, 1, 0, 1, 2.
    assert W.toarray()[0].tolist() == [100.0, 10.0 + 1000.0, 1.0 + 10000.0]


def test_int64_indices_when_int32_overflows():
    # 2**31 + 6 columns but only three rows: indices must be int64, and right.
    n = 2**31 + 6
    W = conv_matrix(np.ones((1, 1, 2)), (1, n), stride=2**30)
    assert W.indices.dtype == np.int64 and W.indptr.dtype == np.int64
    assert W.shape == (3, n)
    assert W.indices.tolist() == [0, 1, 2**30, 2**30 + 1, 2**31, 2**31 + 1]
    size = conv_matrix_nnz((1, 1, 2), (1, n), stride=2**30)
    assert size.index_dtype == np.int64 and size.nnz == 6


@pytest.mark.parametrize("weight_dtype, dtype, expected", [
    (np.int64, None, np.float64),
    (np.float16, None, np.float32),
    (np.float32, None, np.float32),
    (np.float64, np.float32, np.float32),
    (np.float32, np.complex128, np.complex128),
])
def test_result_dtype(weight_dtype, dtype, expected):
    weight = np.arange(8).reshape(1, 2, 4).astype(weight_dtype)
    W = conv_matrix(weight, (2, 6), dtype=dtype)
    assert W.dtype == np.dtype(expected)
    dense, _, _ = reference_conv_matrix(weight.astype(np.float64), (2, 6), 1, 0, 1, 1)
    np.testing.assert_array_equal(W.toarray(), dense)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">c8", ">c16", ">i8"])
def test_byte_order_is_not_a_dtype_choice(dtype):
    # A big-endian weight gives the matrix of its values, in native order.
    rng = np.random.default_rng(seed_of("byteorder", dtype))
    native = random_array(rng, (3, 2, 3), np.dtype(dtype).newbyteorder("="))
    W = conv_matrix(native.astype(dtype), (2, 7), padding=1)
    expected = conv_matrix(native, (2, 7), padding=1)
    assert W.dtype == expected.dtype and W.dtype.isnative
    np.testing.assert_array_equal(W.toarray(), expected.toarray())
    as_requested = conv_matrix(native, (2, 7), padding=1, dtype=np.dtype(dtype).newbyteorder(">")
                               if np.dtype(dtype).kind in "fc" else None)
    assert as_requested.dtype.isnative


def test_inputs_are_not_modified():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((2, 2, 3))
    original = weight.copy()
    input_shape, padding = [2, 8], [(1, 2)]
    W = conv_matrix(weight, input_shape, padding=padding, padding_mode="circular")
    W.data[:] = 0  # the matrix does not alias the weight
    np.testing.assert_array_equal(weight, original)
    assert input_shape == [2, 8] and padding == [(1, 2)]
    assert weight.flags.writeable


def test_max_bytes_guard():
    size = conv_matrix_nnz((4, 4, 3, 3), (4, 32, 32), padding=1)
    with pytest.raises(MemoryError, match=f"would need {size.nbytes} bytes.*max_bytes=1000"):
        conv_matrix(np.ones((4, 4, 3, 3)), (4, 32, 32), padding=1, max_bytes=1000)
    W = conv_matrix(np.ones((4, 4, 3, 3)), (4, 32, 32), padding=1, max_bytes=size.nbytes)
    assert W.nnz == size.nnz
    with pytest.raises(MemoryError, match="max_bytes"):
        conv_transpose_matrix(np.ones((4, 4, 3, 3)), (4, 32, 32), padding=1, max_bytes=10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_build_does_not_depend_on_threads(threads, restore_threads, monkeypatch):
    import sparse_tconv
    from sparse_tconv import _build

    monkeypatch.setattr(_build, "_CHUNK", 64)  # cut even small blocks into pieces
    sparse_tconv.set_num_threads(1)
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 3, 3, 4))
    kwargs = dict(stride=(1, 2), padding=[(2, 1), 1], padding_mode="replicate")
    serial = conv_matrix(weight, (3, 17, 19), **kwargs)
    sparse_tconv.set_num_threads(threads)
    threaded = conv_matrix(weight, (3, 17, 19), **kwargs)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name))
