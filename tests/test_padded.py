"""The product form of single-channel stride-1 layers with any padding: the diagonals of
the padded frame's convolution (sparse_tconv._forms.padded).

Oracles: the canonical CSR of ``conv_matrix`` (its products, to rounding: it adds
the taps that padding sends to one element before multiplying) and PyTorch's
``conv{N}d`` on the padded input; thread counts compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel
from sparse_tconv._forms import PaddedDiagonalForm, diagonals, form_for
from sparse_tconv._forms.padded import frame_geometry
from sparse_tconv._geometry import conv_geometry

from reference import random_array

MODES = ["zeros", "reflect", "replicate", "circular"]
RTOL = {np.float32: 1e-5, np.float64: 1e-12, np.complex128: 1e-12}


@st.composite
def single_channel_layers(draw):
    """One channel, stride 1, any padding mode, N = 1..3, dilation, asymmetric padding."""
    ndim = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(MODES))
    size, kernel, dilation, padding = [], [], [], []
    for _ in range(ndim):
        n = draw(st.integers(1, {1: 30, 2: 9, 3: 5}[ndim]))
        pad_max = {"reflect": n - 1, "circular": n}.get(mode, 4)
        lo, hi = draw(st.integers(0, min(pad_max, 4))), draw(st.integers(0, min(pad_max, 4)))
        d = draw(st.integers(1, 3))
        k = draw(st.integers(1, max(1, min(5, (n + lo + hi - 1) // d + 1))))
        size.append(n), kernel.append(k), dilation.append(d), padding.append((lo, hi))
    return (1, 1, *kernel), (1, *size), dict(padding=padding, dilation=tuple(dilation),
                                             padding_mode=mode)


def _is_padded(case):
    weight_shape, input_shape, kwargs = case
    return form_for(conv_geometry(weight_shape, input_shape, **kwargs)) is PaddedDiagonalForm


def _bound(op, weight):
    """|W| applied entrywise: the sum of the products' magnitudes (the rounding scale)."""
    return type(op)(np.abs(weight), op.input_shape, padding=op.padding,
                    dilation=op.dilation, padding_mode=op.padding_mode).matrix


@settings(max_examples=80, deadline=None)
@given(case=single_channel_layers().filter(_is_padded),
       dtype=st.sampled_from(sorted(RTOL, key=str)), zeros=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_products_equal_the_csr_and_do_not_depend_on_threads(case, dtype, zeros, seed):
    weight_shape, input_shape, kwargs = case
    rng = np.random.default_rng(seed)
    weight = random_array(rng, weight_shape, dtype)
    if zeros:  # taps of weight zero are left out of the diagonals
        weight.reshape(-1)[rng.random(weight.size) < 0.5] = 0
    with pytest.MonkeyPatch.context() as patch:
        # small matrices on the large ones' paths: chunks of rows, two threads
        patch.setattr(diagonals, "_CHUNK_BYTES", 1)
        patch.setattr(diagonals, "_MIN_CHUNK_ROWS", 1)
        patch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
        ops = [ConvOperator(weight, input_shape, threads=t, **kwargs) for t in (1, 2)]
        lean = ConvOperator(weight, input_shape, keep_transpose=False, **kwargs)
        assert ops[0].product_form.name == "padded_diagonals"
        A = ops[0].matrix
        bound = _bound(ops[0], weight)
        x, y = random_array(rng, A.shape[1], dtype), random_array(rng, A.shape[0], dtype)
        X = random_array(rng, (A.shape[1], 3), dtype)
        runs = []
        for op in (*ops, lean):
            got = [op @ x, op.H @ y, op @ X, op.T @ y]
            expected = [A @ x, A.conj().T @ y, A @ X, A.T @ y]
            scales = [bound @ abs(x), bound.T @ abs(y), bound @ abs(X), bound.T @ abs(y)]
            for g, e, m in zip(got, expected, scales):
                assert g.shape == e.shape and g.dtype == np.dtype(dtype)
                assert np.all(np.abs(g - e) <= RTOL[dtype] * m + 1e-300)
            runs.append(got)
    for one, two in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("mode", MODES)
def test_equals_torch_on_a_blur(mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((1, 1, 5, 5))
    op = ConvOperator(weight, (1, 31, 27), padding=2, padding_mode=mode)
    assert op.product_form.name == ("diagonals" if mode == "zeros" else "padded_diagonals")
    x = rng.standard_normal(op.shape[1])
    layer = torch.nn.Conv2d(1, 1, 5, padding=2, padding_mode=mode, bias=False,
                            dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        expected = layer(torch.from_numpy(x.reshape(1, 1, 31, 27))).numpy().ravel()
    np.testing.assert_allclose(op @ x, expected, rtol=1e-12, atol=1e-12)


def test_a_transposed_layer_of_another_size():
    # stride 1 and zeros padding that does not keep the size: W.T's form
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((1, 1, 3, 4))
    op = ConvTransposeOperator(weight, (1, 9, 8), padding=(1, 0))
    assert op.product_form.name == "padded_diagonals"
    A = op.matrix.toarray()
    x, y = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    np.testing.assert_allclose(op @ x, A @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.H @ y, A.T @ y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_inputs_go_to_the_csr(bad):
    # The diagonals' stored zeros would carry a NaN to rows that do not read it.
    weight = np.ones((1, 1, 3, 3))
    op = ConvOperator(weight, (1, 12, 10), padding=1, padding_mode="replicate")
    x = np.ones(op.shape[1])
    x[5] = bad
    expected = op.matrix @ x
    np.testing.assert_array_equal(np.isnan(op @ x), np.isnan(expected))
    np.testing.assert_array_equal(op @ x, expected)
    np.testing.assert_array_equal(op.H @ x, op.matrix.T @ x)


def test_stores_the_frame_diagonals_of_the_nonzero_taps():
    # a 7x7 motion blur along the anti-diagonal with replicate padding at 256x256: the
    # CSR would hold 49 entries a position (38 MB); the form one period of 7 diagonals
    weight = np.fliplr(np.eye(7))[None, None] / 7
    op = ConvOperator(weight, (1, 256, 256), padding=3, padding_mode="replicate")
    form = op._forward_slot.get()
    assert form.name == "padded_diagonals" and len(form.banded.offsets) == 7
    assert op.nbytes < 0.1 * 49 * 12 * 256 * 256
    assert op.nbytes <= PaddedDiagonalForm.predict_nbytes(op.convolution.geometry, np.float64,
                                                          transposed=False)
    geom = frame_geometry(op.convolution.geometry)
    assert tuple(geom.input_size) == tuple(geom.output_size) == (262, 262)
