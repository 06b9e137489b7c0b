"""One BLAS thread while the library's own threads run GEMMs.

The structured product form (:mod:`._forms.structured`) cuts a product into
tiles and multiplies them on the library's threads, one GEMM per tile
(numpy's ``matmul``).  OpenBLAS, numpy's BLAS, would run each of those GEMMs
on all its threads as well: two tiles at once then contend for the same
cores (measured on a 64->64 3x3 layer at 56², 2 cores: 4.3 ms against 3.0 ms
with one BLAS thread), and the ``threads`` setting would not say how many
cores a product uses.  :func:`one_blas_thread` sets OpenBLAS to one thread
while the tiles run and restores it after.

numpy exposes no such setting, so the OpenBLAS libraries loaded in the
process are found in ``/proc/self/maps`` and called through ``ctypes``, as
threadpoolctl does (not a dependency).  Elsewhere (another BLAS, another
system) nothing is changed: the products are the same, only slower when
both BLAS and the library thread.  The setting is process-wide: nested and
concurrent products share one count, and the last to finish restores the
value found by the first.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["one_blas_thread", "panel_gemm", "panel_gemm_available", "PanelGemms"]

# (get, set) symbol names: scipy-openblas (numpy's and scipy's wheels, 64- and
# 32-bit integers) and a plain OpenBLAS
_SYMBOLS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]

_lock = threading.Lock()
_users = 0
_saved: list[tuple[Any, int]] = []
_controls: list[tuple[Any, Any]] | None = None


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _find_controls() -> list[tuple[Any, Any]]:
    """(get, set) functions of every OpenBLAS loaded now (numpy's is loaded with numpy)."""
    controls = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                controls.append((get, set_))
                break
    return controls


@contextlib.contextmanager
def one_blas_thread(active: bool = True) -> Iterator[None]:
    """OpenBLAS on one thread inside the block (nothing when ``active`` is False)."""
    global _users, _controls
    if not active:
        yield
        return
    with _lock:
        if _controls is None:
            _controls = _find_controls()
        if _users == 0:
            _saved[:] = [(set_, get()) for get, set_ in _controls]
            for set_, threads in _saved:
                if threads != 1:
                    set_(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for set_, threads in _saved:
                    if threads != 1:
                        set_(threads)


# --- GEMMs on strided panels -----------------------------------------------
#
# numpy's ``matmul`` multiplies whole arrays.  The structured form's implicit
# GEMMs (:mod:`._forms.structured`) multiply a weight block by a *panel* of
# a flat frame: ``n`` consecutive columns starting at any offset, with the
# frame's own row length as leading dimension, and add the product onto the
# result (``beta = 1``).  That is BLAS's ``gemm`` as written, which scipy
# exports to compiled code as ``scipy.linalg.cython_blas`` (capsules of
# function pointers, on every platform scipy supports); they are called here
# through ``ctypes``, which releases the GIL for the call.

_GEMM_NAMES = {"f": "sgemm", "d": "dgemm", "F": "cgemm", "D": "zgemm"}
_SCALARS = {"f": ctypes.c_float, "d": ctypes.c_double,
            "F": ctypes.c_float * 2, "D": ctypes.c_double * 2}
_gemms: dict[str, Any] = {}
_INT_MAX = 2**31 - 1  # cython_blas takes C ints


def _capsule_pointer(capsule) -> int:
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


def _load_gemm(char: str):
    try:
        from scipy.linalg import cython_blas
        capsules: Any = cython_blas.__pyx_capi__
        capsule = capsules[_GEMM_NAMES[char]]
        pointer = _capsule_pointer(capsule)
    except Exception:  # noqa: BLE001 - any failure: no panel GEMMs, numpy's path instead
        return None
    p = ctypes.POINTER
    scalar: Any = _SCALARS[char]
    prototype = ctypes.CFUNCTYPE(
        None, p(ctypes.c_char), p(ctypes.c_char), p(ctypes.c_int), p(ctypes.c_int),
        p(ctypes.c_int), p(scalar), ctypes.c_void_p, p(ctypes.c_int), ctypes.c_void_p,
        p(ctypes.c_int), p(scalar), ctypes.c_void_p, p(ctypes.c_int))
    return prototype(pointer), scalar


def panel_gemm_available(dtype) -> bool:
    """Whether :func:`panel_gemm` runs for ``dtype`` (float32/64, complex64/128)."""
    global _controls
    char = getattr(dtype, "char", None)
    if char not in _GEMM_NAMES:
        return False
    if char not in _gemms:
        _gemms[char] = _load_gemm(char)
        with _lock:  # the BLAS behind the capsules may be newly loaded: find it again
            if _users == 0:
                _controls = None
    return _gemms[char] is not None


def panel_gemm(a, b, b_offset: int, ldb: int, c, c_offset: int, ldc: int, n: int,
               accumulate: bool) -> None:
    """``C[:, :n] (+)= a @ B[:, :n]`` on panels of flat row-major arrays, in place.

    ``a`` is a C-contiguous ``(m, k)`` array; ``B`` is the ``(k, n)`` panel
    of ``b`` whose element ``(i, j)`` is ``b.flat[b_offset + i * ldb + j]``,
    and ``C`` the ``(m, n)`` panel of ``c`` at ``c_offset`` with rows
    ``ldc`` apart (``b``, ``c`` C-contiguous, of ``a``'s dtype, which
    :func:`panel_gemm_available` accepts).  With ``accumulate`` the product
    is added onto ``C``, else it replaces it.  (:class:`PanelGemms` makes
    many calls of one shape.)
    """
    m, k = a.shape
    size = a.dtype.itemsize
    gemms = PanelGemms(a.dtype, m, k, ldb, ldc, n)
    gemms(a.ctypes.data, b.ctypes.data + b_offset * size, c.ctypes.data + c_offset * size,
          accumulate)


class PanelGemms:
    """Panel GEMMs of one shape (see :func:`panel_gemm`), on addresses.

    ``gemms(a, b, c, accumulate)`` runs ``C (+)= A @ B`` for the ``(m, k)``
    C-contiguous ``A`` at address ``a``, the ``(k, n)`` panel ``B`` at ``b``
    (rows ``ldb`` elements apart) and the ``(m, n)`` panel ``C`` at ``c``
    (rows ``ldc`` apart), in ``dtype``.  The call's constant arguments are
    made once: a call through ``ctypes`` that builds them takes some 7 us, as
    long as the GEMM of a 64x64 block by a few dozen columns.  A row-major
    product is the column-major ``C.T = B.T A.T``: BLAS is called with the
    operands swapped.  The caller keeps the arrays alive during the call.
    """

    __slots__ = ("_function", "_head", "_ldb", "_lda", "_betas", "_ldc", "_kept")

    def __init__(self, dtype, m: int, k: int, ldb: int, ldc: int, n: int):
        function, scalar = _gemms[dtype.char]
        complex_ = dtype.kind == "c"
        one, zero = (scalar(1, 0), scalar(0, 0)) if complex_ else (scalar(1), scalar(0))
        no = ctypes.c_char(b"N")
        n_, m_, k_, ldb_, ldc_ = (ctypes.c_int(v) for v in (n, m, k, ldb, ldc))
        self._kept = (one, zero, no, n_, m_, k_, ldb_, ldc_)  # alive while referenced
        r = ctypes.byref
        self._function = function
        self._head = (r(no), r(no), r(n_), r(m_), r(k_), r(one))
        self._ldb, self._lda, self._ldc = r(ldb_), r(k_), r(ldc_)
        self._betas = (r(zero), r(one))

    def __call__(self, a: int, b: int, c: int, accumulate: bool) -> None:
        self._function(*self._head, b, self._ldb, a, self._lda, self._betas[accumulate], c,
                       self._ldc)
