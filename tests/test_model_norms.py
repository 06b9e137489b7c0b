"""spectral.model_norm_bounds and the built-in architectures of tools.models.

The oracle of each row is independent of the code under test: the layer's
dense matrix is read from PyTorch's own forward (a copy of the layer in
float64 applied to the identity basis, less its value at zero, which is the
bias), and its norm is a dense SVD.  The expected names and input shapes are
written out by hand from the architectures.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest

from sparse_tconv import spectral
from sparse_tconv.spectral import (
    LayerNormBounds,
    ModelNormBounds,
    NormBounds,
    model_norm_bounds,
)

torch = pytest.importorskip("torch")
nn = torch.nn

SAMPLE = (2, 10, 10)


class Mixed(nn.Module):
    """Conv1d/2d/3d and a transposed layer, every padding mode, stride, groups, dilation,
    a layer applied twice, a nested name, and batch norm, ReLU, pooling, dropout between."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular")
        self.drop = nn.Dropout(0.5)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, bias=False)
        self.shared = nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")
        self.seq = nn.Sequential(nn.Conv1d(4, 3, 5, stride=2, padding=2, dilation=2))
        self.vol = nn.Conv3d(1, 2, 3, padding=1, padding_mode="circular")
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = self.pool(torch.relu(self.bn(self.stem(x))))    # (4, 5, 5)
        x = self.drop(self.down(x))                          # (6, 3, 3)
        x = self.up(x, output_size=(6, 6))                   # (4, 6, 6): output_padding 1
        x = self.shared(torch.relu(self.shared(x)))          # twice, (4, 6, 6)
        x = self.seq(x.reshape(x.shape[0], 4, 36))           # (3, 16)
        return self.vol(x.reshape(x.shape[0], 1, 3, 4, 4))   # (2, 3, 4, 4)


# (name, input shape, output shape, description) of each application, in forward order
EXPECTED = [
    ("stem", (2, 10, 10), (4, 10, 10),
     "Conv2d(2->4, 3x3, stride 1, padding 1, reflect) on 2x10x10"),
    ("down", (4, 5, 5), (6, 3, 3),
     "Conv2d(4->6, 3x3, stride 2, padding 1, groups 2, circular) on 4x5x5"),
    ("up", (6, 3, 3), (4, 6, 6),
     "ConvTranspose2d(6->4, 3x3, stride 2, padding 1, output_padding 1, zeros) on 6x3x3"),
    ("shared", (4, 6, 6), (4, 6, 6),
     "Conv2d(4->4, 3x3, stride 1, padding 1, replicate) on 4x6x6"),
    ("shared", (4, 6, 6), (4, 6, 6),
     "Conv2d(4->4, 3x3, stride 1, padding 1, replicate) on 4x6x6"),
    ("seq.0", (4, 36), (3, 16), "Conv1d(4->3, 5, stride 2, dilation 2, padding 2, zeros) on 4x36"),
    ("vol", (1, 3, 4, 4), (2, 3, 4, 4),
     "Conv3d(1->2, 3x3x3, stride 1, padding 1, circular) on 1x3x4x4"),
]


def mixed() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # running statistics that are not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(scope="module")
def bounded():
    model = mixed()
    return model, model_norm_bounds(model, SAMPLE)


