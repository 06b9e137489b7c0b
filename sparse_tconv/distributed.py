"""A convolution operator whose matrix lives in row blocks on a Dask cluster.

:class:`DistributedConvOperator` is a :class:`scipy.sparse.linalg.LinearOperator`
for matrices too large for one machine (or one worker).  The matrix is never
assembled on the driver: each block of contiguous rows is built *on a
worker*, straight from the geometry (:func:`sparse_tconv._build.build_rows`,
in O(that block's nnz)), and kept there as a persisted Dask future.  Only the
geometry and the weight travel to the cluster when it is built; each product
sends the input vector once and gathers the result.

Dask's lineage makes the blocks fault tolerant: a block lost with its worker
is rebuilt from the geometry on another worker, and a product running at that
moment still returns the right answer.

Requires the optional extra ``dask`` (``pip install "sparse-tconv[dask]"``,
i.e. ``dask[distributed]``); importing this module works without it, and
creating an operator then raises :class:`ImportError`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import uuid

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ._build import balanced_row_ranges, build_rows, row_offsets, validate
from ._geometry import (
    _INT32_MAX,
    _check_positive_int,
    _matrix_size,
    cast_if_safe,
    index_dtype,
)
from ._parallel import run_parallel

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


def _build_block(spec, start, stop, transpose):
    geometry, weight = spec
    matrix = build_rows(geometry, weight, start, stop, transpose=transpose, threads=1)
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


def _is_zero(value) -> bool:
    """Whether an int or a sequence of ints is 0 everywhere."""
    try:
        return all(v == 0 for v in np.ravel(np.asarray(value, dtype=object)))
    except TypeError:
        return False


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
    if size.shape[1] <= _INT32_MAX:  # blocks small enough for int32 indices
        n = max(n, -(-size.nnz // _INT32_MAX))
    return n


def _assign(n_blocks: int, workers: dict) -> list[str]:
    """Worker of each block: contiguous runs, in proportion to the worker threads."""
    addrs = list(workers)
    bounds = np.cumsum([workers[a]["nthreads"] for a in addrs])
    where = (np.arange(n_blocks) + 0.5) / n_blocks * bounds[-1]
    return [addrs[i] for i in np.searchsorted(bounds, where, side="right").tolist()]


def _block_nbytes(geom, ranges, dtype, transpose) -> list[int]:
    """Predicted bytes of each block's CSR arrays (exact)."""
    n_cols = _matrix_size(geom, dtype, transpose).shape[1]
    cuts = row_offsets(geom, [r for pair in ranges for r in pair], transpose=transpose)
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

    *Per product* the driver sends the input once (``client.scatter(x,
    broadcast=True)``: to the scheduler, which replicates it to every
    worker) and receives the output once (the blocks' pieces, through the
    scheduler unless ``client.direct_to_workers``); the blocks never move.
    The adjoint with ``adjoint='reduce'`` also moves partial vectors of the
    input's length between workers (about one per worker after the local
    sums) and returns one vector.

    *Results.*  ``matvec``/``matmat`` (and the adjoint with
    ``adjoint='transpose'``) compute each output row with scipy's serial
    CSR kernel on the row's own entries, in the order of the whole matrix,
    so they are bit-for-bit equal to scipy's ``W @ x`` (``W.T @ y``) and to
    the local ``matvec``, whatever ``n_blocks``.  With ``adjoint='reduce'`` the adjoint is a sum of
    ``n_blocks`` partial vectors in a fixed tree: equal to the local result
    to rounding (not bit-for-bit), and reproducible for a given ``n_blocks``.

    *Faults.*  Blocks are Dask tasks computed from the geometry, so a block
    lost with its worker is rebuilt on another worker (its share of memory
    must fit there).  A product whose input was lost, or sent to a worker
    dying at that moment, is sent again (up to 3 times).

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
        if not isinstance(transpose, (bool, np.bool_)):
            raise TypeError(f"transpose must be a bool, got transpose={transpose!r}")
        transpose = bool(transpose)
        if not isinstance(adjoint, str) or adjoint not in ADJOINT_METHODS:
            raise ValueError(f"adjoint must be one of {ADJOINT_METHODS}, got adjoint={adjoint!r}")
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                        padding_mode=padding_mode)
        if transpose:
            geometry["output_padding"] = output_padding
        elif not _is_zero(output_padding):
            raise ValueError(
                "output_padding belongs to the transposed convolution: pass transpose=True "
                f"(got output_padding={output_padding!r} with transpose=False)"
            )
        if n_blocks is not None:
            n_blocks = _check_positive_int(n_blocks, "n_blocks")
        w, geom = validate(weight, input_shape, transpose=transpose, dtype=dtype, **geometry)
        client = _resolve_client(client)
        workers = _workers(client)
        size = _matrix_size(geom, w.dtype, transpose)
        if n_blocks is None:
            n_blocks = _default_n_blocks(size, workers)

        matrices = [transpose] if adjoint == "reduce" else [transpose, not transpose]
        plans, per_worker = [], dict.fromkeys(workers, 0)
        for tr in matrices:
            ranges = balanced_row_ranges(geom, n_blocks, transpose=tr)
            nbytes = _block_nbytes(geom, ranges, w.dtype, tr)
            where = _assign(len(ranges), workers)
            for addr, b in zip(where, nbytes):
                per_worker[addr] += b
            plans.append((tr, ranges, nbytes, where))
        _check_memory(per_worker, workers)

        self._client = client
        self._geometry = geom
        self._weight = w
        self._is_transposed = transpose
        self._adjoint_method = adjoint
        self._name = f"sparse_tconv-{uuid.uuid4().hex[:12]}"
        # One task holds the geometry and the weight; every block depends on
        # it, so a lost block can be rebuilt from the scheduler's lineage.
        self._spec = client.submit(_spec, geom, w, key=f"{self._name}-spec")
        self._blocks = {}
        for tr, ranges, nbytes, where in plans:
            futures = [
                client.submit(
                    _build_block,
                    self._spec,
                    a,
                    b,
                    tr,
                    key=f"{self._name}-{'T' if tr != transpose else 'W'}-{i}",
                    workers=[addr],
                    allow_other_workers=True,
                )
                for i, ((a, b), addr) in enumerate(zip(ranges, where))
            ]
            self._blocks[tr] = (ranges, nbytes, futures)
        all_futures = [f for _, _, futures in self._blocks.values() for f in futures]
        _import_distributed().wait(all_futures)
        for future in all_futures:
            if future.status == "error":
                self.close()
                future.result()  # raises the worker's exception
        super().__init__(dtype=w.dtype, shape=size.shape)

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
        return self._is_transposed

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
        g = self._geometry
        return g.output_shape if self._is_transposed else g.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        g = self._geometry
        return g.input_shape if self._is_transposed else g.output_shape

    def _own(self):
        if not self._blocks:
            raise RuntimeError("this DistributedConvOperator is closed")
        return self._blocks[self._is_transposed]

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        return list(self._own()[0])

    @property
    def block_nbytes(self) -> list[int]:
        return list(self._own()[1])

    @property
    def nbytes(self) -> int:
        self._own()
        return sum(sum(nbytes) for _, nbytes, _ in self._blocks.values())

    @property
    def futures(self) -> tuple:
        return tuple(self._own()[2])

    def __repr__(self):
        state = "closed" if not self._blocks else f"{len(self._own()[2])} blocks"
        kind = "transposed convolution" if self._is_transposed else "convolution"
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype} "
            f"({kind}), {state}, adjoint={self._adjoint_method!r}>"
        )

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Release the blocks on the cluster; later products raise RuntimeError."""
        futures = [f for _, _, fs in self._blocks.values() for f in fs]
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
        groups = {}
        for block in blocks:
            holders = who_has.get(block.key) or ("",)  # "": being rebuilt
            groups.setdefault(min(holders), []).append(block)
        return list(groups.values())

    def _run(self, x, blocks, submit_all, combine):
        """Send ``x``, run one task per worker, gather and combine.

        ``submit_all(x_future, groups)`` returns the futures to gather.  A
        product whose input is lost with its worker is sent again.
        """
        client = self._client
        for attempt in range(_ATTEMPTS):
            x_future = futures = None
            try:
                # To one worker; the others fetch it from there.  (broadcast=True
                # would make the scheduler replicate it, and its replication
                # retries a worker that died meanwhile for ever.)
                x_future = client.scatter(x, hash=False)
                futures = submit_all(x_future, self._groups(blocks))
                return combine(client.gather(futures))
            except (OSError, concurrent.futures.CancelledError):
                if attempt == _ATTEMPTS - 1:
                    raise
            finally:
                del x_future, futures  # released on the cluster

    def _rows(self, matrix_key, x, conj):
        _, _, blocks = self._blocks[matrix_key]
        out = np.empty((self._blocks[matrix_key][0][-1][1],) + x.shape[1:],
                       dtype=np.result_type(self.dtype, x.dtype))

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

        return self._run(x, blocks, submit_all, combine)

    def _matvec(self, x):
        self._own()
        return self._rows(self._is_transposed, self._cast(x).ravel(), conj=False)

    def _matmat(self, X):
        self._own()
        return self._rows(self._is_transposed, self._cast(X), conj=False)

    def _adjoint_product(self, y):
        self._own()
        y = self._cast(y)
        if self._adjoint_method == "transpose":
            conj = np.iscomplexobj(self._weight)
            return self._rows(not self._is_transposed, y, conj=conj)
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

        return self._run(y, self._blocks[self._is_transposed][2], submit_all, lambda r: r[0])

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
        n_vectors = _check_positive_int(n_vectors, "n_vectors")
        item = self.dtype.itemsize * n_vectors
        n_in, n_out = (self.shape[0], self.shape[1]) if adjoint else (self.shape[1], self.shape[0])
        n_workers = len(self._client.scheduler_info(n_workers=-1)["workers"])
        between = (n_workers - 1) * n_in * item
        if adjoint and self._adjoint_method == "reduce":  # one partial sum per worker
            n_parts = min(len(self._own()[2]), n_workers)
            between += (n_parts - 1) * n_out * item
        return {"sent": n_in * item, "received": n_out * item, "between_workers": between}
