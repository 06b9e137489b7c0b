"""The oracles themselves, checked against numpy/scipy on cases they cover."""

import numpy as np
import pytest
from scipy import signal

from reference import padded_indices, reference_conv_matrix, reference_conv_transpose_matrix


@pytest.mark.parametrize("mode, expected", [
    ("zeros", [-1, -1, 0, 1, 2, 3, -1]),
    ("reflect", [2, 1, 0, 1, 2, 3, 2]),
    ("replicate", [0, 0, 0, 1, 2, 3, 3]),
    ("circular", [2, 3, 0, 1, 2, 3, 0]),
])
def test_padded_indices_follow_pytorch_modes(mode, expected):
    # PyTorch documents reflect as mirroring without the edge, replicate as
    # repeating the edge, circular as wrapping around.
    assert padded_indices(4, 2, 1, mode).tolist() == expected


def test_reference_conv_is_cross_correlation():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 9)), rng.standard_normal((3, 4))
    dense, _, shape = reference_conv_matrix(w[None, None], (1, 7, 9), 1, 0, 1, 1)
    expected = signal.correlate(x, w, mode="valid")
    np.testing.assert_allclose((dense @ x.ravel()).reshape(shape[1:]), expected, rtol=1e-12)


def test_reference_transposed_conv_is_full_convolution():
    # A stride-1 transposed convolution without padding is the full convolution.
    rng = np.random.default_rng(1)
    y, w = rng.standard_normal((4, 5)), rng.standard_normal((3, 2))
    dense, shape = reference_conv_transpose_matrix(w[None, None], (1, 4, 5), 1, 0, 0, 1, 1)
    expected = signal.convolve(y, w, mode="full")
    np.testing.assert_allclose((dense @ y.ravel()).reshape(shape[1:]), expected, rtol=1e-12)