def dense_norm(layer, input_shape, **call) -> tuple[float, tuple[int, ...]]:
    """The spectral norm of the layer's linear part by a dense SVD, and its output shape.

    From PyTorch's forward on a float64 copy: column i is ``layer(e_i) - layer(0)``.
    """
    layer = copy.deepcopy(layer).double()
    n = math.prod(input_shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
        columns = layer(basis, **call) - layer(torch.zeros(1, *input_shape,
                                                           dtype=torch.float64), **call)
    matrix = columns.reshape(n, -1).T.numpy()
    assert max(matrix.shape) <= 2000  # small enough for a dense SVD
    return float(np.linalg.norm(matrix, 2)), tuple(columns.shape[1:])


def snapshot(model):
    return ([(name, m.training) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(name, p.requires_grad) for name, p in model.named_parameters()])


def assert_unchanged(model, before):
    flags, state, grads = snapshot(model)
    assert flags == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():  # parameters and buffers, bit for bit
        assert value.dtype == before[1][key].dtype and torch.equal(value, before[1][key]), key
    assert grads == before[2]
    for _, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


# ---------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------


def test_rows_follow_the_forward_pass(bounded):
    model, result = bounded
    assert isinstance(result, ModelNormBounds) and len(result) == len(EXPECTED)
    got = [(r.name, r.input_shape, r.output_shape, r.description) for r in result]
    assert got == EXPECTED
    assert [r.transposed for r in result] == [name == "up" for name, *_ in EXPECTED]
    assert all(isinstance(r, LayerNormBounds) for r in result)
    assert result[2].geometry.output_padding == (1, 1)  # from the output_size of the call
    assert result[1].geometry.groups == 2 and result[1].geometry.padding_mode == "circular"
    assert result.input_shape == SAMPLE and result.rtol == 0.01


def test_each_interval_holds_the_dense_norm(bounded):
    model, result = bounded
    layers = {"stem": model.stem, "down": model.down, "up": model.up, "shared": model.shared,
              "seq.0": model.seq[0], "vol": model.vol}
    for row in result:
        call = {"output_size": (6, 6)} if row.name == "up" else {}
        norm, output_shape = dense_norm(layers[row.name], row.input_shape, **call)
        assert output_shape == row.output_shape
        assert row.lower <= norm * (1 + 1e-12) and norm <= row.upper * (1 + 1e-12), row.name
        assert row.certified and row.reason is None
        assert row.gap == pytest.approx(row.upper / row.lower - 1) and 0 <= row.gap <= 0.01
        assert row.seconds >= 0 and row.build_seconds >= 0


def test_the_container(bounded):
    _, result = bounded
    rows = list(result)
    assert result.upper_product == math.prod(r.upper for r in rows)
    assert result.seconds == pytest.approx(sum(r.seconds for r in rows))
    assert result.build_seconds == pytest.approx(sum(r.build_seconds for r in rows))
    assert result.uncertified == ()
    assert result[-1] is rows[-1] and result[1:3] == tuple(rows[1:3])
    same = ("name", "description", "geometry", "input_shape", "lower", "upper")
    assert [getattr(rows[3], a) for a in same] == [getattr(rows[4], a) for a in same]
    table = result.table()
    lines = table.splitlines()
    assert lines[0].split() == ["#", "layer", "convolution", "lower", "upper", "gap", "%",
                                "seconds"]
    for i, row in enumerate(rows, 1):
        assert lines[i].split()[:2] == [str(i), row.name] and row.description in lines[i]
        assert not lines[i].endswith("*")
    assert f"{result.upper_product:.6g}" in table
    assert "7 convolutions on input 2x10x10" in table
    assert "every convolution certified to rtol 0.01" in table
    assert "7 convolutions" in repr(result)


def test_rows_wider_than_rtol_say_why():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="circular"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # norm_bounds' RuntimeWarning is caught, not raised
        result = model_norm_bounds(model, [2, 8, 8], rtol=0)
    assert len(result.uncertified) == 2 and not any(r.certified for r in result)
    first, second = result
    assert first.reason.startswith("the interval [") and "more than rtol=0" in first.reason
    assert "more than rtol=0" in second.reason  # the exact circulant: only rounding is left
    for row in result:
        assert row.lower <= row.upper and row.gap > 0
    table = result.table()
    assert table.splitlines()[1].endswith("*") and "not certified to rtol 0" in table
    assert f"#1 0: {first.reason}" in table
    # the upper bounds hold all the same
    assert result.upper_product == first.upper * second.upper


def test_a_float64_model_and_a_model_on_numpy_ints():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, dtype=torch.float64))
    result = model_norm_bounds(model, (np.int64(2), np.int64(12)))
    norm, _ = dense_norm(model[0], (2, 12))
    assert result[0].lower <= norm * (1 + 1e-12) <= result[0].upper * (1 + 2e-12)
    assert model[0].weight.dtype == torch.float64


def test_a_bare_layer_is_its_own_model():
    torch.manual_seed(3)
    layer = nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1)
    result = model_norm_bounds(layer, (3, 9))
    (row,) = result
    assert row.name == "" and row.transposed and row.output_shape == (2, 18)
    norm, _ = dense_norm(layer, (3, 9))
    assert row.lower <= norm * (1 + 1e-12) and norm <= row.upper * (1 + 1e-12)
    assert result.table().splitlines()[1].split()[:2] == ["1", "(model)"]


