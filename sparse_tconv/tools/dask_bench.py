"""Distributed products against the local threaded ones, on the same geometry.

:func:`bench_distributed` times :class:`~sparse_tconv.distributed.DistributedConvOperator`
and :class:`~sparse_tconv.ConvOperator` side by side and counts the bytes a
product moves; :func:`format_distributed` prints the figures.  Needs the
optional extra ``dask``.
"""

from __future__ import annotations

import time

import numpy as np

from .. import ConvOperator
from .._validation import check_positive_int

__all__ = ["bench_distributed", "format_distributed"]


def _median_time(func, repeats: int) -> float:
    func()  # warm-up (first touch of the output, task prefixes known to the scheduler)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _loopback_bytes():
    """Bytes sent on the loopback interface so far (Linux), else None."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # transmit bytes
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def bench_distributed(
    weight_shape=(64, 64, 3, 3),
    input_shape=(64, 56, 56),
    *,
    client=None,
    n_blocks=None,
    repeats=5,
    threads=None,
    seed=0,
    **geometry,
) -> dict:
    """Time distributed and local ``matvec``/``rmatvec`` on one geometry.

    Parameters
    ----------
    weight_shape, input_shape : sequence of int
        The convolution (Conv layout), as for :func:`~sparse_tconv.conv_matrix`.
    client : distributed.Client, optional
        Default: a ``LocalCluster(n_workers=2, threads_per_worker=1)`` on
        127.0.0.1, started and closed here.
    n_blocks : int, optional
        As for :class:`~sparse_tconv.distributed.DistributedConvOperator`.
    repeats : int, optional
        Timed products per figure (the median is reported), after one warm-up.
    threads : int, optional
        Threads of the local operator (default: every CPU).
    seed : int, optional
        Seed of the random weight and vectors.
    **geometry
        stride, padding, dilation, groups, padding_mode.

    Returns
    -------
    dict
        ``nnz``, ``matrix_bytes``, ``n_workers``, ``n_blocks``; seconds
        ``local_build``, ``distributed_build``, ``local_matvec``,
        ``distributed_matvec``, ``local_rmatvec``, ``distributed_rmatvec``
        (``adjoint='reduce'``), ``distributed_rmatvec_transpose``
        (``adjoint='transpose'``, built for this figure), ``round_trip``
        (a product on a 1-row matrix: the fixed cost of one product);
        bytes ``sent``, ``received``, ``between_workers`` (per matvec, from
        :meth:`~sparse_tconv.distributed.DistributedConvOperator.bytes_per_product`)
        and ``loopback_matvec``/``loopback_rmatvec`` (every byte that crossed
        the loopback interface per product, protocol included, measured
        from ``/proc/net/dev`` when the cluster is local; None otherwise).

    Raises
    ------
    ImportError
        Without dask.distributed.
    """
    from ..distributed import DistributedConvOperator, _import_distributed

    distributed = _import_distributed()
    repeats = check_positive_int(repeats, "repeats")
    own = None
    if client is None:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None,
        )
        own = (cluster, distributed.Client(cluster))
        client = own[1]
    try:
        weight = np.random.default_rng(seed).standard_normal(weight_shape)
        out = _side_by_side(weight, input_shape, client, n_blocks, threads, repeats, seed,
                            geometry)
        with DistributedConvOperator(weight, input_shape, client=client, n_blocks=n_blocks,
                                     adjoint="transpose", **geometry) as dist_t:
            y = np.random.default_rng(seed + 1).standard_normal(dist_t.shape[0])
            out["distributed_rmatvec_transpose"] = _median_time(lambda: dist_t.rmatvec(y),
                                                                repeats)
        with DistributedConvOperator(np.ones((1, 1, 1)), (1, 1), client=client,
                                     n_blocks=1) as tiny:
            one = np.ones(1)
            out["round_trip"] = _median_time(lambda: tiny.matvec(one), max(repeats, 10))
        return out
    finally:
        if own is not None:
            own[1].close()
            own[0].close()


def _side_by_side(weight, input_shape, client, n_blocks, threads, repeats, seed, geometry):
    """Build and product times of the local and the distributed operator, and the bytes moved.

    Both operators are freed on return, before the next figures are taken.
    """
    from ..distributed import DistributedConvOperator

    out = {}
    t0 = time.perf_counter()
    local = ConvOperator(weight, input_shape, threads=threads, **geometry)
    out["local_build"] = time.perf_counter() - t0
    local.rmatvec(np.zeros(local.shape[0]))  # its transposed matrix, outside the timings
    t0 = time.perf_counter()
    with DistributedConvOperator(weight, input_shape, client=client, n_blocks=n_blocks,
                                 **geometry) as dist:
        out["distributed_build"] = time.perf_counter() - t0
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal(dist.shape[1])
        y = rng.standard_normal(dist.shape[0])
        out["nnz"] = local.matrix.nnz
        out["matrix_bytes"] = dist.nbytes
        out["n_workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
        out["n_blocks"] = len(dist.row_ranges)
        out["local_matvec"] = _median_time(lambda: local.matvec(x), repeats)
        out["distributed_matvec"] = _median_time(lambda: dist.matvec(x), repeats)
        out["local_rmatvec"] = _median_time(lambda: local.rmatvec(y), repeats)
        out["distributed_rmatvec"] = _median_time(lambda: dist.rmatvec(y), repeats)
        out.update(dist.bytes_per_product())
        local_cluster = client.scheduler.address.startswith(("tcp://127.", "tcp://localhost",
                                                             "inproc://"))
        for name, func, arg in (("loopback_matvec", dist.matvec, x),
                                ("loopback_rmatvec", dist.rmatvec, y)):
            before = _loopback_bytes() if local_cluster else None
            for _ in range(repeats):
                func(arg)
            after = _loopback_bytes() if local_cluster else None
            out[name] = None if before is None or after is None else (after - before) // repeats
    return out


def format_distributed(result: dict) -> str:
    """The figures of :func:`bench_distributed` as a short text table."""

    def ms(key):
        return f"{1e3 * result[key]:9.2f} ms"

    def mib(value):
        return "n/a" if value is None else f"{value / 2**20:.2f} MiB"

    lines = [
        f"nnz {result['nnz']:,}  ({mib(result['matrix_bytes'])} of blocks), "
        f"{result['n_blocks']} blocks on {result['n_workers']} workers",
        f"build    local {ms('local_build')}   distributed {ms('distributed_build')}",
        f"matvec   local {ms('local_matvec')}   distributed {ms('distributed_matvec')}",
        f"rmatvec  local {ms('local_rmatvec')}   distributed {ms('distributed_rmatvec')}"
        f"   (adjoint='transpose': {ms('distributed_rmatvec_transpose').strip()})",
        f"fixed cost of one distributed product (1x1 matrix): {ms('round_trip').strip()}",
        f"per matvec: driver sends {mib(result['sent'])}, receives {mib(result['received'])}; "
        f"between workers <= {mib(result['between_workers'])}",
        f"loopback bytes per product (everything, protocol included): matvec "
        f"{mib(result['loopback_matvec'])}, rmatvec {mib(result['loopback_rmatvec'])}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual runs
    print(format_distributed(bench_distributed(padding=1)))
