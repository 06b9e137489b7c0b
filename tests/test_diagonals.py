"""The operators' product form for one channel and stride 1: W by diagonals
(sparse_tconv._forms.diagonals).

Oracles: the canonical CSR of ``conv_matrix``/``conv_transpose_matrix`` and
scipy's serial product with it (which the DIA products equal bit for bit),
and dense products.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel, conv_matrix
from sparse_tconv._build import build
from sparse_tconv._forms import diagonals as _dia
from sparse_tconv._geometry import validate

from reference import random_array

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]

# (weight shape, input shape, keywords): one channel, stride 1, output size = input size
CASES = [
    ((1, 1, 3, 3), (1, 9, 7), dict(padding=1)),
    ((1, 1, 5), (1, 11), dict(padding=[(3, 1)])),
    ((1, 1, 3, 2, 2), (1, 5, 5, 3), dict(padding=[(4, 0), (1, 0), (0, 1)], dilation=(2, 1, 1))),
    ((1, 1, 2, 3), (1, 5, 6), dict(padding="same", dilation=2)),
]
IDS = ["2d", "1d-asymmetric", "3d-dilated", "2d-same-even"]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_diagonal_products_are_the_csr_products_bit_for_bit(case, dtype, threads, monkeypatch):
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)  # thread even these small matrices
    _small_chunks(monkeypatch)  # in chunks of one period: several calls to share
    weight_shape, input_shape, kwargs = case
    rng = np.random.default_rng(0)
    weight = random_array(rng, weight_shape, dtype)
    w, geom = validate(weight, input_shape, transposed=False, **kwargs)
    assert _dia.DiagonalForm.applies(geom)
    for transpose in (False, True):
        csr = build(geom, w, transposed=transpose, threads=1)
        dia = _dia.build_diagonals(geom, w, transposed=transpose)
        assert dia.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(dia.toarray(), csr.toarray())
        assert np.all(np.diff(dia.offsets) > 0)  # the CSR's column order in every row
        x = random_array(rng, csr.shape[1], dtype)
        X = random_array(rng, (csr.shape[1], 3), dtype)
        banded = _dia.BandedDiagonals(geom, w, transposed=transpose)
        np.testing.assert_array_equal(_dia._banded_product(banded, x, threads, None), csr @ x)
        np.testing.assert_array_equal(_dia._banded_product(banded, X, threads, None), csr @ X)


@st.composite
def same_size_geometries(draw):
    """One channel, stride 1, padding that keeps every spatial size."""
    ndim = draw(st.integers(1, 3))
    size, kernel, dilation, padding = [], [], [], []
    for _ in range(ndim):
        n = draw(st.integers(2, {1: 40, 2: 9, 3: 5}[ndim]))
        d = draw(st.integers(1, 3))
        k = draw(st.integers(1, max(1, (n - 1) // d + 1)))
        span = (k - 1) * d  # < n: the offsets grow with the tap
        lo = draw(st.integers(0, span))
        size.append(n), kernel.append(k), dilation.append(d), padding.append((lo, span - lo))
    return (1, 1, *kernel), (1, *size), dict(padding=padding, dilation=tuple(dilation))


@given(same_size_geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_diagonals_over_random_geometries(case, transposed, seed):
    weight_shape, input_shape, kwargs = case
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(weight_shape)
    cls = ConvTransposeOperator if transposed else ConvOperator
    op = cls(weight, input_shape, **kwargs)
    assert op.product_form.name == "diagonals"
    x, y = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    np.testing.assert_array_equal(op.matvec(x), op.matrix @ x)
    np.testing.assert_array_equal(op.rmatvec(y), op.transpose_matrix @ y)
    np.testing.assert_array_equal(op.T.matvec(y), op.transpose_matrix @ y)
    # a batch runs on the CSR matrices: the same bits
    X, Y = rng.standard_normal((op.shape[1], 2)), rng.standard_normal((op.shape[0], 3))
    np.testing.assert_array_equal(op.matmat(X), op.matrix @ X)
    np.testing.assert_array_equal(op.rmatmat(Y), op.transpose_matrix @ Y)


@pytest.mark.parametrize(
    "input_shape, kwargs, form",
    [
        ((1, 8, 8), dict(padding=1, stride=2), "csr"),  # stride 2: no constant offset per tap
        # the diagonals of the padded frame's convolution:
        ((1, 8, 8), dict(), "padded_diagonals"),  # 'valid': the output is smaller
        ((1, 8, 8), dict(padding=1, padding_mode="circular"), "padded_diagonals"),  # wraps
        ((1, 2, 8), dict(padding=1), "padded_diagonals"),  # kernel as long as a dimension
    ],
)
def test_other_single_channel_geometries_are_not_diagonals(input_shape, kwargs, form):
    weight = np.arange(9.0).reshape(1, 1, 3, 3)
    op = ConvOperator(weight, input_shape, **kwargs)
    assert op.product_form.name == form
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    np.testing.assert_allclose(op.matvec(x), op.matrix @ x, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.rmatvec(y), op.matrix.T @ y, rtol=1e-13, atol=1e-13)


def test_diagonal_operator_stores_less_and_builds_the_csr_on_request():
    rng = np.random.default_rng(2)
    op = ConvOperator(rng.standard_normal((1, 1, 9, 9)), (1, 64, 64), padding=4)
    assert op.product_form.name == "diagonals" and op._matrix_slot.built is None
    csr = conv_matrix(op.weight, (1, 64, 64), padding=4)
    dia_bytes = op.product_form.nbytes
    csr_bytes = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
    # 8 bytes per stored value and the few explicit zeros of the padding
    offset_size = op.product_form.matrix.offsets.itemsize
    assert dia_bytes == 81 * 64 * 64 * 8 + 81 * offset_size
    assert dia_bytes < 0.72 * csr_bytes
    new = op.with_weight(2 * op.weight)
    x = rng.standard_normal(op.shape[1])
    np.testing.assert_array_equal(new.matvec(x), (2 * csr) @ x)
    np.testing.assert_array_equal(op.matrix.data, csr.data)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_reach_only_the_rows_that_read_them(bad):
    # The diagonals store zeros where taps fall into the padding; 0 * inf is
    # NaN, so such vectors must not go through them.  torch is the oracle.
    torch = pytest.importorskip("torch")
    weight = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    op = ConvOperator(weight, (1, 4, 4), padding=1)
    assert op.product_form.name == "diagonals"
    x = np.zeros((1, 4, 4))
    x[0, 0, 3] = bad
    expected = torch.nn.functional.conv2d(torch.from_numpy(x[None]), torch.from_numpy(weight),
                                          padding=1)[0].numpy()
    np.testing.assert_array_equal(op.conv(x), expected)
    np.testing.assert_array_equal(op.matvec(x.ravel()), expected.ravel())
    back = torch.nn.functional.conv_transpose2d(torch.from_numpy(x[None]),
                                                torch.from_numpy(weight), padding=1)[0].numpy()
    np.testing.assert_array_equal(op.rmatvec(x.ravel()), back.ravel())
    np.testing.assert_array_equal(op.matvec(np.zeros(16)), np.zeros(16))  # back to finite


def _small_chunks(mp):
    """Chunks of a few rows, so that small matrices have an interior of several."""
    mp.setattr(_dia, "_CHUNK_BYTES", 1)
    mp.setattr(_dia, "_MIN_CHUNK_ROWS", 1)


@given(same_size_geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_banded_diagonals_over_random_geometries(case, keep_transpose, seed):
    # The edge rows and one period of the interior, chunk by chunk: the CSR
    # products bit for bit, in both directions and both modes.
    weight_shape, input_shape, kwargs = case
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(weight_shape)
    with pytest.MonkeyPatch.context() as mp:
        _small_chunks(mp)
        op = ConvOperator(weight, input_shape, keep_transpose=keep_transpose, **kwargs)
        x, y = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
        np.testing.assert_array_equal(op.matvec(x), op.matrix @ x)
        np.testing.assert_array_equal(op.rmatvec(y), op.transpose_matrix @ y)
        np.testing.assert_array_equal(op.T.matvec(y), op.transpose_matrix @ y)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_banded_diagonals_store_one_period_of_the_interior(dtype, transposed):
    rng = np.random.default_rng(3)
    weight = random_array(rng, (1, 1, 5, 3), dtype)
    w, geom = validate(weight, (1, 40, 30), transposed=False, padding=[(2, 2), (0, 2)])
    with pytest.MonkeyPatch.context() as mp:
        _small_chunks(mp)
        mp.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
        banded = _dia.BandedDiagonals(geom, w, transposed=transposed)
        layout = _dia._Layout.of(geom, transposed, w.dtype.itemsize)
        predicted = _dia.DiagonalForm.predict_nbytes(geom, w.dtype, transposed=transposed)
        x = random_array(rng, 1200, dtype)
        products = [banded.matvec(x, threads) for threads in (1, 2, 3)]
    dia = _dia.build_diagonals(geom, w, transposed=transposed)
    csr = build(geom, w, transposed=transposed, threads=1)
    # two edge windows and chunks of one period (30 rows) between them, the
    # interior's chunks all reading the one stored period
    interior = [p for p in banded.pieces if layout.top <= p.start < layout.bottom]
    assert len(interior) > 20 and banded.nbytes == predicted
    assert banded.nbytes < 0.75 * (dia.data.nbytes + dia.offsets.nbytes)
    assert len({id(p.values) for p in interior}) == 1
    assert len({id(p.values) for p in banded.pieces}) == 3
    for product in products:
        np.testing.assert_array_equal(product, csr @ x)
        np.testing.assert_array_equal(product, dia @ x)


@pytest.mark.parametrize("zeros", ["anti-diagonal", "first-and-last", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_taps_of_weight_zero_are_not_multiplied(zeros, dtype, transposed, monkeypatch):
    """A kernel with zero taps (a diagonal motion blur) stores and multiplies its
    nonzero taps only; the products stay the CSR products (which store the zeros)."""
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    _small_chunks(monkeypatch)
    rng = np.random.default_rng(5)
    weight = random_array(rng, (1, 1, 5, 5), dtype)
    if zeros == "anti-diagonal":
        weight = weight * np.fliplr(np.eye(5))
    elif zeros == "first-and-last":
        weight.reshape(-1)[[0, -1]] = 0
    else:
        weight = np.zeros_like(weight)
    w, geom = validate(weight, (1, 23, 17), transposed=False, padding=2)
    banded = _dia.BandedDiagonals(geom, w, transposed=transposed)
    assert len(banded.offsets) == np.count_nonzero(weight)
    assert all(p.values.shape[0] == np.count_nonzero(weight) for p in banded.pieces)
    csr = build(geom, w, transposed=transposed, threads=1)
    x = random_array(rng, csr.shape[1], dtype)
    for threads in (1, 2):
        np.testing.assert_array_equal(_dia._banded_product(banded, x, threads, None), csr @ x)
    op = ConvOperator(weight, (1, 23, 17), padding=2)
    assert op.product_form.name == "diagonals"
    x[7] = np.inf  # through the canonical CSR: inf times a stored zero is NaN there too
    np.testing.assert_array_equal(op @ x, op.matrix @ x)
    np.testing.assert_array_equal(op.H @ x, op.matrix.conj().T @ x)