# ---------------------------------------------------------------------------
# Nothing the user passed is modified
# ---------------------------------------------------------------------------


def test_the_model_is_left_as_it_was():
    model = mixed()
    model.train()
    model.bn.eval()  # mixed flags: each is restored as it was
    model.seq.eval()
    model.vol.weight.requires_grad_(False)
    before = snapshot(model)
    shape = list(SAMPLE)
    model_norm_bounds(model, shape, rtol=0.05)
    assert_unchanged(model, before)
    assert model.calls == 1  # one forward pass
    assert shape == list(SAMPLE) and torch.is_grad_enabled()


def test_a_hook_of_the_user_stays():
    model = mixed()
    seen = []
    handle = model.stem.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model_norm_bounds(model, SAMPLE, rtol=0.05)
    assert list(model.stem._forward_hooks) == [handle.id] and len(seen) == 1
    handle.remove()


def test_a_failing_forward_names_input_shape_and_restores_the_model():
    model = mixed()
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"input_shape=\(3, 10, 10\)") as info:
        model_norm_bounds(model, (3, 10, 10))  # the stem takes 2 channels
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------
# Errors, before any work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model=np.ones((2, 2))), TypeError, "model must be a torch.nn.Module"),
    (dict(model=lambda x: x), TypeError, "model must be a torch.nn.Module"),
    (dict(input_shape=(2, 0, 10)), ValueError, "input_shape must contain only positive"),
    (dict(input_shape=()), ValueError, "input_shape must be one sample's shape"),
    (dict(input_shape="2,10,10"), TypeError, "input_shape must be a sequence of ints"),
    (dict(input_shape=(2, 10.0, 10)), TypeError, "input_shape must contain only ints"),
    (dict(input_shape=10), TypeError, "input_shape must be a sequence of ints"),
    (dict(rtol=-0.1), ValueError, "rtol must be non-negative"),
    (dict(rtol=float("nan")), ValueError, "rtol must be non-negative"),
    (dict(rtol="0.1"), TypeError, "rtol must be a real number"),
    (dict(maxiter=0), ValueError, "maxiter must be a positive integer"),
])
def test_argument_errors_come_before_the_forward_pass(kwargs, error, message):
    model = mixed()
    arguments = dict(model=model, input_shape=SAMPLE) | kwargs
    model_arg = arguments.pop("model")
    with pytest.raises(error, match=message):
        model_norm_bounds(model_arg, **arguments)
    assert model.calls == 0


def test_a_model_without_convolutions():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="model has no convolution layers"):
        model_norm_bounds(model, (3, 4))


