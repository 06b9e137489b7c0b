"""from_torch / to_torch / from_torch_sparse: PyTorch layers in, sparse tensors out and back."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import aslinearoperator

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    from_torch,
    from_torch_sparse,
    to_torch,
)

from reference import tolerance

torch = pytest.importorskip("torch")
nn = torch.nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}

# (layer class, in_channels, out_channels, kernel_size, spatial input size, layer kwargs)
CONV_CASES = [
    (nn.Conv1d, 3, 4, 3, (11,), dict(padding="same")),
    (nn.Conv1d, 2, 4, 4, (9,), dict(padding="same")),  # even kernel: (1, 2)
    (nn.Conv1d, 2, 4, 4, (9,), dict(padding="same", dilation=3, padding_mode="reflect")),
    (nn.Conv1d, 4, 6, 3, (13,), dict(stride=2, padding=2, dilation=2, groups=2,
                                     padding_mode="circular")),
    (nn.Conv1d, 3, 3, 5, (8,), dict(padding="valid", padding_mode="replicate")),
    (nn.Conv2d, 3, 4, (2, 4), (7, 8), dict(padding="same")),  # (0, 1) and (1, 2)
    (nn.Conv2d, 2, 3, (2, 4), (6, 7), dict(padding="same", padding_mode="replicate")),
    (nn.Conv2d, 2, 3, (3, 2), (6, 7), dict(padding="same", dilation=(1, 2),
                                           padding_mode="circular")),
    (nn.Conv2d, 4, 6, 3, (9, 10), dict(stride=(2, 1), padding=(1, 2), groups=2,
                                       padding_mode="reflect")),
    (nn.Conv2d, 4, 4, 3, (8, 7), dict(stride=2, padding=1, groups=4, padding_mode="circular")),
    (nn.Conv2d, 2, 3, 3, (9, 8), dict(padding="valid", dilation=2)),
    (nn.Conv2d, 2, 3, 1, (5, 6), dict(stride=2)),
    (nn.Conv3d, 2, 4, 3, (4, 5, 4), dict(padding="same")),
    (nn.Conv3d, 2, 2, (2, 3, 2), (4, 4, 5), dict(padding="same", padding_mode="circular")),
    (nn.Conv3d, 4, 4, 3, (5, 4, 5), dict(stride=2, padding=(1, 0, 1), groups=2,
                                         padding_mode="replicate")),
    (nn.Conv3d, 1, 2, (1, 2, 3), (3, 5, 4), dict(padding=1, dilation=(1, 2, 1),
                                                 padding_mode="reflect")),
]

# (layer class, in_channels, out_channels, kernel_size, spatial input size, layer kwargs,
#  output_size passed to forward (spatial sizes, or None))
TRANSPOSE_CASES = [
    (nn.ConvTranspose1d, 3, 2, 3, (6,), dict(stride=2, padding=1, output_padding=1), None),
    (nn.ConvTranspose1d, 4, 4, 4, (5,), dict(stride=3, padding=2, dilation=2, groups=2), (17,)),
    (nn.ConvTranspose1d, 2, 3, 3, (5,), dict(dilation=3, output_padding=2), None),  # op >= s
    (nn.ConvTranspose2d, 4, 2, 3, (5, 4), dict(stride=2, padding=1), (10, 7)),
    (nn.ConvTranspose2d, 4, 6, (2, 3), (3, 4), dict(stride=(2, 3), padding=(0, 1),
                                                    output_padding=(1, 2), dilation=(1, 2),
                                                    groups=2), None),
    (nn.ConvTranspose2d, 3, 3, 3, (4, 5), dict(groups=3), None),
    (nn.ConvTranspose3d, 2, 2, 3, (3, 2, 3), dict(stride=2, padding=1,
                                                  output_padding=(1, 0, 1)), None),
    (nn.ConvTranspose3d, 2, 4, (2, 3, 2), (2, 3, 2), dict(stride=(1, 2, 2), groups=2),
     (3, 8, 4)),
]


# Bias on and off, batch axis in input_shape or not.
BIAS_BATCH = [(True, True), (True, False), (False, True)]


def _case_id(case):
    cls, cin, cout, k, size, kwargs, *rest = case
    extra = f"-out{rest[0]}" if rest and rest[0] is not None else ""
    return f"{cls.__name__}-{cin}-{cout}-k{k}-{size}-{kwargs}{extra}"


def _check(ours, expected, dtype):
    ours, expected = np.asarray(ours), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(ours, expected, rtol=tolerance(dtype),
                               atol=tolerance(dtype) * scale)


def _check_layer(layer, x, batched, dtype, output_size=None):
    """from_torch(layer) and to_torch(op) reproduce layer(x) (x: a batch of samples)."""
    kwargs = {} if output_size is None else {"output_size": output_size}
    if batched:
        shape, expected = tuple(x.shape), layer(x, **kwargs)
    else:  # torch's unbatched input: one sample
        x = x[:1]
        shape, expected = tuple(x.shape[1:]), layer(x[0], **kwargs)[None]
    expected = expected.detach().numpy()
    op, b = from_torch(layer, shape, **kwargs)
    n = len(shape) - (2 if batched else 1)

    assert op.dtype == np.dtype(dtype)
    assert op.input_shape == tuple(x.shape[1:])
    assert op.output_shape == expected.shape[1:]
    assert op.stride == tuple(layer.stride) and op.dilation == tuple(layer.dilation)
    assert op.groups == layer.groups and op.padding_mode == layer.padding_mode
    assert len(op.padding) == n
    np.testing.assert_array_equal(op.weight, layer.weight.detach().numpy())
    if layer.bias is None:
        assert b is None
        b = np.zeros(op.shape[0], dtype=op.dtype)
    else:
        assert b.shape == (op.shape[0],) and b.dtype == op.dtype
        np.testing.assert_array_equal(b.reshape(op.output_shape[0], -1)[:, -1],
                                      layer.bias.detach().numpy())

    batch = x.shape[0]
    flat = x.numpy().reshape(batch, -1)
    _check((op @ flat.T).T + b, expected.reshape(batch, -1), dtype)
    _check(op @ flat[0] + b, expected[0].ravel(), dtype)
    # The torch sparse tensor applies the same matrix.
    t = to_torch(op)
    assert t.dtype == TORCH_DTYPE[dtype] and tuple(t.shape) == op.shape
    _check((t @ x.reshape(batch, -1).T).T + torch.from_numpy(b), expected.reshape(batch, -1),
           dtype)
    return op


@pytest.mark.parametrize("bias, batched", BIAS_BATCH, ids=["bias-batch", "bias-sample",
                                                            "nobias-batch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_layer_matches_torch(case, dtype, bias, batched):
    cls, cin, cout, k, size, kwargs = case
    torch.manual_seed(zlib.crc32(_case_id(case).encode()))
    layer = cls(cin, cout, k, bias=bias, dtype=TORCH_DTYPE[dtype], **kwargs)
    x = torch.randn(2, cin, *size, dtype=TORCH_DTYPE[dtype])
    op = _check_layer(layer, x, batched, dtype)
    assert isinstance(op, ConvOperator)


@pytest.mark.parametrize("bias, batched", BIAS_BATCH, ids=["bias-batch", "bias-sample",
                                                            "nobias-batch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_case_id)
def test_conv_transpose_layer_matches_torch(case, dtype, bias, batched):
    cls, cin, cout, k, size, kwargs, output_size = case
    torch.manual_seed(zlib.crc32(_case_id(case).encode()))
    layer = cls(cin, cout, k, bias=bias, dtype=TORCH_DTYPE[dtype], **kwargs)
    x = torch.randn(2, cin, *size, dtype=TORCH_DTYPE[dtype])
    op = _check_layer(layer, x, batched, dtype, output_size)
    assert isinstance(op, ConvTransposeOperator)
    if output_size is None:
        assert op.output_padding == tuple(layer.output_padding)
    else:
        assert op.output_shape[1:] == output_size


def test_same_padding_is_asymmetric_like_torch():
    # Even total padding dilation * (k - 1) splits evenly, odd puts the extra one after.
    layer = nn.Conv2d(1, 1, (2, 4), padding="same", dilation=(3, 1), bias=False)
    op, _ = from_torch(layer, (1, 6, 6))
    assert op.padding == ((1, 2), (1, 2))
    # With another padding mode the layer pads with F.pad(_reversed_padding_repeated_twice).
    layer = nn.Conv1d(1, 1, 4, padding="same", padding_mode="reflect", bias=False)
    op, _ = from_torch(layer, (1, 6))
    assert layer._reversed_padding_repeated_twice == [1, 2]
    assert op.padding == ((1, 2),)
    layer = nn.Conv3d(1, 1, (1, 2, 3), padding="valid", padding_mode="circular")
    op, _ = from_torch(layer, (1, 3, 4, 5))
    assert op.padding == ((0, 0),) * 3 and op.output_shape == (1, 3, 3, 3)


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "sample"])
def test_output_size_follows_torch(batched):
    # Every requested size from one below the smallest to one above the largest:
    # torch's forward and from_torch accept and reject the same ones, and agree.
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(2, 3, (3, 2), stride=(3, 2), padding=(1, 0), dilation=(2, 1),
                               dtype=torch.float64)
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    if not batched:
        x = x[0]
    smallest = ((4 - 1) * 3 - 2 + 2 * 2 + 1, (3 - 1) * 2 + 1 + 1)  # (12, 6)
    for h in range(smallest[0] - 1, smallest[0] + 4):
        for w in range(smallest[1] - 1, smallest[1] + 3):
            try:
                expected = layer(x, output_size=(h, w))
            except ValueError:
                with pytest.raises(ValueError, match="unreachable"):
                    from_torch(layer, tuple(x.shape), output_size=(h, w))
                continue
            op, b = from_torch(layer, tuple(x.shape), output_size=(h, w))
            assert op.output_shape == (3, h, w)
            assert op.output_padding == (h - smallest[0], w - smallest[1])
            _check(op @ x.numpy().ravel() + b, expected.detach().numpy().ravel(), np.float64)
    # The whole output shape is accepted too; as in torch, only its spatial sizes count
    # (a U-Net passes the skip connection's shape, whose channel count may differ).
    full = (7, 13, 7) if not batched else (5, 7, 13, 7)
    op, _ = from_torch(layer, tuple(x.shape), output_size=full)
    assert op.output_shape == (3, 13, 7)
    assert tuple(layer(x, output_size=full).shape[-2:]) == (13, 7)


def test_output_size_errors():
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)  # sizes 7 or 8 from 4
    with pytest.raises(ValueError, match=r"output_size=\(9, 8\) is unreachable.*"
                                         r"between \(7, 7\) and \(8, 8\)"):
        from_torch(layer, (2, 4, 4), output_size=(9, 8))
    with pytest.raises(ValueError, match=r"unreachable"):
        from_torch(layer, (1, 2, 4, 4), output_size=(6, 7))
    with pytest.raises(ValueError, match=r"output_size must have 2 entries .* or 4 .*batched"):
        from_torch(layer, (1, 2, 4, 4), output_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"or 3 .*unbatched"):
        from_torch(layer, (2, 4, 4), output_size=(1, 3, 8, 8))
    with pytest.raises(TypeError, match="output_size must be a sequence of ints"):
        from_torch(layer, (2, 4, 4), output_size=8)
    with pytest.raises(TypeError, match="output_size must contain only ints"):
        from_torch(layer, (2, 4, 4), output_size=(8.0, 8))
    with pytest.raises(ValueError, match=r"output_size is for transposed convolutions only.*"
                                         r"Conv2d"):
        from_torch(nn.Conv2d(2, 3, 3), (2, 4, 4), output_size=(2, 2))


class _Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "module, name",
    [
        (nn.Linear(4, 3), "torch.nn.modules.linear.Linear"),
        (_Custom(), "_Custom"),
        (nn.Sequential(nn.Conv2d(1, 1, 3)), "Sequential"),
        (np.ones((2, 1, 3, 3)), "numpy.ndarray"),
    ],
    ids=["linear", "custom", "sequential", "ndarray"],
)
def test_non_conv_module_is_type_error(module, name):
    with pytest.raises(TypeError, match=rf"Conv1d.*ConvTranspose3d layer, got .*{name}"):
        from_torch(module, (1, 5, 5))


def test_lazy_module():
    torch.manual_seed(2)
    layer = nn.LazyConv2d(4, 3, padding=1)
    with pytest.raises(TypeError, match=r"LazyConv2d whose parameters are not initialised"):
        from_torch(layer, (3, 6, 6))
    x = torch.randn(1, 3, 6, 6)
    expected = layer(x).detach().numpy().ravel()  # initialises it (it becomes a Conv2d)
    op, b = from_torch(layer, (3, 6, 6))
    _check(op @ x.numpy().ravel() + b, expected, np.float32)


def test_input_shape_errors():
    layer = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"does not fit Conv2d\(3, 4, kernel_size=\(3, 3\)\).*"
                                         r"3 input channels, got input_shape\[0\]=2"):
        from_torch(layer, (2, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape\[1\]=2 \(input_shape=\(5, 2, 8, 8\)\)"):
        from_torch(layer, (5, 2, 8, 8))
    with pytest.raises(ValueError, match=r"does not fit Conv2d.*3 or 4 entries, got "
                                         r"input_shape=\(3, 8\)"):
        from_torch(layer, (3, 8))
    with pytest.raises(ValueError, match=r"ConvTranspose1d.*2 or 3 entries.*\(1, 4, 5, 5\)"):
        from_torch(nn.ConvTranspose1d(4, 2, 3), (1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"ConvTranspose1d.*4 input channels.*\(3, 5\)"):
        from_torch(nn.ConvTranspose1d(4, 2, 3), (3, 5))
    with pytest.raises(TypeError, match=r"input_shape must contain only ints"):
        from_torch(layer, (3, 8.0, 8))
    with pytest.raises(TypeError, match=r"input_shape must be a sequence of ints"):
        from_torch(layer, 8)
    with pytest.raises(ValueError, match=r"batch size must be non-negative"):
        from_torch(layer, (-1, 3, 8, 8))
    # A geometry the layer cannot run names the layer too.
    with pytest.raises(ValueError, match=r"Conv2d\(3, 4, kernel_size=\(3, 3\)\) on input shape "
                                         r"\(3, 2, 8\).*dilated kernel"):
        from_torch(layer, (3, 2, 8))
    with pytest.raises(ValueError, match=r"Conv2d.*reflect padding must be smaller"):
        from_torch(nn.Conv2d(3, 4, 3, padding=3, padding_mode="reflect"), (3, 3, 8))


def test_transposed_settings_torch_rejects():
    layer = nn.ConvTranspose2d(2, 2, 3)
    layer.padding_mode = "reflect"  # the constructor refuses it; torch's forward raises too
    with pytest.raises(ValueError):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*padding_mode='reflect'.*only "
                                         r"padding_mode='zeros'"):
        from_torch(layer, (2, 4, 4))
    layer = nn.ConvTranspose2d(2, 2, 3, padding="same")  # stored as ('s', 'a', 'm', 'e')
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*integer padding only"):
        from_torch(layer, (2, 4, 4))


# ---------------------------------------------------------------------------
# Settings with fewer (or more) entries than spatial dimensions, as torch reads them
# ---------------------------------------------------------------------------

# Layers torch runs although a setting has one entry (or, with padding_mode other than
# 'zeros', fewer or more than one per spatial dimension):
# (layer class, in_channels, out_channels, kernel_size, spatial input size, layer kwargs,
#  input kinds torch accepts, output_size passed to forward (spatial sizes, or None)).
BOTH, SAMPLE, BATCH = ("batch", "sample"), ("sample",), ("batch",)
SHORT_CASES = [
    # ATen's convolution repeats a single stride, dilation or zero padding everywhere.
    (nn.Conv2d, 2, 3, 3, (7, 8), dict(stride=(2,)), BOTH, None),
    (nn.Conv3d, 2, 3, 3, (7, 6, 7), dict(dilation=(2,)), BOTH, None),
    (nn.Conv1d, 2, 3, 3, (9,), dict(stride=(2,), padding=(1,), dilation=(2,)), BOTH, None),
    (nn.Conv2d, 4, 2, (3, 2), (6, 7), dict(padding=(1,), stride=(2,), groups=2), BOTH, None),
    (nn.Conv3d, 2, 2, (2, 3, 3), (5, 4, 6), dict(padding=(2,), dilation=(1,)), BOTH, None),
    (nn.Conv2d, 2, 3, 3, (6, 7), dict(stride=(2,), dilation=(2,), padding_mode="circular"),
     BOTH, None),
    # ... and, in zeros mode, the dilation of 'same' in every dimension.
    (nn.Conv2d, 2, 3, (4, 3), (7, 8), dict(padding="same", dilation=(2,)), BOTH, None),
    (nn.Conv3d, 1, 2, (2, 3, 4), (5, 6, 7), dict(padding="same", dilation=(3,)), BOTH, None),
    # Other modes: F.pad(_reversed_padding_repeated_twice) pads the last dimensions only,
    # which F.pad supports for the last dimension of a 3-d (unbatched 2-d) input ...
    (nn.Conv2d, 2, 3, 3, (6, 7), dict(padding=(1,), padding_mode="reflect"), SAMPLE, None),
    (nn.Conv2d, 2, 3, 3, (6, 7), dict(padding=(2,), padding_mode="replicate"), SAMPLE, None),
    (nn.Conv2d, 2, 3, (2, 3), (5, 4), dict(padding=(3,), stride=(2,),
                                           padding_mode="circular"), SAMPLE, None),
    # ... and the last two of a 4-d (unbatched 3-d) one.
    (nn.Conv3d, 2, 2, 3, (4, 5, 6), dict(padding=(1, 2), padding_mode="reflect"), SAMPLE, None),
    # 'same' with one dilation: the constructor pads the first spatial dimension only,
    # the convolution dilates them all.
    (nn.Conv2d, 2, 3, (4, 3), (8, 9), dict(padding="same", dilation=(2,),
                                           padding_mode="reflect"), BOTH, None),
    (nn.Conv3d, 2, 2, (3, 2, 2), (6, 5, 5), dict(padding="same", dilation=(2,),
                                                 padding_mode="replicate"), BOTH, None),
    (nn.Conv1d, 2, 2, 4, (9,), dict(padding="same", dilation=(2,), padding_mode="circular"),
     BOTH, None),
    (nn.Conv2d, 2, 2, 3, (7, 7), dict(padding="valid", dilation=(2,), padding_mode="reflect"),
     BOTH, None),
    # N + 1 entries reach the channel axis of a batched input: fine when that entry is 0.
    (nn.Conv1d, 2, 3, 3, (8,), dict(padding=(0, 2), padding_mode="reflect"), BATCH, None),
    (nn.Conv2d, 2, 3, 3, (6, 7), dict(padding=(0, 1, 2), padding_mode="circular"), BATCH,
     None),
    # Transposed layers: ATen repeats stride, padding, dilation and output_padding.
    (nn.ConvTranspose2d, 2, 3, 3, (4, 5), dict(stride=(2,), padding=(1,), output_padding=(1,)),
     BOTH, None),
    (nn.ConvTranspose3d, 2, 2, (2, 3, 2), (3, 2, 3), dict(dilation=(2,), output_padding=(1,)),
     BOTH, None),
    (nn.ConvTranspose2d, 4, 2, 3, (3, 4), dict(stride=(3,), dilation=(2,), groups=2), BOTH,
     None),
    # With output_size the layer's output_padding is not read, whatever its length.
    (nn.ConvTranspose2d, 2, 3, 3, (4, 5), dict(stride=2, output_padding=(1,)), BOTH, (9, 12)),
    (nn.ConvTranspose2d, 2, 3, 3, (4, 5), dict(stride=2, output_padding=(1, 1, 1)), BOTH,
     (10, 11)),
    (nn.ConvTranspose3d, 2, 2, 2, (2, 3, 2), dict(stride=2, output_padding=()), BOTH, (5, 6, 4)),
    # A one-element setting of a 1-d transposed layer is a full one, output_size included.
    (nn.ConvTranspose1d, 2, 3, 3, (5,), dict(stride=(3,), padding=(1,), dilation=(2,)), BOTH,
     (16,)),
]


def _short_id(case):
    cls, cin, cout, k, size, kwargs, kinds, output_size = case
    extra = "" if output_size is None else f"-out{output_size}"
    return f"{cls.__name__}-{cin}-{cout}-k{k}-{size}-{kwargs}-{'+'.join(kinds)}{extra}"


@pytest.mark.parametrize("case", SHORT_CASES, ids=_short_id)
def test_short_settings_match_torch(case):
    cls, cin, cout, k, size, kwargs, kinds, output_size = case
    torch.manual_seed(zlib.crc32(_short_id(case).encode()))
    layer = cls(cin, cout, k, dtype=torch.float64, **kwargs)
    n = len(size)
    for kind in kinds:
        x = torch.randn(*((2,) if kind == "batch" else ()), cin, *size, dtype=torch.float64)
        call = {} if output_size is None else {"output_size": output_size}
        expected = layer(x, **call).detach().numpy()
        op, b = from_torch(layer, tuple(x.shape), **call)
        assert op.output_shape == expected.shape[-n - 1:]
        assert len(op.stride) == len(op.dilation) == len(op.padding) == n
        flat = x.numpy().reshape(-1, op.shape[1])
        _check((op @ flat.T).T + b, expected.reshape(flat.shape[0], -1), np.float64)


def test_short_settings_read_as_torch_reads_them():
    # The values behind SHORT_CASES, spelt out.
    op, _ = from_torch(nn.Conv3d(2, 3, 3, stride=(2,), dilation=(3,), padding=(1,)), (2, 9, 9, 9))
    assert op.stride == (2, 2, 2) and op.dilation == (3, 3, 3)
    assert op.padding == ((1, 1),) * 3
    # 'same' in zeros mode dilates and pads every dimension ...
    layer = nn.Conv2d(1, 1, (4, 3), padding="same", dilation=(2,))
    op, _ = from_torch(layer, (1, 8, 8))
    assert op.padding == ((3, 3), (2, 2)) and op.output_shape == (1, 8, 8)
    # ... in the other modes only the first dimension is padded.
    layer = nn.Conv2d(1, 1, (4, 3), padding="same", dilation=(2,), padding_mode="reflect")
    op, _ = from_torch(layer, (1, 8, 8))
    assert layer._reversed_padding_repeated_twice == [0, 0, 3, 3]
    assert op.padding == ((3, 3), (0, 0)) and op.output_shape == (1, 8, 4)
    # A one-element padding: the last dimension only.
    layer = nn.Conv2d(1, 1, 3, padding=(2,), padding_mode="circular")
    op, _ = from_torch(layer, (1, 6, 6))
    assert op.padding == ((0, 0), (2, 2)) and op.output_shape == (1, 4, 8)
    layer = nn.Conv3d(1, 1, 3, padding=(1, 2), padding_mode="replicate")
    op, _ = from_torch(layer, (1, 5, 5, 5))
    assert op.padding == ((0, 0), (1, 1), (2, 2))
    # Transposed: everything repeated.
    layer = nn.ConvTranspose2d(1, 1, 3, stride=(2,), padding=(1,), output_padding=(1,))
    op, _ = from_torch(layer, (1, 4, 4))
    assert op.stride == (2, 2) and op.padding == ((1, 1),) * 2 and op.output_padding == (1, 1)


_WOULD_RAISE = r"\(its forward would raise"

# Layers whose forward raises: (layer factory, input_shape, output_size, match).
TORCH_RAISES = [
    # ATen's convolution takes one value or N.
    (lambda: nn.Conv2d(2, 3, 3, stride=()), (2, 6, 6), None,
     (r"Conv2d\(2, 3, kernel_size=\(3, 3\)\) has stride=\(\), but .*single value or one per "
      r"spatial dimension \(2\)")),
    (lambda: nn.Conv2d(2, 3, 3, padding=(1, 1, 1)), (1, 2, 6, 6), None,
     r"Conv2d.* has padding=\(1, 1, 1\)"),
    (lambda: nn.Conv3d(2, 3, 3, dilation=(1, 2)), (2, 8, 8, 8), None,
     r"Conv3d.* has dilation=\(1, 2\).*\(3\)"),
    (lambda: nn.Conv1d(2, 3, 3, stride=(1, 1), padding_mode="reflect"), (2, 8), None,
     r"Conv1d.* has stride=\(1, 1\)"),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=(1, 1, 1)), (2, 4, 4), None,
     r"ConvTranspose2d.* has output_padding=\(1, 1, 1\)"),
    (lambda: nn.ConvTranspose1d(2, 3, 3, padding=()), (2, 4), None,
     r"ConvTranspose1d.* has padding=\(\)"),
    # A one-element kernel_size is not expanded.
    (lambda: nn.Conv2d(2, 3, (3,)), (2, 6, 6), None,
     (r"Conv2d\(2, 3, kernel_size=\(3,\)\) has kernel_size=\(3,\), which PyTorch does not "
      r"expand.*1 kernel axes instead of 2")),
    (lambda: nn.ConvTranspose3d(2, 3, (3,), stride=(1,), padding=(0,), dilation=(1,),
                                output_padding=(0,)), (2, 4, 4, 4), None,
     r"ConvTranspose3d.* has kernel_size=\(3,\).*instead of 3"),
    # With output_size, _output_padding indexes stride, padding and dilation per dimension.
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=(2,)), (2, 4, 4), (9, 9),
     (r"ConvTranspose2d.* has stride=\(2,\): with output_size, .*ConvTranspose2d.forward reads "
      r"stride\[d\] for each of its 2 spatial dimensions.*IndexError")),
    (lambda: nn.ConvTranspose3d(2, 3, 3, padding=(1,)), (1, 2, 4, 4, 4), (4, 4, 4),
     r"ConvTranspose3d.* has padding=\(1,\): with output_size"),
    (lambda: nn.ConvTranspose2d(2, 3, 3, dilation=(2,)), (2, 4, 4), (3, 8, 8),
     r"has dilation=\(2,\): with output_size"),
    # F.pad cannot pad only the last dimension(s) of these inputs.
    (lambda: nn.Conv2d(2, 3, 3, padding=(1,), padding_mode="reflect"), (1, 2, 6, 6), None,
     (r"Conv2d.* with padding=\(1,\) and padding_mode='reflect' pads its input with "
      r"F.pad\(x, \[1, 1\], mode='reflect'\).*rejects for the 4-d batched input")),
    (lambda: nn.Conv3d(2, 3, 3, padding=(1,), padding_mode="replicate"), (2, 5, 5, 5), None,
     r"Conv3d.* with padding=\(1,\) and padding_mode='replicate'.*4-d unbatched input"),
    (lambda: nn.Conv3d(2, 3, 3, padding=(1, 1), padding_mode="circular"), (1, 2, 5, 5, 5),
     None, r"F.pad\(x, \[1, 1, 1, 1\], mode='circular'\).*5-d batched input"),
    (lambda: nn.Conv2d(2, 3, 3, padding=(), padding_mode="reflect"), (2, 6, 6), None,
     r"padding=\(\) and padding_mode='reflect'.*F.pad\(x, \[\]"),
    (lambda: nn.Conv1d(2, 3, 3, padding=(0, 1), padding_mode="reflect"), (2, 8), None,
     r"Conv1d.* with padding=\(0, 1\).*2-d unbatched input"),
    # ... or pads the channel axis, and the convolution gets too many channels.
    (lambda: nn.Conv1d(2, 3, 3, padding=(1, 1), padding_mode="reflect"), (1, 2, 8), None,
     (r"Conv1d.* with padding=\(1, 1\).*pads the channel axis by \(1, 1\): the convolution "
      r"then gets 4 channels instead of 2")),
    (lambda: nn.Conv2d(2, 3, 3, padding=(1, 0, 0), padding_mode="circular"), (1, 2, 6, 6), None,
     r"Conv2d.* pads the channel axis by \(1, 1\)"),
]


TORCH_RAISES_IDS = [
    "stride-empty", "zeros-padding-long", "dilation-2-of-3", "reflect-stride-long",
    "output_padding-long", "transposed-padding-empty", "kernel-one-2d", "kernel-one-transposed-3d",
    "output_size-stride-one", "output_size-padding-one", "output_size-dilation-one",
    "reflect-padding-one-batched-2d", "replicate-padding-one-3d", "circular-padding-two-3d",
    "reflect-padding-empty", "reflect-padding-long-unbatched-1d", "reflect-channel-axis-1d",
    "circular-channel-axis-2d",
]


@pytest.mark.parametrize("factory, shape, output_size, match", TORCH_RAISES,
                         ids=TORCH_RAISES_IDS)
def test_short_settings_torch_rejects(factory, shape, output_size, match):
    torch.manual_seed(5)
    layer = factory()
    kwargs = {} if output_size is None else {"output_size": output_size}
    with pytest.raises((RuntimeError, NotImplementedError, IndexError)):  # torch's own errors
        layer(torch.randn(*shape), **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        from_torch(layer, shape, **kwargs)
    assert re.search(_WOULD_RAISE, str(info.value))


def _setting_forms(ndim, value):
    """One setting as an int, one entry per dimension, one entry, none, one too many."""
    return [value, (value,) * ndim, (value,), (), (value,) * (ndim + 1), (0,) + (value,) * ndim]


def _grid(ndim, transposed):
    """Layer kwargs with every setting in every form, alone and with a one-element stride
    or dilation beside it."""
    base = dict(stride=2, padding=1, dilation=2, kernel_size=3)
    if transposed:
        base["output_padding"] = 1
    for name, value in base.items():
        forms = _setting_forms(ndim, value)
        if name == "kernel_size":
            forms = forms[:-1]  # a zero kernel size: an empty weight, torch warns
        if name == "padding" and not transposed:
            forms += ["same", "valid"]
        for form, extra in itertools.product(forms, [{}, {"stride": (2,)}, {"dilation": (2,)}]):
            kwargs = dict(kernel_size=3, **extra)
            if name == "output_padding":
                kwargs.setdefault("stride", 2)
            kwargs[name] = form
            yield kwargs


LAYER_MODES = [(f"Conv{n}d", mode) for n in (1, 2, 3)
               for mode in ("zeros", "reflect", "replicate", "circular")]
LAYER_MODES += [(f"ConvTranspose{n}d", "zeros") for n in (1, 2, 3)]


@pytest.mark.parametrize("name, padding_mode", LAYER_MODES, ids=[f"{c}-{m}" for c, m in
                                                                 LAYER_MODES])
def test_every_setting_form_agrees_with_torch(name, padding_mode):
    """For every form of every setting, batched and not (and for transposed layers with
    and without output_size): from_torch raises a ValueError exactly where the layer's
    forward raises, and otherwise reproduces it."""
    cls = getattr(nn, name)
    ndim, transposed = int(name[-2]), name.startswith("ConvTranspose")
    torch.manual_seed(zlib.crc32(f"{name}-{padding_mode}".encode()))
    outcomes = {"ran": 0, "raised": 0}
    mode = {} if transposed else {"padding_mode": padding_mode}
    for kwargs in _grid(ndim, transposed):
        try:
            layer = cls(2, 4, dtype=torch.float64, **mode, **kwargs)
        except ValueError:  # the constructor refuses it ('same' with a stride)
            continue
        for batched, size_kind in itertools.product((True, False), (None, "spatial", "full")):
            if size_kind and not transposed:
                continue
            size = (9, 7, 5)[ndim - 1]  # small 3-d inputs: transposed outputs grow
            x = torch.randn(*((2,) if batched else ()), 2, *[size] * ndim, dtype=torch.float64)
            call = {}
            if size_kind:  # the size the layer reaches by itself (a large one if it cannot)
                try:
                    spatial = list(layer(x).shape[-ndim:])
                except (RuntimeError, ValueError):
                    spatial = [20] * ndim
                call["output_size"] = spatial if size_kind == "spatial" else \
                    list(x.shape[:-ndim - 1]) + [4] + spatial
            where = f"{name}({kwargs}, padding_mode={padding_mode!r}) on {tuple(x.shape)} {call}"
            try:
                expected = layer(x, **call).detach().numpy()
            except (RuntimeError, NotImplementedError, IndexError, ValueError) as exc:
                try:
                    from_torch(layer, tuple(x.shape), **call)
                except ValueError:
                    outcomes["raised"] += 1
                    continue
                pytest.fail(f"torch raises {exc!r}, from_torch does not: {where}")
            op, b = from_torch(layer, tuple(x.shape), **call)
            flat = x.numpy().reshape(-1, op.shape[1])
            assert op.output_shape == expected.shape[-ndim - 1:], where
            _check((op @ flat.T).T + b, expected.reshape(flat.shape[0], -1), np.float64)
            outcomes["ran"] += 1
    assert outcomes["ran"] > 50 and outcomes["raised"] > 50, outcomes  # both sides covered


def test_dtype_defaults_and_override():
    torch.manual_seed(3)
    layer = nn.Conv2d(2, 3, 3, padding=1)  # float32
    op, b = from_torch(layer, (2, 5, 5))
    assert op.dtype == np.float32 and b.dtype == np.float32
    op, b = from_torch(layer, (2, 5, 5), dtype=np.float64)
    assert op.dtype == np.float64 and b.dtype == np.float64
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    expected = nn.functional.conv2d(x, layer.weight.double(), layer.bias.double(), padding=1)
    _check(op @ x.numpy().ravel() + b, expected.detach().numpy().ravel(), np.float64)
    for half in (torch.float16, torch.bfloat16):  # numpy-less bfloat16 too: float32, exactly
        op, b = from_torch(layer.to(half), (2, 5, 5))
        assert op.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_array_equal(op.weight, layer.weight.float().detach().numpy())
    complex_layer = nn.Conv1d(2, 2, 3, dtype=torch.complex128)
    op, b = from_torch(complex_layer, (2, 6))
    assert op.dtype == np.complex128 and b.dtype == np.complex128
    z = torch.randn(2, 6, dtype=torch.complex128)
    _check(op @ z.numpy().ravel() + b, complex_layer(z).detach().numpy().ravel(), np.complex128)
    with pytest.raises(TypeError, match="imaginary part"):
        from_torch(complex_layer, (2, 6), dtype=np.float64)


def test_weight_is_copied():
    torch.manual_seed(4)
    layer = nn.Conv2d(2, 2, 3)
    op, b = from_torch(layer, (2, 5, 5), threads=1)
    assert op.threads == 1
    before = op.weight.copy(), op.matrix.data.copy(), b.copy()
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    np.testing.assert_array_equal(op.weight, before[0])
    np.testing.assert_array_equal(op.matrix.data, before[1])
    np.testing.assert_array_equal(b, before[2])


@pytest.mark.parametrize("transposed", [False, True])
def test_keep_transpose_is_passed_on(transposed):
    # One stored form serves the layer's forward and backward products alike.
    torch.manual_seed(5)
    layer = (nn.ConvTranspose2d if transposed else nn.Conv2d)(4, 3, 3, stride=2, padding=1)
    op, _ = from_torch(layer, (4, 9, 9), keep_transpose=False)
    assert op.keep_transpose is False
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = (layer.double()(x) - layer.bias.double()[:, None, None]).numpy().ravel()
    np.testing.assert_allclose(op.matvec(x.numpy().ravel()), expected, rtol=1e-12, atol=1e-12)
    y = np.random.default_rng(5).standard_normal(op.shape[0])
    np.testing.assert_allclose(op.rmatvec(y), op.matrix.T @ y, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# to_torch
# ---------------------------------------------------------------------------


def _random_csr(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return sp.random_array((7, 9), density=0.4, format="csr", dtype=dtype, rng=rng)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "bsr", "dia", "lil", "dok"])
@pytest.mark.parametrize("kind", ["array", "matrix"])
def test_to_torch_any_scipy_format(fmt, kind):
    dense = _random_csr(5).toarray()
    matrix = (sp.csr_array if kind == "array" else sp.csr_matrix)(dense).asformat(fmt)
    t = to_torch(matrix)
    assert t.layout == torch.sparse_csr and tuple(t.shape) == (7, 9)
    assert t.dtype == torch.float64
    np.testing.assert_array_equal(t.to_dense().numpy(), dense)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_to_torch_shares_canonical_csr(dtype):
    matrix = _random_csr(1, dtype)
    t = to_torch(matrix)
    assert t.values().dtype == torch.from_numpy(matrix.data).dtype
    assert t.crow_indices().dtype == torch.int32 == t.col_indices().dtype
    assert t.values().data_ptr() == matrix.data.ctypes.data
    assert t.crow_indices().data_ptr() == matrix.indptr.ctypes.data
    assert t.col_indices().data_ptr() == matrix.indices.ctypes.data
    matrix.data[0] = 42  # one buffer: writes show on both sides
    assert t.values()[0].item() == 42
    # Widened indices are copies; the values are still shared.
    t64 = to_torch(matrix, index_dtype=np.int64)
    assert t64.crow_indices().dtype == torch.int64 == t64.col_indices().dtype
    assert t64.col_indices().data_ptr() != matrix.indices.ctypes.data
    assert t64.values().data_ptr() == matrix.data.ctypes.data
    np.testing.assert_array_equal(t64.to_dense().numpy(), matrix.toarray())
    assert to_torch(matrix, index_dtype=torch.int64).crow_indices().dtype == torch.int64
    # int64 index arrays are shared as they are.
    wide = sp.csr_array((matrix.data, matrix.indices.astype(np.int64),
                         matrix.indptr.astype(np.int64)), shape=matrix.shape)
    t = to_torch(wide)
    assert t.col_indices().dtype == torch.int64
    assert t.col_indices().data_ptr() == wide.indices.ctypes.data


def test_to_torch_copies_when_it_must():
    # Unsorted, duplicated column indices: canonicalised on a copy, argument untouched.
    data, indices, indptr = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2, 0, 2, 1]), [0, 3, 4]
    matrix = sp.csr_array((data.copy(), indices.copy(), indptr), shape=(2, 3))
    t = to_torch(matrix)
    np.testing.assert_array_equal(t.to_dense().numpy(), [[2.0, 0.0, 4.0], [0.0, 4.0, 0.0]])
    np.testing.assert_array_equal(matrix.data, data)
    np.testing.assert_array_equal(matrix.indices, indices)
    # Read-only arrays are copied (torch cannot share them), without a warning.
    matrix = _random_csr(2)
    matrix.data.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_torch(matrix)
    assert t.values().data_ptr() != matrix.data.ctypes.data
    assert t.col_indices().data_ptr() == matrix.indices.ctypes.data
    np.testing.assert_array_equal(t.to_dense().numpy(), matrix.toarray())


def test_to_torch_operators_use_their_matrix():
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((3, 2, 3, 3))
    fwd = ConvOperator(weight, (2, 7, 7), stride=2, padding=1)
    back = ConvTransposeOperator(weight, (3, 4, 4), stride=2, padding=1)
    for op in (fwd, back, fwd.T, back.T):
        t = to_torch(op)
        assert tuple(t.shape) == op.shape
        assert t.values().data_ptr() == op.matrix.data.ctypes.data  # no copy
        x = rng.standard_normal(op.shape[1])
        _check((t @ torch.from_numpy(x)).numpy(), op @ x, np.float64)
    # For a transposed convolution that is the transposed convolution itself.
    y = rng.standard_normal((3, 4, 4))
    expected = nn.functional.conv_transpose2d(torch.from_numpy(y[None]), torch.from_numpy(weight),
                                              stride=2, padding=1)
    _check((to_torch(back) @ torch.from_numpy(y.ravel())).numpy(),
           expected.numpy().ravel(), np.float64)


def test_to_torch_copy_gives_arrays_of_its_own():
    rng = np.random.default_rng(7)
    op = ConvOperator(rng.standard_normal((3, 2, 3, 3)), (2, 7, 7), padding=1)
    shared, own = to_torch(op), to_torch(op, copy=True)
    # The operator's arrays are read-only; the shared tensor reads them as they are.
    assert not op.matrix.data.flags.writeable
    assert shared.values().data_ptr() == op.matrix.data.ctypes.data
    for tensor, array in ((own.values(), op.matrix.data), (own.col_indices(), op.matrix.indices),
                          (own.crow_indices(), op.matrix.indptr)):
        assert tensor.data_ptr() != array.ctypes.data
    own.values().mul_(2.0)  # writing into the copy leaves the operator alone
    x = rng.standard_normal(op.shape[1])
    _check((own @ torch.from_numpy(x)).numpy(), 2.0 * (op @ x), np.float64)
    _check((shared @ torch.from_numpy(x)).numpy(), op @ x, np.float64)
    with pytest.raises(TypeError, match=r"copy must be a bool, got copy='yes'"):
        to_torch(op, copy="yes")


@pytest.mark.parametrize(
    "value, name",
    [
        (np.eye(3), "numpy.ndarray"),
        (aslinearoperator(sp.eye_array(3, format="csr")), "MatrixLinearOperator"),
        (torch.eye(3), "torch.Tensor"),
        (None, "NoneType"),
    ],
    ids=["ndarray", "linear-operator", "tensor", "none"],
)
def test_to_torch_type_errors(value, name):
    with pytest.raises(TypeError, match=rf"scipy sparse matrix or array.*got .*{name}"):
        to_torch(value)


def test_to_torch_value_errors():
    matrix = _random_csr(3)
    with pytest.raises(ValueError, match=r"index_dtype must be None, int32 or int64.*int16"):
        to_torch(matrix, index_dtype="int16")
    with pytest.raises(ValueError, match=r"index_dtype must be None.*float64"):
        to_torch(matrix, index_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"2-dimensional.*\(5,\)"):
        to_torch(sp.coo_array(np.arange(5.0)))


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize == 8, reason="longdouble is float64 here")
def test_to_torch_dtype_without_torch_equivalent():
    matrix = _random_csr(3).astype(np.longdouble)
    with pytest.raises(TypeError, match=rf"dtype {np.dtype(np.longdouble)} has no torch"):
        to_torch(matrix)


@pytest.mark.parametrize("dtype, expected", [
    (torch.float32, torch.float32), (np.float32, torch.float32), ("float32", torch.float32),
    (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (np.complex64, torch.complex64), (torch.complex128, torch.complex128),
])
def test_to_torch_dtype(dtype, expected):
    matrix = _random_csr(8)
    t = to_torch(matrix, dtype=dtype)
    assert t.dtype == expected and t.layout == torch.sparse_csr
    # The values are those of the matrix rounded once to the dtype (torch's own cast).
    expected_values = torch.from_numpy(matrix.data).to(expected)
    assert torch.equal(t.values(), expected_values)
    # Only the values are converted: the index arrays are still shared.
    assert t.col_indices().data_ptr() == matrix.indices.ctypes.data
    assert (t.values().data_ptr() == matrix.data.ctypes.data) == (expected == torch.float64)


def test_to_torch_device_cpu_shares_and_products_agree():
    rng = np.random.default_rng(9)
    op = ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 9, 8), stride=(1, 2), padding=1)
    for device in ("cpu", torch.device("cpu")):
        t = to_torch(op, device=device)
        assert t.device == torch.device("cpu")
        assert t.values().data_ptr() == op.matrix.data.ctypes.data
    X = rng.standard_normal((op.shape[1], 5))
    _check(torch.sparse.mm(t, torch.from_numpy(X)).numpy(), op @ X, np.float64)
    t32 = to_torch(op, dtype=torch.float32, device="cpu")
    _check(torch.sparse.mm(t32, torch.from_numpy(X.astype(np.float32))).numpy(), op @ X,
           np.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_torch_and_back_on_cuda():
    rng = np.random.default_rng(10)
    op = ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 9, 8), padding=1)
    t = to_torch(op, device="cuda", dtype=torch.float32)
    assert t.device.type == "cuda" and t.layout == torch.sparse_csr
    x = rng.standard_normal(op.shape[1]).astype(np.float32)
    _check((t @ torch.from_numpy(x).cuda()).cpu().numpy(), op @ x, np.float32)
    back = from_torch_sparse(t)
    np.testing.assert_array_equal(back.indptr, op.matrix.indptr)
    np.testing.assert_array_equal(back.indices, op.matrix.indices)
    np.testing.assert_array_equal(back.data, op.matrix.data.astype(np.float32))


def test_to_torch_dtype_and_device_errors():
    matrix = _random_csr(11)
    with pytest.raises(TypeError, match=r"dtype must be a floating or complex dtype, "
                                        r"got dtype=torch\.int32"):
        to_torch(matrix, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"dtype must be a torch floating or complex dtype or one "
                                        r"of .*got dtype='int64'"):
        to_torch(matrix, dtype="int64")
    with pytest.raises(TypeError, match=r"got dtype='bogus'"):
        to_torch(matrix, dtype="bogus")
    with pytest.raises(TypeError, match=r"cannot use dtype=torch\.float64 for a complex matrix"):
        to_torch(matrix.astype(np.complex128), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"device must be a torch\.device or a device string "
                                         r"such as 'cpu' or 'cuda:0', got device='gpu' "
                                         r"\(Expected one of"):
        to_torch(matrix, device="gpu")
    with pytest.raises(ValueError, match=r"got device=2\.5"):
        to_torch(matrix, device=2.5)
    with pytest.raises(ValueError, match=r"device='meta' holds no values"):
        to_torch(matrix, device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_to_torch_unavailable_device_is_named():
    with pytest.raises(ValueError, match=r"cannot place the tensor on device=cuda: "
                                         r".*not compiled with CUDA"):
        to_torch(_random_csr(12), device="cuda")


# ---------------------------------------------------------------------------
# from_torch_sparse
# ---------------------------------------------------------------------------


def _assert_same_csr(a, b):
    assert isinstance(a, sp.csr_array) and a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_from_torch_sparse_round_trip_is_exact(dtype, index_dtype):
    matrix = _random_csr(13, dtype)
    matrix.data[::5] = 0  # explicit zeros survive too
    back = from_torch_sparse(to_torch(matrix, index_dtype=index_dtype))
    assert back.indices.dtype == index_dtype
    _assert_same_csr(back, matrix)
    # COO (coalesced by torch's own rule) gives the same canonical CSR.
    coo = to_torch(matrix).to_sparse_coo()
    _assert_same_csr(from_torch_sparse(coo), matrix)


def test_from_torch_sparse_coo_sums_duplicates():
    rows, cols = np.array([2, 0, 2, 1, 0]), np.array([1, 3, 1, 0, 0])
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    tensor = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                     torch.from_numpy(values), size=(3, 4), check_invariants=True)
    assert not tensor.is_coalesced()
    expected = sp.coo_array((values, (rows, cols)), shape=(3, 4)).tocsr()  # scipy sums them
    expected.sum_duplicates()
    got = from_torch_sparse(tensor)
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)
    assert got.has_canonical_format
    assert not tensor.is_coalesced()  # the argument is not modified
    empty = from_torch_sparse(torch.sparse_coo_tensor(torch.zeros((2, 0), dtype=torch.long),
                                                      torch.zeros(0), size=(3, 2),
                                                      check_invariants=True))
    assert empty.shape == (3, 2) and empty.nnz == 0


def test_from_torch_sparse_of_an_operator_and_a_product():
    rng = np.random.default_rng(14)
    op = ConvTransposeOperator(rng.standard_normal((4, 2, 3, 3)), (4, 5, 5), stride=2,
                               output_padding=1)
    t = to_torch(op)
    _assert_same_csr(from_torch_sparse(t), op.matrix)
    # A matrix torch computed itself: the product of two sparse tensors.
    square = torch.sparse.mm(t.to_sparse_coo().t(), t.to_sparse_coo())
    gram = op.matrix.T @ op.matrix
    np.testing.assert_allclose(from_torch_sparse(square).toarray(), gram.toarray(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, np.float32),
                                             (torch.float16, np.float32),
                                             (torch.int64, np.int64), (torch.bool, np.bool_)])
def test_from_torch_sparse_dtypes(dtype, expected):
    dense = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]]).to(dtype)
    got = from_torch_sparse(dense.to_sparse_csr())
    assert got.dtype == expected
    np.testing.assert_array_equal(got.toarray(), dense.to(torch.float64).numpy().astype(expected))


def test_from_torch_sparse_shares_unless_copy():
    tensor = to_torch(_random_csr(15))
    shared, own = from_torch_sparse(tensor), from_torch_sparse(tensor, copy=True)
    assert shared.data.ctypes.data == tensor.values().data_ptr()
    assert shared.indices.ctypes.data == tensor.col_indices().data_ptr()
    assert own.data.ctypes.data != tensor.values().data_ptr()
    _assert_same_csr(own, shared)
    with pytest.raises(TypeError, match=r"copy must be a bool, got copy=1"):
        from_torch_sparse(tensor, copy=1)
    # A tensor that requires grad is read without its graph.
    leaf = to_torch(_random_csr(16)).detach().requires_grad_(True)
    _assert_same_csr(from_torch_sparse(leaf), _random_csr(16))


def test_from_torch_sparse_errors():
    dense = torch.eye(3)
    with pytest.raises(TypeError, match=r"got a dense tensor \(layout torch\.strided, "
                                        r"shape \(3, 3\)\)"):
        from_torch_sparse(dense)
    for layout in ("csc", "bsr"):
        tensor = (dense.to_sparse_csc() if layout == "csc" else dense.to_sparse_bsr((1, 1)))
        with pytest.raises(TypeError, match=rf"got layout torch\.sparse_{layout}; convert it "
                                            r"first with tensor\.to_sparse_csr\(\)"):
            from_torch_sparse(tensor)
    with pytest.raises(TypeError, match=r"torch sparse tensor .*got an object of type "
                                        r".*csr_array"):
        from_torch_sparse(_random_csr(17))
    batch = torch.stack([dense, dense]).to_sparse_csr()
    with pytest.raises(ValueError, match=r"2-d sparse matrix, got shape \(2, 3, 3\)"):
        from_torch_sparse(batch)
    hybrid = torch.ones(3, 4, 2).to_sparse(2)
    with pytest.raises(ValueError, match=r"2 sparse and 1 dense dimensions"):
        from_torch_sparse(hybrid)
    with pytest.raises(ValueError, match=r"'meta' device"):
        from_torch_sparse(dense.to_sparse_csr().to("meta"))


# ---------------------------------------------------------------------------
# torch is optional
# ---------------------------------------------------------------------------


def test_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install sparse-tconv\[torch\]"):
        from_torch(object(), (1, 5))
    with pytest.raises(ImportError, match=r"pip install sparse-tconv\[torch\]"):
        to_torch(_random_csr())
    with pytest.raises(ImportError, match=r"from_torch_sparse needs PyTorch"):
        from_torch_sparse(object())


def test_import_does_not_import_torch():
    env = dict(os.environ, PYTHONPATH=REPO)
    code = "import sparse_tconv, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)


# ---------------------------------------------------------------------------
# The operator norm is not the reshaped-kernel norm spectral_norm normalises
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, size",
    [
        (dict(padding=1), (8, 8)),
        (dict(stride=2, padding=1), (8, 8)),
        (dict(dilation=2, padding=2), (7, 9)),
        (dict(padding=0), (5, 6)),
    ],
    ids=str,
)
def test_operator_norm_versus_spectral_norm(kwargs, size):
    """``||K|| <= ||W|| <= sqrt(prod(k)) ||K||`` for zero padding (see from_torch's Notes).

    ``K`` is the weight reshaped to (C_out, C_in * prod(k)), the matrix whose
    largest singular value ``spectral_norm`` estimates by power iteration.
    """
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, bias=False, dtype=torch.float64, **kwargs)
    op, _ = from_torch(layer, (3, *size))
    exact = np.linalg.norm(op.matrix.toarray(), 2)
    kernel = np.linalg.norm(op.weight.reshape(8, -1), 2)
    layer = spectral_norm(layer).eval()
    with torch.no_grad():
        estimate = float(layer.parametrizations.weight.original.norm() / layer.weight.norm())
    assert estimate <= kernel * (1 + 1e-12)
    assert kernel <= exact * (1 + 1e-12)
    assert exact <= math.sqrt(9) * kernel
    assert exact > 1.2 * kernel  # not close: the kernel norm is no Lipschitz constant
    # The spectrally normalised layer is therefore not 1-Lipschitz.
    normalised, _ = from_torch(layer, (3, *size))
    assert np.isclose(np.linalg.norm(normalised.matrix.toarray(), 2), exact / estimate)
    assert exact / estimate > 1.2


def test_operator_norm_example_numbers():
    # The numbers of from_torch's docstring example.
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1, bias=False, dtype=torch.float64)
    op, _ = from_torch(layer, (3, 8, 8))
    exact = np.linalg.norm(op.matrix.toarray(), 2)
    kernel = np.linalg.norm(op.weight.reshape(8, -1), 2)
    layer = spectral_norm(layer).eval()
    with torch.no_grad():
        estimate = float(layer.parametrizations.weight.original.norm() / layer.weight.norm())
    np.testing.assert_allclose([exact, kernel, estimate], [1.47282, 0.80788, 0.80788], atol=1e-5)
