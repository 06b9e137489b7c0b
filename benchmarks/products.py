"""Products with W: matvec, rmatvec (the transposed convolution) and matmat, per thread count."""

import numpy as np

from .common import GEOMETRIES, cpu_count, make


class Products:
    params = [list(GEOMETRIES), [1, 2]]
    param_names = ["geometry", "threads"]
    timeout = 120

    def setup(self, geometry, threads):
        if threads > cpu_count():
            raise NotImplementedError("more threads than CPUs")
        _, self.op, self.x, self.y = make(geometry, threads=threads)
        self.op.rmatvec(self.y)  # builds the transposed matrix here, not inside time_rmatvec
        _ = self.op.matrix  # the canonical CSR (built on request) for scipy's baseline
        self.X = np.random.default_rng(7).standard_normal((self.op.shape[1], 8))

    def time_matvec(self, geometry, threads):
        self.op.matvec(self.x)

    def time_rmatvec(self, geometry, threads):
        self.op.rmatvec(self.y)

    def time_matmat(self, geometry, threads):
        self.op.matmat(self.X)

    def time_scipy_matvec(self, geometry, threads):
        # scipy's own serial product on the same matrix: the baseline of the speed-up.
        self.op.matrix @ self.x
