"""The benchmark configurations: one table for ``bench``, ``perf`` and the asv suite.

Each row is one configuration of the performance work, (a) being the
transposed-convolution chapter's example, at three sizes: ``full`` (the
figures in the README), ``quick`` (smoke runs in seconds) and ``asv`` (a
fraction of the full size, so that the whole asv suite runs in minutes on two
cores).  The asv suite names its rows by ``asv_name``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from .. import (
    ConvMatrixSize,
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
    conv_output_shape,
    conv_transpose_matrix,
    conv_transpose_matrix_nnz,
    conv_transpose_output_shape,
)

__all__ = ["Config", "Row", "TABLE", "CONFIGS", "QUICK_CONFIGS", "ASV_CONFIGS", "select"]


@dataclass(frozen=True)
class Config:
    """One geometry to measure: a convolution, or a transposed one."""

    name: str
    description: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    transposed: bool = False
    batch: int = 0  # also time matmat on this many columns

    def operator(self, weight, threads=None, **options):
        cls = ConvTransposeOperator if self.transposed else ConvOperator
        return cls(weight, self.input_shape, threads=threads, **self.kwargs, **options)

    def build(self, weight):
        """The canonical CSR of the configuration's matrix, by the public builder."""
        builder = conv_transpose_matrix if self.transposed else conv_matrix
        return builder(weight, self.input_shape, **self.kwargs)

    def build_transpose(self, weight):
        """The canonical CSR of the transpose, built directly by the other public builder.

        A convolution's transpose is the transposed convolution on its output,
        with the ``output_padding`` that gives its input size back, and the
        other way round.
        """
        kwargs = {k: v for k, v in self.kwargs.items() if k != "output_padding"}
        if self.transposed:
            shape = conv_transpose_output_shape(self.input_shape, self.weight_shape,
                                                **self._shape_kwargs())
            return conv_matrix(weight, shape, **kwargs)
        out = conv_output_shape(self.input_shape, self.weight_shape, **self._shape_kwargs())
        smallest = conv_transpose_output_shape(out, self.weight_shape, **self._shape_kwargs())
        extra = tuple(n - m for n, m in zip(self.input_shape[1:], smallest[1:]))
        return conv_transpose_matrix(weight, out, output_padding=extra, **kwargs)

    def _shape_kwargs(self) -> dict:
        names: tuple[str, ...] = ("stride", "padding", "dilation", "groups")
        if self.transposed:
            names += ("output_padding",)
        return {k: v for k, v in self.kwargs.items() if k in names}

    def predicted_size(self) -> ConvMatrixSize:
        """The size of the configuration's matrix, without building it."""
        size = conv_transpose_matrix_nnz if self.transposed else conv_matrix_nnz
        return size(self.weight_shape, self.input_shape, **self.kwargs)

    def with_batch(self, batch: int) -> Config:
        return dataclasses.replace(self, batch=batch)

    def random_weight(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.weight_shape)


@dataclass(frozen=True)
class Row:
    """One configuration at its three sizes."""

    asv_name: str
    full: Config
    quick: Config
    asv: Config


def _row(name, asv_name, transposed=False, **sizes) -> Row:
    """A row from ``full=``, ``quick=`` and ``asv=`` tuples
    ``(description, weight_shape, input_shape, kwargs[, batch])``."""

    def config(spec):
        description, weight_shape, input_shape, kwargs, *batch = spec
        return Config(name, description, weight_shape, input_shape, kwargs, transposed,
                      batch[0] if batch else 0)

    return Row(asv_name, config(sizes["full"]), config(sizes["quick"]), config(sizes["asv"]))


_CHAPTER = ("chapter: 10x16x16, 10->20, k5 p2 s3", (20, 10, 5, 5), (10, 16, 16),
            dict(padding=2, stride=3))

TABLE = [
    _row("a", "chapter", full=_CHAPTER, quick=_CHAPTER, asv=_CHAPTER),
    _row("b", "stem",
         full=("3x224x224, 3->64, k7 s2 p3", (64, 3, 7, 7), (3, 224, 224),
               dict(stride=2, padding=3)),
         quick=("3x64x64, 3->16, k7 s2 p3", (16, 3, 7, 7), (3, 64, 64),
                dict(stride=2, padding=3)),
         asv=("3x112x112, 3->64, k7 s2 p3", (64, 3, 7, 7), (3, 112, 112),
              dict(stride=2, padding=3))),
    _row("c", "resblock",
         full=("64x56x56, 64->64, k3 p1 (+ batch 32)", (64, 64, 3, 3), (64, 56, 56),
               dict(padding=1), 32),
         quick=("16x24x24, 16->16, k3 p1 (+ batch 8)", (16, 16, 3, 3), (16, 24, 24),
                dict(padding=1), 8),
         asv=("64x28x28, 64->64, k3 p1", (64, 64, 3, 3), (64, 28, 28), dict(padding=1))),
    _row("d", "blur",
         full=("1x512x512, 1->1, k9 p4", (1, 1, 9, 9), (1, 512, 512), dict(padding=4)),
         quick=("1x48x48, 1->1, k5 p2", (1, 1, 5, 5), (1, 48, 48), dict(padding=2)),
         asv=("1x256x256, 1->1, k9 p4", (1, 1, 9, 9), (1, 256, 256), dict(padding=4))),
    _row("e", "signal1d",
         full=("1-D 1x1,000,000, k31 p15", (1, 1, 31), (1, 1_000_000), dict(padding=15)),
         quick=("1-D 1x50,000, k31 p15", (1, 1, 31), (1, 50_000), dict(padding=15)),
         asv=("1-D 1x250,000, k31 p15", (1, 1, 31), (1, 250_000), dict(padding=15))),
    _row("f", "volume3d",
         full=("3-D 1x64x64x64, k3 p1", (1, 1, 3, 3, 3), (1, 64, 64, 64), dict(padding=1)),
         quick=("3-D 1x16x16x16, k3 p1", (1, 1, 3, 3, 3), (1, 16, 16, 16), dict(padding=1)),
         asv=("3-D 1x32x32x32, k3 p1", (1, 1, 3, 3, 3), (1, 32, 32, 32), dict(padding=1))),
    _row("g", "upsample", transposed=True,
         full=("transposed 64x28x28, 64->32, k4 s2 p1", (64, 32, 4, 4), (64, 28, 28),
               dict(stride=2, padding=1)),
         quick=("transposed 16x14x14, 16->8, k4 s2 p1", (16, 8, 4, 4), (16, 14, 14),
                dict(stride=2, padding=1)),
         asv=("transposed 64x14x14, 64->32, k4 s2 p1", (64, 32, 4, 4), (64, 14, 14),
              dict(stride=2, padding=1))),
]

CONFIGS = [row.full for row in TABLE]
QUICK_CONFIGS = [row.quick for row in TABLE]
ASV_CONFIGS = {row.asv_name: row.asv for row in TABLE}


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_Item = TypeVar("_Item", bound=_Named)


def select(configs: list[_Item], names) -> list[_Item]:
    """The configurations called ``names`` (all when None); ValueError naming unknown ones."""
    if not names:
        return list(configs)
    known = [c.name for c in configs]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {known}")
    return [c for c in configs if c.name in names]
