"""Certified norm bounds: time, and the interval's relative width, per layer."""

import warnings

try:
    from sparse_tconv.spectral import norm_bounds
    from sparse_tconv.tools.norm_bench import LAYERS
except ImportError:  # a commit before norm_bounds: skipped
    norm_bounds, LAYERS = None, []

_NAMES = ["s2", "small", "grp", "1d", "circ"]
_BY_NAME = {layer.name: layer for layer in LAYERS}


class NormBounds:
    params = [_NAMES]
    param_names = ["layer"]
    timeout = 120

    def setup(self, layer):
        if layer not in _BY_NAME:
            raise NotImplementedError("norm_bounds is not in this commit")
        self.op = _BY_NAME[layer].operator()

    def _bounds(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return norm_bounds(self.op)

    def time_norm_bounds(self, layer):
        self._bounds()

    def track_gap_percent(self, layer):
        return 100 * self._bounds().gap

    track_gap_percent.unit = "%"
