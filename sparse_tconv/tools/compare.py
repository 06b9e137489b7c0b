"""The matrix product against direct kernels and peers: ``sparse-tconv bench`` and ``crossover``.

Every figure is a time measured in one run, reported as a ratio to the
operator's threaded product ``W @ x`` of the same geometry (on dense channel
blocks where the layer has them, else on the CSR matrix; the keys say
"csr" for both), and that product itself against the memory-bandwidth bound
measured in the same run.  Direct
kernels are :mod:`sparse_tconv.direct`'s; peers (PyTorch, PyLops) are timed
only when they are installed.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import ConvOperator, conv_matrix, conv_matrix_nnz, direct
from .._validation import normalize_padding
from .configs import CONFIGS, QUICK_CONFIGS, Config
from .timing import best_time, measure_bandwidth

__all__ = [
    "BENCH_CONFIGS",
    "BENCH_QUICK_CONFIGS",
    "Progress",
    "available_peers",
    "compare_config",
    "format_comparison",
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
    """A one-line progress bar on stderr (a line per step when not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f} s  {label}")
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            self.stream.write("\r" + line[:120].ljust(120) + end)
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


def available_peers() -> tuple[dict, list[str]]:
    """Installed peer libraries and a note for each missing one."""
    found, notes = {}, []
    for name, extra in (("torch", "pip install torch"), ("pylops", "pip install pylops")):
        module = _import(name)
        if module is None:
            notes.append(f"{name} not installed: its columns are omitted ({extra} to add them)")
        else:
            found[name] = module
    return found, notes


def _torch_padding(padding, ndim: int):
    """PyTorch's form of a padding: a string, or one int per dimension; None if it has none."""
    pairs = normalize_padding(padding, ndim)
    if isinstance(pairs, str):
        return pairs
    if any(lo != hi for lo, hi in pairs):
        return None  # torch.nn.functional pads symmetrically only
    return tuple(lo for lo, _ in pairs)


def _torch_kernel(torch, config: Config, weight, x, dtype):
    """``torch.nn.functional.conv{N}d`` (or the transposed one) on this geometry, if it has one."""
    import torch.nn.functional as F

    ndim = len(config.weight_shape) - 2
    kwargs = dict(config.kwargs)
    if kwargs.pop("padding_mode", "zeros") != "zeros" or ndim > 3:
        return None
    kwargs["padding"] = _torch_padding(kwargs.get("padding", 0), ndim)
    if kwargs["padding"] is None or (config.transposed and isinstance(kwargs["padding"], str)):
        return None
    func = getattr(F, f"conv_transpose{ndim}d" if config.transposed else f"conv{ndim}d")
    w = torch.from_numpy(weight.astype(dtype))
    t = torch.from_numpy(x.astype(dtype))[None]
    return lambda: func(t, w, **kwargs)


def _pylops_applies(config: Config) -> bool:
    """PyLops' ConvolveND covers one channel, stride 1, an odd kernel centred ('same')."""
    kw, k = config.kwargs, config.weight_shape[2:]
    centred = kw.get("padding") == "same" or (
        len(set(k)) == 1 and kw.get("padding") == (k[0] - 1) // 2
    )
    return (not config.transposed and config.weight_shape[:2] == (1, 1) and centred
            and all(kk % 2 == 1 for kk in k) and kw.get("stride", 1) == 1
            and kw.get("dilation", 1) == 1 and kw.get("padding_mode", "zeros") == "zeros")


def pylops_operator(config: Config, weight):
    """PyLops' N-d FFT convolution computing the same as ``conv_matrix`` (see _pylops_applies)."""
    from pylops.signalprocessing import ConvolveND  # type: ignore[import-not-found]

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


def _n_positions(op) -> int:
    return math.prod(op.output_shape[1:])


def compare_config(config: Config, *, threads: int, bandwidth: float, repeat: int,
                   peers: dict, progress: Progress | None = None) -> dict:
    """Times (s) and ratios for one configuration: CSR, direct kernels, peers.

    ``r['times']`` maps each method to its best time for one sample; every
    ``r['vs_csr'][m]`` is that time over the threaded CSR product ``W @ x``.
    """
    rng = np.random.default_rng(0)
    weight, op, x = _operator_and_input(config, threads, rng)
    W = op.matrix
    y = rng.standard_normal(W.shape[0])
    matrix_bytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    r: dict[str, Any] = dict(config=config.name, description=config.description,
                             threads=threads, nnz=int(W.nnz), shape=list(W.shape),
                             matrix_bytes=int(matrix_bytes))
    times = {}
    times["build"] = best_time(lambda: config.build(weight), repeat, min_time=0)
    times["csr"] = best_time(lambda: op.matvec(x.ravel()), repeat)
    times["csr_serial"] = best_time(lambda: W @ x.ravel(), repeat)
    op.rmatvec(y)  # builds the transposed products' matrix once, outside the timing
    times["csr_transpose"] = best_time(lambda: op.rmatvec(y), repeat)
    batch = config.batch or 8
    X = rng.standard_normal((W.shape[1], batch))
    times["csr_batch_per_column"] = best_time(lambda: op.matmat(X), repeat) / batch
    r["batch"] = batch
    # what the operator's product reads: its dense channel blocks, or the CSR
    r["product_bytes"] = int(op.product_form.nbytes)
    r["bound_s"] = (r["product_bytes"] + x.nbytes + y.nbytes) / bandwidth
    r["csr_of_bound"] = r["bound_s"] / times["csr"]
    if progress:
        progress.step(f"{config.name}: CSR")

    x_sample = x
    for method in direct.METHODS:
        if method == "naive" and _n_positions(op) > _NAIVE_MAX_POSITIONS:
            continue
        run = _direct_kernel(method, config, weight, x_sample)
        times[method] = best_time(run, 1 if method == "naive" else repeat,
                                  min_time=0 if method == "naive" else 0.05)
    if progress:
        progress.step(f"{config.name}: direct kernels")

    torch = peers.get("torch")
    if torch is not None:
        for dtype, label in ((np.float64, "f64"), (np.float32, "f32")):
            run = _torch_kernel(torch, config, weight, x_sample, dtype)
            if run is None:
                continue
            with torch.no_grad(), _torch_threads(torch, 1):
                times[f"torch_{label}_1t"] = best_time(run, repeat)
            with torch.no_grad(), _torch_threads(torch, threads):
                times[f"torch_{label}_{threads}t"] = best_time(run, repeat)
    if "pylops" in peers and _pylops_applies(config):
        pylops_op, flat = pylops_operator(config, weight), x_sample.ravel()
        times["pylops_fft"] = best_time(lambda: pylops_op.matvec(flat), repeat)
    if progress:
        progress.step(f"{config.name}: peers")
    r["times"] = times
    r["vs_csr"] = {k: v / times["csr"] for k, v in times.items()}
    return r


