"""A convolution operator whose matrix lives in row blocks on a Dask cluster.

:class:`DistributedConvOperator` is a :class:`scipy.sparse.linalg.LinearOperator`
for matrices too large for one machine (or one worker).  The matrix is never
assembled on the driver: each block of contiguous rows is built *on a
worker*, straight from the geometry (:func:`sparse_tconv._build_rows.build_rows`,
in O(that block's nnz)), and kept there as a persisted Dask future.  Only the
geometry and the weight travel to the cluster when it is built; each product
sends the input vector once and gathers the result.

Dask's lineage makes the blocks fault tolerant: a block lost with its worker
is rebuilt from the geometry on another worker, and a product running at that
moment still returns the right answer.  A block Dask gives up on (its workers
kept dying, or it was cancelled) is submitted again by the next product.

Requires the optional extra ``dask`` (``pip install "sparse-tconv[dask]"``,
i.e. ``dask[distributed]``); importing this module works without it, and
creating an operator then raises :class:`ImportError`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import uuid
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ._build_rows import balanced_row_ranges, build_rows, row_offsets
from ._geometry import Convolution, given_shapes, index_dtype, matrix_size, validate
from ._parallel import run_parallel
from ._validation import INT32_MAX, cast_if_safe, check_choice, check_positive_int

__all__ = ["DistributedConvOperator", "RowBlock", "ADJOINT_METHODS"]

ADJOINT_METHODS = ("reduce", "transpose")
"""How ``rmatvec``/``rmatmat`` run; see :class:`DistributedConvOperator`."""

# Partial results of the adjoint are summed this many at a time.
_REDUCE_FAN_IN = 4
# A product that loses its input (scatter to a dying worker, every replica of
# the input lost) is sent again; the blocks themselves are rebuilt by Dask.
_ATTEMPTS = 3


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sparse_tconv.distributed needs dask.distributed; install the optional extra: "
            'pip install "sparse-tconv[dask]"'
        ) from exc
    return distributed


# ---------------------------------------------------------------------------
# What runs on the workers (module-level functions: pickled by reference)
# ---------------------------------------------------------------------------


class RowBlock:
    """Rows ``[start, stop)`` of the matrix, as a worker holds them.

    Its ``sys.getsizeof`` (which Dask uses for memory accounting and
    spilling) is the bytes of the CSR arrays.
    """

    __slots__ = ("start", "stop", "matrix")

    def __init__(self, start, stop, matrix):
        self.start = start
        self.stop = stop
        self.matrix = matrix

    def __sizeof__(self):
        m = self.matrix
        return object.__sizeof__(self) + m.data.nbytes + m.indices.nbytes + m.indptr.nbytes

    def __repr__(self):
        return f"RowBlock(rows {self.start}:{self.stop}, nnz={self.matrix.nnz})"


def _spec(geometry, weight):
    """The task whose lineage holds the geometry and weight (sent once)."""
    return geometry, weight


def _build_block(spec, start, stop, transposed):
    geometry, weight = spec
    matrix = build_rows(geometry, weight, start, stop, transposed=transposed, threads=1)
    return RowBlock(start, stop, matrix)


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except Exception:  # not on a worker (called directly)
        return 1


def _rows_product(blocks, x, conj):
    """``[(row_start, block @ x), ...]`` for the blocks one worker holds.

    scipy's serial CSR kernel computes every row exactly as in ``W @ x``.
    """

    def product(block):
        if conj:  # the adjoint through W.T's blocks: conj(W.T @ conj(y))
            return np.conj(block.matrix @ np.conj(x))
        return block.matrix @ x

    out = [None] * len(blocks)

    def run(i):
        out[i] = (blocks[i].start, product(blocks[i]))

    run_parallel(run, range(len(blocks)), min(len(blocks), _worker_threads()))
    return out


def _adjoint_partial(blocks, y):
    """``sum_b block_b^H @ y[rows of b]`` over the blocks one worker holds."""

    def partial(block):
        ys = y[block.start : block.stop]
        matrix_t = block.matrix.T
        if np.iscomplexobj(block.matrix.data):
            return np.conj(matrix_t @ np.conj(ys))
        return matrix_t @ ys

    out = [None] * len(blocks)

    def run(i):
        out[i] = partial(blocks[i])

    run_parallel(run, range(len(blocks)), min(len(blocks), _worker_threads()))
    return _sum(*out)


def _sum(*parts):
    """Left-to-right sum, in the order given."""
    return functools.reduce(np.add, parts)


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------

# Future states of a block that Dask will not bring back by itself: an error
# (its workers kept dying, or the build raised) or a cancellation (a restart
# of the cluster, a cancel).  A "lost" block is being recomputed by Dask.
_GONE = ("error", "cancelled")


def _is_zero(value) -> bool:
    """Whether an int or a sequence of ints is 0 everywhere."""
    try:
        return all(v == 0 for v in np.ravel(np.asarray(value, dtype=object)))
    except TypeError:
        return False


def _check_arguments(transpose, adjoint, n_blocks, output_padding, geometry: dict):
    """Check the operator's own arguments (the geometry is checked by ``validate``).

    Returns
    -------
    transpose : bool
    n_blocks : int or None
    geometry : dict
        The keywords of :func:`~sparse_tconv._geometry.validate`, with
        ``output_padding`` when ``transpose``.
    """
    if not isinstance(transpose, (bool, np.bool_)):
        raise TypeError(f"transpose must be a bool, got transpose={transpose!r}")
    transpose = bool(transpose)
    check_choice(adjoint, ADJOINT_METHODS, "adjoint")
    geometry = dict(geometry)
    if transpose:
        geometry["output_padding"] = output_padding
    elif not _is_zero(output_padding):
        raise ValueError(
            "output_padding belongs to the transposed convolution: pass transpose=True "
            f"(got output_padding={output_padding!r} with transpose=False)"
        )
    if n_blocks is not None:
        n_blocks = check_positive_int(n_blocks, "n_blocks")
    return transpose, n_blocks, geometry


def _resolve_client(client):
    distributed = _import_distributed()
    if client is None:
        try:
            return distributed.get_client()
        except ValueError:
            raise ValueError(
                "client=None but there is no default Dask client: pass client=, e.g. "
                'distributed.Client("tcp://scheduler:8786"), or create a Client first'
            ) from None
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client or None, got client={client!r}")
    return client


def _workers(client) -> dict:
    """``{address: {"nthreads", "memory_limit"}}`` of the running workers, sorted."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        raise ValueError(f"the Dask cluster of {client!r} has no workers")
    return {
        addr: {"nthreads": int(w["nthreads"]), "memory_limit": int(w.get("memory_limit") or 0)}
        for addr, w in sorted(info.items())
    }


