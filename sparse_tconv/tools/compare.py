"""The matrix product against peers and direct kernels: ``sparse-tconv bench`` and ``crossover``.

Every figure is a time measured in one run, reported as a ratio to the
sparse matrix's threaded product of the same geometry (the operator's own
``W @ x`` on diagonals or the CSR matrix, or, for a channel layer whose
operator multiplies through the structured form, the library's threaded
CSR products on its explicit matrix; the keys say "csr" for all: ``csr`` is
``W @ x``, ``csr_transpose`` its ``W.T @ y``), and that product itself
against the memory-bandwidth bound measured in the same run.  The
structured form is timed beside it (``structured``, ``structured_transpose``,
``structured_batch_per_column``).  The sparse-product peers (scipy's serial CSR, torch.sparse_csr,
sparse_convolution) multiply the same matrix; direct kernels are
:mod:`sparse_tconv.direct`'s; PyTorch's and PyLops' kernels are timed when
installed.  Tables and plots name every method in words (:func:`label`) and
mark what was skipped, and why.
"""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import ConvOperator, conv_matrix, conv_matrix_nnz, direct
from .._validation import normalize_padding
from .configs import CONFIGS, QUICK_CONFIGS, Config
from .timing import Timing, best_time, measure_bandwidth, paired_stats, time_stats

__all__ = [
    "BENCH_CONFIGS",
    "BENCH_QUICK_CONFIGS",
    "Progress",
    "available_peers",
    "missing_peers",
    "compare_config",
    "label",
    "reference_of",
    "spconv_mode",
    "spconv_peer",
    "torch_csr",
    "torch_csr_products",
    "format_comparison",
    "markdown_table",
    "plot_comparison",
    "crossover_grid",
    "run_crossover",
    "format_crossover",
    "plot_crossover",
    "machine_figures",
]

# The configurations of the performance work at full size (about a minute on
# two cores), each also timing a batch of 8 columns unless its row says
# otherwise (32 for (c), as in the performance work).
BENCH_CONFIGS = [c.with_batch(c.batch or 8) for c in CONFIGS]
BENCH_QUICK_CONFIGS = [c.with_batch(c.batch or 4) for c in QUICK_CONFIGS]

# The naive kernel loops over output positions in Python: only small problems.
_NAIVE_MAX_POSITIONS = 4096


class Progress:
    """A one-line progress bar on stderr (a line per change when not a terminal).

    :meth:`begin` names the step that starts running now, :meth:`update`
    renames it while it runs (its sub-steps), :meth:`end` counts it done.
    The line always names what is running at the moment it is printed, never
    what just finished.  ``clock`` is the timer (a fake one in tests).
    """

    def __init__(self, total: int, stream=None, width: int = 30, clock=time.perf_counter):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.start = clock()
        self.running: str | None = None

    def begin(self, label: str) -> None:
        """Start a step: the line shows ``label`` until the next call."""
        self.running = label
        self._write(f"running: {label}")

    def update(self, label: str) -> None:
        """Rename the running step (what part of it runs now)."""
        self.begin(label)

    def end(self, result: str = "") -> None:
        """The running step is done (``result``: a word on its outcome, shown once)."""
        self.done = min(self.done + 1, self.total)
        finished, self.running = self.running, None
        last = self.done >= self.total
        if result or last:
            self._write(f"done: {finished}{': ' + result if result else ''}", newline=last)

    def step(self, label: str) -> None:
        """A step reported after the fact (one call per finished step)."""
        self.running = label
        self.end()

    def _write(self, text: str, newline: bool = False) -> None:
        filled = self.width * self.done // self.total
        elapsed = self.clock() - self.start
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} done "
                f"{elapsed:5.0f} s  {text}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120) + ("\n" if newline else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@contextmanager
