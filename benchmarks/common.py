"""Geometries shared by the asv benchmarks.

Sizes are a fraction of the performance issue's configurations so that a
full ``asv run`` stays within minutes on two cores.
"""

import os

import numpy as np

try:
    import sparse_tconv
except ImportError:  # asv imports this file in its own environment to discover benchmarks
    sparse_tconv = None

# name: (weight shape, input shape, keywords, transposed)
GEOMETRIES = {
    "chapter": ((20, 10, 5, 5), (10, 16, 16), dict(stride=3, padding=2), False),
    "stem": ((64, 3, 7, 7), (3, 112, 112), dict(stride=2, padding=3), False),
    "resblock": ((64, 64, 3, 3), (64, 28, 28), dict(padding=1), False),
    "blur": ((1, 1, 9, 9), (1, 256, 256), dict(padding=4), False),
    "signal1d": ((1, 1, 31), (1, 250_000), dict(padding=15), False),
    "volume3d": ((1, 1, 3, 3, 3), (1, 32, 32, 32), dict(padding=1), False),
    "upsample": ((64, 32, 4, 4), (64, 14, 14), dict(stride=2, padding=1), True),
}


def n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make(name, threads=None):
    """Seeded weight, operator, an input and an output vector for a geometry."""
    weight_shape, input_shape, kwargs, transposed = GEOMETRIES[name]
    rng = np.random.default_rng(1234)
    weight = rng.standard_normal(weight_shape)
    cls = sparse_tconv.ConvTransposeOperator if transposed else sparse_tconv.ConvOperator
    op = cls(weight, input_shape, threads=threads, **kwargs)
    x = rng.standard_normal(op.shape[1])
    y = rng.standard_normal(op.shape[0])
    return weight, op, x, y


def builder(name):
    weight_shape, input_shape, kwargs, transposed = GEOMETRIES[name]
    build = sparse_tconv.conv_transpose_matrix if transposed else sparse_tconv.conv_matrix
    return lambda weight: build(weight, input_shape, **kwargs)


def operator_builder(name):
    weight_shape, input_shape, kwargs, transposed = GEOMETRIES[name]
    cls = sparse_tconv.ConvTransposeOperator if transposed else sparse_tconv.ConvOperator
    return lambda weight: cls(weight, input_shape, **kwargs)
