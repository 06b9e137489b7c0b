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

__all__ = ["one_blas_thread"]

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
