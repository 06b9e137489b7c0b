"""Direct convolution kernels on the same geometries, and their time over the CSR product."""

import math

import numpy as np

from .common import GEOMETRIES, best_time, config, make

try:
    from sparse_tconv import direct
except ImportError:
    direct = None

# The naive kernel is a Python loop over output positions.
_NAIVE_MAX_POSITIONS = 4096


class DirectKernels:
    params = [list(GEOMETRIES), ["naive", "fast", "fft"]]
    param_names = ["geometry", "method"]
    timeout = 180

    def setup(self, geometry, method):
        weight, op, _, _ = make(geometry)
        if method == "naive" and math.prod(op.output_shape[1:]) > _NAIVE_MAX_POSITIONS:
            raise NotImplementedError("the naive loop is for small sizes only")
        cfg = config(geometry)
        kwargs = cfg.kwargs
        kernel = direct.conv_transpose if cfg.transposed else direct.conv
        sample = np.random.default_rng(3).standard_normal(op.input_shape)
        self.run = lambda: kernel(sample, weight, method=method, **kwargs)
        flat = sample.ravel()
        self.csr = lambda: op.matvec(flat)

    def time_conv(self, geometry, method):
        self.run()

    def track_time_over_csr(self, geometry, method):
        # > 1: the threaded CSR product W @ x is faster than this kernel.
        return best_time(self.run, 3, min_time=0) / best_time(self.csr, 3, min_time=0)

    track_time_over_csr.unit = "ratio"