def _torch_threads(torch, n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Optional libraries timed beside the operator: import name, its name in the
# notes and the legend, how to install it (the README's pins), and the
# prefixes of the timing keys it owns.
_PEER_LIBRARIES = (
    ("torch", "PyTorch", "pip install torch==2.13.0", ("csr_torch", "torch_")),
    ("pylops", "PyLops", "pip install pylops", ("pylops",)),
    ("sparse_convolution", "sparse_convolution", "pip install sparse-convolution", ("spconv",)),
)


def available_peers() -> tuple[dict, list[str]]:
    """Installed peer libraries and a note for each missing one."""
    found, notes = {}, []
    for name, human, install, _ in _PEER_LIBRARIES:
        module = _import(name)
        if module is None:
            notes.append(f"{name} not installed: the {human} columns are left out "
                         f"({install} to add them)")
        else:
            found[name] = module
    return found, notes


def _peer_of(key: str) -> str | None:
    """The import name of the optional library that times ``key``; None for the project's own."""
    for name, _, _, prefixes in _PEER_LIBRARIES:
        if key.startswith(prefixes):
            return name
    return None


def _not_installed(r: dict, key: str) -> bool:
    """Whether ``key`` has no figure in ``r`` because its library is missing (column left out)."""
    return _peer_of(key) in r.get("not_installed", ())


def missing_peers(results) -> list[str]:
    """The human names of the peer libraries missing from every result, in the notes' order."""
    missing = set.intersection(*(set(r.get("not_installed", ())) for r in results)) \
        if results else set()
    return [human for name, human, _, _ in _PEER_LIBRARIES if name in missing]


def _torch_padding(padding, ndim: int):
    """PyTorch's form of a padding: a string, or one int per dimension; None if it has none."""
    pairs = normalize_padding(padding, ndim)
    if isinstance(pairs, str):
        return pairs
    if any(lo != hi for lo, hi in pairs):
        return None  # torch.nn.functional pads symmetrically only
    return tuple(lo for lo, _ in pairs)


def torch_settings(config: Config) -> dict | str:
    """The configuration's keywords as ``torch.nn.functional``'s convolutions take them,
    or why they cannot (another padding mode, more than 3-D, uneven padding)."""
    ndim = len(config.weight_shape) - 2
    kwargs = dict(config.kwargs)
    if kwargs.pop("padding_mode", "zeros") != "zeros":
        return "padding mode"
    if ndim > 3:
        return f"{ndim}-D"
    kwargs["padding"] = _torch_padding(kwargs.get("padding", 0), ndim)
    if kwargs["padding"] is None:
        return "uneven padding"
    if config.transposed and isinstance(kwargs["padding"], str):
        return "string padding"
    return kwargs


def _torch_kernel(torch, config: Config, weight, x, dtype):
    """``torch.nn.functional.conv{N}d`` (or the transposed one) on this geometry, or why not."""
    import torch.nn.functional as F

    ndim = len(config.weight_shape) - 2
    kwargs = torch_settings(config)
    if isinstance(kwargs, str):
        return kwargs
    func = getattr(F, f"conv_transpose{ndim}d" if config.transposed else f"conv{ndim}d")
    w = torch.from_numpy(weight.astype(dtype))
    t = torch.from_numpy(x.astype(dtype))[None]
    return lambda: func(t, w, **kwargs)


def _pylops_skip(config: Config) -> str | None:
    """Why PyLops' ConvolveND cannot compute this geometry (None: it can).

    It covers one channel, stride 1, an odd kernel centred ('same').
    """
    kw, k = config.kwargs, config.weight_shape[2:]
    centred = kw.get("padding") == "same" or (
        len(set(k)) == 1 and kw.get("padding") == (k[0] - 1) // 2
    )
    if config.transposed:
        return "transposed"
    if config.weight_shape[:2] != (1, 1):
        return "channels"
    if kw.get("stride", 1) != 1 or kw.get("dilation", 1) != 1:
        return "stride/dilation"
    if not (centred and all(kk % 2 == 1 for kk in k)) or kw.get("padding_mode", "zeros") != "zeros":
        return "not 'same'"
    return None


def _pylops_applies(config: Config) -> bool:
    return _pylops_skip(config) is None


def pylops_operator(config: Config, weight):
    """PyLops' N-d FFT convolution computing the same as ``conv_matrix`` (see _pylops_applies)."""
    from pylops.signalprocessing import ConvolveND  # type: ignore[import-untyped, import-not-found, unused-ignore]

    k = config.weight_shape[2:]
    dims = config.input_shape[1:]
    # PyLops convolves (flips the kernel); PyTorch correlates: flip it back.
    h = weight[0, 0][(slice(None, None, -1),) * len(k)]
    return ConvolveND(dims, h, offset=[kk // 2 for kk in k], axes=tuple(range(len(dims))),
                      method="fft", dtype=weight.dtype)


def _operator_and_input(config: Config, threads: int, rng):
    weight = rng.standard_normal(config.weight_shape)
    op = config.operator(weight, threads=threads)
    x = rng.standard_normal(op.input_shape)
    return weight, op, x


def _direct_kernel(method: str, config: Config, weight, x):
    kernel = direct.conv_transpose if config.transposed else direct.conv
    return lambda: kernel(x, weight, method=method, **config.kwargs)


class _WithProducts:
    """``op`` whose ``matvec`` and ``rmatvec`` are other functions (the CSR's products)."""

    def __init__(self, op, matvec, rmatvec):
        self._op, self.matvec, self.rmatvec = op, matvec, rmatvec

    def __getattr__(self, name):
        return getattr(self._op, name)


def _csr_products(op, threads: int):
    """``(W @ v, W.T @ v)`` on the explicit CSR matrix, as the operators' CSR form runs them.

    What a channel layer's operator multiplied through before the structured
    form: the library's threaded kernels on ``op.matrix`` (and on W.T, its
    columns numbered as that form numbers them).
    """
    from .._forms import CsrForm, Request, Role

    conv = op.convolution
    forward = CsrForm.build(Request(conv, Role.FORWARD, threads, lambda: op.matrix))
    backward = CsrForm.build(Request(conv.T, Role.BACKWARD, threads,
                                     lambda: op.transpose_matrix))
    return (lambda v: forward.multiply(v, threads)), (lambda v: backward.multiply(v, threads))


def _n_positions(op) -> int:
    return math.prod(op.output_shape[1:])


# --- sparse-product peers --------------------------------------------------------------------

def torch_csr(torch, matrix):
    """A ``torch.sparse_csr_tensor`` on a scipy CSR matrix's own arrays (no copy)."""
    # The arrays are read-only (torch only reads them) and the layout is beta in
    # torch: its warnings about both say nothing about this use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        parts = [torch.from_numpy(np.asarray(a)) for a in (matrix.indptr, matrix.indices,
                                                            matrix.data)]
        return torch.sparse_csr_tensor(*parts, size=matrix.shape, check_invariants=False)


def torch_csr_products(torch, W):
    """``W @ x`` and ``W.T @ y`` as a PyTorch user runs them (set torch's threads around them).

    ``W.T @ y`` multiplies the CSR tensor of the transpose, built the way a
    user would (``W.T.tocsr()`` in scipy, then the tensor): torch's own
    transposed CSR product is not threaded.  Returns two functions of a
    numpy vector, and the transpose's build time in seconds.
    """
    forward = torch_csr(torch, W)
    start = time.perf_counter()
    backward = torch_csr(torch, W.T.tocsr())
    transpose_s = time.perf_counter() - start

    def product(tensor):
        return lambda v: tensor @ torch.from_numpy(v)

    return product(forward), product(backward), transpose_s


