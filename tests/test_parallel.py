"""The thread pool under concurrent use, after fork, and operators that pickle.

Each hazard runs in a bounded way: a hang is a failure (a join with a
timeout), not a stuck CI.
"""

import copy
import multiprocessing
import pickle
import threading

import numpy as np
import pytest

import sparse_tconv
from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel, conv_matrix

from reference import seed_of
from strategies import shrink_tiles

TIMEOUT = 120  # seconds: far beyond what each needs (about one)


def _large_operator(threads=2):
    # Above the parallel threshold, so that the products use the pool.
    rng = np.random.default_rng(seed_of("pool"))
    op = ConvOperator(rng.standard_normal((8, 8, 3, 3)), (8, 96, 96), padding=1, threads=threads)
    assert op.matrix.nnz >= sparse_tconv._parallel.MIN_PARALLEL_NNZ
    return op, rng.standard_normal(op.shape[1])


def _run_bounded(*targets):
    """Run each target on its own thread; the errors they raised (a hang fails)."""
    errors = []

    def guarded(target):
        try:
            target()
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a thread did not finish: the pool hung"
    return errors


def test_replacing_the_pool_never_breaks_a_product_in_flight(restore_threads):
    op, x = _large_operator()
    expected = conv_matrix(op.weight, op.input_shape, padding=1) @ x

    def multiply():
        for _ in range(100):
            np.testing.assert_allclose(op @ x, expected, rtol=1e-13, atol=1e-12)

    def grow_the_pool():
        # Every larger thread count replaces the pool while `multiply` uses it.
        for threads in range(2, 40):
            sparse_tconv.set_num_threads(threads)
            ConvOperator(op.weight, op.input_shape, padding=1) @ x

    assert _run_bounded(multiply, grow_the_pool) == []


def _product_in_child(queue):
    op, x = _large_operator()
    queue.put(float(np.sum(op @ x)))


def test_a_forked_child_can_multiply():
    op, x = _large_operator()
    op @ x  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_product_in_child, args=(queue,))
    child.start()
    child.join(TIMEOUT)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a product")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(float(np.sum(op @ x)), rel=1e-12)


OPERATORS = {
    "structured": lambda rng, **kw: ConvOperator(rng.standard_normal((4, 3, 3, 3)), (3, 9, 9),
                                                 padding=1, **kw),
    "structured-strided": lambda rng, **kw: ConvOperator(rng.standard_normal((4, 3, 3, 3)),
                                                         (3, 9, 9), padding=1, stride=2, **kw),
    "diagonals": lambda rng, **kw: ConvOperator(rng.standard_normal((1, 1, 3, 3)), (1, 9, 9),
                                                padding=1, **kw),
    "csr": lambda rng, **kw: ConvOperator(rng.standard_normal((2, 1, 3, 3)), (2, 9, 9),
                                          padding=1, padding_mode="reflect", groups=2, **kw),
    "complex": lambda rng, **kw: ConvOperator(rng.standard_normal((3, 2, 3)) + 1j, (2, 9),
                                              padding=1, **kw),
    "transposed": lambda rng, **kw: ConvTransposeOperator(rng.standard_normal((4, 2, 3, 3)),
                                                          (4, 5, 5), stride=2,
                                                          output_padding=1, threads=1, **kw),
}


@pytest.mark.parametrize("keep_transpose", [True, False])
@pytest.mark.parametrize("view", ["op", "T", "H", "TT"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
def test_operators_pickle_and_deep_copy(name, view, copier, keep_transpose):
    rng = np.random.default_rng(seed_of("pickle", name, view, copier))
    op = OPERATORS[name](rng, keep_transpose=keep_transpose)
    op = {"op": op, "T": op.T, "H": op.H, "TT": op.T.T}[view]
    clone = pickle.loads(pickle.dumps(op)) if copier == "pickle" else copy.deepcopy(op)
    assert type(clone) is type(op) and clone.shape == op.shape and clone.dtype == op.dtype
    assert clone.threads == op.threads and clone.input_shape == op.input_shape
    assert clone.keep_transpose is keep_transpose
    x = rng.standard_normal(op.shape[1])
    y = rng.standard_normal(op.shape[0])
    # The same geometry and weight give the same products, bit for bit.
    np.testing.assert_array_equal(clone @ x, op @ x)
    np.testing.assert_array_equal(clone.rmatvec(y), op.rmatvec(y))
    np.testing.assert_array_equal(clone.matrix.toarray(), op.matrix.toarray())
    assert not clone.weight.flags.writeable and not np.shares_memory(clone.weight, op.weight)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_what_an_operator_shares_is_read_only(name):
    rng = np.random.default_rng(seed_of("read-only", name))
    op = OPERATORS[name](rng)
    op.rmatvec(rng.standard_normal(op.shape[0]))  # the backward form is built too
    for matrix in (op.matrix, op.transpose_matrix, op.T.matrix, op.H.matrix):
        for array in (matrix.data, matrix.indices, matrix.indptr):
            with pytest.raises(ValueError, match="read-only"):
                array[:1] = 0
    fresh = op.with_weight(rng.standard_normal(op.weight.shape))
    assert not fresh.matrix.data.flags.writeable


def test_phases_never_put_overlapping_parts_together():
    spans = [(0, 5), (4, 9), (8, 13), (12, 17), (0, 17), (16, 20), (3, 3)]
    phases = _parallel.disjoint_phases(spans)
    assert sorted(k for phase in phases for k in phase) == list(range(len(spans)))
    for phase in phases:
        for i in phase:
            for j in phase:
                (a, b), (c, d) = spans[i], spans[j]
                assert i == j or b <= c or d <= a or a >= b or c >= d
    # neighbours alternate; the part that overlaps everything is alone; the empty one fits first
    assert phases == [[0, 2, 5, 6], [1, 3], [4]]


@pytest.mark.parametrize("name", ["structured", "structured-strided", "csr"])
def test_lean_products_from_many_threads_at_once(name, monkeypatch):
    # Phased scatters (and tiled products) run from several caller threads at once
    # into their own outputs.
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    monkeypatch.setattr(_parallel, "SCATTER_PART_NNZ", 1)
    shrink_tiles(monkeypatch)
    rng = np.random.default_rng(seed_of("lean-threads", name))
    op = OPERATORS[name](rng, keep_transpose=False, threads=2)
    assert op.product_form.name == name.split("-")[0]
    ys = rng.standard_normal((6, op.shape[0]))
    expected = [op.rmatvec(y) for y in ys]
    results = [None] * len(ys)

    def work(i):
        results[i] = op.rmatvec(ys[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(ys))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in workers)
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