_CSR_COLUMNS = [
    ("build", "build ms"),
    ("csr", "W@x ms"),
    ("csr_transpose", "WT@y ms"),
    ("csr_batch_per_column", "batch/col"),
    ("csr_serial", "scipy 1t"),
]


def _peer_columns(results) -> list[str]:
    seen = []
    for r in results:
        for key in r["times"]:
            if key not in seen and key not in dict(_CSR_COLUMNS):
                seen.append(key)
    return seen


def format_comparison(results: list[dict], machine: dict, notes: list[str]) -> str:
    """The bench table: CSR figures, then every other method as a ratio to ``W @ x``."""
    lines = [
        f"{machine['date']}, {machine['threads']} threads, float64; read bandwidth "
        f"{machine['bandwidth_all']/1e9:.1f} GB/s ({machine['bandwidth_1']/1e9:.1f} on 1 thread)",
        "",
        "Sparse matrix, by the operator (dense channel blocks where the layer has them, else CSR; "
        "times in ms; batch/col: matmat time per column; scipy 1t: scipy's serial CSR W @ x)",
        f"{'cfg':<4}{'nnz':>12}{'MB':>8}" + "".join(f"{h:>11}" for _, h in _CSR_COLUMNS)
        + f"{'of bound':>10}",
    ]
    for r in results:
        t = r["times"]
        lines.append(f"{r['config']:<4}{r['nnz']:>12,}{r['matrix_bytes']/1e6:>8.1f}"
                     + "".join(f"{t[k]*1e3:>11.3f}" for k, _ in _CSR_COLUMNS)
                     + f"{r['csr_of_bound']:>10.2f}")
    others = _peer_columns(results)
    lines += ["", "Direct kernels and peers: time in ms "
              "(time / matrix W@x; > 1 means the matrix is faster)",
              f"{'cfg':<4}" + "".join(f"{k:>20}" for k in others)]
    for r in results:
        cells = []
        for k in others:
            if k in r["times"]:
                cells.append(f"{r['times'][k]*1e3:.3f} ({r['vs_csr'][k]:.2g}x)")
            else:
                cells.append("-")
        lines.append(f"{r['config']:<4}" + "".join(f"{c:>20}" for c in cells))
    lines.append("")
    for r in results:
        lines.append(f"  ({r['config']}) {r['description']}")
    lines.append("\nof bound: (bytes of the matrix form W@x reads + x + y) / read bandwidth over "
                 "the W@x time; "
                 "naive: Python loop over output positions (small sizes only); fast: im2col "
                 "as a strided view + matmul; fft: scipy.fft; torch_f64_1t: "
                 "torch.nn.functional on 1 thread, float64; '-': not applicable or skipped")
    lines += [f"note: {n}" for n in notes]
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


def plot_comparison(results: list[dict], path, title: str = "") -> None:
    """Bar chart: every method's time over the CSR product's, per configuration (log scale)."""
    plt = _pyplot()
    methods = ["csr_transpose", "csr_serial"] + [m for m in _peer_columns(results)]
    fig, ax = plt.subplots(figsize=(11.5, 1.0 + 0.75 * len(results)))
    height = 0.8 / len(methods)
    cmap = plt.get_cmap("tab20")
    for j, m in enumerate(methods):
        ys = [i + j * height for i in range(len(results))]
        vals = [r["vs_csr"].get(m, np.nan) for r in results]
        ax.barh(ys, vals, height=height, label=m, color=cmap(j % 20))
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(results))])
    ax.set_yticklabels([f"({r['config']}) {r['description']}" for r in results], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time / threaded matrix product W @ x  (left of 1: faster than it)")
    ax.set_title(title or "sparse-tconv bench")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
                    progress.step(f"{C}x{n}x{n}, k{k}: {cell['winner']}")
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