def _spconv_image(config: Config, image_shape=None):
    """This geometry as sparse_convolution's 2-D single channel one: (image, kernel, pads).

    A 1-D signal is a 1 x L image.  A string: why it does not apply.
    """
    kw = config.kwargs
    ndim = len(config.weight_shape) - 2
    if config.transposed:
        return "transposed"
    if ndim > 2:
        return f"{ndim}-D"
    if config.weight_shape[:2] != (1, 1):
        c_out, c_in = config.weight_shape[:2]
        return f"{c_in}->{c_out} ch"
    for name in ("stride", "dilation"):
        value = kw.get(name, 1)
        if np.any(np.asarray(value) != 1):
            return f"{name} {value}"
    if kw.get("padding_mode", "zeros") != "zeros" or config.kwargs.get("groups", 1) != 1:
        return "padding mode"
    image = tuple(image_shape or config.input_shape[1:])
    kernel = tuple(config.weight_shape[2:])
    if ndim == 1:
        image, kernel = (1, *image), (1, *kernel)
    return image, kernel


def _spconv_kernel(weight, kernel_shape):
    # sparse_convolution convolves (scipy.signal.convolve2d); PyTorch correlates: flip.
    return np.ascontiguousarray(weight.reshape(kernel_shape)[::-1, ::-1])


SPCONV_MODES = ("full", "same", "valid")


def spconv_mode(spconv, config: Config, rng=None) -> str:
    """The ``Toeplitz_convolution2d`` mode that computes this geometry, or ``skipped: why``.

    Its modes fix the padding (scipy.signal's full/same/valid); the one that
    matches is found numerically, on a small image with the same kernel and
    padding: the mode whose output equals ``conv_matrix(...) @ x``.
    """
    geometry = _spconv_image(config)
    if isinstance(geometry, str):
        return f"skipped: {geometry}"
    image, kernel = geometry
    rng = np.random.default_rng(3) if rng is None else rng
    small = tuple(1 if n == 1 and k == 1 else k + 4 for n, k in zip(image, kernel))
    spatial = small[1:] if len(config.weight_shape) == 3 else small
    weight = rng.standard_normal(config.weight_shape)
    x = rng.standard_normal(small)
    expected = conv_matrix(weight, (1, *spatial), **config.kwargs) @ x.ravel()
    for mode in SPCONV_MODES:
        conv = spconv.Toeplitz_convolution2d(small, _spconv_kernel(weight, kernel), mode=mode,
                                             method="precomputed")
        out = np.asarray(conv(x, batching=False)).ravel()
        if out.shape == expected.shape and np.allclose(out, expected, rtol=1e-10, atol=1e-12):
            return mode
    return "skipped: no mode fits"


def _close(a, b) -> bool:
    """Equal to rounding: sums in another order differ by a few ulps of the largest term."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max()))


def _time(func, repeat: int, min_time: float = 0.05) -> Timing:
    return time_stats(func, repeat, min_time)


def _paired(funcs, repeat: int, min_time: float = 0.05) -> list[Timing]:
    return paired_stats(funcs, repeat, min_time)


def _sparse_peers(r, config, op, W, weight, x, y, *, threads, repeat, peers, progress):
    """torch.sparse_csr (both directions) and sparse_convolution (build, product) on W.

    (scipy's serial product, the baseline, is timed with the operator's.)
    """
    timings, skipped, paired = r["timing"], r["skipped"], r["paired"]
    flat = x.ravel()
    torch = peers.get("torch")
    if torch is None:
        _mark_not_installed(r, "torch")
    else:
        if progress:
            progress.update(f"({config.name}) peers: torch.sparse_csr W @ x, W.T @ y")
        forward, backward, r["torch_transpose_build_s"] = torch_csr_products(torch, W)
        with _torch_threads(torch, threads):  # set once: setting it costs milliseconds
            # Verified before it is timed: the same products, to rounding.
            same = (_close(forward(flat).numpy(), op.matvec(flat))
                    and _close(backward(y).numpy(), op.rmatvec(y)))
            if same:
                # in alternating rounds with the operator's same products: their
                # ratio compares calls made under the same load
                own_f, own_b, timings["csr_torch"], timings["csr_torch_transpose"] = _paired(
                    [lambda: op.matvec(flat), lambda: op.rmatvec(y), lambda: forward(flat),
                     lambda: backward(y)], repeat)
                paired["csr_torch"], paired["csr_torch_transpose"] = own_f.min, own_b.min
            else:
                skipped["csr_torch"] = skipped["csr_torch_transpose"] = "skipped: output differs"
        del forward, backward  # the transpose's CSR: as large as W
    spconv = peers.get("sparse_convolution")
    if spconv is None:
        _mark_not_installed(r, "sparse_convolution")
        return
    if progress:
        progress.update(f"({config.name}) peers: sparse_convolution build and W @ x")
    peer = spconv_peer(spconv, config, weight, op, x)
    if isinstance(peer, str):
        skipped["spconv_build"] = skipped["spconv"] = peer
        return
    r["spconv_mode"], build, apply = peer
    own, timings["spconv_build"] = _paired([lambda: config.build(weight), build],
                                           max(1, min(repeat, 3)), min_time=0)
    paired["spconv_build"] = own.min
    own, timings["spconv"] = _paired([lambda: op.matvec(flat), apply], repeat)
    paired["spconv"] = own.min


def _mark_not_installed(r: dict, name: str) -> None:
    """Record that peer library ``name`` is missing: its columns are left out, not skipped."""
    if name not in r["not_installed"]:
        r["not_installed"].append(name)


def spconv_peer(spconv, config: Config, weight, op, x):
    """sparse_convolution's ``Toeplitz_convolution2d(method='precomputed')`` on this geometry.

    Returns ``(mode, build, apply)``: its mode, a function building it and
    one applying a built one to ``x``, after checking that its output equals
    ``op @ x``; or ``'skipped: why'`` where it does not apply.
    """
    mode = spconv_mode(spconv, config)
    if mode.startswith("skipped"):
        return mode
    image, kernel = _spconv_image(config)
    k = _spconv_kernel(weight, kernel)

    def build():
        return spconv.Toeplitz_convolution2d(image, k, mode=mode, method="precomputed")

    conv = build()
    x2 = np.asarray(x).reshape(image)
    if not _close(np.asarray(conv(x2, batching=False)).ravel(), op.matvec(np.ravel(x))):
        return "skipped: output differs"
    return mode, build, lambda: conv(x2, batching=False)


def _dense_peers(r, config, weight, x, *, threads, repeat, peers):
    """PyTorch's direct kernels (float64, float32; 1 and all threads) and PyLops' FFT."""
    torch = peers.get("torch")
    if torch is None:
        _mark_not_installed(r, "torch")
    else:
        _torch_kernels(r, torch, config, weight, x, threads=threads, repeat=repeat)
    if "pylops" not in peers:
        _mark_not_installed(r, "pylops")
        return
    why = _pylops_skip(config)
    if why:
        r["skipped"]["pylops_fft"] = f"skipped: {why}"
    else:
        pylops_op, flat = pylops_operator(config, weight), x.ravel()
        r["timing"]["pylops_fft"] = _time(lambda: pylops_op.matvec(flat), repeat)


def _torch_kernels(r, torch, config, weight, x, *, threads, repeat):
    """``torch.nn.functional``'s convolution in float64 and float32, on 1 and all threads."""
    for dtype, name in ((np.float64, "f64"), (np.float32, "f32")):
        keys = dict.fromkeys([f"torch_{name}_1t", f"torch_{name}_{threads}t"])
        run = _torch_kernel(torch, config, weight, x, dtype)
        if isinstance(run, str):
            r["skipped"].update(dict.fromkeys(keys, f"skipped: {run}"))
            continue
        for key, n in zip(keys, (1, threads)):
            with torch.no_grad(), _torch_threads(torch, n):
                r["timing"][key] = _time(run, repeat)


