"""Building W: time, peak memory and size, per geometry."""

import numpy as np

from .common import GEOMETRIES, config, make


class Build:
    params = [list(GEOMETRIES)]
    param_names = ["geometry"]
    timeout = 120

    def setup(self, geometry):
        self.weight, self.op, _, _ = make(geometry)
        self.build = config(geometry).build
        self.new_operator = config(geometry).operator
        self.new_weight = np.random.default_rng(5).standard_normal(self.weight.shape)

    def time_build(self, geometry):
        self.build(self.weight)

    def peakmem_build(self, geometry):
        self.build(self.weight)

    def time_operator(self, geometry):
        # what an operator builds for its products: the weight (structured), diagonals or the CSR
        self.new_operator(self.weight)

    def time_with_weight(self, geometry):
        self.op.with_weight(self.new_weight)

    def track_nnz(self, geometry):
        return self.op.matrix.nnz

    track_nnz.unit = "entries"

    def track_matrix_megabytes(self, geometry):
        W = self.op.matrix
        return (W.data.nbytes + W.indices.nbytes + W.indptr.nbytes) / 1e6

    track_matrix_megabytes.unit = "MB"
