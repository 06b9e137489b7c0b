"""Panel GEMMs (one BLAS call per tap on a flat frame) against numpy, the CSR matrix and PyTorch.

The hypothesis suites of ``test_structured.py`` run every small geometry
through both the panels and im2col; here: the BLAS call itself, layers wide
enough that the form picks panels on its own (every mode, stride, dilation,
groups, N = 1..3, both directions, one and two threads), and the rule that
picks them.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator
from sparse_tconv._blas import panel_gemm, panel_gemm_available
from sparse_tconv._forms import panels
from sparse_tconv._geometry import conv_geometry

from reference import random_array, torch_conv, torch_conv_transpose

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]
RTOL = {np.float32: 1e-5, np.float64: 1e-12, np.complex64: 1e-5, np.complex128: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_panel_gemm_equals_matmul_on_the_panel(dtype, accumulate):
    rng = np.random.default_rng(4)
    assert panel_gemm_available(np.dtype(dtype))
    a = random_array(rng, (5, 7), dtype)
    b = random_array(rng, (7, 40), dtype)
    c = random_array(rng, (5, 30), dtype)
    expected = c.copy()
    panel = a @ b[:, 9:20]
    expected[:, 3:14] = expected[:, 3:14] + panel if accumulate else panel
    untouched = b.copy(), a.copy()
    panel_gemm(a, b, 9, 40, c, 3, 30, 11, accumulate)
    np.testing.assert_allclose(c, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * 10)
    np.testing.assert_array_equal(c[:, :3], expected[:, :3])  # outside the panel: as it was
    np.testing.assert_array_equal(c[:, 14:], expected[:, 14:])
    np.testing.assert_array_equal(b, untouched[0])
    np.testing.assert_array_equal(a, untouched[1])


def test_no_panel_gemm_for_other_dtypes():
    assert not panel_gemm_available(np.dtype(np.int64))
    assert not panel_gemm_available(np.dtype(np.float16))


# (weight shape, input shape, settings): wide enough (32 channels a side, or 8
# times 4 classes) that the form picks panels by itself
LAYERS = [
    ((32, 40, 3, 3), (40, 9, 8), dict(padding=1)),
    ((36, 32, 3, 3), (32, 11, 9), dict(padding=(2, 1), stride=2)),
    ((32, 8, 4, 4), (8, 12, 11), dict(padding=1, stride=2)),
    ((40, 33, 3, 2), (33, 10, 9), dict(padding=2, dilation=(2, 3), stride=(1, 2))),
    ((32, 32, 3, 3), (32, 11, 10), dict(padding=2, dilation=2, stride=2)),
    ((64, 32, 3, 3), (64, 8, 9), dict(padding=1, groups=2)),
    ((33, 32, 5), (32, 30), dict(padding=2, stride=3)),
    ((32, 32, 3, 3, 3), (32, 5, 6, 4), dict(padding=1, stride=(1, 2, 1))),
]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _operator(weight, shape, settings, mode, threads):
    return ConvOperator(weight, shape, padding_mode=mode, threads=threads, **settings)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_wide_layers_run_as_panels_and_equal_the_csr_matrix(layer, mode, threads, monkeypatch):
    weight_shape, shape, settings = LAYERS[layer]
    monkeypatch.setattr(panels, "_MIN_PARALLEL_MACS", 0)  # two pieces even for these
    rng = np.random.default_rng(layer)
    weight = rng.standard_normal(weight_shape)
    op = _operator(weight, shape, settings, mode, threads)
    geom = conv_geometry(weight_shape, shape, padding_mode=mode, **settings)
    assert panels.panels_apply(geom, np.dtype(np.float64), 1)
    A = op.matrix
    X = rng.standard_normal((A.shape[1], 2))
    Y = rng.standard_normal((A.shape[0], 2))
    bound = abs(_operator(np.abs(weight), shape, settings, mode, 1).matrix)
    for got, expected, scale in [(op @ X[:, 0], A @ X[:, 0], bound @ abs(X[:, 0])),
                                 (op @ X, A @ X, bound @ abs(X)),
                                 (op.H @ Y[:, 1], A.T @ Y[:, 1], bound.T @ abs(Y[:, 1])),
                                 (op.H @ Y, A.T @ Y, bound.T @ abs(Y))]:
        assert np.all(np.abs(got - expected) <= 1e-12 * scale)
    x = X[:, 0].reshape(shape)
    kwargs = {"padding": 0, "stride": 1, "dilation": 1, "groups": 1, **settings}
    expected = torch_conv(x, weight, kwargs["stride"], kwargs["padding"], kwargs["dilation"],
                          kwargs["groups"], mode)
    np.testing.assert_allclose(op.conv(x), expected, rtol=1e-10, atol=1e-10 * abs(expected).max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layer", [1, 2, 4, 6, 7])
def test_wide_transposed_layers_equal_torch(layer, threads, monkeypatch):
    """ConvTransposeOperator of the layers above: conv_transpose by classes (depth-to-space)."""
    weight_shape, shape, settings = LAYERS[layer]
    monkeypatch.setattr(panels, "_MIN_PARALLEL_MACS", 0)
    rng = np.random.default_rng(10 + layer)
    weight = rng.standard_normal(weight_shape[1::-1] + weight_shape[2:])  # (C_in, C_out/g, *k)
    groups = settings.get("groups", 1)
    assert groups == 1
    ndim = len(shape) - 1
    padding = settings.get("padding", 0)
    padding = padding if isinstance(padding, tuple) else (padding,) * ndim
    kwargs = dict(stride=settings.get("stride", 1), padding=padding,
                  dilation=settings.get("dilation", 1))
    y = rng.standard_normal((weight.shape[0], *[n // 2 + 2 for n in shape[1:]]))
    op = ConvTransposeOperator(weight, y.shape, threads=threads, **kwargs)
    expected = torch_conv_transpose(y, weight, kwargs["stride"], padding, 0,
                                     kwargs["dilation"], 1)
    np.testing.assert_allclose(op.conv_transpose(y), expected, rtol=1e-10,
                               atol=1e-10 * abs(expected).max())
    x = rng.standard_normal(op.shape[0])
    np.testing.assert_allclose(op.H @ x, op.matrix.T @ x, rtol=1e-10,
                               atol=1e-10 * abs(op.matrix.T @ x).max())


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.complex128])
def test_wide_layers_in_other_dtypes_equal_the_csr(dtype):
    rng = np.random.default_rng(5)
    weight = random_array(rng, (32, 32, 3, 3), dtype)
    op = ConvOperator(weight, (32, 7, 6), padding=1, stride=(2, 1), padding_mode="reflect")
    A = op.matrix
    x, y = random_array(rng, A.shape[1], dtype), random_array(rng, A.shape[0], dtype)
    bound = abs(ConvOperator(np.abs(weight), (32, 7, 6), padding=1, stride=(2, 1),
                             padding_mode="reflect").matrix)
    assert np.all(np.abs(op @ x - A @ x) <= RTOL[dtype] * (bound @ abs(x)))
    assert np.all(np.abs(op.H @ y - A.conj().T @ y) <= RTOL[dtype] * (bound.T @ abs(y)))


def test_the_rule_takes_panels_for_wide_layers_only():
    f64 = np.dtype(np.float64)
    stem = conv_geometry((64, 3, 7, 7), (3, 224, 224), stride=2, padding=3)
    assert not panels.panels_apply(stem, f64, 1)  # 3 x 4 classes: thin GEMMs
    wide = conv_geometry((64, 64, 3, 3), (64, 56, 56), padding=1)
    assert panels.panels_apply(wide, f64, 1)
    upsample = conv_geometry((64, 32, 4, 4), (32, 56, 56), stride=2, padding=1)
    assert panels.panels_apply(upsample, f64, 1)  # 32 channels x 4 classes
    assert not panels.panels_apply(wide, np.dtype(np.int64), 1)
    assert not panels.panels_apply(wide, f64, 2**31 // 58 // 58)  # rows past BLAS's C ints