# The operator's figure each time is compared with: the same product (or build).
_REFERENCE = {"csr_torch_transpose": "csr_transpose", "spconv_build": "build",
              "structured_transpose": "csr_transpose",
              "structured_batch_per_column": "csr_batch_per_column"}

# Timings read the canonical CSR matrix: the bound of a product reading it.
_CSR_READERS = ("csr_serial", "csr_torch", "csr_torch_transpose")


def reference_of(key: str) -> str:
    """The operator's timing that ``key``'s ratio is taken over."""
    return _REFERENCE.get(key, "csr")


def compare_config(config: Config, *, threads: int, bandwidth: float, repeat: int,
                   peers: dict, progress: Progress | None = None) -> dict:
    """Times (s) and ratios for one configuration: the operator, direct kernels, peers.

    ``r['times']`` maps each method to its best time for one sample and
    ``r['timing']`` to its min, median and max over ``repeat`` rounds;
    ``r['vs_csr'][m]`` is that time over the operator's same product (``W.T
    @ y`` for torch's transposed product, the CSR build for
    sparse_convolution's build, else ``W @ x``), so above 1 means the
    operator is ahead.  The sparse peers run in rounds alternating with the
    operator's product, whose best time there is ``r['paired'][m]``.
    ``r['skipped'][m]`` says why a method has no time; the methods of a
    peer library listed in ``r['not_installed']`` have neither.
    """
    rng = np.random.default_rng(0)
    name = f"({config.name})"
    if progress:
        progress.begin(f"{name} operator: build W, W @ x, W.T @ y, batch; scipy's W @ x")
    weight, op, x = _operator_and_input(config, threads, rng)
    W = op.matrix
    y = rng.standard_normal(W.shape[0])
    matrix_bytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    # A channel layer's operator multiplies through the structured form; the
    # sparse rows then time the explicit CSR matrix (the library's threaded
    # CSR products), and the structured form is timed beside them.
    structured = op.product_form.name == "structured"
    matvec, rmatvec = _csr_products(op, threads) if structured else (op.matvec, op.rmatvec)
    matmat = matvec if structured else op.matmat
    r: dict[str, Any] = dict(config=config.name, description=config.description,
                             threads=threads, nnz=int(W.nnz), shape=list(W.shape),
                             matrix_bytes=int(matrix_bytes),
                             form="csr" if structured else op.product_form.name,
                             repeat=repeat, timing={}, skipped={}, paired={}, not_installed=[])
    timings = r["timing"]
    timings["build"] = _time(lambda: config.build(weight), repeat, min_time=0)
    timings["csr"] = _time(lambda: matvec(x.ravel()), repeat)
    timings["csr_serial"] = _time(lambda: W @ x.ravel(), repeat)
    rmatvec(y)  # builds the transposed products' matrix once, outside the timing
    timings["csr_transpose"] = _time(lambda: rmatvec(y), repeat)
    batch = config.batch or 8
    X = rng.standard_normal((W.shape[1], batch))
    t = _time(lambda: matmat(X), repeat)
    timings["csr_batch_per_column"] = Timing(t.min / batch, t.median / batch, t.max / batch,
                                               t.rounds)
    r["batch"] = batch
    if structured:
        timings["structured"] = _time(lambda: op.matvec(x.ravel()), repeat)
        timings["structured_transpose"] = _time(lambda: op.rmatvec(y), repeat)
        t = _time(lambda: op.matmat(X), repeat)
        timings["structured_batch_per_column"] = Timing(t.min / batch, t.median / batch,
                                                        t.max / batch, t.rounds)
        # what an operator holds for both directions (a fresh one: op holds the CSR now)
        fresh = config.operator(weight, threads=threads)
        fresh.rmatvec(y)
        r["structured_bytes"] = int(fresh.nbytes)
    else:
        r["skipped"].update(dict.fromkeys(
            ["structured", "structured_transpose", "structured_batch_per_column"],
            "skipped: one channel per group"))
    # what the sparse rows' product reads: the operator's form, or the CSR
    r["product_bytes"] = int(matrix_bytes if structured else op.product_form.nbytes)
    r["bound_s"] = (r["product_bytes"] + x.nbytes + y.nbytes) / bandwidth
    r["csr_bound_s"] = (matrix_bytes + x.nbytes + y.nbytes) / bandwidth
    if progress:
        progress.end()
        progress.begin(f"{name} direct kernels: naive, fast, fft")
    for method in direct.METHODS:
        if method == "naive" and _n_positions(op) > _NAIVE_MAX_POSITIONS:
            r["skipped"][method] = "skipped: too large"
            continue
        run = _direct_kernel(method, config, weight, x)
        timings[method] = _time(run, 1 if method == "naive" else repeat,
                                min_time=0 if method == "naive" else 0.05)
    if progress:
        progress.end()
        progress.begin(f"{name} peers: torch.sparse_csr, sparse_convolution, torch conv, PyLops")
    # the sparse peers are paired with the sparse matrix's own products
    sparse = _WithProducts(op, matvec, rmatvec) if structured else op
    _sparse_peers(r, config, sparse, W, weight, x, y, threads=threads, repeat=repeat,
                  peers=peers, progress=progress)
    if progress:
        progress.update(f"{name} peers: torch.nn.functional, PyLops")
    _dense_peers(r, config, weight, x, threads=threads, repeat=repeat, peers=peers)
    if progress:
        progress.end()
    times = {k: v.min for k, v in timings.items()}
    r["times"] = times
    r["timing"] = {k: v._asdict() for k, v in timings.items()}
    # A peer timed in alternating rounds with the operator is compared with
    # the operator's time from those rounds.
    r["vs_csr"] = {k: v / r["paired"].get(k, times[reference_of(k)]) for k, v in times.items()}
    r["csr_of_bound"] = r["bound_s"] / times["csr"]
    r["of_bound"] = {k: r["csr_bound_s"] / times[k] for k in _CSR_READERS if k in times}
    r["of_bound"]["csr"] = r["csr_of_bound"]
    r["of_bound"]["csr_transpose"] = r["bound_s"] / times["csr_transpose"]
    return r


