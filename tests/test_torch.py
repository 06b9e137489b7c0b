"""Parity with PyTorch, the second oracle (skipped when torch is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator, conv_matrix, conv_transpose_matrix

from reference import random_array, seed_of, tolerance, torch_conv, torch_conv_transpose

torch = pytest.importorskip("torch")

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]

# (input_shape, weight_shape, stride, padding, dilation, groups)
CONV_GEOMETRIES = [
    ((3, 11), (4, 3, 3), 1, 1, 1, 1),
    ((4, 12), (6, 2, 4), 2, 3, 2, 2),
    ((2, 9), (2, 2, 9), 1, 0, 1, 1),  # kernel as large as the input
    ((2, 9, 7), (3, 2, 3, 2), (2, 1), ((0, 2), (1, 0)), 1, 1),  # (before, after) pairs
    ((2, 7), (2, 2, 1), 3, 0, 1, 1),  # 1x1 kernel, stride 3
    ((3, 8, 9), (6, 1, 3, 3), 2, 1, 1, 3),  # depthwise
    ((4, 7, 8), (2, 2, 2, 4), (1, 2), (1, 2), (2, 1), 2),  # even kernels
    ((2, 6, 6), (3, 2, 3, 3), 1, "same", (2, 1), 1),
    ((2, 5, 7), (3, 2, 2, 4), 1, "same", 1, 1),  # 'same' with odd total padding
    ((2, 6, 5), (3, 2, 3, 2), (2, 1), "valid", 1, 1),
    ((2, 4, 4), (3, 2, 6, 6), 1, 1, 1, 1),  # kernel as large as the padded input
    ((2, 5, 6, 4), (4, 1, 3, 2, 3), (2, 1, 1), (1, 0, 1), (1, 2, 1), 2),
    ((1, 6, 5, 5), (2, 1, 3, 3, 3), 1, "same", 1, 1),
]


def _check(ours, expected, dtype):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(ours, expected, rtol=tolerance(dtype),
                               atol=tolerance(dtype) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
def test_conv_matrix_matches_torch(geometry, mode, dtype):
    input_shape, weight_shape, stride, padding, dilation, groups = geometry
    rng = np.random.default_rng(seed_of(geometry, mode, str(dtype)))
    weight = random_array(rng, weight_shape, dtype)
    x = random_array(rng, input_shape, dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    W = conv_matrix(weight, input_shape, padding_mode=mode, **kwargs)
    expected = torch_conv(x, weight, mode=mode, **kwargs)
    y = W @ x.ravel()
    assert y.dtype == np.dtype(dtype)
    _check(y, expected.ravel(), dtype)
    # The operator's shaped application agrees, for one sample and for a batch.
    op = ConvOperator(weight, input_shape, padding_mode=mode, **kwargs)
    assert op.output_shape == expected.shape
    _check(op.conv(x), expected, dtype)
    batch = np.stack([x, 2 * x])
    _check(op.conv(batch), np.stack([expected, 2 * expected]), dtype)


# (input_shape of the transposed conv, weight_shape (C_in, C_out // g, *k),
#  stride, padding, output_padding, dilation, groups)
TRANSPOSE_GEOMETRIES = [
    ((1, 2, 2), (1, 1, 2, 2), 1, 0, 0, 1, 1),
    ((3, 5), (3, 2, 3), 2, 1, 1, 1, 1),
    ((4, 6), (4, 3, 4), 3, 2, 2, 2, 2),
    ((2, 4), (2, 2, 3), 1, 0, 1, 2, 1),  # output_padding >= stride, < dilation
    ((2, 5), (2, 1, 1), 2, 0, 1, 1, 1),  # 1x1 kernel
    ((20, 6, 6), (20, 10, 5, 5), 3, 2, 1, 1, 1),  # the chapter's round trip
    ((4, 5, 4), (4, 1, 3, 3), 2, 1, (1, 0), 1, 4),  # depthwise
    ((2, 3, 4), (2, 3, 4, 2), (2, 1), (1, 0), (1, 0), (1, 3), 1),  # even kernels
    ((64, 4, 4), (64, 2, 4, 4), 2, 1, 0, 1, 32),
    ((2, 3, 3, 4), (2, 2, 2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 0, 0), (1, 1, 2), 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", TRANSPOSE_GEOMETRIES, ids=str)
def test_conv_transpose_matrix_matches_torch(geometry, dtype):
    input_shape, weight_shape, stride, padding, output_padding, dilation, groups = geometry
    rng = np.random.default_rng(seed_of(geometry, str(dtype)))
    weight = random_array(rng, weight_shape, dtype)
    y = random_array(rng, input_shape, dtype)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding,
                  dilation=dilation, groups=groups)
    M = conv_transpose_matrix(weight, input_shape, **kwargs)
    expected = torch_conv_transpose(y, weight, **kwargs)
    x = M @ y.ravel()
    assert x.dtype == np.dtype(dtype)
    _check(x, expected.ravel(), dtype)
    op = ConvTransposeOperator(weight, input_shape, **kwargs)
    assert op.output_shape == expected.shape
    _check(op.conv_transpose(y), expected, dtype)
    _check(op.conv_transpose(y[None])[0], expected, dtype)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_nn_module_with_padding_mode(mode):
    # torch.nn.Conv2d applies padding_mode itself; the matrix reproduces the module.
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 6, (3, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                            groups=2, bias=False, padding_mode=mode).double()
    x = torch.randn(1, 4, 9, 10, dtype=torch.float64)
    W = conv_matrix(layer.weight.detach().numpy(), (4, 9, 10), stride=(2, 1), padding=(1, 2),
                    dilation=(1, 2), groups=2, padding_mode=mode)
    expected = layer(x).detach().numpy().ravel()
    np.testing.assert_allclose(W @ x.numpy().ravel(), expected, rtol=1e-12, atol=1e-12)


def test_backward_of_conv_is_the_transposed_matrix():
    # The gradient of <conv(x), g> with respect to x is W.T g: the chapter's
    # statement that the transposed convolution swaps forward and backward.
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((5, 3, 3, 3))
    x = torch.tensor(rng.standard_normal((1, 3, 8, 8)), requires_grad=True)
    out = torch.nn.functional.conv2d(x, torch.tensor(weight), stride=2, padding=1)
    g = rng.standard_normal(out.shape)
    out.backward(torch.tensor(g))
    op = ConvOperator(weight, (3, 8, 8), stride=2, padding=1)
    np.testing.assert_allclose(op.rmatvec(g.ravel()), x.grad.numpy().ravel(), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tensor_weights_are_taken_as_detached_copies(dtype):
    # A tensor that requires grad, or in bfloat16 (numpy has none), gives
    # the matrix of its values: bfloat16 widened exactly to float32.
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, dtype=dtype, requires_grad=True)
    W = conv_matrix(weight, (2, 9), padding=1)
    values = weight.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    assert W.dtype == np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    x = torch.randn(1, 2, 9, dtype=values.dtype)
    expected = torch.nn.functional.conv1d(x, values, padding=1).numpy().ravel()
    np.testing.assert_allclose(W @ x.numpy().ravel(), expected, rtol=1e-5, atol=1e-5)
    assert weight.requires_grad and weight.grad is None  # the argument is untouched


def test_the_documented_non_finite_conventions():
    # docs/semantics.md, "Infinities and NaN": both differences, against torch.
    w = np.array([[[np.inf, 1.0, 1.0]]])
    ours = conv_matrix(w, (1, 4), padding=1) @ np.ones(4)
    theirs = torch.nn.functional.conv1d(torch.ones(1, 1, 4, dtype=torch.float64),
                                        torch.from_numpy(w), padding=1)[0, 0].numpy()
    np.testing.assert_array_equal(ours, [2.0, np.inf, np.inf, np.inf])
    np.testing.assert_array_equal(theirs, [np.nan, np.inf, np.inf, np.inf])

    w = np.array([[[1e308, 0.0, 1e308]]])
    x = np.array([0.0, 0.5, 0.0])
    ours = conv_matrix(w, (1, 3), padding=1, padding_mode="reflect") @ x
    layer = torch.nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect", bias=False,
                            dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        theirs = layer(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(ours, [np.inf, 0.0, np.inf])
    np.testing.assert_array_equal(theirs, [1e308, 0.0, 1e308])
