"""DistributedConvOperator on a local two-worker Dask cluster.

Products against the local operators (bit for bit where the summation order
allows), scipy solvers, a worker killed in the middle of a solve, and a
matrix larger than one worker's memory limit.  On a second cluster, where
Dask gives up on a task at the first worker that dies running it: the
errors of a failed build, blocks Dask gave up on or a restart cancelled
(rebuilt by the next product, or reported), and the planning on its own.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import signal
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsqr  # noqa: E402

from sparse_tconv import (  # noqa: E402
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
)
from sparse_tconv._build import build  # noqa: E402
from sparse_tconv._geometry import validate  # noqa: E402
from sparse_tconv.direct import conv  # noqa: E402
from sparse_tconv.distributed import (  # noqa: E402
    DistributedConvOperator,
    RowBlock,
    _place_lost,
    _plan,
)

from reference import random_array, seed_of  # noqa: E402

# Each worker may use this much; the memory test builds a larger matrix.
MEMORY_LIMIT = 700 * 2**20
# Without a dashboard the scheduler still serves HTTP, on port 8787 by
# default: a second cluster (or another test run on the machine) would get a
# "Port 8787 is already in use" UserWarning, an error here.
_ANY_HTTP_PORT = {"dashboard_address": "127.0.0.1:0"}


def _local_cluster(memory_limit, **scheduler_kwargs):
    """Two single-thread worker processes on 127.0.0.1, no dashboard."""
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=memory_limit,
        scheduler_kwargs={**_ANY_HTTP_PORT, **scheduler_kwargs},
    )


@pytest.fixture(scope="module")
def cluster():
    cluster = _local_cluster(MEMORY_LIMIT)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    client = distributed.Client(cluster)
    yield client
    client.close()


@pytest.fixture
def two_workers(client):
    """Every test starts (and leaves the cluster) with two running workers."""
    client.wait_for_workers(2, timeout=60)
    yield client
    client.wait_for_workers(2, timeout=60)


# The workers of the fragile cluster; the memory-limit tests outgrow it.
FRAGILE_LIMIT = 400 * 2**20


@pytest.fixture(scope="module")
def fragile_client():
    """A second cluster whose scheduler gives up on a task at its first dead worker.

    (Dask's default, 3, would need four workers dying.)  Not the default
    client: test_defaults_repr_close_and_bytes expects the first one, and
    the operators of these tests check that a client need not be the default.
    """
    cluster = _local_cluster(FRAGILE_LIMIT, allowed_failures=0)
    client = distributed.Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def fragile(fragile_client):
    """Two running workers with the real ``build_rows``, before and after each test."""
    fragile_client.wait_for_workers(2, timeout=60)
    yield fragile_client
    fragile_client.wait_for_workers(2, timeout=60)
    _on_workers_build_rows(fragile_client, None)


def _on_workers_build_rows(client, kind, workers=None):
    """Replace ``build_rows`` in the workers' sparse_tconv.distributed, until they restart.

    ``kind``: ``"raise"`` (an ArithmeticError), ``"hog"`` (allocates until
    the nanny kills the worker at its memory limit) or None (the real one).
    The functions are nested so that cloudpickle sends them by value: the
    workers need not import this test module.
    """

    def raising(*args, **kwargs):
        raise ArithmeticError("build_rows failed on the worker (injected by the test)")

    def hog(*args, **kwargs):
        import time

        import numpy as np

        chunks = []
        for _ in range(40):  # 1.3 GiB at most; the nanny kills it at 95% of 400 MiB
            chunks.append(np.ones(2**22))  # 32 MiB, written
            time.sleep(0.02)
        raise AssertionError("the nanny did not kill this worker at its memory limit")

    fake = {"raise": raising, "hog": hog, None: None}[kind]

    def replace():
        import sparse_tconv.distributed as module

        real = module.__dict__.setdefault("_real_build_rows", module.build_rows)
        module.build_rows = fake or real

    client.run(replace, workers=workers)


def _bounded(seconds, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it is still running after ``seconds``.

    In a daemon thread, so that a hang (the bug some tests guard against)
    is a failure and not a stuck run.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__qualname__', fn)} still running after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _wait_until(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {seconds} s")
        time.sleep(0.05)


def _local(weight, input_shape, transpose, **kwargs):
    cls = ConvTransposeOperator if transpose else ConvOperator
    return cls(weight, input_shape, threads=1, **kwargs)


# (name, weight shape, input shape, arguments, transposed convolution?)
CASES = [
    ("2d-reflect-groups", (6, 2, 3, 3), (6, 13, 12),
     dict(stride=2, padding=1, groups=3, padding_mode="reflect"), False),
    ("1d-circular-dilated", (3, 2, 4), (2, 40), dict(padding=[(5, 3)], dilation=2,
                                                      padding_mode="circular"), False),
    ("3d-zeros", (2, 2, 3, 2, 3), (2, 5, 6, 7), dict(stride=(1, 2, 1), padding=1), False),
    ("2d-transposed", (4, 3, 3, 3), (4, 7, 6),
     dict(stride=2, padding=1, output_padding=1), True),
]


@pytest.mark.parametrize("n_blocks", [1, 3, 7])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_products_equal_the_local_operator(two_workers, case, n_blocks):
    name, weight_shape, input_shape, kwargs, transpose = case
    rng = np.random.default_rng(seed_of(name, n_blocks))
    weight = random_array(rng, weight_shape, np.float64)
    local = _local(weight, input_shape, transpose, **kwargs)
    with DistributedConvOperator(weight, input_shape, client=two_workers, n_blocks=n_blocks,
                                 transpose=transpose, **kwargs) as op:
        assert op.shape == local.shape and op.dtype == local.dtype
        assert op.input_shape == local.input_shape and op.output_shape == local.output_shape
        assert len(op.row_ranges) == n_blocks
        x = rng.standard_normal(op.shape[1])
        X = rng.standard_normal((op.shape[1], 3))
        y = rng.standard_normal(op.shape[0])
        # Row blocks: every row by scipy's kernel, in the whole matrix's order.
        assert op.matvec(x).tobytes() == (local.matrix @ x).tobytes()
        assert op.matmat(X).tobytes() == (local.matrix @ X).tobytes()
        np.testing.assert_allclose(op @ x, local.matvec(x), rtol=1e-12, atol=1e-12)
        # The adjoint is a sum of per-block partial vectors: equal to rounding.
        Y = rng.standard_normal((op.shape[0], 2))
        np.testing.assert_allclose(op.rmatvec(y), local.rmatvec(y), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(op.rmatmat(Y), local.rmatmat(Y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
def test_adjoint_through_transposed_blocks_is_bit_equal(two_workers, dtype, transpose):
    kwargs = dict(stride=2, padding=1, padding_mode="zeros" if transpose else "replicate")
    rng = np.random.default_rng(seed_of(np.dtype(dtype).name, transpose))
    weight = random_array(rng, (4, 2, 3, 3), dtype)
    input_shape = (4, 6, 5) if transpose else (2, 11, 10)
    local = _local(weight, input_shape, transpose, **kwargs)
    with DistributedConvOperator(weight, input_shape, client=two_workers, n_blocks=3,
                                 transpose=transpose, adjoint="transpose", **kwargs) as op:
        assert op.adjoint_method == "transpose" and op.transposed == transpose
        y = random_array(rng, op.shape[0], dtype)
        Y = random_array(rng, (op.shape[0], 2), dtype)
        x = random_array(rng, op.shape[1], dtype)
        # scipy's serial product with the transposed matrix, conjugated around
        WT = local.transpose_matrix
        assert op.rmatvec(y).tobytes() == np.conj(WT @ np.conj(y)).tobytes()
        assert op.rmatmat(Y).tobytes() == np.conj(WT @ np.conj(Y)).tobytes()
        np.testing.assert_allclose(op.rmatvec(y), local.rmatvec(y), rtol=1e-5, atol=1e-5)
        assert op.matvec(x).tobytes() == (local.matrix @ x).tobytes()
        # .T is scipy's transposed operator: the plain transpose, also for complex
        assert op.T.matvec(y).tobytes() == (WT @ y).tobytes()
        # both matrices are held: W's blocks and W.T's (its own 3 indptr arrays)
        nnz, item = local.matrix.nnz, np.dtype(dtype).itemsize
        assert sum(op.block_nbytes) == nnz * (item + 4) + (op.shape[0] + 3) * 4
        assert op.nbytes - sum(op.block_nbytes) == nnz * (item + 4) + (op.shape[1] + 3) * 4


def test_reduce_adjoint_of_complex_and_matmat(two_workers):
    rng = np.random.default_rng(seed_of("complex-reduce"))
    weight = random_array(rng, (3, 2, 3, 2), np.complex128)
    local = ConvOperator(weight, (2, 9, 8), padding=1, threads=1)
    with DistributedConvOperator(weight, (2, 9, 8), padding=1, client=two_workers,
                                 n_blocks=5) as op:
        y = random_array(rng, op.shape[0], np.complex128)
        Y = random_array(rng, (op.shape[0], 3), np.complex128)
        np.testing.assert_allclose(op.rmatvec(y), local.rmatvec(y), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(op.rmatmat(Y), local.rmatmat(Y), rtol=1e-12, atol=1e-12)
        # adjoint identity <W x, y> == <x, W^H y>
        x = random_array(rng, op.shape[1], np.complex128)
        np.testing.assert_allclose(np.vdot(y, op.matvec(x)), np.vdot(op.rmatvec(y), x),
                                   rtol=1e-12)
        # a real vector is cast to the operator's dtype before it is sent
        xr = rng.standard_normal(op.shape[1])
        assert op.matvec(xr).tobytes() == (local.matrix @ xr.astype(np.complex128)).tobytes()


def test_blocks_on_the_workers_are_the_rows_of_the_matrix(two_workers):
    rng = np.random.default_rng(seed_of("blocks"))
    weight = rng.standard_normal((4, 2, 3, 3))
    kwargs = dict(stride=(2, 1), padding=2, groups=2, padding_mode="circular")
    w, geom = validate(weight, (4, 9, 8), transposed=False, **kwargs)
    whole = build(geom, w, transposed=False, threads=1)
    with DistributedConvOperator(weight, (4, 9, 8), client=two_workers, n_blocks=4,
                                 **kwargs) as op:
        blocks = two_workers.gather(list(op.futures))
        holders = two_workers.who_has(list(op.futures))
        # contiguous runs of blocks per worker, both workers used
        assert len({h for hs in holders.values() for h in hs}) == 2
        nnz = [b.matrix.nnz for b in blocks]
        assert max(nnz) - min(nnz) <= max(np.diff(whole.indptr))  # balanced by nnz
        for block, (a, b), nbytes in zip(blocks, op.row_ranges, op.block_nbytes):
            assert isinstance(block, RowBlock) and (block.start, block.stop) == (a, b)
            expected = whole[a:b]
            assert block.matrix.data.tobytes() == expected.data.tobytes()
            np.testing.assert_array_equal(block.matrix.indices, expected.indices)
            np.testing.assert_array_equal(block.matrix.indptr, expected.indptr)
            m = block.matrix
            assert nbytes == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        # Dask's memory accounting sees the CSR bytes
        sizes = two_workers.nbytes(summary=False)
        for future, nbytes in zip(op.futures, op.block_nbytes):
            assert nbytes <= sizes[future.key] < nbytes + 1024


def test_scipy_solvers_drive_it(two_workers):
    rng = np.random.default_rng(seed_of("solvers"))
    weight = rng.standard_normal((3, 2, 3, 3))
    local = ConvOperator(weight, (2, 12, 12), padding=1, threads=1)
    with DistributedConvOperator(weight, (2, 12, 12), padding=1, client=two_workers,
                                 n_blocks=4) as op:
        b = local.matvec(rng.standard_normal(op.shape[1]))
        x_dist, *info_dist = lsqr(op, b, atol=0, btol=0, iter_lim=30)
        x_local, *info_local = lsqr(local, b, atol=0, btol=0, iter_lim=30)
        assert info_dist[1] == info_local[1] == 30  # iterations
        np.testing.assert_allclose(x_dist, x_local, rtol=1e-9, atol=1e-12)
        # cg on the normal equations, composed by scipy from op.H and op
        rhs = op.rmatvec(b)
        x_cg, info = cg(op.H @ op, rhs, rtol=0, atol=0, maxiter=20)
        x_cg_local, _ = cg(local.H @ local, rhs, rtol=0, atol=0, maxiter=20)
        np.testing.assert_allclose(x_cg, x_cg_local, rtol=1e-9, atol=1e-12)


def _kill_worker_holding(client, future):
    """SIGKILL the process of a worker that holds ``future``; return its address."""
    addr = sorted(client.who_has([future])[future.key])[0]
    pid = client.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)
    return addr


def _problem(rng):
    weight = rng.standard_normal((4, 3, 3, 3))
    local = ConvOperator(weight, (3, 24, 24), padding=1, padding_mode="reflect", threads=1)
    b = local.matvec(rng.standard_normal(local.shape[1]))
    return weight, local, b


def test_worker_killed_between_products_of_cg(two_workers):
    rng = np.random.default_rng(seed_of("kill-between"))
    weight, local, b = _problem(rng)
    with DistributedConvOperator(weight, (3, 24, 24), padding=1, padding_mode="reflect",
                                 client=two_workers, n_blocks=4) as op:
        normal = op.H @ op
        rhs = op.rmatvec(b)
        killed = []

        def callback(xk):
            if len(killed) == 0 and callback.n == 3:  # after the third iteration
                killed.append(_kill_worker_holding(two_workers, op.futures[0]))
            callback.n += 1

        callback.n = 0
        x, _ = cg(normal, rhs, rtol=0, atol=0, maxiter=25, callback=callback)
        reference, _ = cg(local.H @ local, rhs, rtol=0, atol=0, maxiter=25)
        assert killed
        holders = two_workers.who_has(list(op.futures))
        assert all(hs and killed[0] not in hs for hs in holders.values())  # rebuilt
        np.testing.assert_allclose(x, reference, rtol=1e-8, atol=1e-10)
        # and the products are still exact
        v = rng.standard_normal(op.shape[1])
        assert op.matvec(v).tobytes() == (local.matrix @ v).tobytes()


class _KillingOperator(LinearOperator):
    """Kills a worker at the start of its ``kill_at``-th matvec, then multiplies."""

    def __init__(self, op, client, kill_at):
        self.op, self.client, self.kill_at, self.calls, self.killed = op, client, kill_at, 0, None
        super().__init__(op.dtype, op.shape)

    def _matvec(self, x):
        self.calls += 1
        if self.calls == self.kill_at:
            # the scheduler has not noticed yet when the product is submitted
            self.killed = _kill_worker_holding(self.client, self.op.futures[-1])
        return self.op.matvec(x)

    def _rmatvec(self, y):
        return self.op.rmatvec(y)


@pytest.mark.parametrize("adjoint", ["reduce", "transpose"])
def test_worker_killed_during_a_product_of_lsqr(two_workers, adjoint):
    rng = np.random.default_rng(seed_of("kill-during", adjoint))
    weight, local, b = _problem(rng)
    with DistributedConvOperator(weight, (3, 24, 24), padding=1, padding_mode="reflect",
                                 client=two_workers, n_blocks=4, adjoint=adjoint) as op:
        killing = _KillingOperator(op, two_workers, kill_at=4)
        x = lsqr(killing, b, atol=0, btol=0, iter_lim=20)[0]
        # scipy's serial products with W and W.T: what adjoint="transpose" computes
        serial = aslinearoperator(local.matrix)
        reference = lsqr(serial if adjoint == "transpose" else local, b, atol=0, btol=0,
                         iter_lim=20)[0]
        assert killing.killed is not None
        holders = two_workers.who_has(list(op.futures))
        assert all(hs and killing.killed not in hs for hs in holders.values())  # rebuilt
        if adjoint == "transpose":  # every product is bit-equal to scipy's
            assert x.tobytes() == reference.tobytes()
        else:
            np.testing.assert_allclose(x, reference, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("product", ["matvec", "rmatvec"])
def test_worker_killed_while_tasks_run(two_workers, product):
    """SIGKILL from a timer, a few ms into a product of ~9M entries."""
    rng = np.random.default_rng(seed_of("kill-timer", product))
    weight = rng.standard_normal((16, 16, 3, 3))
    local = ConvOperator(weight, (16, 64, 64), padding=1, threads=1)
    with DistributedConvOperator(weight, (16, 64, 64), padding=1, client=two_workers,
                                 n_blocks=4) as op:
        v = rng.standard_normal(op.shape[1] if product == "matvec" else op.shape[0])
        expected = local.matrix @ v if product == "matvec" else local.rmatvec(v)
        getattr(op, product)(v)  # warm (task durations known to the scheduler)
        victim = sorted(two_workers.who_has([op.futures[0]])[op.futures[0].key])[0]
        pid = two_workers.run(os.getpid, workers=[victim])[victim]
        timer = threading.Timer(0.01, os.kill, (pid, signal.SIGKILL))
        timer.start()
        try:
            got = getattr(op, product)(v)
        finally:
            timer.join()
        if product == "matvec":
            assert got.tobytes() == expected.tobytes()
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        # the next product runs on the rebuilt blocks
        again = getattr(op, product)(v)
        np.testing.assert_allclose(again, expected, rtol=1e-12, atol=1e-12)


def test_matrix_larger_than_a_worker_memory_limit(two_workers):
    """W needs more than one worker's memory_limit; each worker holds half."""
    weight_shape, input_shape = (42, 42, 3, 3), (42, 64, 64)
    predicted = conv_matrix_nnz(weight_shape, input_shape, padding=1).nbytes
    assert predicted > MEMORY_LIMIT  # 764 MB > 700 MiB (734 MB)
    rng = np.random.default_rng(seed_of("memory"))
    weight = rng.standard_normal(weight_shape)
    with DistributedConvOperator(weight, input_shape, padding=1, client=two_workers,
                                 n_blocks=4) as op:
        assert op.nbytes == predicted + 3 * 4  # one indptr end per extra block
        per_worker = {}
        for future, nbytes in zip(op.futures, op.block_nbytes):
            (holder,) = two_workers.who_has([future])[future.key]
            per_worker[holder] = per_worker.get(holder, 0) + nbytes
        assert len(per_worker) == 2
        assert all(v < 0.6 * MEMORY_LIMIT for v in per_worker.values())  # below Dask's target
        x = rng.standard_normal(input_shape)
        y = op.matvec(x.ravel())
        np.testing.assert_allclose(y, conv(x, weight, padding=1).ravel(), rtol=1e-10,
                                   atol=1e-10)

        def rss():
            import psutil

            return psutil.Process().memory_info().rss

        assert all(v < MEMORY_LIMIT for v in two_workers.run(rss).values())
        info = two_workers.scheduler_info(n_workers=-1)["workers"]
        assert all(w["memory_limit"] == MEMORY_LIMIT for w in info.values())


def test_memory_error_when_a_worker_share_does_not_fit(two_workers):
    # about 3.5 GB: 1.7 GB per worker, more than the 700 MiB limit
    with pytest.raises(MemoryError, match=r"would need \d+ bytes on worker tcp://.*more than "
                                          rf"its memory_limit={MEMORY_LIMIT}"):
        DistributedConvOperator(np.ones((64, 64, 3, 3)), (64, 96, 96), padding=1,
                                client=two_workers)


def test_defaults_repr_close_and_bytes(two_workers):
    weight = np.ones((2, 1, 3))
    with DistributedConvOperator(weight, (1, 50), padding=1) as op:  # the default client
        assert op.client is two_workers
        assert len(op.row_ranges) == 2  # one block per worker thread
        assert "2 blocks" in repr(op) and "adjoint='reduce'" in repr(op)
        assert op.bytes_per_product() == {"sent": 400, "received": 800,
                                          "between_workers": 400}
        assert op.bytes_per_product(3, adjoint=True) == {"sent": 2400, "received": 1200,
                                                          "between_workers": 2400 + 1200}
    assert "closed" in repr(op)
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(np.ones(50))
    op.close()  # twice is fine


def test_argument_errors(two_workers):
    weight = np.ones((2, 1, 3))
    with pytest.raises(ValueError, match=r"n_blocks must be a positive integer, got n_blocks=0"):
        DistributedConvOperator(weight, (1, 8), client=two_workers, n_blocks=0)
    with pytest.raises(TypeError, match=r"n_blocks must be an int, got n_blocks=2.0"):
        DistributedConvOperator(weight, (1, 8), client=two_workers, n_blocks=2.0)
    with pytest.raises(ValueError, match=r"adjoint must be one of \('reduce', 'transpose'\), "
                                         r"got adjoint='sum'"):
        DistributedConvOperator(weight, (1, 8), client=two_workers, adjoint="sum")
    with pytest.raises(TypeError, match=r"client must be a distributed.Client or None, "
                                        r"got client='tcp://x:1'"):
        DistributedConvOperator(weight, (1, 8), client="tcp://x:1")
    with pytest.raises(TypeError, match=r"transpose must be a bool, got transpose=1"):
        DistributedConvOperator(weight, (1, 8), client=two_workers, transpose=1)
    with pytest.raises(ValueError, match=r"output_padding belongs to the transposed "
                                         r"convolution: pass transpose=True"):
        DistributedConvOperator(weight, (1, 8), client=two_workers, output_padding=1)
    with DistributedConvOperator(weight, (1, 8), client=two_workers, output_padding=(0,)) as op:
        assert not op.transposed  # a zero output_padding is accepted
    with pytest.raises(ValueError, match=r"input_shape\[0\]=2 channels do not match"):
        DistributedConvOperator(weight, (2, 8), client=two_workers)
    with pytest.raises(ValueError, match=r"(?i)dimension mismatch"):
        with DistributedConvOperator(weight, (1, 8), client=two_workers) as op:
            op.matvec(np.ones(7))


def test_benchmark_runs_on_a_small_geometry(two_workers):
    from sparse_tconv.tools.dask_bench import bench_distributed, format_distributed

    result = bench_distributed((4, 4, 3, 3), (4, 16, 16), client=two_workers, repeats=1,
                               padding=1)
    assert result["nnz"] == 16 * (3 * 16 - 2) ** 2
    assert result["n_workers"] == 2
    assert result["sent"] == 4 * 16 * 16 * 8 and result["received"] == 4 * 16 * 16 * 8
    for key in ("local_matvec", "distributed_matvec", "distributed_rmatvec",
                "distributed_rmatvec_transpose", "round_trip", "distributed_build"):
        assert result[key] > 0
    text = format_distributed(result)
    assert "matvec" in text and "driver sends" in text


# ---------------------------------------------------------------------------
# Failures of the blocks themselves (the fragile cluster), copies, planning
# ---------------------------------------------------------------------------


def _operator_keys(client):
    """Keys of DistributedConvOperator tasks the scheduler still knows."""

    def keys(dask_scheduler):
        return [k for k in dask_scheduler.tasks if str(k).startswith("sparse_tconv-")]

    return client.run_on_scheduler(keys)


def test_a_build_that_raises_on_a_worker_raises_its_own_exception(fragile):
    _on_workers_build_rows(fragile, "raise")
    with pytest.raises(ArithmeticError, match=r"build_rows failed on the worker \(injected"):
        _bounded(60, DistributedConvOperator, np.ones((2, 1, 3)), (1, 50), client=fragile,
                 n_blocks=2)
    # and the blocks were released
    _wait_until(lambda: not _operator_keys(fragile), 30, "tasks of the failed operator released")


def test_a_worker_killed_at_its_memory_limit_while_building_names_the_block(fragile):
    weight = np.random.default_rng(seed_of("killed-building")).standard_normal((3, 2, 3))
    _on_workers_build_rows(fragile, "hog")
    with pytest.raises(distributed.KilledWorker) as info:
        _bounded(90, DistributedConvOperator, weight, (2, 40), padding=1, client=fragile,
                 n_blocks=2)
    message = str(info.value)
    found = re.search(r"block (\d) \(rows (\d+):(\d+) of the matrix, (\d+) bytes\) could not "
                      r"be built.* placed on (tcp://\S+) with (\d+) bytes of blocks in all, "
                      rf"against its memory_limit={FRAGILE_LIMIT}", message)
    assert found, message
    i, a, b, nbytes = map(int, found.group(1, 2, 3, 4))
    # the rows and bytes are those of block i: W's rows a:b, as scipy holds them
    W = conv_matrix(weight, (2, 40), padding=1)
    rows = W[a:b]
    assert nbytes == rows.data.nbytes + rows.indices.nbytes + rows.indptr.nbytes
    assert (i, a) == (0, 0) or (i, b) == (1, W.shape[0])
    assert int(found.group(6)) == nbytes  # one block per worker
    assert isinstance(info.value.__cause__, distributed.KilledWorker)  # Dask's own
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, distributed.KilledWorker) and str(again) == message