# --- labels and tables -----------------------------------------------------------------------

_LABELS = {
    "build": "build W (conv_matrix, CSR)",
    "csr": "sparse matrix W @ x",
    "csr_transpose": "sparse matrix W.T @ y",
    "csr_batch_per_column": "sparse matrix W @ X, per column",
    "structured": "structured form W @ x",
    "structured_transpose": "structured form W.T @ y",
    "structured_batch_per_column": "structured form W @ X, per column",
    "csr_serial": "scipy CSR W @ x, 1 thread",
    "csr_torch": "torch.sparse_csr W @ x",
    "csr_torch_transpose": "torch.sparse_csr W.T @ y",
    "spconv_build": "sparse_convolution build",
    "spconv": "sparse_convolution W @ x",
    "naive": "direct: Python loop",
    "fast": "direct: im2col view + matmul",
    "fft": "direct: scipy.fft",
    "pylops_fft": "PyLops ConvolveND (FFT)",
}

_FORM_NAMES = {"diagonals": "diagonals", "csr": "CSR"}


def label(key: str, threads: int | None = None) -> str:
    """The human name of a timing key (``csr_transpose`` -> 'operator W.T @ y')."""
    if key in _LABELS:
        text = _LABELS[key]
        if key.startswith("csr_torch") and threads:
            text += f", {threads} threads"
        return text
    parts = key.split("_")
    if len(parts) == 3 and parts[0] == "torch" and parts[2].endswith("t"):
        n = parts[2][:-1]
        return f"torch conv {parts[1]}, {n} thread{'s' if n != '1' else ''}"
    return key


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1 else f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 10 else f"{value:.2g}x"


def _cell(r: dict, key: str) -> str:
    """``ms (ratio x)`` or ``skipped: why``."""
    if key in r["times"]:
        return f"{_ms(r['times'][key])} ({_ratio(r['vs_csr'][key])})"
    if _not_installed(r, key):
        return "not installed"
    return r.get("skipped", {}).get(key, "skipped")


def _shown(results, keys) -> list[str]:
    """``keys`` less those of peer libraries missing from every result (named once instead)."""
    return [k for k in keys if not results or not all(_not_installed(r, k) for r in results)]


_OPERATOR_COLUMNS = ["build", "csr", "csr_transpose", "csr_batch_per_column"]
_SPARSE_PEERS = ["csr_serial", "csr_torch", "csr_torch_transpose", "spconv_build", "spconv"]
_SHORT = {
    "csr_serial": "scipy 1t W@x", "csr_torch": "torch CSR W@x",
    "csr_torch_transpose": "torch CSR WT@y", "spconv_build": "spconv build",
    "spconv": "spconv W@x", "naive": "naive loop", "fast": "fast (im2col)", "fft": "fft",
    "pylops_fft": "PyLops FFT", "structured": "struct W@x",
    "structured_transpose": "struct WT@y", "structured_batch_per_column": "struct batch/col",
}


def _short(key: str) -> str:
    if key in _SHORT:
        return _SHORT[key]
    return label(key).replace("torch conv ", "torch ").replace(" threads", "t") \
        .replace(" thread", "t")