class Skips(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return x * 2


def test_a_model_whose_forward_applies_no_convolution():
    with pytest.raises(ValueError, match=r"applied none of its 1 convolution layers \('unused'\)"):
        model_norm_bounds(Skips(), (2, 8, 8))


class PadsItself(nn.Conv2d):
    """A layer that pads in its forward (as TensorFlow's 'SAME' ports do): not its settings."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_a_layer_whose_forward_differs_from_its_settings_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), PadsItself(2, 2, 3))
    with pytest.raises(ValueError, match=r"layer '1' \(PadsItself\) gave an output of shape "
                                         r"\(1, 2, 8, 8\).* settings give \(2, 6, 6\)"):
        model_norm_bounds(model, (2, 8, 8))


def test_a_layer_that_cannot_be_bounded_is_named():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer '1' of the model.*must be finite"):
        model_norm_bounds(model, (2, 6, 6))


def test_without_torch(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="model_norm_bounds needs PyTorch"):
        model_norm_bounds(object(), (3, 8, 8))


# ---------------------------------------------------------------------------
# The built-in ResNet-18
# ---------------------------------------------------------------------------


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)),
            (f"{prefix}.running_mean", (channels,)), (f"{prefix}.running_var", (channels,)),
            (f"{prefix}.num_batches_tracked", ())]


def resnet18_state_shapes(num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """torchvision's resnet18 state dict, from its specification table.

    conv1 7x7 3->64; four stages of two basic blocks, widths 64, 128, 256,
    512, the first block of stages 2-4 with stride 2 and a 1x1 downsample;
    fc 512 -> num_classes.
    """
    keys = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    width_in = 64
    for stage, width in enumerate((64, 128, 256, 512), 1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            c_in = width_in if block == 0 else width
            keys += [(f"{p}.conv1.weight", (width, c_in, 3, 3)), *_bn(f"{p}.bn1", width),
                     (f"{p}.conv2.weight", (width, width, 3, 3)), *_bn(f"{p}.bn2", width)]
            if block == 0 and stage > 1:
                keys += [(f"{p}.downsample.0.weight", (width, c_in, 1, 1)),
                         *_bn(f"{p}.downsample.1", width)]
        width_in = width
    return keys + [("fc.weight", (num_classes, 512)), ("fc.bias", (num_classes,))]


def test_resnet18_has_torchvision_state_dict():
    from sparse_tconv.tools.models import resnet18

    model = resnet18()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == resnet18_state_shapes()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count
    assert [(k, tuple(v.shape)) for k, v in resnet18(num_classes=10).state_dict().items()
            ] == resnet18_state_shapes(10)
    # a state dict of this layout loads strictly
    resnet18(seed=1).load_state_dict(model.state_dict(), strict=True)
    assert model.training
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.maxpool.kernel_size == 3
    assert model.conv1.stride == (2, 2) and model.conv1.padding == (3, 3)
    assert model.conv1.bias is None and model.layer3[0].downsample[0].stride == (2, 2)


def test_resnet18_weights_are_seeded_and_leave_the_global_generator_alone():
    from sparse_tconv.tools.models import resnet18

    state = torch.random.get_rng_state()
    a, b, c = resnet18(seed=3), resnet18(seed=3), resnet18(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)
    assert not torch.equal(a.layer1[0].conv1.weight, c.layer1[0].conv1.weight)
    # torchvision's initialisation: Kaiming normal with fan out, gain sqrt(2)
    w = a.layer4[1].conv2.weight.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)
    assert torch.equal(a.bn1.weight, torch.ones(64)) and torch.equal(a.bn1.bias, torch.zeros(64))


def test_a_whole_resnet18_saved_with_torch_save_loads_again():
    from sparse_tconv.tools.models import resnet18

    model = resnet18(num_classes=5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == "ResNet" and type(loaded) is type(model)
    x = torch.randn(1, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def resnet18_applications(size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and input shapes of the convolutions, from the strides, by hand."""
    s = size // 2 // 2  # conv1 stride 2, then maxpool stride 2
    rows = [("conv1", (3, size, size))]
    width_in = 64
    for stage, width in enumerate((64, 128, 256, 512), 1):
        stride = 1 if stage == 1 else 2
        p = f"layer{stage}"
        rows += [(f"{p}.0.conv1", (width_in, s, s)), (f"{p}.0.conv2", (width, s // stride,
                                                                      s // stride))]
        if stride == 2:
            rows.append((f"{p}.0.downsample.0", (width_in, s, s)))
        s //= stride
        rows += [(f"{p}.1.conv1", (width, s, s)), (f"{p}.1.conv2", (width, s, s))]
        width_in = width
    return rows


def test_resnet18_walk_finds_its_20_convolutions(monkeypatch):
    """The walk and the rows on ResNet-18 at 32x32; norm_bounds itself is replaced by a
    stub here (its run on these layers takes minutes; the other tests check it)."""
    from sparse_tconv.tools.models import resnet18

    seen = []

    def stub(op, *, rtol, maxiter):
        seen.append((op.input_shape, op.output_shape, rtol, maxiter))
        return NormBounds(1.5, 1.5 * (1 + rtol / 2))

    monkeypatch.setattr(spectral, "norm_bounds", stub)
    model = resnet18()
    before = snapshot(model)
    result = model_norm_bounds(model, (3, 32, 32), rtol=0.02, maxiter=7)
    expected = resnet18_applications(32)
    assert len(expected) == 20
    assert [(r.name, r.input_shape) for r in result] == expected
    assert [s[0] for s in seen] == [shape for _, shape in expected]
    assert all(s[2:] == (0.02, 7) for s in seen)
    assert result[0].output_shape == (64, 16, 16) and result[-1].output_shape == (512, 1, 1)
    assert result[0].description == "Conv2d(3->64, 7x7, stride 2, padding 3, zeros) on 3x32x32"
    assert result.upper_product == pytest.approx((1.5 * 1.01) ** 20)
    assert all(r.certified for r in result)
    assert_unchanged(model, before)