def test_a_block_dask_gave_up_on_is_rebuilt_by_the_next_product(fragile):
    """Its worker killed, its rebuild killed at the memory limit: the next product rebuilds it."""
    rng = np.random.default_rng(seed_of("gave-up"))
    weight, local, _ = _problem(rng)
    op = _bounded(60, DistributedConvOperator, weight, (3, 24, 24), padding=1,
                  padding_mode="reflect", client=fragile, n_blocks=4)
    with op:
        keys = [f.key for f in op.futures]
        victim = min(fragile.who_has([op.futures[0]])[keys[0]])
        survivor = next(a for a in fragile.scheduler_info(n_workers=-1)["workers"] if a != victim)
        _on_workers_build_rows(fragile, "hog", workers=[survivor])
        _kill_worker_holding(fragile, op.futures[0])  # its blocks are rebuilt on the survivor
        _wait_until(lambda: any(f.status == "error" for f in op.futures), 60,
                    "a block given up on by Dask")
        gave_up = [i for i, f in enumerate(op.futures) if f.status == "error"]
        fragile.wait_for_workers(2, timeout=60)  # both restarted by their nannies
        v = rng.standard_normal(op.shape[1])
        assert _bounded(60, op.matvec, v).tobytes() == (local.matrix @ v).tobytes()
        y = rng.standard_normal(op.shape[0])
        np.testing.assert_allclose(_bounded(60, op.rmatvec, y), local.rmatvec(y), rtol=1e-12,
                                   atol=1e-12)
        # resubmitted under fresh keys; the others kept theirs
        assert all(op.futures[i].key != keys[i] for i in gave_up)
        assert all(f.status == "finished" for f in op.futures)


