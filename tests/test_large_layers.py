"""What lets layers past any CSR matrix's size run: the pieces that change with size.

A 64->64 3x3 layer on a 512x512 image has 9.7e9 entries (154 GB as CSR).
Its operator stores the weight (the structured form); its norm bound forms
the circulant's blocks a chunk of frequencies at a time; the border
certificate and tikhonov's preconditioner step aside instead of building
what no machine holds.  Each path is forced here on small layers, where an
independent oracle (FFT blocks, a dense SVD) checks it.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparse_tconv import ConvOperator, ConvTransposeOperator, _bounds, solvers, spectral
from sparse_tconv._fourier import circular_blocks


@pytest.mark.parametrize("complex_weight", [False, True])
@pytest.mark.parametrize("weight_shape, input_shape, kwargs", [
    ((6, 4, 3, 3), (4, 9, 8), dict(padding=1)),
    ((6, 2, 3, 2), (4, 9, 8), dict(padding=(1, 2), stride=(2, 1), groups=2, dilation=(1, 2))),
    ((3, 2, 3), (2, 10), dict(stride=3, padding=2)),
    ((2, 2, 2, 2, 2), (2, 5, 4, 6), dict(padding=1, stride=(1, 2, 1))),
])
def test_blocks_by_chunks_equal_the_fft_blocks(monkeypatch, weight_shape, input_shape, kwargs,
                                               complex_weight):
    """The chunked direct DFT finds the FFT path's largest block norm, at a block that is
    the FFT's block of its group and frequency (ties may pick another maximiser)."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal(weight_shape)
    if complex_weight:
        weight = weight + 1j * rng.standard_normal(weight_shape)
    geom = ConvOperator(weight, input_shape, **kwargs).convolution.geometry
    circulant = _bounds._circulant(geom, _bounds._circulant_grids(geom, 1)[0])
    monkeypatch.setattr(_bounds, "_DIRECT_DFT_TAPS", 0)  # the FFT for any kernel
    by_fft = _bounds._blocks_bound(geom, weight, circulant, 1.0)
    monkeypatch.setattr(_bounds, "_BLOCKS_BYTES", 0)
    monkeypatch.setattr(_bounds, "_BLOCKS_CHUNK_BYTES", 4096)  # several chunks
    by_chunks = _bounds._blocks_bound(geom, weight, circulant, 1.0)
    np.testing.assert_allclose(by_chunks[0], by_fft[0], rtol=1e-12)
    group, freq = by_chunks[2:4]
    fft_block = circular_blocks(circulant, weight)[group, freq]
    np.testing.assert_allclose(by_chunks[1], fft_block, atol=1e-12 * np.abs(weight).sum())
    np.testing.assert_allclose(np.linalg.norm(fft_block, 2), by_chunks[0], rtol=1e-12)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_norm_bounds_by_chunks_contain_the_norm(monkeypatch, mode):
    """With every large-size path forced (chunked blocks, no border certificate), the
    interval still contains the dense SVD's norm."""
    monkeypatch.setattr(_bounds, "_BLOCKS_BYTES", 0)
    monkeypatch.setattr(_bounds, "_BLOCKS_CHUNK_BYTES", 4096)
    monkeypatch.setattr(_bounds, "_BORDER_OPERATIONS", 0)
    rng = np.random.default_rng(5)
    op = ConvOperator(rng.standard_normal((5, 4, 3, 3)), (4, 8, 9), padding=1, padding_mode=mode)
    exact = np.linalg.norm(op.matrix.toarray(), 2)
    bounds = spectral.norm_bounds(op, rtol=0.05)
    assert bounds.lower <= exact <= bounds.upper


def test_tikhonov_runs_plain_cg_where_the_blocks_would_not_fit(monkeypatch):
    rng = np.random.default_rng(6)
    # a 4-channel blur with cross-talk (even along both axes: 'auto' preconditions it)
    mix = 0.6 * np.eye(4) + 0.1 * rng.random((4, 4))
    op = ConvOperator(np.einsum("oc,kl->ockl", mix, np.outer([1, 2, 1], [1, 2, 1]) / 16),
                      (4, 10, 10), padding=1)
    y = rng.standard_normal(op.shape[0])
    _, info = solvers.tikhonov(op, y, 0.5)
    assert info.preconditioner != "none"  # the default: a preconditioner (or its race lost)
    monkeypatch.setattr(solvers, "_PRECONDITIONER_BYTES", 4 * 4 * 100 * 16 - 1)
    x, info = solvers.tikhonov(op, y, 0.5)
    assert info.preconditioner == "none"
    W = op.matrix.toarray()
    expected = np.linalg.solve(W.T @ W + 0.25 * np.eye(W.shape[1]), W.T @ y)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_a_layer_past_any_csr_is_an_operator_of_its_weight():
    """64->64 3x3 at 512x512: 9.7e9 entries; the operator is built, small, and refuses
    nothing (no product is run: that is the benchmark's job)."""
    weight = np.zeros((64, 64, 3, 3))
    for cls in (ConvOperator, ConvTransposeOperator):
        op = cls(weight, (64, 512, 512), padding=1, max_bytes=1 << 20)
        assert op.product_form.name == "structured"
        # the weight, for W.T its flipped copy, and the panel blocks of its products
        assert op.nbytes <= 3 * weight.nbytes


@pytest.mark.parametrize("method", ["svds", "power"])
def test_operator_norm_runs_on_the_products_without_the_csr(method):
    """svds and power iteration need products only: the CSR is not built for them."""
    rng = np.random.default_rng(7)
    op = ConvOperator(rng.standard_normal((6, 4, 3, 3)), (4, 12, 11), padding=1)
    value = spectral.operator_norm(op, method=method)
    assert op._matrix_slot.built is None and op._tmatrix_slot.built is None
    exact = np.linalg.norm(op.matrix.toarray(), 2)
    assert abs(value - exact) <= 1e-6 * exact
