"""The structured product form (the weight's taps: tiled im2col or panel GEMMs) against oracles.

Random geometries (hypothesis: N = 1..3, every padding mode, stride,
dilation, asymmetric padding, groups), both directions, float32, float64 and
complex128, one and two threads, each product run as im2col and as panel
GEMMs (one per tap, :mod:`sparse_tconv._forms.panels`): every product equals
the canonical CSR matrix's (``conv_matrix`` / ``conv_transpose_matrix``) to
rounding, and PyTorch's ``conv{N}d`` / ``conv_transpose{N}d``; the thread
count changes no bit.  The tile budgets are lowered so that these small
layers are cut into many tiles (pieces) and two threads split them, as large
layers are.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_output_shape,
    conv_transpose_output_shape,
)
from sparse_tconv._forms import StructuredForm, form_for
from sparse_tconv._geometry import conv_geometry

from reference import random_array, torch_conv
from strategies import PANEL_CHOICES, _kwargs, geometries, shrink_tiles

DTYPES = [np.float32, np.float64, np.complex128]
RTOL = {np.float32: 1e-5, np.float64: 1e-12, np.complex128: 1e-12}


def _is_structured(g) -> bool:
    geom = conv_geometry(g["weight_shape"], g["input_shape"], **_kwargs(g))
    return form_for(geom) is StructuredForm


def _symmetric_zeros(g):
    """The geometry with zeros padding, ``max(lo, hi)`` on both sides (what PyTorch's
    transposed convolutions take; a larger padding keeps the kernel inside)."""
    padding = [(max(pair),) * 2 for pair in g["padding"]]
    return {**g, "padding": padding, "padding_mode": "zeros"}


def _assert_close(actual, expected, magnitude, rtol):
    """Entry by entry within ``rtol * magnitude``, the sum of the products' magnitudes:
    a sum of the same products in any order is that close."""
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= rtol * magnitude + 1e-300)


@settings(max_examples=60, deadline=None)
@given(g=geometries().filter(_is_structured), transposed=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       panel_gemms=st.sampled_from(PANEL_CHOICES))
def test_products_equal_the_csr_matrix_and_do_not_depend_on_threads(g, transposed, dtype, seed,
                                                                     panel_gemms):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], dtype)
    kwargs = _kwargs(g)
    with pytest.MonkeyPatch.context() as patch:
        shrink_tiles(patch, panel_gemms)
        if transposed:
            # The transposed convolution whose matrix is this convolution's W.T.
            if g["padding_mode"] != "zeros":
                return  # a transposed convolution has zeros padding only (PyTorch)
            kwargs.pop("padding_mode")
            shape = conv_output_shape(g["input_shape"], g["weight_shape"], **kwargs)
            try:
                smallest = conv_transpose_output_shape(shape, g["weight_shape"], **kwargs)
            except ValueError:  # padding past what a transposed convolution takes back
                assume(False)
            extra = tuple(n - m for n, m in zip(g["input_shape"][1:], smallest[1:]))
            assume(all(e < max(s, d) for e, s, d in zip(extra, g["stride"], g["dilation"])))
            def make(w, t):
                return ConvTransposeOperator(w, shape, threads=t, output_padding=extra, **kwargs)
        else:
            def make(w, t):
                return ConvOperator(w, g["input_shape"], threads=t, **kwargs)
        ops = [make(weight, t) for t in (1, 2)]
        # The bound: |w| per tap (the CSR matrix adds the taps that padding folds
        # onto one input, which may cancel; the form multiplies them one by one).
        bound = make(np.abs(weight), 1).matrix
        assert ops[0].product_form.name == "structured"
        A = ops[0].matrix
        x = random_array(rng, A.shape[1], dtype)
        y = random_array(rng, A.shape[0], dtype)
        X = random_array(rng, (A.shape[1], 3), dtype)
        Y = random_array(rng, (A.shape[0], 3), dtype)
        results = []
        for op in ops:
            products = [op @ x, op.H @ y, op @ X, op.H @ Y, op.T @ y]
            _assert_close(products[0], A @ x, bound @ abs(x), RTOL[dtype])
            _assert_close(products[1], A.conj().T @ y, bound.T @ abs(y), RTOL[dtype])
            _assert_close(products[2], A @ X, bound @ abs(X), RTOL[dtype])
            _assert_close(products[3], A.conj().T @ Y, bound.T @ abs(Y), RTOL[dtype])
            _assert_close(products[4], A.T @ y, bound.T @ abs(y), RTOL[dtype])
            results.append(products)
        for one, two in zip(*results):
            np.testing.assert_array_equal(one, two)


@settings(max_examples=40, deadline=None)
@given(g=geometries().filter(_is_structured), seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]), panel_gemms=st.sampled_from(PANEL_CHOICES))
def test_conv_equals_torch(g, seed, threads, panel_gemms):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(g["weight_shape"])
    x = rng.standard_normal(g["input_shape"])
    with pytest.MonkeyPatch.context() as patch:
        shrink_tiles(patch, panel_gemms)
        op = ConvOperator(weight, g["input_shape"], threads=threads, **_kwargs(g))
        got = op.conv(x)
    expected = torch_conv(x, weight, g["stride"], g["padding"], g["dilation"], g["groups"],
                          g["padding_mode"])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@settings(max_examples=40, deadline=None)
@given(g=geometries().map(_symmetric_zeros).filter(_is_structured),
       seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([1, 2]),
       panel_gemms=st.sampled_from(PANEL_CHOICES))
def test_conv_transpose_equals_torch(g, seed, threads, panel_gemms):
    from reference import torch_conv_transpose

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(g["weight_shape"])
    padding = tuple(lo for lo, _ in g["padding"])
    kwargs = dict(stride=g["stride"], padding=padding, dilation=g["dilation"], groups=g["groups"])
    shape = conv_output_shape(g["input_shape"], g["weight_shape"], **kwargs)
    y = rng.standard_normal(shape)
    with pytest.MonkeyPatch.context() as patch:
        shrink_tiles(patch, panel_gemms)
        try:
            op = ConvTransposeOperator(weight, shape, threads=threads, **kwargs)
        except ValueError:  # an empty output: more padding than the transposed convolution has
            assume(False)
        got = op.conv_transpose(y)
    expected = torch_conv_transpose(y, weight, g["stride"], padding, 0, g["dilation"],
                                    g["groups"])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_batch_equals_one_product_per_column(mode, stride):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((6, 4, 3, 3))
    op = ConvOperator(weight, (4, 9, 8), padding=1, stride=stride, padding_mode=mode)
    X = rng.standard_normal((op.shape[1], 5))
    Y = rng.standard_normal((op.shape[0], 5))
    columns = np.column_stack([op @ X[:, j] for j in range(5)])
    np.testing.assert_allclose(op @ X, columns, rtol=1e-13, atol=1e-13)
    columns = np.column_stack([op.H @ Y[:, j] for j in range(5)])
    np.testing.assert_allclose(op.H @ Y, columns, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("stride, dilation", [((2, 2), (2, 2)), ((3, 2), (2, 3)),
                                              ((4, 1), (1, 1)), ((1, 1), (2, 1))])
def test_transposed_products_of_strided_dilated_layers_equal_the_csr(mode, stride, dilation):
    """W.T @ y lands each tap in the frame's class modulo the stride: classes a tap
    never reaches (dilation a multiple of the stride) stay zero, the others add up.
    Layers large enough for several tiles and chunks of channels, at full tile size."""
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((6, 8, 3, 4))
    op = ConvOperator(weight, (8, 23, 19), padding=((3, 2), (1, 3)), stride=stride,
                      dilation=dilation, padding_mode=mode, threads=2)
    A = op.matrix
    Y = rng.standard_normal((A.shape[0], 3))
    np.testing.assert_allclose(op.H @ Y, A.T @ Y, rtol=1e-12, atol=1e-12 * np.abs(Y).max())
    np.testing.assert_allclose(op.H @ Y[:, 1], A.T @ Y[:, 1], rtol=1e-12,
                               atol=1e-12 * np.abs(Y).max())


def test_the_form_stores_the_weight_only():
    """A few hundred kB where the CSR matrix takes tens of MB; the CSR is built when read."""
    weight = np.random.default_rng(0).standard_normal((64, 64, 3, 3))
    op = ConvOperator(weight, (64, 56, 56), padding=1)
    assert op.product_form.name == "structured"
    assert op.nbytes == 2 * weight.nbytes  # the weight and its per-tap blocks
    _ = op @ np.ones(op.shape[1]), op.H @ np.ones(op.shape[0])
    # and the form of W.T, built by the first W.T @ y: the flipped weight and its blocks
    assert op.nbytes == 4 * weight.nbytes
    assert op._matrix_slot.built is None
    x = np.random.default_rng(1).standard_normal(op.shape[1])
    _ = op @ x, op.H @ op @ x
    assert op._matrix_slot.built is None  # products never build the CSR
    expected = conv_matrix(weight, (64, 56, 56), padding=1) @ x
    np.testing.assert_allclose(op @ x, expected, rtol=1e-12, atol=1e-12 * abs(expected).max())


@st.composite
def _transposed_layers(draw):
    """A transposed convolution drawn as PyTorch's layers take it, output_padding included."""
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    size = [draw(st.integers(1, {1: 7, 2: 5, 3: 3}[ndim])) for _ in range(ndim)]
    kernel = [draw(st.integers(1, 3)) for _ in range(ndim)]
    stride = [draw(st.integers(1, 3)) for _ in range(ndim)]
    dilation = [draw(st.integers(1, 3)) for _ in range(ndim)]
    padding = [draw(st.integers(0, 2)) for _ in range(ndim)]
    output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
    return dict(weight_shape=(cin, cout // groups, *kernel), input_shape=(cin, *size),
                stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                groups=groups, output_padding=tuple(output_padding))


@settings(max_examples=60, deadline=None)
@given(layer=_transposed_layers(), seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]), panel_gemms=st.sampled_from(PANEL_CHOICES))
def test_transposed_layers_with_output_padding_equal_torch(layer, seed, threads, panel_gemms):
    """output_padding leaves input elements of W that no output reads (with stride 1 too):
    the products must give their zeros, as torch and the CSR matrix do."""
    from reference import torch_conv_transpose

    rng = np.random.default_rng(seed)
    kwargs = {k: layer[k] for k in ("stride", "padding", "dilation", "groups",
                                    "output_padding")}
    weight = rng.standard_normal(layer["weight_shape"])
    with pytest.MonkeyPatch.context() as patch:
        shrink_tiles(patch, panel_gemms)
        try:
            op = ConvTransposeOperator(weight, layer["input_shape"], threads=threads, **kwargs)
        except ValueError:  # an empty output
            assume(False)
        assume(op.product_form.name == "structured")
        y = rng.standard_normal(layer["input_shape"])
        got = op.conv_transpose(y)
        back = op.H @ rng.standard_normal(op.shape[0])
    expected = torch_conv_transpose(y, weight, layer["stride"], layer["padding"],
                                    layer["output_padding"], layer["dilation"], layer["groups"])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    assert np.all(np.isfinite(back))
    x = rng.standard_normal(op.shape[0])
    np.testing.assert_allclose(op.H @ x, op.matrix.T @ x, rtol=1e-10,
                               atol=1e-10 * np.abs(op.matrix.T @ x).max())


def test_output_padding_with_stride_one_regression():
    """Found by the suite: stride 1, dilation 2, output_padding 1 left the last
    elements unwritten (np.empty's contents) and read past the frame in 2-D."""
    w = np.array([[[1.0], [2.0]]])
    op = ConvTransposeOperator(w, (1, 2), dilation=2, output_padding=1)
    np.testing.assert_array_equal(op @ np.array([1.0, 10.0]), [1, 10, 0, 2, 20, 0])
    op = ConvTransposeOperator(np.array([[[[1.0]], [[2.0]]]]), (1, 2, 1), dilation=(1, 2),
                               output_padding=(0, 1))
    np.testing.assert_array_equal(op @ np.array([1.0, 10.0]), [1, 0, 10, 0, 2, 0, 20, 0])
