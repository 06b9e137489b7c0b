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


# (weight shape, input shape, settings) of stride 1, wide enough (32 input
# channels per group, 9 taps at most) that the form picks panels by itself
LAYERS = [
    ((32, 40, 3, 3), (40, 9, 8), dict(padding=1)),
    ((36, 32, 3, 3), (32, 11, 9), dict(padding=(2, 1))),
    ((32, 40, 2, 3), (40, 12, 11), dict(padding=1)),
    ((40, 33, 3, 2), (33, 10, 9), dict(padding=2, dilation=(2, 3))),
    ((32, 32, 3, 1), (32, 11, 10), dict(padding=2, dilation=2)),
    ((64, 32, 3, 3), (64, 8, 9), dict(padding=1, groups=2)),
    ((33, 32, 5), (32, 30), dict(padding=2)),
    ((32, 32, 2, 2, 2), (32, 5, 6, 4), dict(padding=1)),
    # unpadded: the input is the frame; a 1x1 kernel (and a 3x1 one, padded
    # along the first dimension alone) writes the output with nothing to crop
    ((32, 32, 3, 3), (32, 8, 9), {}),
    ((40, 32, 1, 1), (32, 7, 9), {}),
    ((32, 34, 3, 1), (34, 9, 8), dict(padding=(1, 0))),
]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _operator(weight, shape, settings, mode, threads):
    return ConvOperator(weight, shape, padding_mode=mode, threads=threads, **settings)


def _split(monkeypatch, pieces) -> None:
    """``pieces``: "columns" cuts the product into many pieces of columns that
    the library's threads share, "channels" into two ranges of output
    channels; None as the form does (for these small layers: one piece)."""
    if pieces:
        monkeypatch.setattr(panels, "_MIN_PARALLEL_MACS", 0)
    if pieces == "columns":
        monkeypatch.setattr(panels, "_PIECE_MACS", 1)
        monkeypatch.setattr(panels, "_MIN_PIECE_COLUMNS", 0)
    elif pieces == "channels":
        monkeypatch.setattr(panels, "_MIN_PIECE_COLUMNS", 1 << 62)
        monkeypatch.setattr(panels, "_MIN_PIECE_CHANNELS", 1)