def test_blocks_cancelled_by_a_restart_are_rebuilt_or_reported(fragile):
    """client.restart() cancels every block and the spec: rebuilt, or an error saying why not."""
    rng = np.random.default_rng(seed_of("restart"))
    weight = rng.standard_normal((3, 2, 3, 3))
    local = ConvOperator(weight, (2, 10, 9), stride=2, padding=1, threads=1)
    op = _bounded(60, DistributedConvOperator, weight, (2, 10, 9), stride=2, padding=1,
                  client=fragile, n_blocks=3, adjoint="transpose")
    with op:
        _bounded(90, fragile.restart, timeout=60)
        assert all(f.status == "cancelled" for f in op.futures)
        x = rng.standard_normal(op.shape[1])
        # a rebuild that fails on every worker: the operator says it is unusable, and why
        _on_workers_build_rows(fragile, "raise")
        with pytest.raises(RuntimeError, match=r"unusable: block \d \(rows \d+:\d+ of the "
                                               r"(transposed )?matrix, \d+ bytes\) was lost and "
                                               r"rebuilding it from the geometry failed: "
                                               r"ArithmeticError\('build_rows failed"):
            _bounded(60, op.matvec, x)
        # the cluster can build them again: the next product does (spec included)
        _on_workers_build_rows(fragile, None)
        assert _bounded(60, op.matvec, x).tobytes() == (local.matrix @ x).tobytes()
        y = rng.standard_normal(op.shape[0])
        assert _bounded(60, op.rmatvec, y).tobytes() == (local.transpose_matrix @ y).tobytes()