def _default_n_blocks(size, workers) -> int:
    n = sum(w["nthreads"] for w in workers.values())  # one block per worker thread
    n = max(n, len(workers))
    if size.shape[1] <= INT32_MAX:  # blocks small enough for int32 indices
        n = max(n, -(-size.nnz // INT32_MAX))
    return n


def _assign(n_blocks: int, workers: dict) -> list[str]:
    """Worker of each block: contiguous runs, in proportion to the worker threads."""
    addrs = list(workers)
    bounds = np.cumsum([workers[a]["nthreads"] for a in addrs])
    where = (np.arange(n_blocks) + 0.5) / n_blocks * bounds[-1]
    return [addrs[i] for i in np.searchsorted(bounds, where, side="right").tolist()]


def _block_nbytes(geom, ranges, dtype, transposed) -> list[int]:
    """Predicted bytes of each block's CSR arrays (exact)."""
    n_cols = matrix_size(geom, dtype, transposed).shape[1]
    cuts = row_offsets(geom, [r for pair in ranges for r in pair], transposed=transposed)
    sizes = []
    for (a, b), nnz in zip(ranges, (cuts[1::2] - cuts[0::2]).tolist()):
        idx = index_dtype(nnz, b - a, n_cols)
        sizes.append(nnz * (np.dtype(dtype).itemsize + idx.itemsize) + (b - a + 1) * idx.itemsize)
    return sizes


def _check_memory(per_worker: dict, workers: dict) -> None:
    for addr, need in per_worker.items():
        limit = workers[addr]["memory_limit"]
        if limit and need > limit:
            total = sum(per_worker.values())
            raise MemoryError(
                f"the matrix blocks would need {need} bytes on worker {addr}, more than its "
                f"memory_limit={limit} ({total} bytes over {len(workers)} workers): add "
                "workers or memory (Dask also starts spilling to disk above its 'target' "
                "fraction of memory_limit, 0.6 by default)"
            )


@dataclass(frozen=True)
class _MatrixPlan:
    """The row blocks of one matrix: the operator's own, or its transpose."""

    transposed: bool
    """The ``transposed=`` of :func:`~sparse_tconv._build_rows.build_rows` for these blocks."""
    own: bool
    """Whether this is the operator's matrix (else its transpose, ``adjoint='transpose'``)."""
    ranges: tuple[tuple[int, int], ...]
    nbytes: tuple[int, ...]
    workers: tuple[str, ...]
    """Where each block is first placed."""

    def describe(self, i: int) -> str:
        """Block ``i`` in words, for error messages: its rows and bytes."""
        a, b = self.ranges[i]
        which = "the matrix" if self.own else "the transposed matrix"
        return f"block {i} (rows {a}:{b} of {which}, {self.nbytes[i]} bytes)"


@dataclass(frozen=True)
class _Plan:
    """Everything decided before a task is submitted."""

    shape: tuple[int, int]
    matrices: tuple[_MatrixPlan, ...]
    per_worker: dict
    """Bytes of the blocks placed on each worker."""
    workers: dict
    """The workers as read from the scheduler (see :func:`_workers`)."""


def _plan(geom, dtype, transposed: bool, adjoint: str, n_blocks, workers: dict) -> _Plan:
    """Ranges, bytes and placement of every block; MemoryError if a worker's share won't fit.

    Reads nothing from the cluster: ``workers`` is :func:`_workers`'s answer.
    """
    size = matrix_size(geom, dtype, transposed)
    if n_blocks is None:
        n_blocks = _default_n_blocks(size, workers)
    kinds = [transposed] if adjoint == "reduce" else [transposed, not transposed]
    matrices, per_worker = [], dict.fromkeys(workers, 0)
    for tr in kinds:
        ranges = balanced_row_ranges(geom, n_blocks, transposed=tr)
        nbytes = _block_nbytes(geom, ranges, dtype, tr)
        where = _assign(len(ranges), workers)
        for addr, b in zip(where, nbytes):
            per_worker[addr] += b
        matrices.append(_MatrixPlan(tr, tr == transposed, tuple(map(tuple, ranges)),
                                    tuple(nbytes), tuple(where)))
    _check_memory(per_worker, workers)
    return _Plan(size.shape, tuple(matrices), per_worker, workers)


def _place_lost(lost: list, held: dict, workers: dict) -> list[str]:
    """A worker for each lost block: the one with the most room left.

    Parameters
    ----------
    lost : list of (str, int)
        Each lost block's description and bytes.
    held : dict
        Bytes of this operator's blocks each worker holds now.
    workers : dict
        The running workers (see :func:`_workers`).

    Returns
    -------
    list of str
        The address of each block's worker.

    Raises
    ------
    RuntimeError
        If a block fits no worker's room (``memory_limit`` minus what it
        holds): the operator is unusable until the cluster grows.
    """
    room = {
        addr: w["memory_limit"] - held.get(addr, 0) if w["memory_limit"] else float("inf")
        for addr, w in workers.items()
    }
    places = []
    for description, need in lost:
        addr = max(room, key=lambda a: room[a])  # ties: the first address, reproducibly
        if need > room[addr]:
            free = {a: max(0, r) for a, r in room.items()}
            raise RuntimeError(
                f"this DistributedConvOperator is unusable: {description} was lost and no "
                f"running worker has room for it (bytes left below each memory_limit: "
                f"{free}); add workers or memory, or close it and build a new operator from "
                "the geometry (a larger n_blocks makes smaller blocks)"
            )
        room[addr] -= need
        places.append(addr)
    return places


@functools.cache
def _block_killed_worker_class():
    """``distributed.KilledWorker`` with a message that names the block and its memory.

    Made on first use: dask.distributed is an optional dependency.
    """

    class BlockKilledWorker(_import_distributed().KilledWorker):
        """A block's every worker died while building it (e.g. at its memory limit)."""

        def __init__(self, task, last_worker, allowed_failures, message):
            super().__init__(task, last_worker, allowed_failures)
            self.message = message

        def __str__(self):
            return self.message

        def __reduce__(self):  # the class is local: rebuild it through the factory
            return _block_killed_worker, (*self.args, self.message)

    return BlockKilledWorker


def _block_killed_worker(task, last_worker, allowed_failures, message):
    return _block_killed_worker_class()(task, last_worker, allowed_failures, message)


def _killed_while_building(cause, plan: _Plan, matrix: _MatrixPlan, i: int):
    """The :class:`KilledWorker` to raise for block ``i``, from Dask's ``cause``."""
    addr = matrix.workers[i]
    limit = plan.workers[addr]["memory_limit"]
    last = getattr(cause.last_worker, "address", cause.last_worker)
    message = (
        f"{matrix.describe(i)} could not be built: the worker running it died "
        f"{cause.allowed_failures + 1} time(s), the last one {last} (a worker killed at its "
        f"memory limit?). The block was placed on {addr} with {plan.per_worker[addr]} bytes "
        f"of blocks in all, against its memory_limit={limit}"
        + (" (none)" if not limit else "")
        + "; building a block takes more memory than the block keeps: pass a larger "
        "n_blocks or give the workers more memory"
    )
    return _block_killed_worker(cause.task, cause.last_worker, cause.allowed_failures, message)


class DistributedConvOperator(LinearOperator):
    """Convolution (or transposed convolution) applied by a Dask cluster.

    The matrix W (``transpose=False``) or the transposed convolution's
    matrix (``transpose=True``) is cut into ``n_blocks`` blocks of contiguous
    rows with about equal nnz; each block is built on a worker from the
    geometry and stays there.  Products scatter the input to the workers,
    multiply every block where it lives and gather the pieces.

    Parameters
    ----------
    weight : array_like
        ``(C_out, C_in // groups, *k)`` (PyTorch's Conv layout) when
        ``transpose=False``; PyTorch's ConvTranspose layout (the same array
        as the forward convolution being transposed) when ``transpose=True``.
        Copied; sent once to the cluster.
    input_shape : sequence of int
        One input sample of ``matvec``: ``(C_in, *L)`` for a convolution,
        ``(C_in, *O)`` for a transposed convolution.
    client : distributed.Client, optional
        Default: the current default client (``distributed.get_client()``).
    n_blocks : int, optional
        Number of row blocks (at least 1; fewer are made when there are fewer
        rows).  Default: the total number of worker threads, and at least
        enough blocks for each to have int32 indices.
    transpose : bool, optional
        ``False`` (default): the arguments of :func:`~sparse_tconv.conv_matrix`
        and this operator is :class:`~sparse_tconv.ConvOperator`.  ``True``:
        the arguments of :func:`~sparse_tconv.conv_transpose_matrix`
        (``output_padding`` included) and it is
        :class:`~sparse_tconv.ConvTransposeOperator`.
    adjoint : {'reduce', 'transpose'}, optional
        How ``rmatvec``/``rmatmat`` (the adjoint) run.  ``'reduce'`` (default):
        every block multiplies its own adjoint by its slice of ``y`` and the
        partial vectors are summed on the workers, in a tree; the cluster
        holds the matrix once.  ``'transpose'``: row blocks of the transposed
        matrix are built too (twice the memory) and the adjoint runs like
        ``matvec``, bit-for-bit equal to scipy's serial product with the
        transposed matrix (the local operator sums in another order when the
        output has several channels; see :class:`~sparse_tconv.ConvOperator`).
    stride, padding, dilation, groups, padding_mode, dtype
        As for :func:`~sparse_tconv.conv_matrix`.
    output_padding : int or sequence of int, optional
        Only with ``transpose=True``; as for
        :func:`~sparse_tconv.conv_transpose_matrix`.

    Attributes
    ----------
    shape : tuple of int
        That of the matrix.
    dtype : numpy.dtype
        That of the weight (as validated).
    input_shape, output_shape : tuple of int
        Shapes of one sample of ``matvec``'s input and output.
    row_ranges : list of (int, int)
        The ``[start, stop)`` rows of each block.
    block_nbytes : list of int
        Exact bytes of each block's CSR arrays.
    nbytes : int
        Bytes of all blocks held by the cluster (both matrices with
        ``adjoint='transpose'``).
    futures : tuple of distributed.Future
        The persisted blocks (:class:`RowBlock` on the workers).
    client : distributed.Client

    Raises
    ------
    ImportError
        If dask.distributed is not installed.
    ValueError, TypeError
        As for :func:`~sparse_tconv.conv_matrix`; also an invalid
        ``n_blocks``, ``adjoint`` or ``client``, no default client,
        ``output_padding`` without ``transpose=True``, a cluster without
        workers.
    MemoryError
        If the blocks assigned to a worker would need more bytes than its
        ``memory_limit``.
    distributed.KilledWorker
        If every worker that built a block died (one killed at its
        ``memory_limit``, say); the message names the block, its rows, its
        bytes and the worker's ``memory_limit``.  Any other exception of a
        block's build on a worker is raised as the worker raised it.

    See Also
    --------
    sparse_tconv.ConvOperator, sparse_tconv.ConvTransposeOperator

    Notes
    -----
    *Placement.*  Blocks are first placed in contiguous runs, in proportion
    to the worker threads (a loose restriction: Dask rebuilds a block
    elsewhere if its worker is lost), so a worker holds about
    ``nbytes / n_workers`` bytes.  The weight travels to the cluster inside
    the task graph, once (Dask warns about graphs above 10 MB).  A product
    runs one task per worker, which multiplies the blocks that worker holds
    on its threads; the blocks never move.

    *Per product* the driver sends the input once (``client.scatter(x)``,
    to one worker, from which the others fetch it) and receives the output
    once (the blocks' pieces, through the scheduler unless
    ``client.direct_to_workers``); the blocks never move.
    The adjoint with ``adjoint='reduce'`` also moves partial vectors of the
    input's length between workers (about one per worker after the local
    sums) and returns one vector.

    *Results.*  ``matvec``/``matmat`` (and the adjoint with
    ``adjoint='transpose'``) compute each output row with scipy's serial
    CSR kernel on the row's own entries, in the order of the whole matrix,
    so they are bit-for-bit equal to scipy's ``W @ x`` (``W.T @ y``),
    whatever ``n_blocks``, and to the local ``matvec`` to rounding (bit for
    bit where it runs on the CSR matrix or the diagonals; see
    :class:`~sparse_tconv.ConvOperator`).  With ``adjoint='reduce'`` the
    adjoint is a sum of ``n_blocks`` partial vectors in a fixed tree: equal
    to the local result to rounding (not bit-for-bit), and reproducible for
    a given ``n_blocks``.

    *Faults.*  Blocks are Dask tasks computed from the geometry, so a block
    lost with its worker is rebuilt on another worker (its share of memory
    must fit there).  A product whose input was lost, or sent to a worker
    dying at that moment, is sent again (up to 3 times).  A block Dask gives
    up on (its workers kept dying while building it: Dask's
    ``distributed.scheduler.allowed-failures``; or cancelled, as
    ``client.restart()`` does) is submitted again from the geometry, with a
    fresh key, by the next product, on the worker with the most room below
    its ``memory_limit`` (the task holding the geometry too, if it is gone).
    When no worker has room for it, or that rebuild fails as well, the
    product raises :class:`RuntimeError` saying that the operator is
    unusable and why; when a worker is lost under each of the product's
    attempts, a :class:`RuntimeError` says so and that the blocks are being
    rebuilt (never Dask's bare ``FutureCancelledError``).  Blocks cancelled
    while the constructor builds them are submitted again too.

    *Copies.*  ``pickle``, ``copy.copy`` and ``copy.deepcopy`` raise
    :class:`TypeError`: the blocks are futures on the client's cluster.
    Build a new operator from the geometry on the target client instead.

    Examples
    --------
    Start a client (here a local cluster; ``Client("tcp://host:8786")``
    connects to an existing one):

    >>> import numpy as np
    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> from sparse_tconv.distributed import DistributedConvOperator
    >>> client = Client(LocalCluster(n_workers=2))  # doctest: +SKIP
    >>> rng = np.random.default_rng(0)
    >>> weight = rng.standard_normal((16, 8, 3, 3))
    >>> op = DistributedConvOperator(weight, (8, 64, 64), padding=1,
    ...                              client=client, n_blocks=4)  # doctest: +SKIP
    >>> op.shape  # doctest: +SKIP
    (65536, 32768)
    >>> y = op.matvec(rng.standard_normal(op.shape[1]))  # doctest: +SKIP

    scipy's solvers drive it unchanged:

    >>> from scipy.sparse.linalg import lsqr
    >>> x = lsqr(op, y, iter_lim=20)[0]  # doctest: +SKIP
    >>> op.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        weight,
        input_shape,
        *,
        client=None,
        n_blocks=None,
        transpose=False,
        adjoint="reduce",
        stride=1,
        padding=0,
        output_padding=0,
        dilation=1,
        groups=1,
        padding_mode="zeros",
        dtype=None,
    ):
        transpose, n_blocks, geometry = _check_arguments(
            transpose, adjoint, n_blocks, output_padding,
            dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                 padding_mode=padding_mode),
        )
        w, geom = validate(weight, input_shape, transposed=transpose, dtype=dtype, **geometry)
        client = _resolve_client(client)
        plan = _plan(geom, w.dtype, transpose, adjoint, n_blocks, _workers(client))

        self._client = client
        self._geometry = geom
        self._weight = w
        self._transposed = transpose
        self._adjoint_method = adjoint
        self._name = f"sparse_tconv-{uuid.uuid4().hex[:12]}"
        self._plan = plan
        self._rebuilds = itertools.count(1)  # fresh keys for rebuilt tasks
        self._submit()
        self._wait_built()
        super().__init__(dtype=w.dtype, shape=plan.shape)

    # -- building ---------------------------------------------------------

    def _submit_spec(self, tag: str = ""):
        # One task holds the geometry and the weight; every block depends on
        # it, so a lost block can be rebuilt from the scheduler's lineage.
        return self._client.submit(_spec, self._geometry, self._weight,
                                   key=f"{self._name}-spec{tag}")

    def _submit_block(self, matrix: _MatrixPlan, i: int, worker: str, tag: str = ""):
        a, b = matrix.ranges[i]
        return self._client.submit(
            _build_block,
            self._spec,
            a,
            b,
            matrix.transposed,
            key=f"{self._name}-{'W' if matrix.own else 'T'}-{i}{tag}",
            workers=[worker],
            allow_other_workers=True,  # a loose placement: Dask may rebuild it elsewhere
        )

    def _submit(self) -> None:
        """Submit the spec and every block where the plan places it."""
        self._spec = self._submit_spec()
        self._blocks = {
            m.transposed: (m, [self._submit_block(m, i, addr) for i, addr in enumerate(m.workers)])
            for m in self._plan.matrices
        }

    def _wait_built(self) -> None:
        """Wait for every block; on a failure, release them all and raise the worker's error.

        The error is read before the futures are cancelled: a cancelled
        future only reports its cancellation.
        """
        distributed = _import_distributed()
        for _ in range(_ATTEMPTS):  # blocks a restart cancelled while building: sent again
            with self._client.as_current():  # wait() uses the current client, not the futures'
                try:
                    distributed.wait([f for _, fs in self._blocks.values() for f in fs])
                except concurrent.futures.CancelledError:  # read from the statuses below
                    pass
            statuses = {f.status for _, fs in self._blocks.values() for f in fs}
            if "cancelled" not in statuses or "error" in statuses:  # an error is reported
                break
            try:
                self._rebuild_lost()
            except BaseException:
                self.close()
                raise
        blocks = [(m, i, f) for m, futures in self._blocks.values() for i, f in enumerate(futures)]
        for matrix, i, future in blocks:
            if future.status == "finished":
                continue
            try:
                future.result()  # raises the worker's exception, with its traceback
            except distributed.KilledWorker as exc:
                self.close()
                raise _killed_while_building(exc, self._plan, matrix, i) from exc
            except concurrent.futures.CancelledError as exc:
                self.close()
                raise RuntimeError(
                    f"{matrix.describe(i)} was cancelled {_ATTEMPTS + 1} times while being built "
                    f"(workers lost or the cluster restarted: {exc}); build the operator "
                    "again once the cluster is stable") from exc
            except BaseException:
                self.close()
                raise

    def _rebuild_lost(self) -> list:
        """Resubmit, with fresh keys, the spec and the blocks Dask will not bring back.

        Returns
        -------
        list of (_MatrixPlan, int)
            The blocks resubmitted.

        Raises
        ------
        RuntimeError
            If there are blocks to rebuild but no worker, or no worker with
            room for one of them.
        """
        lost = [(m, i) for m, futures in self._blocks.values()
                for i, f in enumerate(futures) if f.status in _GONE]
        spec_gone = self._spec.status in _GONE  # the blocks' lineage, for their next loss
        if not lost and not spec_gone:
            return []
        places = self._places_for(lost) if lost else []
        tag = f"-rebuilt{next(self._rebuilds)}"
        if spec_gone:
            self._spec = self._submit_spec(tag)
        for (matrix, i), addr in zip(lost, places):
            self._blocks[matrix.transposed][1][i] = self._submit_block(matrix, i, addr, tag)
        return lost

    def _places_for(self, lost: list) -> list[str]:
        """The worker to rebuild each lost block on (see :func:`_place_lost`)."""
        try:
            workers = _workers(self._client)
        except ValueError:
            raise RuntimeError(
                f"this DistributedConvOperator is unusable: {len(lost)} of its blocks were "
                "lost and the cluster has no workers to rebuild them on; add workers"
            ) from None
        return _place_lost([(m.describe(i), m.nbytes[i]) for m, i in lost],
                           self._held_bytes(), workers)

    def _held_bytes(self) -> dict:
        """Bytes of this operator's blocks on each worker now (replicas counted)."""
        futures = {f.key: m.nbytes[i] for m, fs in self._blocks.values()
                   for i, f in enumerate(fs) if f.status not in _GONE}
        held: dict[str, int] = {}
        for key, holders in self._client.who_has(list(futures)).items():
            for addr in holders:
                held[addr] = held.get(addr, 0) + futures[key]
        return held

    def _check_rebuilt(self, rebuilt: list, exc: BaseException) -> None:
        """Raise RuntimeError if a block rebuilt for this product failed again."""
        for matrix, i in rebuilt:
            future = self._blocks[matrix.transposed][1][i]
            if future.status in _GONE:
                cause = future.exception() if future.status == "error" else exc
                raise RuntimeError(
                    f"this DistributedConvOperator is unusable: {matrix.describe(i)} was "
                    f"lost and rebuilding it from the geometry failed: {cause!r}; close it "
                    "and build a new operator from the geometry once the cluster can hold it "
                    "(a larger n_blocks makes smaller blocks)"
                ) from exc

    def __reduce_ex__(self, protocol):
        # The blocks are futures of the client's cluster: a copy elsewhere
        # would point at keys it does not own (or at no cluster at all).
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or copied: it holds futures of its "
            "row blocks on the cluster of its client; build a new DistributedConvOperator "
            "from the geometry (op.weight, op.input_shape and the same arguments) on the "
            "target client instead"
        )

    # -- description ------------------------------------------------------

    @property
    def client(self):
        """The :class:`distributed.Client` this operator runs on."""
        return self._client

    @property
    def transposed(self) -> bool:
        """Whether this is a transposed convolution (the ``transpose=`` argument).

        (``transpose()`` and ``.T`` are LinearOperator's transpose.)
        """
        return self._transposed

    @property
    def convolution(self) -> Convolution:
        """Geometry, weight and direction, as :attr:`ConvOperator.convolution
        <sparse_tconv.ConvOperator.convolution>` gives them."""
        return Convolution(self._geometry, self._weight, self._transposed)

    @property
    def adjoint_method(self) -> str:
        """The ``adjoint=`` argument."""
        return self._adjoint_method

    @property
    def weight(self) -> np.ndarray:
        """The validated weight (read-only)."""
        return self._weight

    @property
    def input_shape(self) -> tuple[int, ...]:
        return given_shapes(self._geometry, self._transposed)[0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return given_shapes(self._geometry, self._transposed)[1]

    def _own(self):
        if not self._blocks:
            raise RuntimeError("this DistributedConvOperator is closed")
        return self._blocks[self._transposed]

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        return list(self._own()[0].ranges)

    @property
    def block_nbytes(self) -> list[int]:
        return list(self._own()[0].nbytes)

    @property
    def nbytes(self) -> int:
        self._own()
        return sum(sum(m.nbytes) for m in self._plan.matrices)

    @property
    def futures(self) -> tuple:
        return tuple(self._own()[1])

    def __repr__(self):
        state = "closed" if not self._blocks else f"{len(self._own()[1])} blocks"
        kind = "transposed convolution" if self._transposed else "convolution"
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype} "
            f"({kind}), {state}, adjoint={self._adjoint_method!r}>"
        )

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Release the blocks on the cluster; later products raise RuntimeError."""
        futures = [f for _, fs in self._blocks.values() for f in fs]
        if getattr(self, "_spec", None) is not None:
            futures.append(self._spec)
            self._spec = None
        self._blocks = {}
        if futures and self._client.status == "running":
            self._client.cancel(futures)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- products ---------------------------------------------------------

    def _cast(self, x):
        return np.ascontiguousarray(cast_if_safe(np.asarray(x), self.dtype))

    def _groups(self, blocks) -> list[list]:
        """The blocks grouped by the worker holding them now (one task each)."""
        who_has = self._client.who_has(blocks)
        groups: dict[str, list] = {}
        for block in blocks:
            holders = who_has.get(block.key) or ("",)  # "": being rebuilt
            groups.setdefault(min(holders), []).append(block)
        return list(groups.values())

    def _run(self, x, matrix_key, submit_all, combine):
        """Send ``x``, run one task per worker on the blocks of ``matrix_key``, gather, combine.

        ``submit_all(x_future, groups)`` returns the futures to gather.  A
        product whose input is lost with its worker is sent again; blocks
        Dask will not bring back are rebuilt first (:meth:`_rebuild_lost`).
        """
        client = self._client
        for attempt in range(_ATTEMPTS):
            rebuilt = self._rebuild_lost()
            x_future = futures = None
            try:
                # To one worker; the others fetch it from there.  (broadcast=True
                # would make the scheduler replicate it, and its replication
                # retries a worker that died meanwhile for ever.)
                x_future = client.scatter(x, hash=False)
                futures = submit_all(x_future, self._groups(self._blocks[matrix_key][1]))
                return combine(client.gather(futures))
            except Exception as exc:
                self._check_rebuilt(rebuilt, exc)
                if not self._may_retry(exc):
                    raise
                if attempt == _ATTEMPTS - 1:
                    raise self._lost_every_attempt(exc) from exc
            finally:
                del x_future, futures  # released on the cluster

    def _lost_every_attempt(self, exc: BaseException) -> RuntimeError:
        """What a product says when a worker was lost under each of its attempts.

        Dask's own error (``FutureCancelledError``, ``KilledWorker``, a closed
        comm) says only that a task is gone, not why nor what comes next.
        """
        resubmitted = len(self._rebuild_lost())  # the next product finds them submitted
        return RuntimeError(
            f"a Dask worker died or was lost during each of {_ATTEMPTS} attempts at this "
            f"product ({type(exc).__name__}: {exc}); the operator's lost blocks are rebuilt "
            f"from the geometry by Dask on the remaining workers ({resubmitted} resubmitted "
            "now), so the product can be called again once the cluster is stable"
        )

    def _may_retry(self, exc) -> bool:
        """Whether another attempt can succeed: the input was lost, or a block is to rebuild."""
        retried = (OSError, concurrent.futures.CancelledError, _import_distributed().KilledWorker)
        if isinstance(exc, retried):
            return True
        return any(f.status in _GONE for _, fs in self._blocks.values() for f in fs)

    def _rows(self, matrix_key, x, conj):
        n_rows = self._blocks[matrix_key][0].ranges[-1][1]
        out = np.empty((n_rows,) + x.shape[1:], dtype=np.result_type(self.dtype, x.dtype))

        def submit_all(x_future, groups):
            return [
                self._client.submit(_rows_product, group, x_future, conj, pure=False)
                for group in groups
            ]

        def combine(results):
            for pieces in results:
                for start, piece in pieces:
                    out[start : start + len(piece)] = piece
            return out

        return self._run(x, matrix_key, submit_all, combine)

    def _matvec(self, x):
        self._own()
        return self._rows(self._transposed, self._cast(x).ravel(), conj=False)

    def _matmat(self, X):
        self._own()
        return self._rows(self._transposed, self._cast(X), conj=False)

    def _adjoint_product(self, y):
        self._own()
        y = self._cast(y)
        if self._adjoint_method == "transpose":
            conj = np.iscomplexobj(self._weight)
            return self._rows(not self._transposed, y, conj=conj)
        client = self._client

        def submit_all(y_future, groups):
            parts = [client.submit(_adjoint_partial, group, y_future, pure=False)
                     for group in groups]
            while len(parts) > 1:
                parts = [
                    client.submit(_sum, *parts[i : i + _REDUCE_FAN_IN], pure=False)
                    for i in range(0, len(parts), _REDUCE_FAN_IN)
                ]
            return parts

        return self._run(y, self._transposed, submit_all, lambda r: r[0])

    def _rmatvec(self, y):
        return self._adjoint_product(np.asarray(y).ravel())

    def _rmatmat(self, Y):
        return self._adjoint_product(np.asarray(Y))

    def bytes_per_product(self, n_vectors: int = 1, *, adjoint: bool = False) -> dict:
        """Array bytes the driver sends and receives for one product.

        Parameters
        ----------
        n_vectors : int, optional
            Columns of the ``matmat`` operand (1 for ``matvec``).
        adjoint : bool, optional
            For ``rmatvec``/``rmatmat`` instead of ``matvec``/``matmat``.

        Returns
        -------
        dict
            ``sent`` (the input, once), ``received`` (the output, once),
            ``between_workers`` (the input's replicas on the other workers,
            plus, for ``adjoint='reduce'``, the partial vectors summed on a
            worker other than theirs: an upper bound), all in bytes of the
            operator's dtype.  Message headers and task descriptions (a few
            hundred bytes per block) are not counted.

        Raises
        ------
        TypeError, ValueError
            If ``n_vectors`` is not a positive int.
        """
        n_vectors = check_positive_int(n_vectors, "n_vectors")
        item = self.dtype.itemsize * n_vectors
        n_in, n_out = (self.shape[0], self.shape[1]) if adjoint else (self.shape[1], self.shape[0])
        n_workers = len(self._client.scheduler_info(n_workers=-1)["workers"])
        between = (n_workers - 1) * n_in * item
        if adjoint and self._adjoint_method == "reduce":  # one partial sum per worker
            n_parts = min(len(self._own()[1]), n_workers)
            between += (n_parts - 1) * n_out * item
        return {"sent": n_in * item, "received": n_out * item, "between_workers": between}
