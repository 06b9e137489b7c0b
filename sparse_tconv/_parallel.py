"""Thread settings and the persistent thread pool shared by builders and products.

numpy's copy/ufunc loops and scipy's CSR kernels release the GIL, so plain
Python threads use every core without any new dependency.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from ._validation import check_int

__all__ = ["get_num_threads", "set_num_threads", "resolve_threads", "run_parallel", "MAX_THREADS",
           "balanced_ranges", "even_ranges", "SCATTER_PARTS", "SCATTER_PART_NNZ",
           "scatter_parts", "disjoint_phases", "run_phases"]

ENV_VAR = "SPARSE_TCONV_NUM_THREADS"

# The most threads a setting may ask for: a product starts up to one thread per
# part of its rows, and each holds about 1 MB (measured: 10**9 requested, 1,670
# started on a 300x300 layer, 1.8 GB resident), far past any speed-up.
MAX_THREADS = 1024

# Below this many stored entries a product runs on one thread: handing work
# to a pool thread costs about 0.1 ms on the project's 2-core VMs (wake-up and
# GIL hand-off), which a product of ~500 k entries takes alone (measured with
# 4->4 channel 5x5 and 1-channel convolutions: 2 threads lose below 400 k
# entries and win from about 900 k).
MIN_PARALLEL_NNZ = 1 << 19

# The number of parts a scatter product (a stored matrix's transpose times a
# vector, on the matrix's own arrays) is cut into, whatever the number of
# threads: the parts, hence the order in which each output element is summed,
# depend on the matrix alone.  At most SCATTER_PARTS (enough to keep 8 threads
# busy in each of two phases, see disjoint_phases), with at least
# SCATTER_PART_NNZ entries each (what is worth a thread, as MIN_PARALLEL_NNZ):
# a part costs some 20-30 us of numpy and kernel calls.
SCATTER_PARTS = 32
SCATTER_PART_NNZ = 1 << 19


def scatter_parts(nnz: int) -> int:
    """How many parts a scatter product over ``nnz`` entries is cut into (not a thread count)."""
    return max(1, min(SCATTER_PARTS, nnz // max(1, SCATTER_PART_NNZ)))

_setting: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Number of threads sparse_tconv uses when ``threads=None``.

    Resolved in this order: the value given to :func:`set_num_threads`; the
    environment variable ``SPARSE_TCONV_NUM_THREADS``; the number of CPUs this
    process may run on.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    ValueError
        If ``SPARSE_TCONV_NUM_THREADS`` is set but is not a positive integer.

    Examples
    --------
    >>> import sparse_tconv
    >>> sparse_tconv.get_num_threads() >= 1
    True
    """
    if _setting is not None:
        return _setting
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if not 1 <= value <= MAX_THREADS:
            raise ValueError(f"{ENV_VAR} must be a positive integer, at most {MAX_THREADS}, "
                             f"got {ENV_VAR}={env!r}")
        return value
    return min(_cpu_count(), MAX_THREADS)


def set_num_threads(threads: int | None) -> None:
    """Set the default number of threads (``None`` restores the default).

    Applies to building matrices and to the products of operators created with
    ``threads=None``.  Results do not depend on the number of threads: every
    output row is computed by the same serial kernel.

    Parameters
    ----------
    threads : int or None
        A number of threads from 1 to 1024, or ``None`` to fall back to
        ``SPARSE_TCONV_NUM_THREADS`` or the CPU count.

    Raises
    ------
    TypeError, ValueError
        If ``threads`` is not ``None`` or an int from 1 to 1024.

    Examples
    --------
    >>> import sparse_tconv
    >>> sparse_tconv.set_num_threads(1)
    >>> sparse_tconv.get_num_threads()
    1
    >>> sparse_tconv.set_num_threads(None)
    """
    global _setting
    _setting = None if threads is None else resolve_threads(threads)


def resolve_threads(threads) -> int:
    """Validate a ``threads=`` argument; ``None`` means :func:`get_num_threads`."""
    if threads is None:
        return get_num_threads()
    threads = check_int(threads, "threads")
    if threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got threads={threads}")
    if threads > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS} (each one is an OS thread "
                         f"with its own stack), got threads={threads}")
    return threads


def _get_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of at least ``threads`` workers.

    A smaller pool is replaced, never shut down: a product on another thread
    may still be submitting to it (a shut-down executor refuses new work).
    Its workers exit once the last caller drops it (an executor's workers
    stop when it is garbage collected).
    """
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparse_tconv")
            _pool_size = threads
        return _pool


def _forget_pool_in_child() -> None:
    """After ``fork``: the child has none of the parent's pool threads.

    The inherited executor would count workers that do not exist in the
    child and wait for them for ever; the child starts a pool of its own.
    """
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run_all(func, items) -> None:
    for item in items:
        func(item)


def run_parallel(func, items, threads: int) -> None:
    """Call ``func(item)`` for every item, on at most ``threads`` threads.

    Items are dealt round-robin into ``threads`` shares; the calling thread
    runs the first share itself, pool workers the others.
    """
    items = list(items)
    threads = min(threads, len(items))
    if threads <= 1:
        _run_all(func, items)
        return
    pool = _get_pool(threads - 1)
    futures = [pool.submit(_run_all, func, items[i::threads]) for i in range(1, threads)]
    try:
        _run_all(func, items[0::threads])
    finally:  # never return while a worker may still be writing
        wait(futures)
    for future in futures:
        future.result()


def balanced_ranges(indptr, parts: int) -> list[tuple[int, int]]:
    """Split the rows of a compressed matrix into ``parts`` contiguous ranges of equal work.

    ``indptr`` is the CSR (or BSR) row pointer: each range holds about the
    same number of stored entries (blocks).  Empty ranges are dropped.
    """
    total, n_rows = int(indptr[-1]), len(indptr) - 1
    targets = total * np.arange(1, parts, dtype=np.int64) // parts
    cuts = [0, *np.searchsorted(indptr, targets).tolist(), n_rows]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``parts`` contiguous ranges of equal length (±1).

    Empty ranges are dropped.
    """
    cuts = np.linspace(0, n, max(1, parts) + 1).astype(int)
    return [(a, b) for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()) if b > a]


def disjoint_phases(spans) -> list[list[int]]:
    """Deal parts into phases whose parts write disjoint ranges of the output.

    ``spans[k] = (lo, hi)`` is the half-open range of output elements part
    ``k`` adds into (``lo >= hi``: none).  Each part goes, in order, to the
    first phase none of whose parts it overlaps.  Running the phases one
    after the other, the parts of a phase at once, adds into every element
    in an order fixed by the spans alone: the result does not depend on the
    number of threads.  Parts of a convolution write overlapping ranges only
    near their ends, so there are two phases, or a few more where circular
    padding wraps a part's range round.
    """
    phases: list[list[int]] = []
    taken: list[list[tuple[int, int]]] = []
    for k, (lo, hi) in enumerate(spans):
        for phase, ranges in zip(phases, taken):
            if all(hi <= a or b <= lo for a, b in ranges) or hi <= lo:
                phase.append(k)
                ranges.append((lo, hi))
                break
        else:
            phases.append([k])
            taken.append([(lo, hi)])
    return phases


def run_phases(func, phases, threads: int) -> None:
    """``func(part)`` for every part of every phase: the phases in order, each on ``threads``."""
    for phase in phases:
        run_parallel(func, phase, threads)