class _LosingGather:
    """``client.gather`` losing its futures the first ``times`` calls, as a dying worker does."""

    def __init__(self, client, times):
        self.gather, self.times, self.calls = client.gather, times, 0

    def __call__(self, futures, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.times:
            from distributed.client import FutureCancelledError

            raise FutureCancelledError(futures[0].key, "worker-lost")
        return self.gather(futures, *args, **kwargs)


@pytest.mark.parametrize("product", ["matvec", "rmatvec"])
def test_a_product_that_loses_its_futures_is_retried_then_says_why(two_workers, monkeypatch,
                                                                     product):
    rng = np.random.default_rng(seed_of("lost-gather", product))
    weight = rng.standard_normal((3, 2, 3, 3))
    local = ConvOperator(weight, (2, 12, 12), padding=1, threads=1)
    with DistributedConvOperator(weight, (2, 12, 12), padding=1, client=two_workers,
                                 n_blocks=3) as op:
        v = rng.standard_normal(op.shape[1] if product == "matvec" else op.shape[0])
        expected = local.matvec(v) if product == "matvec" else local.rmatvec(v)
        # lost twice: the third attempt completes
        monkeypatch.setattr(two_workers, "gather", _LosingGather(two_workers, 2))
        np.testing.assert_allclose(getattr(op, product)(v), expected, rtol=1e-12, atol=1e-12)
        # lost at every attempt: an error that says what happened and what comes next,
        # not Dask's bare FutureCancelledError
        monkeypatch.setattr(two_workers, "gather", _LosingGather(two_workers, 3))
        with pytest.raises(RuntimeError, match=r"a Dask worker died or was lost during each of "
                                               r"3 attempts at this product "
                                               r"\(FutureCancelledError: .*\); the operator's "
                                               r"lost blocks are rebuilt from the geometry .*"
                                               r"\(0 resubmitted now\)") as info:
            getattr(op, product)(v)
        from distributed.client import FutureCancelledError

        assert isinstance(info.value.__cause__, FutureCancelledError)
        monkeypatch.undo()
        np.testing.assert_allclose(getattr(op, product)(v), expected, rtol=1e-12, atol=1e-12)


def test_blocks_cancelled_while_building_are_built_again(two_workers, monkeypatch):
    # the first submission of every block is cancelled at once, as a restart in the middle
    # of the constructor would: the constructor submits them again and the operator works
    rng = np.random.default_rng(seed_of("cancel-build"))
    weight = rng.standard_normal((3, 2, 3, 3))
    submit = DistributedConvOperator._submit_block
    cancelled = []

    def cancel_first(self, matrix, i, worker, tag=""):
        future = submit(self, matrix, i, worker, tag)
        if not tag:
            future.cancel()
            cancelled.append(future.key)
        return future

    monkeypatch.setattr(DistributedConvOperator, "_submit_block", cancel_first)
    with DistributedConvOperator(weight, (2, 12, 12), padding=1, client=two_workers,
                                 n_blocks=3) as op:
        assert cancelled and not set(cancelled) & {f.key for f in op.futures}
        x = rng.standard_normal(op.shape[1])
        expected = conv_matrix(weight, (2, 12, 12), padding=1) @ x
        assert op.matvec(x).tobytes() == expected.tobytes()


def test_an_operator_is_not_pickled_or_copied(two_workers):
    import cloudpickle

    rng = np.random.default_rng(seed_of("pickle"))
    weight = rng.standard_normal((2, 1, 3))
    with DistributedConvOperator(weight, (1, 30), padding=1, client=two_workers) as op:
        for how in (pickle.dumps, cloudpickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match=r"cannot be pickled or copied: it holds "
                                                r"futures .* build a new "
                                                r"DistributedConvOperator from the geometry"):
                how(op)
        # and the operator still works
        x = rng.standard_normal(op.shape[1])
        assert op.matvec(x).tobytes() == (conv_matrix(weight, (1, 30), padding=1) @ x).tobytes()


def test_lost_blocks_go_where_there_is_room_or_the_operator_is_unusable():
    workers = {"tcp://a": {"nthreads": 1, "memory_limit": 1000},
               "tcp://b": {"nthreads": 1, "memory_limit": 1000}}
    held = {"tcp://a": 600, "tcp://b": 850}  # room: a 400, b 150
    assert _place_lost([("block 0", 300), ("block 1", 100)], held, workers) == ["tcp://a",
                                                                                 "tcp://b"]
    with pytest.raises(RuntimeError, match=r"unusable: block 2 \(rows 7:9\) was lost and no "
                                           r"running worker has room for it .*'tcp://a': 400, "
                                           r"'tcp://b': 150"):
        _place_lost([("block 2 (rows 7:9)", 401)], held, workers)
    unlimited = {"tcp://c": {"nthreads": 1, "memory_limit": 0}}  # memory_limit=0: no limit
    assert _place_lost([("block 0", 10**15)], {"tcp://c": 10**15}, unlimited) == ["tcp://c"]


def test_the_plan_needs_no_cluster():
    """Ranges, bytes and placement of both matrices, from the workers' info alone."""
    weight = np.random.default_rng(seed_of("plan")).standard_normal((4, 2, 3, 3))
    w, geom = validate(weight, (2, 9, 8), transposed=False, padding=1)
    workers = {"tcp://a": {"nthreads": 2, "memory_limit": 0},
               "tcp://b": {"nthreads": 1, "memory_limit": 0}}
    plan = _plan(geom, w.dtype, False, "transpose", None, workers)
    W = conv_matrix(weight, (2, 9, 8), padding=1)
    assert plan.shape == W.shape
    for matrix, whole in zip(plan.matrices, (W, W.T.tocsr())):
        assert matrix.ranges[0][0] == 0 and matrix.ranges[-1][1] == whole.shape[0]
        assert all(r[1] == s[0] for r, s in zip(matrix.ranges, matrix.ranges[1:]))
        for (a, b), nbytes in zip(matrix.ranges, matrix.nbytes):
            rows = whole[a:b]
            assert nbytes == rows.data.nbytes + rows.indices.nbytes + rows.indptr.nbytes
        assert matrix.workers == ("tcp://a", "tcp://a", "tcp://b")  # one per thread
    assert [m.own for m in plan.matrices] == [True, False]
    assert sum(plan.per_worker.values()) == sum(sum(m.nbytes) for m in plan.matrices)
    small = {a: {**info, "memory_limit": plan.per_worker[a] - 1} for a, info in workers.items()}
    with pytest.raises(MemoryError, match=r"would need \d+ bytes on worker tcp://a"):
        _plan(geom, w.dtype, False, "transpose", None, small)


@pytest.mark.parametrize("transpose", [False, True])
def test_norm_bounds_of_the_distributed_operator(two_workers, transpose):
    # The same interval as the local operator's structure gives, holding the
    # dense SVD's norm; the lower bound from the cluster's own products.
    from sparse_tconv.spectral import norm_bounds

    rng = np.random.default_rng(21)
    weight = rng.standard_normal((6, 4, 3, 3)) / 6
    kwargs = dict(stride=2, padding=1)
    shape = (6, 8, 8) if transpose else (4, 16, 16)
    if transpose:
        kwargs["output_padding"] = 1
    with DistributedConvOperator(weight, shape, client=two_workers, n_blocks=3,
                                 transpose=transpose, **kwargs) as op:
        bounds = norm_bounds(op, rtol=0.05)
    local = (ConvTransposeOperator if transpose else ConvOperator)(weight, shape, **kwargs)
    norm = float(np.linalg.norm(local.matrix.toarray(), 2))
    assert bounds.lower <= norm * (1 + 1e-12) and norm * (1 - 1e-12) <= bounds.upper
    assert bounds.gap <= 0.05
