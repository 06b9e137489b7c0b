"""sparse_tconv: any convolution as an explicit sparse matrix.

``conv_matrix`` builds the CSR matrix W of an N-d, multi-channel convolution
(PyTorch semantics); convolution is ``W @ x`` and transposed convolution
``W.T @ y``.  ``ConvOperator`` and ``ConvTransposeOperator`` serve both as
``scipy.sparse.linalg.LinearOperator`` objects with threaded products;
``save_operator`` / ``load_operator`` keep one in a file that
``scipy.sparse.load_npz`` also reads, and ``to_torch`` / ``from_torch_sparse``
exchange matrices with PyTorch.

Submodules: :mod:`sparse_tconv.direct` (direct convolution kernels),
:mod:`sparse_tconv.spectral` (singular values, certified norm bounds, Gram
matrices, composition), :mod:`sparse_tconv.solvers` (Tikhonov deconvolution
and preconditioners), :mod:`sparse_tconv.testing` (dot test, reference
check).
"""

# Public submodules: direct kernels, spectra and norms, solvers, test helpers.
# (re-exported by the redundant aliases, outside __all__: names, not functions)
from . import direct as direct
from . import solvers as solvers
from . import spectral as spectral
from . import testing as testing
from ._build import conv_matrix, conv_transpose_matrix
from ._geometry import (
    ConvMatrixSize,
    Convolution,
    conv_matrix_nnz,
    conv_output_shape,
    conv_transpose_matrix_nnz,
    conv_transpose_output_shape,
)
from ._io import load_operator, save_operator
from ._operator import ConvOperator, ConvTransposeOperator, ProductFormInfo
from ._parallel import get_num_threads, set_num_threads
from ._torch import from_torch, from_torch_sparse, to_torch
from ._version import __version__ as __version__

__all__ = [
    "conv_matrix",
    "conv_transpose_matrix",
    "conv_output_shape",
    "conv_transpose_output_shape",
    "conv_matrix_nnz",
    "conv_transpose_matrix_nnz",
    "ConvMatrixSize",
    "ConvOperator",
    "ConvTransposeOperator",
    "ProductFormInfo",
    "Convolution",
    "get_num_threads",
    "set_num_threads",
    "from_torch",
    "to_torch",
    "from_torch_sparse",
    "save_operator",
    "load_operator",
]
