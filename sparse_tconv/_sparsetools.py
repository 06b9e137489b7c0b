"""scipy's private serial sparse kernels, imported in one place.

``scipy.sparse._sparsetools`` is private: a release may move or drop a
kernel.  Each name here is the kernel, or ``None`` when this scipy lacks it;
callers then fall back to scipy's public product (``matrix @ x``, one
thread).  Read them as attributes of this module at call time
(``_sparsetools.csr_matvec``), so that a test can take one away.

The kernels add into their output array and release the GIL, which is what
lets plain Python threads run them on disjoint row ranges at once.
"""

from __future__ import annotations

import importlib

__all__ = ["csr_matvec", "csr_matvecs", "csc_matvec", "csc_matvecs", "dia_matvec",
           "csr_matmat_maxnnz"]


def _kernel(name: str):
    try:
        module = importlib.import_module("scipy.sparse._sparsetools")
    except ImportError:  # pragma: no cover - depends on the scipy release
        return None
    return getattr(module, name, None)


csr_matvec = _kernel("csr_matvec")
csr_matvecs = _kernel("csr_matvecs")
# The scatters ``y[Ai[k]] += Ax[k] * x[j]`` (csc_matvecs: a row of n_vecs per entry): the
# transposed products of a stored matrix on its own arrays (keep_transpose=False).
csc_matvec = _kernel("csc_matvec")
csc_matvecs = _kernel("csc_matvecs")
dia_matvec = _kernel("dia_matvec")
# The symbolic pass of a sparse product: its exact nnz in O(rows) memory.
csr_matmat_maxnnz = _kernel("csr_matmat_maxnnz")