def _other_columns(results) -> list[str]:
    """Direct kernels and dense peers present in any result (timed or skipped)."""
    seen: list[str] = []
    for r in results:
        for key in [*r["times"], *r.get("skipped", {})]:
            if key not in seen and key not in _OPERATOR_COLUMNS + _SPARSE_PEERS:
                seen.append(key)
    return seen


def _table(results, keys, width: int) -> list[str]:
    """Right-aligned columns, each at least ``width`` wide and one space apart."""
    cells = [[_cell(r, k) for k in keys] for r in results]
    widths = [max([width, len(_short(k)) + 1] + [len(row[j]) + 1 for row in cells])
              for j, k in enumerate(keys)]
    lines = [f"{'cfg':<4}" + "".join(f"{_short(k):>{w}}" for k, w in zip(keys, widths))]
    for r, row in zip(results, cells):
        lines.append(f"{r['config']:<4}" + "".join(f"{c:>{w}}" for c, w in zip(row, widths)))
    return lines


def _spread_lines(results) -> list[str]:
    """Per configuration: the largest median/min over its timings, and which one."""
    rounds = sorted({r.get("repeat", 0) for r in results})
    lines = [f"spread (median / min over {', '.join(map(str, rounds))} round(s) per timing; "
             "1.00 = every round the same):"]
    for r in results:
        timing = r.get("timing", {})
        spreads = {k: t["median"] / t["min"] for k, t in timing.items()
                   if t["rounds"] > 1 and t["min"] > 0}
        if not spreads:
            lines.append(f"  ({r['config']}) one round only: no spread (use --repeat 3 or more)")
            continue
        worst = max(spreads, key=lambda k: spreads[k])
        lines.append(f"  ({r['config']}) operator W @ x {spreads.get('csr', math.nan):.2f}, "
                     f"W.T @ y {spreads.get('csr_transpose', math.nan):.2f}; largest "
                     f"{spreads[worst]:.2f} ({label(worst)})")
    return lines


def format_comparison(results: list[dict], machine: dict, notes: list[str]) -> str:
    """The bench tables: the operator's figures, the sparse peers, the direct kernels."""
    threads = machine["threads"]
    lines = [
        f"{machine['date']}, {threads} threads, float64; read bandwidth "
        f"{machine['bandwidth_all']/1e9:.1f} GB/s ({machine['bandwidth_1']/1e9:.1f} on 1 thread)",
        "",
        "The sparse matrix (times in ms, best of the rounds; median beside W@x; form: what "
        "the products read: the operator's own form, or for channel layers the explicit CSR "
        "matrix, threaded; batch/col: matmat time per column)",
        f"{'cfg':<4}{'form':>15}{'nnz':>13}{'MB':>8}{'build':>9}{'W@x':>9}{'median':>9}"
        f"{'of bound':>9}{'WT@y':>9}{'of bound':>9}{'batch/col':>10}",
    ]
    for r in results:
        t, bound = r["times"], r.get("of_bound", {})
        median = r.get("timing", {}).get("csr", {}).get("median", t["csr"])
        lines.append(
            f"{r['config']:<4}{_FORM_NAMES.get(r.get('form', ''), r.get('form', '')):>15}"
            f"{r['nnz']:>13,}{r['matrix_bytes']/1e6:>8.1f}{_ms(t['build']):>9}"
            f"{_ms(t['csr']):>9}{_ms(median):>9}{r['csr_of_bound']:>9.2f}"
            f"{_ms(t['csr_transpose']):>9}{bound.get('csr_transpose', math.nan):>9.2f}"
            f"{_ms(t['csr_batch_per_column']):>10}")
    lines += _structured_lines(results, threads)
    lines += ["", "Sparse products on the same matrix: time in ms (peer time / the operator's "
              "same product; > 1: the operator is ahead)"]
    lines += _table(results, _shown(results, _SPARSE_PEERS), 16)
    lines += ["", "The structured form, direct kernels and peers: time in ms "
              "(time / matrix W@x; > 1 means the matrix is faster)"]
    lines += _table(results, _other_columns(results), 15)
    lines.append("")
    for r in results:
        extra = f"; sparse_convolution mode '{r['spconv_mode']}'" if r.get("spconv_mode", "") \
            in SPCONV_MODES else ""
        lines.append(f"  ({r['config']}) {r['description']}{extra}")
    lines += [""] + _spread_lines(results)
    lines.append(
        f"\nof bound: (bytes the product reads + x + y) / read bandwidth over its time (the "
        "operator reads its product form; torch and scipy the CSR matrix, whose column is in "
        "--json). "
        f"torch CSR: torch.sparse_csr_tensor on W's arrays, {threads} threads; its W.T@y "
        "multiplies the CSR of W.T built as a user would (W.T.tocsr()), since torch's "
        "transposed CSR product is serial. spconv: sparse_convolution's "
        "Toeplitz_convolution2d(method='precomputed'), 2-D one channel (a 1-D signal as a "
        "1 x L image), checked equal to W @ x first; its build is over conv_matrix's. "
        "naive: Python loop over output positions (small sizes only); fast: im2col "
        "as a strided view + matmul; fft: scipy.fft; torch f64 1t: "
        "torch.nn.functional on 1 thread, float64")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _structured_lines(results, threads: int) -> list[str]:
    """The structured form of the channel layers: its times beside the CSR's and torch's."""
    rows = [r for r in results if "structured" in r["times"]]
    if not rows:
        return []
    torch_key = f"torch_f64_{threads}t"
    lines = ["", f"The structured form (channel layers: the weight's taps, tiled GEMMs; kB it "
             f"holds for both directions; ms; "
             f"in brackets the sparse matrix's same product over it, and torch float64 on "
             f"{threads} threads over it, > 1: the structured form is ahead)",
             f"{'cfg':<4}{'kB':>8}{'W@x':>9}{'vs CSR':>8}{'vs torch':>9}{'WT@y':>9}"
             f"{'vs CSR':>8}{'batch/col':>10}{'vs CSR':>8}"]
    for r in rows:
        t = r["times"]

        def over(key, base, t=t):
            return f"{t[base] / t[key]:.2f}" if base in t else "-"

        lines.append(
            f"{r['config']:<4}{r['structured_bytes']/1e3:>8.0f}{_ms(t['structured']):>9}"
            f"{over('structured', 'csr'):>8}{over('structured', torch_key):>9}"
            f"{_ms(t['structured_transpose']):>9}"
            f"{over('structured_transpose', 'csr_transpose'):>8}"
            f"{_ms(t['structured_batch_per_column']):>10}"
            f"{over('structured_batch_per_column', 'csr_batch_per_column'):>8}")
    return lines


