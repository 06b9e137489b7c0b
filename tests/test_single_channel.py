"""The single-channel spelling: a kernel (k_1..k_N) on an input (L_1..L_N).

It must mean exactly the channel spelling ``k[None, None]`` on ``(1, L_1..L_N)``
in every entry point (builders, sizes, shapes, operators, the distributed
operator), and agree with PyTorch on ``x[None, None]``.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
    conv_output_shape,
    conv_transpose_matrix,
    conv_transpose_matrix_nnz,
    conv_transpose_output_shape,
)
from sparse_tconv._geometry import expand_single_channel, validate

from reference import seed_of, tolerance, torch_conv, torch_conv_transpose

# (kernel shape, input size, keywords)
CASES = [
    ((3,), (11,), dict(padding=1)),
    ((4,), (9,), dict(stride=2, dilation=2, padding=[(1, 2)], padding_mode="reflect")),
    ((3, 3), (7, 8), dict(padding="same", padding_mode="circular")),
    ((2, 4), (6, 9), dict(stride=(2, 1), padding=((0, 1), (2, 0)))),
    ((3, 2), (6, 7), dict(dilation=(2, 1), padding_mode="replicate", padding=1)),
    ((2, 3, 2), (4, 5, 4), dict(stride=(1, 2, 1), padding=1)),
]
TRANSPOSE_CASES = [
    ((3,), (6,), dict(stride=2, padding=1, output_padding=1)),
    ((2, 3), (4, 3), dict(stride=(2, 3), padding=(0, 1), output_padding=(1, 2))),
    ((3, 3), (4, 5), dict(dilation=2, padding=1)),
    ((2, 2, 3), (3, 2, 3), dict(stride=2)),
]


def _ids(case):
    return f"k{case[0]}-L{case[1]}-{case[2]}"


def _weight(kernel, *parts):
    return np.random.default_rng(seed_of(*parts)).standard_normal(kernel)


def _assert_same_csr(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_matrix_is_the_channel_spelling(case):
    kernel, size, kwargs = case
    k = _weight(kernel, "conv", kernel, size)
    before = k.copy()
    _assert_same_csr(conv_matrix(k, size, **kwargs), conv_matrix(k[None, None], (1, *size),
                                                                 **kwargs))
    np.testing.assert_array_equal(k, before)  # not modified
    nnz_kwargs = dict(kwargs)
    assert (conv_matrix_nnz(kernel, size, **nnz_kwargs)
            == conv_matrix_nnz((1, 1, *kernel), (1, *size), **nnz_kwargs))
    shape_kwargs = {key: v for key, v in kwargs.items() if key != "padding_mode"}
    assert (conv_output_shape(size, kernel, **shape_kwargs)
            == conv_output_shape((1, *size), (1, 1, *kernel), **shape_kwargs))


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_ids)
def test_conv_transpose_matrix_is_the_channel_spelling(case):
    kernel, size, kwargs = case
    k = _weight(kernel, "transpose", kernel, size)
    _assert_same_csr(conv_transpose_matrix(k, size, **kwargs),
                     conv_transpose_matrix(k[None, None], (1, *size), **kwargs))
    assert (conv_transpose_matrix_nnz(kernel, size, **kwargs)
            == conv_transpose_matrix_nnz((1, 1, *kernel), (1, *size), **kwargs))
    assert (conv_transpose_output_shape(size, kernel, **kwargs)
            == conv_transpose_output_shape((1, *size), (1, 1, *kernel), **kwargs))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_matches_torch_on_one_channel(case):
    pytest.importorskip("torch")
    kernel, size, kwargs = case
    k = _weight(kernel, "torch", kernel, size)
    x = _weight(size, "torch-x", kernel, size)
    kwargs = dict(kwargs)
    mode = kwargs.pop("padding_mode", "zeros")
    expected = torch_conv(x[None], k[None, None], kwargs.get("stride", 1),
                          kwargs.get("padding", 0), kwargs.get("dilation", 1), 1, mode)
    got = conv_matrix(k, size, padding_mode=mode, **kwargs) @ x.ravel()
    np.testing.assert_allclose(got, expected.ravel(), rtol=tolerance(np.float64), atol=1e-12)
    op = ConvOperator(k, size, padding_mode=mode, **kwargs)
    np.testing.assert_allclose(op @ x.ravel(), expected.ravel(), rtol=tolerance(np.float64),
                               atol=1e-12)


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_ids)
def test_conv_transpose_matches_torch_on_one_channel(case):
    pytest.importorskip("torch")
    kernel, size, kwargs = case
    k = _weight(kernel, "torch-t", kernel, size)
    y = _weight(size, "torch-y", kernel, size)
    expected = torch_conv_transpose(y[None], k[None, None], kwargs.get("stride", 1),
                                    kwargs.get("padding", 0), kwargs.get("output_padding", 0),
                                    kwargs.get("dilation", 1), 1)
    got = conv_transpose_matrix(k, size, **kwargs) @ y.ravel()
    np.testing.assert_allclose(got, expected.ravel(), rtol=tolerance(np.float64), atol=1e-12)
    op = ConvTransposeOperator(k, size, **kwargs)
    np.testing.assert_allclose(op @ y.ravel(), expected.ravel(), rtol=tolerance(np.float64),
                               atol=1e-12)


def test_operators_report_the_channel_shapes():
    k = _weight((3, 3), "operators")
    op = ConvOperator(k, (6, 7), padding=1)
    assert op.input_shape == (1, 6, 7) and op.output_shape == (1, 6, 7)
    assert op.weight.shape == (1, 1, 3, 3) and not op.weight.flags.writeable
    np.testing.assert_array_equal(op.weight[0, 0], k)
    _assert_same_csr(op.matrix, conv_matrix(k[None, None], (1, 6, 7), padding=1))
    top = ConvTransposeOperator(k, (3, 4), stride=2)
    assert top.input_shape == (1, 3, 4) and top.output_shape == (1, 7, 9)
    _assert_same_csr(top.matrix, conv_transpose_matrix(k[None, None], (1, 3, 4), stride=2))


def test_validate_expands_once_and_keeps_the_copy_private():
    k = np.arange(6.0).reshape(2, 3)
    w, geom = validate(k, (5, 6), transposed=False)
    assert w.shape == (1, 1, 2, 3) and geom.input_shape == (1, 5, 6)
    assert not w.flags.writeable and not np.shares_memory(w, k)
    # The channel spelling is left alone, and so is a wrong one (reported by its check).
    assert expand_single_channel((4, 2, 3), (2, 9)) == ((4, 2, 3), (2, 9), False)
    assert expand_single_channel((3, 3), (2, 8, 8)) == ((3, 3), (2, 8, 8), False)
    assert expand_single_channel((3, 3), (8, 8)) == ((1, 1, 3, 3), (1, 8, 8), True)


def test_distributed_operator_takes_the_single_channel_spelling():
    distributed = pytest.importorskip("distributed")
    from sparse_tconv.distributed import DistributedConvOperator

    k = _weight((3, 3), "distributed")
    x = _weight((9, 8), "distributed-x")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=None) as client:
        op = DistributedConvOperator(k, (9, 8), padding=1, client=client, n_blocks=2)
        try:
            assert op.shape == (72, 72)
            got = op.matvec(x.ravel())
        finally:
            op.close()
    expected = conv_matrix(k[None, None], (1, 9, 8), padding=1) @ x.ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: conv_matrix(np.ones((3, 3)), (8, 8), groups=2),
     r"single-channel weight .*weight\.shape=\(3, 3\), input_shape=\(8, 8\)\) needs groups=1, "
     r"got groups=2"),
    (lambda: ConvOperator(np.ones((3,)), (9,), groups=3), r"needs groups=1, got groups=3"),
    (lambda: conv_matrix(np.ones((7, 3)), (5, 6)),
     r"dilated kernel \(size 7 in spatial dimension 0\).*read as weight\.shape=\(1, 1, 7, 3\) "
     r"on input_shape=\(1, 5, 6\)"),
    (lambda: conv_matrix(np.ones((3, 3)), (2, 8, 8)),
     r"weight must have at least 3 dimensions .*or as many as input_shape .*"
     r"weight\.shape=\(3, 3\)"),
    (lambda: conv_transpose_matrix(np.ones((3, 3)), (4, 4), output_padding=1),
     r"output_padding must be smaller.*read as weight\.shape=\(1, 1, 3, 3\)"),
])
def test_single_channel_errors_say_how_the_shapes_were_read(call, match):
    with pytest.raises(ValueError, match=match):
        call()
