"""The Fourier structure of circular convolutions: W block-diagonalised by the DFT.

A circular-padding convolution whose stride divides the input size, after a
polyphase split of the input (``x_{c,r}[m] = x[c, m s + r]``), is a
multi-channel circular correlation on the output grid; the unitary DFT on
that grid turns it into one small block per spatial frequency.  The exact
singular values (:func:`~sparse_tconv.spectral.conv_singular_values`), the
certified norm bounds and the exact FFT solves all read these blocks.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from ._geometry import ConvGeometry

__all__ = ["check_circulant", "circular_blocks"]


def check_circulant(geom: ConvGeometry, what: str = "exact singular values",
                    instead: str = "use operator_norm() for the spectral norm") -> None:
    """Raise NotImplementedError unless W is a (subsampled) circulant.

    That is: no padding read in a mode other than ``'circular'``, and in
    every dimension a stride that divides the input size ``L`` and an output
    size of ``L / stride``.  ``instead`` says what the caller can do then.
    """
    padded = any(v > 0 for pair in geom.padding for v in pair)
    if padded and geom.padding_mode != "circular":
        raise NotImplementedError(
            f"{what} need circular padding, got padding_mode="
            f"{geom.padding_mode!r} with padding={geom.padding}: the operator is not "
            f"circulant; {instead}"
        )
    for axis, (L, O, s) in enumerate(zip(geom.input_size, geom.output_size, geom.stride)):
        if L % s or O * s != L:
            raise NotImplementedError(
                f"{what} need a (subsampled) circulant: in every spatial "
                f"dimension the stride must divide the input size and the output size must "
                f"be input size / stride; spatial dimension {axis} has input size {L}, "
                f"stride {s}, output size {O} (input_shape={geom.input_shape}, "
                f"padding={geom.padding}, kernel_size={geom.kernel_size}, "
                f"dilation={geom.dilation}); {instead}"
            )


def circular_blocks(geom: ConvGeometry, weight: np.ndarray) -> np.ndarray:
    """The DFT blocks of a circulant geometry (see :func:`check_circulant`).

    Returns
    -------
    ndarray, shape (groups, prod(M), C_out / groups, (C_in / groups) * prod(stride))
        complex128: for each group and each frequency ``f`` of the output
        grid ``M`` (C order, numpy's ``fftn`` sign: ``B(-f)`` in the notation
        of :func:`~sparse_tconv.spectral.conv_singular_values`), the block
        ``B[o, (c, r)]`` acting on the polyphase components ``r`` (C order
        over the stride's grid) of input channel ``c`` of the group.  With
        ``F`` the unitary DFT on the ``M`` grid and ``P`` the polyphase
        permutation, ``W = F^H blockdiag(B) F P`` up to the ordering of rows
        and columns, so W and the blocks have the same singular values.
    """
    n = geom.ndim
    g = geom.groups
    c_out, cpg = geom.out_channels, geom.in_channels // g
    opg = c_out // g
    S, M = geom.stride, geom.output_size
    # Polyphase kernel A[o, c, r_1..r_N, m_1..m_N]; taps that land together add up.
    phases, shifts = [], []
    for k, s, d, (lo, _), m in zip(geom.kernel_size, S, geom.dilation, geom.padding, M):
        offset = np.arange(k) * d - lo
        phases.append(offset % s)
        shifts.append((offset // s) % m)
    work = np.complex128 if np.iscomplexobj(weight) else np.float64
    A = np.zeros((c_out, cpg, *S, *M), dtype=work)
    # Phase and shift of every tap of the N-d kernel, on the kernel's grid.
    grids = np.meshgrid(*[np.arange(k) for k in geom.kernel_size], indexing="ij")
    index = (
        slice(None),
        slice(None),
        *(phases[a][grids[a]] for a in range(n)),
        *(shifts[a][grids[a]] for a in range(n)),
    )
    np.add.at(A, cast(Any, index), weight.astype(work))  # a tuple index (numpy's stubs lack it)
    blocks = np.fft.fftn(A, axes=tuple(range(2 + n, 2 + 2 * n)))
    n_freq, n_phase = math.prod(M), math.prod(S)
    return blocks.reshape(g, opg, cpg * n_phase, n_freq).transpose(0, 3, 1, 2)