def markdown_table(results: list[dict]) -> str:
    """The README's table of the sparse peers: ms, and in brackets the peer over the operator."""
    peers = _shown(results, _SPARSE_PEERS)
    head = ["config", "nnz", "form", "`W @ x`", "of bound", "`W.T @ y`", *(
        label(k, results[0]["threads"] if results else None) for k in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t = r["times"]
        cells = [f"({r['config']}) {r['description']}", f"{r['nnz']/1e6:.1f} M",
                 _FORM_NAMES.get(r.get("form", ""), ""), _ms(t["csr"]),
                 f"{r['csr_of_bound']:.2f}", _ms(t["csr_transpose"]),
                 *(_cell(r, k) for k in peers)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install 'sparse-tconv[bench]'"
        ) from exc
    return plt


_BAR_INCHES = 0.2  # height of one bar: readable labels at the docs' width


def _bar_panel(plt, ax, results, keys, threads, *, colors, xlabel):
    """Horizontal bars of ``vs_csr`` per configuration; skipped ones hatched and labelled."""
    n = len(keys)
    height = 0.86 / n
    ratios = [r["vs_csr"][k] for r in results for k in keys if k in r["times"]]
    lo = min([*ratios, 1.0]) / 3
    hi = max([*ratios, 1.0]) * 8
    for j, key in enumerate(keys):
        for i, r in enumerate(results):
            y = i + (j - (n - 1) / 2) * height
            if key in r["times"]:
                value = r["vs_csr"][key]
                ax.barh(y, value - lo, left=lo, height=height * 0.9, color=colors[j])
                ax.text(value * 1.08, y, f"{_ms(r['times'][key])} ms", va="center", fontsize=8)
            else:
                ax.barh(y, 1.0 - lo, left=lo, height=height * 0.9, facecolor="none",
                        edgecolor=colors[j], hatch="///", lw=0.6)
                ax.text(lo * 1.1, y, r.get("skipped", {}).get(key, "skipped"), va="center",
                        fontsize=7.5, color="0.25",
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.3))
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels([f"({r['config']})\n" + textwrap.fill(r["description"], 22)
                        for r in results], fontsize=9)
    ax.set_ylim(len(results) - 0.5, -0.5)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", which="major", color="0.85", lw=0.6)
    ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors[:n]]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="0.3", hatch="///"))
    names = [label(k, threads) + (" (over its W @ x)" if k == "csr_transpose" else "")
             for k in keys]
    return handles, names + ["skipped (why is written on it)"]


