"""The operator's products against the sparse-product peers on the same matrix, as ratios.

``track_over_operator`` is a peer's best time over the operator's same
product, both timed in the same call, in alternating rounds (above 1: the
operator is ahead), so that a change of the operator or of a peer shows as a
step in the ratio whatever the machine's speed that day.  ``float32`` is the other way round:
the operator's float64 product over its float32 one (its speed-up).  A peer
that is not installed, or whose geometry does not apply, is skipped.
"""

import numpy as np

from .common import GEOMETRIES, config, make

try:
    from sparse_tconv.tools import compare
    from sparse_tconv.tools.timing import paired_stats
except ImportError:  # a commit before the peers: skipped
    compare = paired_stats = None

PEERS = ["scipy_serial", "torch_csr", "torch_csr_transpose", "sparse_convolution", "float32"]


class SparsePeers:
    params = [list(GEOMETRIES), PEERS]
    param_names = ["geometry", "peer"]
    timeout = 180

    def setup(self, geometry, peer):
        if compare is None:
            raise NotImplementedError("this commit has no sparse_tconv.tools.compare peers")
        installed = compare.available_peers()[0]
        weight, op, x, y = make(geometry)
        own = lambda: op.matvec(x)  # noqa: E731
        if peer == "scipy_serial":
            W = op.matrix
            other = lambda: W @ x  # noqa: E731
        elif peer.startswith("torch_csr"):
            if "torch" not in installed:
                raise NotImplementedError("torch not installed")
            forward, backward, _ = compare.torch_csr_products(installed["torch"], op.matrix)
            other = lambda: forward(x)  # noqa: E731
            if peer == "torch_csr_transpose":
                # the CSR of W.T, built as a user would (W.T.tocsr()), against rmatvec
                op.rmatvec(y)
                other, own = (lambda: backward(y)), (lambda: op.rmatvec(y))
        elif peer == "sparse_convolution":
            if "sparse_convolution" not in installed:
                raise NotImplementedError("sparse_convolution not installed")
            found = compare.spconv_peer(installed["sparse_convolution"], config(geometry),
                                        weight, op, x)
            if isinstance(found, str):
                raise NotImplementedError(found)
            other = found[2]
        else:  # float32: the operator's float64 product over its float32 one
            op32 = config(geometry).operator(weight.astype(np.float32))
            x32 = x.astype(np.float32)
            other, own = own, (lambda: op32.matvec(x32))
        self.other, self.own = other, own

    def track_over_operator(self, geometry, peer):
        # in alternating rounds: both see the same load on a shared machine
        other, own = paired_stats([self.other, self.own], 3)
        return other.min / own.min

    track_over_operator.unit = "ratio"
