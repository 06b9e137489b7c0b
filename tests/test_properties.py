"""Property-based tests over random geometries (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sparse_tconv import ConvOperator, conv_matrix, conv_matrix_nnz, conv_transpose_matrix

from reference import random_array, reference_conv_matrix, transposed_product
from strategies import MODES, _kwargs, geometries


@given(geometries(), st.sampled_from([np.float64, np.complex128]), st.integers(0, 2**32 - 1))
def test_matches_reference(g, dtype, seed):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], dtype)
    W = conv_matrix(weight, g["input_shape"], **_kwargs(g))
    dense, pattern, _ = reference_conv_matrix(
        weight, g["input_shape"], g["stride"], g["padding"], g["dilation"], g["groups"],
        g["padding_mode"],
    )
    np.testing.assert_allclose(W.toarray(), dense, rtol=1e-12, atol=1e-12)
    assert W.nnz == pattern.sum() == conv_matrix_nnz(g["weight_shape"], g["input_shape"],
                                                     **_kwargs(g)).nnz
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    assert np.all(pattern[rows, W.indices])  # every stored entry is structural
    same_row = rows[1:] == rows[:-1]
    assert np.all(np.diff(W.indices)[same_row] > 0)  # canonical


@given(geometries(), st.integers(0, 2**32 - 1))
def test_transpose_matrix_is_exact_transpose(g, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(g["weight_shape"])
    W = conv_matrix(weight, g["input_shape"], **_kwargs(g))
    op = ConvOperator(weight, g["input_shape"], **_kwargs(g))
    out_shape = op.output_shape
    output_padding = tuple(
        n - ((o - 1) * s - lo - hi + d * (k - 1) + 1)
        for n, o, s, (lo, hi), d, k in zip(g["input_shape"][1:], out_shape[1:], g["stride"],
                                            g["padding"], g["dilation"], g["weight_shape"][2:])
    )
    M = conv_transpose_matrix(weight, out_shape, output_padding=output_padding, **_kwargs(g))
    WT = W.T.tocsr()
    assert M.shape == WT.shape
    np.testing.assert_array_equal(M.indptr, WT.indptr)
    np.testing.assert_array_equal(M.indices, WT.indices)
    np.testing.assert_array_equal(M.data, WT.data)
    # and the operator's transposed product is W.T's: on the CSR and diagonal forms
    # summed in the order of its position-major W.T, bit for bit (scipy's own W.T @ y
    # when there is one channel); the structured form's GEMMs sum in their own order,
    # and the padded diagonals multiply each padded copy of a tap (the CSR sums the
    # copies that land on one element first)
    v = rng.standard_normal(W.shape[0])
    channels = op.output_shape[0]
    if op.product_form.name in ("csr", "diagonals"):
        np.testing.assert_array_equal(op.rmatvec(v), transposed_product(W, v, channels))
        if channels == 1:
            np.testing.assert_array_equal(op.rmatvec(v), W.T @ v)
    np.testing.assert_allclose(op.rmatvec(v), W.T @ v, rtol=1e-12, atol=1e-12)


@given(geometries(), st.integers(0, 2**32 - 1))
def test_adjoint_dot_product(g, seed):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], np.complex128)
    op = ConvOperator(weight, g["input_shape"], **_kwargs(g))
    u = random_array(rng, op.shape[1], np.complex128)
    v = random_array(rng, op.shape[0], np.complex128)
    lhs, rhs = np.vdot(v, op.matvec(u)), np.vdot(op.rmatvec(v), u)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


@given(
    st.integers(1, 40),  # L
    st.integers(1, 9),  # k
    st.integers(1, 5),  # stride
    st.integers(1, 6),  # dilation
    st.integers(0, 60),  # lo
    st.integers(0, 60),  # hi
    st.sampled_from(MODES),
)
def test_entry_count_of_one_dimension_matches_the_definition(L, k, s, d, lo, hi, mode):
    # The count the size functions use (no maps built) against every row's
    # taps read off np.pad of the indices, wide paddings included.
    from sparse_tconv._indexmap import dim_nnz

    from reference import padded_indices

    if mode == "reflect":
        lo, hi = min(lo, L - 1), min(hi, L - 1)
    elif mode == "circular":
        lo, hi = min(lo, L), min(hi, L)
    if L + lo + hi < d * (k - 1) + 1:
        return
    index = padded_indices(L, lo, hi, mode)
    O = (len(index) - d * (k - 1) - 1) // s + 1
    expected = sum(len({int(index[p * s + t * d]) for t in range(k)} - {-1}) for p in range(O))
    assert dim_nnz(L, O, k, s, d, lo, hi, mode) == expected
