"""Oracles written straight from the definitions, sharing no code with the builder.

The padded input is described by ``np.pad`` applied to the input *indices*
(numpy's 'reflect', 'edge' and 'wrap' are PyTorch's reflect, replicate and
circular; zeros become -1, "no input element").  The matrices are dense and
filled by plain loops over output channels, positions, input channels and taps,
so they are only for small geometries.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import scipy.sparse as sp

NUMPY_PAD_MODE = {
    "zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap",
}


def padded_indices(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Input index of each padded coordinate; -1 where zero padding is read."""
    kwargs = {"constant_values": -1} if mode == "zeros" else {}
    return np.pad(np.arange(size), (before, after), mode=NUMPY_PAD_MODE[mode], **kwargs)


def _per_dim(value, ndim):
    return [value] * ndim if isinstance(value, int) else list(value)


def _pairs(padding, ndim):
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def reference_conv_matrix(
    weight, input_shape, stride, padding, dilation, groups, mode="zeros"
):
    """Dense W and its structural pattern, by the definition of convolution.

    ``y[o, p] = sum_c sum_t w[o, c, t] * xpad[g * cpg + c, p * stride + t * dilation]``.
    ``padding`` is an int or a per-dim list of ints or (before, after) pairs.
    """
    weight = np.asarray(weight)
    c_out, cpg, *kernel = weight.shape
    c_in, *size = input_shape
    ndim = len(kernel)
    stride, dilation = _per_dim(stride, ndim), _per_dim(dilation, ndim)
    pads = _pairs(padding, ndim)
    index = [padded_indices(size[d], *pads[d], mode) for d in range(ndim)]
    out = [
        (len(index[d]) - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(ndim)
    ]
    opg = c_out // groups
    dense = np.zeros((c_out * int(np.prod(out)), c_in * int(np.prod(size))), dtype=weight.dtype)
    pattern = np.zeros(dense.shape, dtype=bool)
    for o in range(c_out):
        g = o // opg
        for p in itertools.product(*(range(n) for n in out)):
            row = np.ravel_multi_index((o, *p), (c_out, *out))
            for c in range(cpg):
                for t in itertools.product(*(range(k) for k in kernel)):
                    i = [index[d][p[d] * stride[d] + t[d] * dilation[d]] for d in range(ndim)]
                    if min(i) < 0:
                        continue
                    col = np.ravel_multi_index((g * cpg + c, *i), (c_in, *size))
                    dense[row, col] += weight[(o, c, *t)]
                    pattern[row, col] = True
    return dense, pattern, (c_out, *out)


def reference_conv_transpose_matrix(
    weight, input_shape, stride, padding, output_padding, dilation, groups, mode="zeros"
):
    """Dense matrix of a transposed convolution, by its definition (scatter).

    Each input element ``y[ci, p]`` adds ``w[ci, co, t] * y[ci, p]`` to the
    padded output at ``p * stride + t * dilation``; the padding is then cropped
    (zeros) or folded back onto the output elements it mirrors (other modes).
    """
    weight = np.asarray(weight)
    c_in, opg, *kernel = weight.shape
    _, *size_in = input_shape
    ndim = len(kernel)
    stride, dilation = _per_dim(stride, ndim), _per_dim(dilation, ndim)
    output_padding = _per_dim(output_padding, ndim)
    pads = _pairs(padding, ndim)
    size_out = [
        (size_in[d] - 1) * stride[d] - sum(pads[d]) + dilation[d] * (kernel[d] - 1)
        + output_padding[d] + 1
        for d in range(ndim)
    ]
    index = [padded_indices(size_out[d], *pads[d], mode) for d in range(ndim)]
    c_out = opg * groups
    ipg = c_in // groups
    dense = np.zeros((c_out * int(np.prod(size_out)), c_in * int(np.prod(size_in))),
                     dtype=weight.dtype)
    for ci in range(c_in):
        g = ci // ipg
        for p in itertools.product(*(range(n) for n in size_in)):
            col = np.ravel_multi_index((ci, *p), (c_in, *size_in))
            for co in range(opg):
                for t in itertools.product(*(range(k) for k in kernel)):
                    i = [index[d][p[d] * stride[d] + t[d] * dilation[d]] for d in range(ndim)]
                    if min(i) < 0:
                        continue
                    row = np.ravel_multi_index((g * opg + co, *i), (c_out, *size_out))
                    dense[row, col] += weight[(ci, co, *t)]
    return dense, (c_out, *size_out)


def torch_conv(x, weight, stride, padding, dilation, groups, mode="zeros"):
    """``torch.nn.functional.conv{N}d`` on one sample, padding applied as ``nn.ConvNd`` does."""
    import torch
    import torch.nn.functional as F

    ndim = weight.ndim - 2
    conv = getattr(F, f"conv{ndim}d")
    xt = torch.from_numpy(np.ascontiguousarray(x)[None])
    wt = torch.from_numpy(np.ascontiguousarray(weight))
    if isinstance(padding, str):
        if mode == "zeros":
            return conv(xt, wt, None, stride, padding, dilation, groups)[0].numpy()
        kernel = weight.shape[2:]
        dil = _per_dim(dilation, ndim)
        totals = [d * (k - 1) for k, d in zip(kernel, dil)] if padding == "same" else [0] * ndim
        padding = [(t // 2, t - t // 2) for t in totals]
    pads = _pairs(padding, ndim)
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad lists the last dim first
    xt = F.pad(xt, flat, mode="constant" if mode == "zeros" else mode)
    return conv(xt, wt, None, stride, 0, dilation, groups)[0].numpy()


def torch_conv_transpose(y, weight, stride, padding, output_padding, dilation, groups):
    """``torch.nn.functional.conv_transpose{N}d`` on one sample."""
    import torch
    import torch.nn.functional as F

    ndim = weight.ndim - 2
    conv_t = getattr(F, f"conv_transpose{ndim}d")
    yt = torch.from_numpy(np.ascontiguousarray(y)[None])
    wt = torch.from_numpy(np.ascontiguousarray(weight))
    return conv_t(yt, wt, None, stride, padding, output_padding, groups, dilation)[0].numpy()


def random_array(rng, shape, dtype):
    """Standard normal values in ``dtype`` (complex: independent parts)."""
    dtype = np.dtype(dtype)
    values = rng.standard_normal(shape)
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def tolerance(dtype) -> float:
    """Relative tolerance of a sum of a few hundred products in ``dtype``."""
    return 2e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-10


def seed_of(*parts) -> int:
    """A reproducible seed from a test's parameters (``hash`` of str is salted per run)."""
    return zlib.crc32(repr(parts).encode())


def to_position_major(v: np.ndarray, channels: int) -> np.ndarray:
    """Reorder the first axis of ``v`` from (channel, position) to (position, channel)."""
    return v.reshape((channels, -1) + v.shape[1:]).swapaxes(0, 1).reshape(v.shape)


def position_major(matrix, channels: int) -> sp.csr_array:
    """``matrix`` with columns renumbered (channel, position) -> (position, channel).

    Built with scipy only (relabel, then sort each row), as an oracle for the
    operators' transposed products, which run on such a matrix.
    """
    matrix = sp.csr_array(matrix)
    positions = matrix.shape[1] // channels
    old = matrix.indices.astype(np.int64)
    new = (old % positions) * channels + old // positions
    out = sp.csr_array((matrix.data.copy(), new, matrix.indptr.copy()), shape=matrix.shape)
    out.has_sorted_indices = False
    out.sort_indices()
    return out


def transposed_product(W, y: np.ndarray, channels: int) -> np.ndarray:
    """``W.T @ y`` summed in the operators' order: serial scipy on the position-major W.T."""
    return position_major(W.T.tocsr(), channels) @ to_position_major(y, channels)


def from_position_major(v: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`to_position_major`."""
    return v.reshape((-1, channels) + v.shape[1:]).swapaxes(0, 1).reshape(v.shape)