def plot_comparison(results: list[dict], path, title: str = "") -> None:
    """Two panels of bars: the sparse products' times over the operator's, then the kernels'.

    Each bar is a ratio (log scale; right of 1: slower than the operator)
    with its absolute time written beside it; a skipped method is a hatched
    placeholder that says why.  A peer library that is not installed has no
    bars: the first legend names it once.
    """
    plt = _pyplot()
    threads = results[0]["threads"] if results else None
    sparse = ["csr_transpose", *_shown(results, _SPARSE_PEERS)]
    others = _other_columns(results)
    panels = [(sparse, "sparse products on the same matrix",
               "time / the sparse matrix's same product (W.T @ y for the transposed products, "
               "conv_matrix for builds, else W @ x)")]
    if others:
        panels.append((others, "the structured form, direct convolution kernels, PyTorch / PyLops",
                       "time / the sparse matrix's W @ x (right of 1: the matrix product is "
                       "faster)"))
    heights = [len(results) * len(keys) * _BAR_INCHES + 2.2 for keys, _, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.4), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights), layout="constrained")
    missing = missing_peers(results)
    for ax, (keys, name, xlabel) in zip(axes[:, 0], panels):
        cmap = plt.get_cmap("tab10" if keys is sparse else "Dark2")
        handles, names = _bar_panel(plt, ax, results, keys, threads,
                                    colors=[cmap(j % 8) for j in range(len(keys))], xlabel=xlabel)
        if missing and keys is sparse:  # once, in the first legend: no bar stands for them
            handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="none"))
            names.append(f"not installed, left out: {', '.join(missing)}")
        # above the bars, under the panel's name, so that no bar is hidden
        ax.legend(handles, names, title=name, title_fontsize=11, alignment="left", fontsize=9,
                  ncol=3, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    fig.suptitle(title or "sparse-tconv bench", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- crossover -------------------------------------------------------------------------------

CROSSOVER_METHODS = ("csr", "fast", "fft")


def crossover_grid(quick: bool = False) -> dict:
    """Channels x kernel sizes x image sizes of the crossover map (2-D, C -> C, padding 'same')."""
    if quick:
        return dict(channels=[1, 4], kernels=[3, 5], images=[16])
    return dict(channels=[1, 4, 16, 64], kernels=[1, 3, 5, 9], images=[16, 64, 256])


def _matrix_times(weight, x, kwargs, *, threads, repeat) -> dict:
    """The operator's ``W @ x`` and the build of W (the operator is freed on return)."""
    op = ConvOperator(weight, x.shape, threads=threads, **kwargs)
    flat = x.ravel()
    return dict(csr=best_time(lambda: op.matvec(flat), repeat),
                csr_build=best_time(lambda: conv_matrix(weight, x.shape, **kwargs), 1,
                                    min_time=0))


def _crossover_cell(C, k, n, *, threads, repeat, max_nnz, rng):
    weight = rng.standard_normal((C, C, k, k))
    x = rng.standard_normal((C, n, n))
    kwargs = dict(padding="same")
    times = {}
    nnz = conv_matrix_nnz(weight.shape, x.shape, **kwargs).nnz
    if nnz <= max_nnz:
        times.update(_matrix_times(weight, x, kwargs, threads=threads, repeat=repeat))
    for method in ("fast", "fft"):
        times[method] = best_time(
            lambda method=method: direct.conv(x, weight, method=method, **kwargs), repeat)
    return dict(channels=C, kernel=k, image=n, nnz=int(nnz), times=times)


def run_crossover(grid: dict, *, threads: int, repeat: int, max_nnz: int = 150_000_000,
                  progress: Progress | None = None) -> list[dict]:
    """Time CSR ``W @ x``, the fast direct kernel and the FFT kernel on every grid cell.

    Cells whose matrix would exceed ``max_nnz`` entries time only the direct
    kernels (the matrix is marked as not built).
    """
    rng = np.random.default_rng(0)
    cells = []
    for n in grid["images"]:
        for C in grid["channels"]:
            for k in grid["kernels"]:
                if progress:
                    progress.begin(f"{C}x{n}x{n}, k{k}: W @ x, fast, fft")
                cell = _crossover_cell(C, k, n, threads=threads, repeat=repeat, max_nnz=max_nnz,
                                       rng=rng)
                t = {m: cell["times"][m] for m in CROSSOVER_METHODS if m in cell["times"]}
                ranked = sorted(t, key=lambda m: t[m])
                cell["winner"] = ranked[0]
                cell["factor"] = t[ranked[1]] / t[ranked[0]]  # runner-up over winner
                if "csr" in t:
                    cell["csr_over_best_direct"] = t["csr"] / min(t["fast"], t["fft"])
                cells.append(cell)
                if progress:
                    progress.end(f"{cell['winner']} wins")
    return cells


def format_crossover(cells: list[dict], machine: dict) -> str:
    lines = [f"{machine['date']}, {machine['threads']} threads, float64, 2-D C->C, padding 'same'",
             f"{'image':>6}{'C':>4}{'k':>4}{'nnz':>17}{'W@x ms':>10}{'fast ms':>10}{'fft ms':>10}"
             f"{'winner':>8}{'by':>7}{'W/best direct':>17}"]
    for c in cells:
        t = c["times"]
        csr = f"{t['csr']*1e3:10.3f}" if "csr" in t else f"{'too big':>10}"
        ratio = f"{c['csr_over_best_direct']:17.2f}" if "csr" in t else f"{'-':>17}"
        lines.append(f"{c['image']:>6}{c['channels']:>4}{c['kernel']:>4}{c['nnz']:>17,}{csr}"
                     f"{t['fast']*1e3:10.3f}{t['fft']*1e3:10.3f}{c['winner']:>8}"
                     f"{c['factor']:>6.1f}x{ratio}")
    lines.append("by: runner-up time over the winner's; W/best direct < 1: the matrix product "
                 "wins (build time not included; it is paid once per weight)")
    return "\n".join(lines)


def plot_crossover(cells: list[dict], path, title: str = "") -> None:
    """Heat map per image size: the fastest method in each (channels, kernel) cell."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    images = sorted({c["image"] for c in cells})
    channels = sorted({c["channels"] for c in cells})
    kernels = sorted({c["kernel"] for c in cells})
    colors = {"csr": "#4c72b0", "fast": "#dd8452", "fft": "#55a868"}
    cmap = ListedColormap([colors[m] for m in CROSSOVER_METHODS])
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images) + 1, 4.2), squeeze=False)
    for ax, n in zip(axes[0], images):
        grid = np.full((len(channels), len(kernels)), np.nan)
        for c in cells:
            if c["image"] != n:
                continue
            i, j = channels.index(c["channels"]), kernels.index(c["kernel"])
            grid[i, j] = CROSSOVER_METHODS.index(c["winner"])
            label = f"{c['winner']}\n{c['factor']:.1f}x"
            if "csr" not in c["times"]:
                label += "\n(no W)"
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white")
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(CROSSOVER_METHODS) - 0.5, origin="lower")
        ax.set_xticks(range(len(kernels)))
        ax.set_xticklabels(kernels)
        ax.set_yticks(range(len(channels)))
        ax.set_yticklabels(channels)
        ax.set_xlabel("kernel size k (k x k, padding 'same')")
        ax.set_ylabel("channels in = out")
        ax.set_title(f"{n} x {n} image")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in CROSSOVER_METHODS]
    fig.legend(handles, ["sparse matrix W @ x", "fast direct (im2col view)", "FFT"],
               loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title or "fastest method per cell; factor = runner-up / winner")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_figures(threads: int, quick: bool, repeat: int) -> dict:
    size = (64 << 20) if quick else (512 << 20)
    return dict(threads=threads, date=time.strftime("%Y-%m-%d"),
                bandwidth_1=measure_bandwidth(1, size, repeat),
                bandwidth_all=measure_bandwidth(threads, size, repeat))
