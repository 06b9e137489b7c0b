"""The geometries of the asv benchmarks: the asv sizes of sparse_tconv.tools.configs.

Sizes are a fraction of the performance work's configurations so that a
full ``asv run`` stays within minutes on two cores.
"""

import numpy as np

try:
    from sparse_tconv.tools.configs import ASV_CONFIGS
    from sparse_tconv.tools.timing import best_time, cpu_count
except ImportError:  # asv imports this file in its own environment to discover benchmarks,
    # and an older commit may predate the shared table: its benchmarks are skipped.
    ASV_CONFIGS, best_time, cpu_count = {}, None, None

GEOMETRIES = list(ASV_CONFIGS) or ["chapter"]


def config(name):
    if not ASV_CONFIGS:
        raise NotImplementedError("this commit has no sparse_tconv.tools.configs")
    return ASV_CONFIGS[name]


def make(name, threads=None):
    """Seeded weight, operator, an input and an output vector for a geometry."""
    cfg = config(name)
    rng = np.random.default_rng(1234)
    weight = rng.standard_normal(cfg.weight_shape)
    op = cfg.operator(weight, threads=threads)
    x = rng.standard_normal(op.shape[1])
    y = rng.standard_normal(op.shape[0])
    return weight, op, x, y
