"""DistributedConvOperator on a local two-worker Dask cluster.

Products against the local operators (bit for bit where the summation order
allows), scipy solvers, a worker killed in the middle of a solve, and a
matrix larger than one worker's memory limit.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsqr  # noqa: E402

from reference import random_array, seed_of  # noqa: E402
from sparse_tconv import ConvOperator, ConvTransposeOperator, conv_matrix_nnz  # noqa: E402
from sparse_tconv._build import build, validate  # noqa: E402
from sparse_tconv.direct import conv  # noqa: E402
from sparse_tconv.distributed import DistributedConvOperator, RowBlock  # noqa: E402

# Each worker may use this much; the memory test builds a larger matrix.
MEMORY_LIMIT = 700 * 2**20


@pytest.fixture(scope="module")
def cluster():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=MEMORY_LIMIT,
    )
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
    w, geom = validate(weight, (4, 9, 8), transpose=False, **kwargs)
    whole = build(geom, w, transpose=False, threads=1)
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
    from sparse_tconv._distributed_bench import bench_distributed, format_distributed

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