@pytest.mark.parametrize("pieces", [None, "columns", "channels"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_wide_layers_run_as_panels_and_equal_the_csr_matrix(layer, mode, threads, pieces,
                                                            monkeypatch):
    weight_shape, shape, settings = LAYERS[layer]
    _split(monkeypatch, pieces)
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


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_unpadded_layers_read_the_input_as_it_lies_and_leave_it_alone(kernel, order):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((32, 48, *kernel))
    op = ConvOperator(weight, (48, 7, 6))
    A = op.matrix
    X = np.asarray(rng.standard_normal((A.shape[1], 3)), order=order)
    before = X.copy()
    for got, expected in [(op @ X, A @ X), (op @ X[:, 1], A @ X[:, 1]),
                          (op.matvec(X[::1, 2]), A @ X[:, 2])]:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * abs(expected).max())
    np.testing.assert_array_equal(X, before)


# transposed layers (weight (C_in, C_out/g, *k), input shape, settings) whose
# W.T @ y the form runs by classes: 8 channels of y or more, blocks of 32 rows
# (C_in/g times the classes) or more, none empty
TRANSPOSED = [
    ((8, 32, 4, 4), (8, 6, 5), dict(stride=2, padding=1)),
    ((16, 12, 3, 2), (16, 5, 6), dict(stride=(3, 2), padding=(1, 0))),
    ((8, 12, 3), (8, 9), dict(stride=3, padding=1)),
    ((12, 32, 3, 3), (12, 5, 4), dict(stride=2, dilation=2, padding=1)),
    ((10, 12, 3, 4), (10, 4, 5), dict(stride=(3, 2), dilation=(1, 2), padding=(2, 1))),
    ((8, 16, 2, 2, 2), (8, 3, 4, 3), dict(stride=(1, 2, 1), padding=1)),
    ((16, 8, 4, 4), (16, 5, 5), dict(stride=2, padding=1, groups=2)),
]


@pytest.mark.parametrize("pieces", [None, "columns", "channels"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layer", range(len(TRANSPOSED)))
def test_transposed_products_by_classes_equal_torch_and_the_csr(layer, threads, pieces,
                                                                monkeypatch):
    weight_shape, shape, settings = TRANSPOSED[layer]
    _split(monkeypatch, pieces)
    rng = np.random.default_rng(10 + layer)
    weight = rng.standard_normal(weight_shape)
    op = ConvTransposeOperator(weight, shape, threads=threads, **settings)
    groups = settings.get("groups", 1)
    geom = conv_geometry(weight_shape, op.output_shape, stride=settings["stride"],
                         padding=settings["padding"], dilation=settings.get("dilation", 1),
                         groups=groups)
    assert panels.panels_apply(geom, np.dtype(np.float64), 1, transposed=True)
    y = rng.standard_normal(shape)
    ndim = len(shape) - 1
    padding = settings["padding"]
    padding = padding if isinstance(padding, tuple) else (padding,) * ndim
    expected = torch_conv_transpose(y, weight, settings["stride"], padding, 0,
                                     settings.get("dilation", 1), groups)
    np.testing.assert_allclose(op.conv_transpose(y), expected, rtol=1e-10,
                               atol=1e-10 * abs(expected).max())
    Y = rng.standard_normal((op.shape[1], 3))
    np.testing.assert_allclose(op @ Y, op.matrix @ Y, rtol=1e-10,
                               atol=1e-10 * abs(op.matrix @ Y).max())


@pytest.mark.parametrize("stride", [(1, 1), (2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.complex128])
def test_wide_layers_in_other_dtypes_equal_the_csr(dtype, stride, monkeypatch):
    monkeypatch.setattr(panels, "_PANEL_DTYPES", "fdFD")  # (float64 only, by default)
    rng = np.random.default_rng(5)
    weight = random_array(rng, (32, 32, 3, 3), dtype)
    op = ConvOperator(weight, (32, 7, 6), padding=1, stride=stride, padding_mode="reflect")
    A = op.matrix
    x, y = random_array(rng, A.shape[1], dtype), random_array(rng, A.shape[0], dtype)
    bound = abs(ConvOperator(np.abs(weight), (32, 7, 6), padding=1, stride=stride,
                             padding_mode="reflect").matrix)
    assert np.all(np.abs(op @ x - A @ x) <= RTOL[dtype] * (bound @ abs(x)))
    assert np.all(np.abs(op.H @ y - A.conj().T @ y) <= RTOL[dtype] * (bound.T @ abs(y)))


def test_the_rule_takes_panels_where_they_were_measured_faster():
    f64 = np.dtype(np.float64)
    wide = conv_geometry((64, 64, 3, 3), (64, 56, 56), padding=1)
    assert panels.panels_apply(wide, f64, 1) and panels.panels_apply(wide, f64, 1, True)
    assert not panels.panels_apply(conv_geometry((64, 16, 3, 3), (16, 56, 56), padding=1),
                                   f64, 1)  # thin blocks
    assert not panels.panels_apply(conv_geometry((64, 64, 5, 5), (64, 28, 28), padding=2),
                                   f64, 1)  # many taps
    stem = conv_geometry((64, 3, 7, 7), (3, 224, 224), stride=2, padding=3)
    assert not panels.panels_apply(stem, f64, 1)  # strided W @ x: im2col
    assert not panels.panels_apply(stem, f64, 1, True)  # blocks of 3 x 4 rows
    upsample = conv_geometry((64, 32, 4, 4), (32, 56, 56), stride=2, padding=1)
    assert panels.panels_apply(upsample, f64, 1, True)  # W.T @ y by classes
    downsample = conv_geometry((64, 64, 3, 3), (64, 56, 56), stride=2, padding=1)
    assert not panels.panels_apply(downsample, f64, 1, True)  # 7 of 16 blocks empty
    assert not panels.panels_apply(wide, np.dtype(np.int64), 1)
    assert not panels.panels_apply(wide, np.dtype(np.float32), 1)  # SGEMM: im2col
    assert panels.panels_apply(upsample, np.dtype(np.float32), 1, True)
    assert not panels.panels_apply(wide, f64, 2**31 // 58 // 58)  # rows past BLAS's C ints
    assert not panels.panels_apply(upsample, f64, 2**31 // 58 // 58, True)
