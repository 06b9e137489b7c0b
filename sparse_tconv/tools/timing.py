"""Timing and the machine's physical limits, measured in the run they are compared in.

Every figure of the benchmarks is a ratio within one run (the machines are
shared and noisy): a product against scipy's on the same matrix, or against
what this machine's memory or BLAS can do at best, measured here.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from typing import NamedTuple

import numpy as np

from .. import _blas
from .._parallel import run_parallel

__all__ = [
    "cpu_count",
    "Timing",
    "time_stats",
    "paired_stats",
    "best_time",
    "measure_bandwidth",
    "settle",
    "measure_fresh_write",
    "measure_block_gemm_rate",
    "measure_layer_gemm",
]


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Timing(NamedTuple):
    """Seconds per call over the rounds of one measurement: best, median, worst."""

    min: float
    median: float
    max: float
    rounds: int

    @property
    def spread(self) -> float:
        """Median over best: 1.0 when every round took the same time."""
        return self.median / self.min if self.min > 0 else math.nan


def time_stats(func, repeat: int = 5, min_time: float = 0.05) -> Timing:
    """Wall time of ``func()`` in seconds over ``repeat`` rounds: min, median, max.

    A round calls ``func`` enough times to last ``min_time``, so that very
    short calls are not dominated by the timer.  The minimum is the figure
    to compare (the least disturbed round); the median beside it shows how
    much the machine varied during the measurement.
    """
    func()  # warm up: first-touch page faults, lazy imports
    number = 1
    start = time.perf_counter()
    func()
    once = time.perf_counter() - start
    if once < min_time:
        number = max(1, int(min_time / max(once, 1e-9)))
    rounds = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for _ in range(number):
            func()
        rounds.append((time.perf_counter() - start) / number)
    return Timing(min(rounds), float(np.median(rounds)), max(rounds), len(rounds))


# How long each function of paired_stats runs untimed before its timed calls in
# a round: what ran before it may still hold a core.  torch's OpenMP threads
# spin for some milliseconds after each of its parallel products (GNU OpenMP's
# default wait policy): the 64->64 3x3 layer's product at 56x56 took 5.4 ms
# right after torch's, 2.8 ms next, 2.6 ms from then on (medians of 30).
_SETTLE_S = 0.01


def paired_stats(funcs, repeat: int = 5, min_time: float = 0.05) -> list[Timing]:
    """:func:`time_stats` of several functions measured in alternating rounds.

    Round after round each function runs once in turn, so that the ratio of
    two of them compares calls made under the same conditions: on a shared
    machine the load changes from second to second, and two functions timed
    one after the other can see different machines.  In each round a
    function first runs untimed for ``_SETTLE_S`` (the previous one's threads
    may still be spinning), then its timed calls: each is timed in its own
    steady state.
    """
    numbers = []
    for func in funcs:
        func()  # warm up
        start = time.perf_counter()
        func()
        once = time.perf_counter() - start
        numbers.append(max(1, int(min_time / max(once, 1e-9))) if once < min_time else 1)
    rounds: list[list[float]] = [[] for _ in funcs]
    for _ in range(max(1, repeat)):
        for func, number, times in zip(funcs, numbers, rounds):
            _settle_into(func)
            start = time.perf_counter()
            for _ in range(number):
                func()
            times.append((time.perf_counter() - start) / number)
    return [Timing(min(t), float(np.median(t)), max(t), len(t)) for t in rounds]


def _settle_into(func) -> None:
    """``func()``, untimed, until ``_SETTLE_S`` has passed (at least once)."""
    end = time.perf_counter() + _SETTLE_S
    func()
    while time.perf_counter() < end:
        func()


def best_time(func, repeat: int = 5, min_time: float = 0.05) -> float:
    """Best wall time of ``func()`` in seconds, over ``repeat`` rounds (see :func:`time_stats`)."""
    return time_stats(func, repeat, min_time).min


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s: ``max`` over a large float64 array on ``threads`` threads.

    ``max`` is vectorised with no chain of dependent additions (a plain sum
    is limited by its add latency well below the memory speed on this kind
    of machine), so it runs at the memory's read speed: the bound for a sparse
    product, which reads each stored entry once.
    """
    chunks = np.array_split(np.ones(nbytes // 8), threads)
    return nbytes / best_time(lambda: run_parallel(np.max, chunks, threads), repeat)


def settle(seconds: float) -> None:
    """Let freed memory go back to the hypervisor before a 'cold' measurement.

    On these virtual machines the guest reports freed pages to the host
    (virtio-balloon free page reporting, after about two seconds); touching
    them again costs a host-side page fault, about 1 ns per byte, where
    reusing memory still held costs about 0.05.
    """
    gc.collect()
    time.sleep(seconds)


def measure_fresh_write(
    threads: int, nbytes: int = 1 << 30, repeat: int = 5, cold: bool = False,
    settle_s: float = 3.0,
) -> float:
    """Bytes/s written into newly allocated memory, page faults included.

    Building a matrix writes every byte of it into new memory, so
    ``matrix bytes / this`` is the floor of a build.  ``cold=True`` measures
    memory the guest has handed back to the host (see :func:`settle`), once.
    """
    n = nbytes // 8

    def write():
        array = np.empty(n)
        run_parallel(lambda part: part.fill(1.0), np.array_split(array, threads), threads)

    if cold:
        settle(settle_s)
        start = time.perf_counter()
        write()
        return nbytes / (time.perf_counter() - start)
    return nbytes / best_time(write, repeat, min_time=0)


def measure_block_gemm_rate(op, n_vecs: int, threads: int, blocks: int = 256) -> float:
    """Flop/s of numpy's ``matmul`` on stacks of the operator's blocks, on ``threads`` threads.

    The batched product is a sum of such products, so this bounds it from
    below: ``2 * nnz * n_vecs / rate`` seconds.  For an operator without
    products are sums of single entries the blocks are 1x1; the structured
    form's are its GEMMs' weight, ``(C_out/g) x (C_in/g * taps)``.
    """
    form = op.product_form
    r, c = (1, 1)
    if form.name == "structured":  # (its GEMMs are a tile's positions wide, times the columns)
        geom = op.convolution.geometry
        r = geom.out_channels // geom.groups
        c = geom.in_channels // geom.groups * math.prod(geom.kernel_size)
        n_vecs, blocks = max(n_vecs, 256), 16
    rng = np.random.default_rng(1)
    a = [rng.standard_normal((blocks, r, c)) for _ in range(threads)]
    b = [rng.standard_normal((blocks, c, n_vecs)) for _ in range(threads)]
    seconds = best_time(lambda: run_parallel(lambda i: np.matmul(a[i], b[i]), range(threads),
                                             threads), 5)
    return 2.0 * blocks * r * c * n_vecs * threads / seconds


# The most elements of the windows matrix measure_layer_gemm multiplies (a
# larger layer's GEMM is timed on this many columns and scaled: the rate of a
# GEMM this wide no longer grows with its width).
_LAYER_GEMM_ELEMENTS = 1 << 22


def measure_layer_gemm(geometry, dtype, threads: int) -> float:
    """Seconds of a layer's multiply-adds as one GEMM per group, BLAS on ``threads`` threads.

    ``(C_out/g) x (C_in/g * taps)`` weight times ``(C_in/g * taps) x
    positions`` windows, as numpy's ``matmul``, on data already in memory:
    the time a product that runs the layer's flops as GEMMs at this
    machine's best BLAS rate takes, with nothing gathered and nothing
    added: no product that multiplies every weight by every window through
    this BLAS (im2col, panels) can be faster.  OpenBLAS threads its GEMM itself here,
    unlike the structured form's products (one BLAS thread per tile, so that
    results do not depend on the thread count), which makes this a strict
    bound.  A wide layer's GEMM is timed on ``_LAYER_GEMM_ELEMENTS``
    elements of windows and scaled to all its positions.
    """
    g = geometry.groups
    rows = geometry.out_channels // g
    depth = geometry.in_channels // g * math.prod(geometry.kernel_size)
    positions = math.prod(geometry.output_size)
    width = max(1, min(positions, _LAYER_GEMM_ELEMENTS // (g * depth)))
    rng = np.random.default_rng(3)
    a = rng.standard_normal((g, rows, depth)).astype(dtype)
    b = rng.standard_normal((g, depth, width)).astype(dtype)
    out = np.empty((g, rows, width), dtype=dtype)
    with _blas_threads(threads):
        seconds = best_time(lambda: np.matmul(a, b, out=out), 5)
    return seconds * positions / width


@contextlib.contextmanager
def _blas_threads(threads: int):
    """Every loaded OpenBLAS on ``threads`` threads inside the block (restored after)."""
    controls = _blas._find_controls()
    saved = [(set_, get()) for get, set_ in controls]
    for set_, _ in saved:
        set_(threads)
    try:
        yield
    finally:
        for set_, before in saved:
            set_(before)
