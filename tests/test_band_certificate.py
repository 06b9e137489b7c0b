"""The band certificate of norm_bounds: ``t I - W^H W`` by a banded Cholesky factorisation.

Oracles: the dense Gram matrix of the explicit matrix (the band's entries), and
LAPACK's dense SVD of it (the norm the certificate must stay above, and the
shifts below which it must refuse).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparse_tconv._bounds as bounds_module
from sparse_tconv import ConvOperator
from sparse_tconv._certificates import band
from sparse_tconv.spectral import norm_bounds

from reference import random_array, seed_of
from strategies import _kwargs, geometries


def _dense_from_band(ab: np.ndarray) -> np.ndarray:
    """The Hermitian matrix whose lower band LAPACK's storage ``ab`` holds."""
    kd1, n = ab.shape
    dense = np.zeros((n, n), dtype=ab.dtype)
    for r in range(kd1):
        j = np.arange(n - r)
        dense[j + r, j] = ab[r, :n - r]
    return np.tril(dense) + np.tril(dense, -1).conj().T


def _position_major_gram(op, group: int) -> np.ndarray:
    """``W_g^H W_g`` of one group's input columns, reordered positions outer, channels inner."""
    geom = op.convolution.geometry
    W = op.matrix.toarray().astype(np.complex128)
    cpg = geom.in_channels // geom.groups
    n_pos = math.prod(geom.input_size)
    columns = (np.arange(group * cpg, (group + 1) * cpg)[None, :] * n_pos
               + np.arange(n_pos)[:, None]).ravel()  # position-major order of the group
    Wg = W[:, columns]
    return Wg.conj().T @ Wg


def _zero_padded_layer(g, complex_weight: bool, seed: int) -> ConvOperator:
    """The drawn geometry with zero padding, and a random real or complex weight."""
    g = {**g, "padding_mode": "zeros"}
    dtype = np.complex128 if complex_weight else np.float64
    weight = random_array(np.random.default_rng(seed), g["weight_shape"], dtype)
    return ConvOperator(weight, g["input_shape"], **_kwargs(g))


@settings(max_examples=40, deadline=None)
@given(geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_the_band_holds_the_gram_matrix(g, complex_weight, seed):
    # every entry of the band is that of t I - W^H W, for each group, any N-d geometry
    op = _zero_padded_layer(g, complex_weight, seed)
    geom = op.convolution.geometry
    groups, taps = geom.groups, math.prod(geom.kernel_size)
    opg, cpg = geom.out_channels // groups, geom.in_channels // groups
    weight = op.convolution.weight.reshape(groups, opg, cpg, taps)
    shift = 1.5
    for group in range(groups):
        ab, kd = band._gram_band(geom, np.moveaxis(weight[group], 2, 0), shift)
        expected = shift * np.eye(cpg * math.prod(geom.input_size)) - _position_major_gram(
            op, group)
        assert ab.shape == (kd + 1, expected.shape[0])
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(_dense_from_band(ab), expected, rtol=0, atol=1e-12 * scale)


@settings(max_examples=25, deadline=None)
@given(geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_the_band_certifies_above_the_norm_and_refuses_below(g, complex_weight, seed):
    op = _zero_padded_layer(g, complex_weight, seed)
    norm = float(np.linalg.norm(op.matrix.toarray().astype(np.complex128), 2))
    assume(norm > 0)  # (the certificate runs above a positive lower bound only)
    structure = bounds_module.structure_of(op)
    above = band.band_upper(structure, (norm * 1.01) ** 2)
    assert above is not None and norm <= above <= norm * 1.0101
    assert band.band_upper(structure, (norm * 0.99) ** 2) is None


@pytest.fixture
def band_sized(monkeypatch):
    """Small layers past the inertia certificate and the dense SVD: the band runs."""
    monkeypatch.setattr(bounds_module, "_INERTIA_GRAM_NNZ", 0)
    monkeypatch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)


@pytest.mark.parametrize("weight_shape, input_shape, kwargs", [
    ((16, 12, 3, 3), (12, 5, 5), dict(padding=1)),  # many channels on a small grid
    ((8, 6, 3, 3), (6, 9, 8), dict(padding=1, stride=2)),
    ((8, 3, 3), (6, 10), dict(padding=2, dilation=2, groups=2)),
])
def test_norm_bounds_closes_small_grids_with_the_band(band_sized, weight_shape, input_shape,
                                                      kwargs):
    rng = np.random.default_rng(seed_of("band", str(weight_shape), str(kwargs)))
    op = ConvOperator(rng.standard_normal(weight_shape), input_shape, **kwargs)
    assert band.band_applies(_open_run(op))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: closed to rtol
        bounds = norm_bounds(op, rtol=2e-3)
    norm = float(np.linalg.norm(op.matrix.toarray(), 2))
    assert bounds.lower <= norm * (1 + 1e-12) and norm <= bounds.upper
    assert bounds.gap <= 2e-3
    assert norm_bounds(op.T, rtol=2e-3).upper >= norm  # the transpose: the same certificate


def _open_run(op):
    from sparse_tconv._certificates import Interval

    return Interval(bounds_module.structure_of(op), 1e-3, 200, lower=1e-9, upper=1e9)


def test_the_band_stays_out_of_other_padding_modes_and_large_bands(band_sized, monkeypatch):
    rng = np.random.default_rng(seed_of("band-applies"))
    weight = rng.standard_normal((8, 6, 3, 3))
    for mode in ("reflect", "replicate"):
        op = ConvOperator(weight, (6, 7, 7), padding=1, padding_mode=mode)
        assert not band.band_applies(_open_run(op))
    op = ConvOperator(weight, (6, 7, 7), padding=1)
    assert band.band_applies(_open_run(op))
    operations, _ = band.band_cost(op.convolution.geometry)
    monkeypatch.setattr(band, "_BAND_OPERATIONS", operations * 0.99)
    assert not band.band_applies(_open_run(op))


def test_reused_memory_gives_the_same_bounds_and_is_let_go(band_sized):
    rng = np.random.default_rng(seed_of("band-reuse"))
    ops = [ConvOperator(rng.standard_normal((8, 6, 3, 3)), (6, L, L), padding=1)
           for L in (6, 5, 6)]
    fresh = [norm_bounds(op, rtol=2e-3) for op in ops]
    with band.reuse_band_memory():
        reused = [norm_bounds(op, rtol=2e-3) for op in ops]
        assert band._kept.buffer is not None
    assert reused == fresh
    assert band._kept.buffer is None


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_the_border_certificate_holds_past_the_inertia_certificate(monkeypatch, mode):
    monkeypatch.setattr(bounds_module, "_INERTIA_GRAM_NNZ", 0)
    monkeypatch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)
    rng = np.random.default_rng(seed_of("border-band", mode))
    op = ConvOperator(rng.standard_normal((6, 6, 3, 3)) / 5, (6, 14, 13), padding=1,
                      padding_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bounds = norm_bounds(op, rtol=1e-2)
    norm = float(np.linalg.norm(op.matrix.toarray(), 2))
    assert bounds.lower <= norm * (1 + 1e-12) and norm <= bounds.upper
    assert bounds.gap <= 0.01  # the certificate held, within rtol
