"""The gradient regulariser ``D`` of ``tikhonov(..., L='gradient')``, as constructions see it.

``D`` stacks the forward differences along each spatial axis of the Gram
side (the operator's input), per channel, without boundary rows:
``(D x)[i] = x[i+1] - x[i]`` for ``i = 0 .. n-2`` along a line of length
``n``.  ``D^H D`` is then the Neumann Laplacian, a sum over the axes of
``tridiag(-1, 2, -1)`` with ``1`` in both corners: diagonalised by the
orthonormal DCT-II with the eigenvalues ``sum_a 4 sin^2(pi f_a / (2 n_a))``.
Its circulant counterpart (periodic differences) has ``sum_a 4 sin^2(pi f_a /
n_a)`` in the DFT basis, and exceeds ``D^H D`` by one wrap-around term per
line (positive semi-definite).
"""

from __future__ import annotations

import numpy as np

__all__ = ["REGULARISERS", "gradient_diagonal", "laplacian_symbol", "scale"]

REGULARISERS = ("identity", "gradient")
"""What a construction may model besides ``W^H W``: ``damp^2 I`` or ``damp^2 D^H D``."""


def laplacian_symbol(size, frequencies, kind: str) -> np.ndarray:
    """The eigenvalues of ``D^H D`` (``'dct2'``) or of its periodic version (``'dft'``).

    Parameters
    ----------
    size : tuple of int
        The spatial size of the grid.
    frequencies : tuple of int
        How many frequencies each axis holds (``size``, 1 for an axis left
        untransformed, which must then have size 1, or the half spectrum of
        ``rfftn`` on the last axis for ``'dft'``).
    kind : {'dct2', 'dft'}
        The basis.

    Returns
    -------
    ndarray, shape frequencies
        ``sum_a 4 sin^2(pi f_a / (2 n_a))`` (DCT-II) or ``sum_a 4 sin^2(pi f_a / n_a)`` (DFT).
    """
    total = np.zeros(tuple(frequencies))
    for axis, (n, count) in enumerate(zip(size, frequencies)):
        f = np.arange(count, dtype=np.float64)
        denominator = 2 * n if kind == "dct2" else n
        values = 4.0 * np.sin(np.pi * f / denominator) ** 2
        total = total + values.reshape([count if b == axis else 1 for b in range(len(size))])
    return total


def gradient_diagonal(channels: int, size) -> np.ndarray:
    """``diag(D^H D)``, shaped (channels, *size): per axis 1 at the ends, 2 inside (0 if n = 1)."""
    diagonal = np.zeros((channels, *size))
    for axis, n in enumerate(size):
        if n < 2:
            continue
        line = np.full(n, 2.0)
        line[[0, -1]] = 1.0
        diagonal += line.reshape([n if b == axis else 1 for b in range(-1, len(size))])
    return diagonal


def scale(true_diagonal: np.ndarray, model_diagonal: np.ndarray, shift: float,
          floor: float) -> np.ndarray:
    """``sqrt((model + shift) / (true + shift))``, the true one floored at ``floor`` times its top.

    The border correction of the constructions, with the regulariser's
    diagonal already in both.
    """
    true, model = true_diagonal + shift, model_diagonal + shift
    for values in (true, model):
        top = float(values.max(initial=0.0))
        np.maximum(values, floor * top if top > 0 else 1.0, out=values)
    return np.sqrt(model / true)
