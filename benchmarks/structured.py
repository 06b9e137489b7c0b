"""The structured form on layer kinds beyond the shared table, against the GEMM floor.

The table's channel layers (b), (c), (g) are a stem, a 56x56 residual layer
and a small transposed one; networks also have deep layers on small images,
1x1 layers and strided ones, whose products take other paths (pieces by
output channels, the output written in place, im2col with a stride).
``time_*`` are the products; ``track_*_over_gemm`` their time over the
layer's flops as one GEMM at this machine's BLAS rate, measured in the same
call (the floor a product that runs them through numpy's BLAS cannot beat):
a step in it is a change of the product, whatever the machine's speed.
"""

import numpy as np

from .common import cpu_count

try:
    from sparse_tconv import ConvOperator, ConvTransposeOperator
    from sparse_tconv.tools.timing import best_time, measure_layer_gemm
except ImportError:  # a commit before the GEMM floor: skipped
    best_time = measure_layer_gemm = None

# name: (transposed, weight shape, input shape, settings)
LAYERS = {
    "deep 256->256 k3 14x14": (False, (256, 256, 3, 3), (256, 14, 14), dict(padding=1)),
    "1x1 64->64 56x56": (False, (64, 64, 1, 1), (64, 56, 56), {}),
    "strided 64->128 k3 s2 56x56": (False, (128, 64, 3, 3), (64, 56, 56),
                                    dict(stride=2, padding=1)),
    "transposed 128->64 k4 s2 14x14": (True, (128, 64, 4, 4), (128, 14, 14),
                                       dict(stride=2, padding=1)),
}


class StructuredLayers:
    params = [list(LAYERS), ["float64", "float32"]]
    param_names = ["layer", "dtype"]
    timeout = 120

    def setup(self, layer, dtype):
        if measure_layer_gemm is None:
            raise NotImplementedError("this commit has no GEMM floor")
        transposed, weight_shape, input_shape, settings = LAYERS[layer]
        rng = np.random.default_rng(11)
        weight = rng.standard_normal(weight_shape).astype(dtype)
        cls = ConvTransposeOperator if transposed else ConvOperator
        self.op = cls(weight, input_shape, threads=min(2, cpu_count()), **settings)
        if self.op.product_form.name != "structured":
            raise NotImplementedError("not a structured layer at this commit")
        self.x = rng.standard_normal(self.op.shape[1]).astype(dtype)
        self.y = rng.standard_normal(self.op.shape[0]).astype(dtype)
        self.op.rmatvec(self.y)  # the transposed product's blocks, outside the timings
        self.geometry = self.op.convolution.geometry
        self.dtype = np.dtype(dtype)

    def time_matvec(self, layer, dtype):
        self.op.matvec(self.x)

    def time_rmatvec(self, layer, dtype):
        self.op.rmatvec(self.y)

    def _over_gemm(self, product):
        threads = min(2, cpu_count())
        return best_time(product, 5) / measure_layer_gemm(self.geometry, self.dtype, threads)

    def track_matvec_over_gemm(self, layer, dtype):
        return self._over_gemm(lambda: self.op.matvec(self.x))

    def track_rmatvec_over_gemm(self, layer, dtype):
        return self._over_gemm(lambda: self.op.rmatvec(self.y))

    track_matvec_over_gemm.unit = "ratio"
    track_rmatvec_over_gemm.unit = "ratio"
