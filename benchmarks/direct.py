"""Direct convolution kernels on the same geometries, and their time over the CSR product."""

import math
import time

import numpy as np

from .common import GEOMETRIES, make

try:
    from sparse_tconv import direct
except ImportError:
    direct = None

# The naive kernel is a Python loop over output positions.
_NAIVE_MAX_POSITIONS = 4096


def _best(func, repeat=5):
    func()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


class DirectKernels:
    params = [list(GEOMETRIES), ["naive", "fast", "fft"]]
    param_names = ["geometry", "method"]
    timeout = 180

    def setup(self, geometry, method):
        weight, op, _, _ = make(geometry)
        if method == "naive" and math.prod(op.output_shape[1:]) > _NAIVE_MAX_POSITIONS:
            raise NotImplementedError("the naive loop is for small sizes only")
        _, _, kwargs, transposed = GEOMETRIES[geometry]
        kernel = direct.conv_transpose if transposed else direct.conv
        sample = np.random.default_rng(3).standard_normal(op.input_shape)
        self.run = lambda: kernel(sample, weight, method=method, **kwargs)
        flat = sample.ravel()
        self.csr = lambda: op.matvec(flat)

    def time_conv(self, geometry, method):
        self.run()

    def track_time_over_csr(self, geometry, method):
        # > 1: the threaded CSR product W @ x is faster than this kernel.
        return _best(self.run, 3) / _best(self.csr, 3)

    track_time_over_csr.unit = "ratio"
