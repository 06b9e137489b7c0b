"""The operators' product form: W as dense channel blocks (sparse_tconv._forms.blocks).

Oracles: the canonical CSR of ``conv_matrix``/``conv_transpose_matrix``
renumbered and converted to BSR by scipy alone (``reference.block_form``),
scipy's serial BSR product on it, and dense products.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel
from sparse_tconv._build import build
from sparse_tconv._forms import blocks as _bsr
from sparse_tconv._geometry import validate

from reference import block_form, block_product, random_array
from strategies import _kwargs, geometries

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]

# (weight shape, input shape, keywords, transposed convolution?)
CASES = [
    ((8, 6, 3, 3), (6, 9, 7), dict(padding=1), False),
    ((9, 2, 3, 3), (6, 9, 7), dict(padding=[(2, 0), (1, 1)], stride=2, groups=3, dilation=2),
     False),
    ((6, 4, 4), (6, 11), dict(stride=3, padding=2, output_padding=1), True),
    ((6, 2, 3, 2, 2), (6, 4, 5, 3), dict(stride=(2, 1, 1), groups=3), True),
    ((4, 3, 3, 3), (3, 5, 5), dict(padding=6, dilation=5), False),  # rows without blocks
    ((4, 1, 3), (2, 8), dict(groups=2), False),
]
IDS = ["2d", "2d-groups-dilated", "1d-transposed", "3d-transposed-groups", "empty-rows",
       "1d-groups"]


def _blocks_and_csr(weight, input_shape, kwargs, transposed, transpose):
    """The block form made by _forms.blocks and the canonical CSR, of W (or W.T)."""
    w, geom = validate(weight, input_shape, transposed=transposed, **kwargs)
    pattern = _bsr.block_pattern(geom, transposed=transpose, threads=1)
    blocks = _bsr.fill_blocks(pattern, geom, w, transposed=transpose, threads=2)
    csr = build(geom, w, transposed=transpose, threads=1)
    rows_ch, cols_ch = geom.in_channels, geom.out_channels
    if not transpose:
        rows_ch, cols_ch = cols_ch, rows_ch
    return geom, blocks, csr, rows_ch, cols_ch


def _assert_same_bsr(got, expected):
    assert got.blocksize == expected.blocksize and got.shape == expected.shape
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "W.T"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_blocks_equal_scipys_conversion_of_the_csr(case, transpose):
    weight_shape, input_shape, kwargs, transposed = case
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(weight_shape)
    geom, blocks, csr, rows_ch, cols_ch = _blocks_and_csr(weight, input_shape, kwargs,
                                                          transposed, transpose)
    _assert_same_bsr(blocks, block_form(csr, rows_ch, cols_ch, geom.groups))
    assert blocks.nnz == csr.nnz  # every block dense, no stored zero added
    assert blocks.indices.dtype == csr.indices.dtype == np.int32


@given(geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_blocks_over_random_geometries(g, transpose, seed):
    g = dict(g, padding_mode="zeros")  # the only mode with a block form
    weight = np.random.default_rng(seed).standard_normal(g["weight_shape"])
    geom, blocks, csr, rows_ch, cols_ch = _blocks_and_csr(weight, g["input_shape"], _kwargs(g),
                                                          False, transpose)
    _assert_same_bsr(blocks, block_form(csr, rows_ch, cols_ch, geom.groups))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_products(case, dtype, threads, monkeypatch):
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)  # thread even these small matrices
    weight_shape, input_shape, kwargs, transposed = case
    rng = np.random.default_rng(1)
    weight = random_array(rng, weight_shape, dtype)
    geom, blocks, csr, rows_ch, cols_ch = _blocks_and_csr(weight, input_shape, kwargs,
                                                          transposed, transposed)
    x = random_array(rng, csr.shape[1], dtype)
    X = random_array(rng, (csr.shape[1], 5), dtype)
    # one vector: scipy's serial BSR kernel, bit for bit
    np.testing.assert_array_equal(_bsr.bsr_product(blocks, x, threads, geom.groups),
                                  block_product(csr, x, rows_ch, cols_ch, geom.groups))
    np.testing.assert_array_equal(_bsr.bsr_product(blocks, X[:, :1], threads, geom.groups),
                                  block_product(csr, X[:, :1], rows_ch, cols_ch, geom.groups))
    # a block of columns: BLAS per block row, the dense product to rounding ...
    got = _bsr.bsr_product(blocks, X, threads, geom.groups)
    tol = 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-12
    np.testing.assert_allclose(got, csr.toarray() @ X, rtol=tol, atol=tol)
    assert got.dtype == np.dtype(dtype)
    # ... and the same bits on one thread
    np.testing.assert_array_equal(got, _bsr.bsr_product(blocks, X, 1, geom.groups))


def test_batch_chunks_split_rows_of_equal_length():
    indptr = np.array([0, 3, 6, 6, 6, 8, 10, 13, 16, 19])
    chunks = list(_bsr._uniform_chunks(indptr, (1, 9), 6))
    assert chunks[0][0] == 1 and chunks[-1][1] == 9
    assert all(b1[1] == b2[0] for b1, b2 in zip(chunks, chunks[1:]))  # contiguous, in order
    lengths = np.diff(indptr)
    for a, b in chunks:
        assert len(set(lengths[a:b])) == 1  # one row length per chunk
        assert b - a == 1 or indptr[b] - indptr[a] <= 6
    assert list(_bsr._uniform_chunks(indptr, (2, 4), 6)) == [(2, 4)]  # empty rows: one chunk


@pytest.mark.parametrize(
    "weight_shape, kwargs, expected",
    [
        ((4, 3, 3, 3), dict(), True),
        ((1, 2, 3, 3), dict(), True),  # 1 x 2 blocks
        ((4, 3, 3, 3), dict(padding=1, padding_mode="reflect"), False),  # taps fold together
        ((1, 1, 3, 3), dict(), False),  # one channel: the blocks would be the CSR entries
        ((6, 1, 3, 3), dict(groups=6), False),  # depthwise: 1 x 1 blocks
    ],
)
def test_which_operators_use_blocks(weight_shape, kwargs, expected):
    channels = weight_shape[1] * kwargs.get("groups", 1)
    op = ConvOperator(np.ones(weight_shape), (channels, 6, 6), **kwargs)
    assert (op.product_form.name == "blocks") is expected
    # the canonical CSR is built only when asked for if the products do not use it
    assert (op._matrix_slot.built is None) is expected
    x = np.random.default_rng(2).standard_normal(op.shape[1])
    np.testing.assert_allclose(op.matvec(x), op.matrix @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_operators_keep_dtype_and_adjoint(dtype):
    rng = np.random.default_rng(3)
    weight = random_array(rng, (4, 6, 3, 3), dtype)
    op = ConvTransposeOperator(weight, (4, 5, 6), stride=2, padding=1, output_padding=1,
                               groups=2)
    dense = op.matrix.toarray()
    x = random_array(rng, op.shape[1], dtype)
    y = random_array(rng, op.shape[0], dtype)
    X = random_array(rng, (op.shape[1], 3), dtype)
    Y = random_array(rng, (op.shape[0], 3), dtype)
    single = np.dtype(dtype) in (np.float32, np.complex64)
    tol = dict(rtol=1e-4, atol=1e-4) if single else dict(rtol=1e-12, atol=1e-12)
    for got, expected in (
        (op.matvec(x), dense @ x),
        (op.matmat(X), dense @ X),
        (op.rmatvec(y), dense.conj().T @ y),
        (op.rmatmat(Y), dense.conj().T @ Y),
        (op.H.matvec(y), dense.conj().T @ y),
        (op.T.matvec(y), dense.T @ y),
        (op.T.T.matmat(X), dense @ X),
    ):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, expected, **tol)
    # .T shares the block forms: one build serves both
    assert op.T._forward_slot is op._backward_slot and op.T._backward_slot is op._forward_slot


def test_with_weight_on_blocks_equals_a_fresh_operator():
    rng = np.random.default_rng(4)
    w1, w2 = rng.standard_normal((2, 6, 4, 3, 3))
    op = ConvOperator(w1, (4, 9, 8), padding=1, stride=(2, 1))
    y = rng.standard_normal(op.shape[0])
    op.rmatvec(y)  # build the backward form too, so that its pattern is shared
    new, fresh = op.with_weight(w2), ConvOperator(w2, (4, 9, 8), padding=1, stride=(2, 1))
    x = rng.standard_normal(op.shape[1])
    np.testing.assert_array_equal(new.matvec(x), fresh.matvec(x))
    np.testing.assert_array_equal(new.rmatvec(y), fresh.rmatvec(y))
    for slot in ("_forward_slot", "_backward_slot"):
        got, expected = getattr(new, slot).get().matrix, getattr(fresh, slot).get().matrix
        _assert_same_bsr(got, expected)
        assert np.shares_memory(got.indices, getattr(op, slot).get().matrix.indices)
    assert new._matrix_slot.built is None  # the canonical CSR still only on request
    np.testing.assert_array_equal(new.matrix.data, fresh.matrix.data)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("weight_shape, input_shape",
                         [((2, 2, 3), (2, 5)), ((1, 1, 3), (1, 5)), ((1, 1, 3), (1, 9))])
def test_empty_blocks_of_columns_and_batches(weight_shape, input_shape, padding_mode):
    # zero columns (and a batch of zero samples): empty results, as scipy's W @ X
    op = ConvOperator(np.ones(weight_shape), input_shape, padding=1, padding_mode=padding_mode)
    for product, n in ((op.matmat, op.shape[1]), (op.rmatmat, op.shape[0])):
        out = product(np.zeros((n, 0)))
        assert out.shape == ((op.shape[0] if n == op.shape[1] else op.shape[1]), 0)
    assert op.conv(np.zeros((0, *op.input_shape))).shape == (0, *op.output_shape)
    assert op.conv_transpose(np.zeros((0, *op.output_shape))).shape == (0, *op.input_shape)


def test_lazy_matrices_are_built_once_under_threads():
    from concurrent.futures import ThreadPoolExecutor

    from sparse_tconv._operator import _Lazy

    calls = []

    def factory():
        calls.append(1)
        import time

        time.sleep(0.01)  # a slow build: the other threads arrive meanwhile
        return object()

    lazy = _Lazy(factory)
    with ThreadPoolExecutor(8) as pool:
        values = list(pool.map(lambda _: lazy.get(), range(8)))
    assert len(calls) == 1 and all(v is values[0] for v in values)
