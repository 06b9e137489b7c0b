"""Built-in architectures for ``sparse-tconv norms --model``, in code, without torchvision.

- :func:`resnet18`: ResNet-18 with torchvision's module names, shapes and
  initialisation, so that a torchvision state dict loads into it with
  ``load_state_dict(strict=True)``.
- :func:`convnet`: a small plain network (seconds to bound at 32x32).

``ARCHITECTURES`` maps their names to the builders, each called as
``builder(num_classes=..., seed=...)``.  PyTorch is imported when a model is
built, not with this module; the ResNet classes are made then too, under
this module's name (``BasicBlock``, ``ResNet``), so that a whole model saved
with ``torch.save`` loads again.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Any

__all__ = ["ARCHITECTURES", "resnet18", "convnet"]


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "the built-in architectures need PyTorch, an optional dependency; install it with "
            "`pip install sparse-tconv[torch]`") from exc
    return torch


@functools.cache
def _classes() -> dict[str, Any]:
    """torchvision's ``BasicBlock`` and ``ResNet`` (the parts ResNet-18 uses)."""
    torch = _import_torch()
    nn: Any = torch.nn  # a base class read from a module imported here

    def conv3x3(in_planes, out_planes, stride=1):
        return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                         bias=False)

    class BasicBlock(nn.Module):
        """Two 3x3 convolutions with batch norm, and the identity or a 1x1 shortcut."""

        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = conv3x3(inplanes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):  # torchvision's order: the shortcut after the branch
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """torchvision's ResNet with basic blocks: ``layers`` blocks per stage."""

        def __init__(self, layers, num_classes=1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0])
            self.layer2 = self._make_layer(128, layers[1], stride=2)
            self.layer3 = self._make_layer(256, layers[2], stride=2)
            self.layer4 = self._make_layer(512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    classes = {"BasicBlock": BasicBlock, "ResNet": ResNet}
    for name, cls in classes.items():  # pickle finds them here, through __getattr__
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


def __getattr__(name: str):
    if name in ("BasicBlock", "ResNet"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _seeded(torch, seed: int):
    """torch's global generator seeded inside, restored after."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resnet18(num_classes: int = 1000, *, seed: int = 0):
    """ResNet-18 as torchvision builds it, with seeded random weights.

    The same modules, names and parameter shapes as
    ``torchvision.models.resnet18(num_classes=num_classes)`` (``conv1`` 7x7
    stride 2, ``bn1``, ``relu``, ``maxpool`` 3x3 stride 2, ``layer1`` to
    ``layer4`` of two ``BasicBlock`` each with ``conv1``, ``bn1``, ``conv2``,
    ``bn2`` and, where the stride or width changes, ``downsample`` = 1x1
    convolution and batch norm, ``avgpool``, ``fc``), so that its state dict
    loads with ``load_state_dict(strict=True)``; and torchvision's
    initialisation (Kaiming normal, fan out, on the convolutions).

    Parameters
    ----------
    num_classes : int, optional
        Outputs of ``fc``.  Default 1000.
    seed : int, optional
        Seed of the random weights (torch's global generator is restored
        afterwards).  Default 0.

    Returns
    -------
    torch.nn.Module
        In training mode, as torchvision returns it.

    Examples
    --------
    >>> from sparse_tconv.tools.models import resnet18
    >>> model = resnet18()
    >>> tuple(model.layer2[0].downsample[0].weight.shape)
    (128, 64, 1, 1)
    >>> sum(p.numel() for p in model.parameters())
    11689512
    """
    torch = _import_torch()
    with _seeded(torch, seed):
        return _classes()["ResNet"]([2, 2, 2, 2], num_classes=num_classes)


def convnet(num_classes: int = 10, *, seed: int = 0):
    """A small plain network: five convolutions of every padding mode, seconds to bound.

    ``Conv2d(3->16, 3x3, padding 1)``, ReLU, ``Conv2d(16->32, 3x3, stride 2,
    padding 1, reflect)``, ReLU, ``Conv2d(32->32, 3x3, padding 1, groups 4,
    circular)``, ReLU, ``Conv2d(32->32, 3x3, stride 2, padding 1,
    replicate)``, ReLU, ``ConvTranspose2d(32->16, 2x2, stride 2)``, global
    average pooling and ``fc``, a ``torch.nn.Sequential`` for 3-channel
    inputs.

    Parameters
    ----------
    num_classes : int, optional
        Outputs of ``fc``.  Default 10.
    seed : int, optional
        Seed of the random weights (PyTorch's default initialisation; torch's
        global generator is restored afterwards).  Default 0.

    Returns
    -------
    torch.nn.Sequential
    """
    torch = _import_torch()
    nn = torch.nn
    with _seeded(torch, seed):
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 16, 3, padding=1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect")),
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(32, 32, 3, padding=1, groups=4, padding_mode="circular")),
            ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(32, 32, 3, stride=2, padding=1, padding_mode="replicate")),
            ("relu4", nn.ReLU()),
            ("up", nn.ConvTranspose2d(32, 16, 2, stride=2)),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(16, num_classes)),
        ]))


# The architectures of ``sparse-tconv norms --model NAME`` and ``--arch NAME``.
ARCHITECTURES = {"resnet18": resnet18, "convnet": convnet}
