"""The measurement engine: build and product timings against their physical bounds.

Run ``sparse-tconv perf`` or ``python -m sparse_tconv.tools.perf`` (``--help`` for
options).  Every
figure is a ratio measured within one run, since shared machines are noisy:
the build against the number of stored entries, the threaded products against
scipy's serial product on the same matrix, the batched product against one
product, the pattern reuse against a fresh build, and every product against
the memory-bandwidth bound measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import sys
import time
import tracemalloc
from typing import Any

import numpy as np

from .. import ConvOperator
from .._parallel import resolve_threads
from . import compare
from .configs import CONFIGS, QUICK_CONFIGS, Config, select
from .outputs import output_path_problem
from .timing import (
    best_time,
    measure_bandwidth,
    measure_block_gemm_rate,
    measure_fresh_write,
    measure_layer_gemm,
    paired_stats,
    settle,
    time_stats,
)

__all__ = ["TARGETS", "SMOKE_VERDICT", "run_config", "main"]


# The targets of the performance issue: (figure, comparison, bound, configs it
# applies to, the figure's physical limit measured in the same run or None).
TARGETS = [
    ("build_ns_per_entry", "<=", 4.0, "bcdg", None),
    ("matvec_speedup", ">=", 1.8, "bcdefg", "matvec_speedup_bound"),
    ("rmatvec_speedup", ">=", 1.8, "bcdefg", "matvec_speedup_bound"),
    # The forms that stream a matrix (the channel layers' structured form: below)
    ("rmatvec_over_matvec", "<=", 1.1, "def", None),
    ("rebuild_speedup", ">=", 3.0, "bcdefg", "rebuild_speedup_bound"),
    ("build_peak_over_matrix", "<=", 1.2, "bcdefg", None),
    # issue 18: ahead of every sparse peer where it applies; float32; one stored form
    ("torch_csr_over_matvec", ">=", 1.0, "bcdefg", None),
    ("torch_csr_over_rmatvec", ">=", 1.0, "bcdefg", None),
    ("spconv_over_matvec", ">=", 1.0, "bcdefg", None),
    ("float32_speedup", ">=", 1.6, "bcg", "float32_speedup_bound"),
    ("single_form_rmatvec_over_matvec", "<=", 1.5, "def", None),
    # issue 25: the channel layers' structured form against torch's direct kernels
    # (limits: the layer's flops as one GEMM at this machine's BLAS rate)
    ("structured_matvec_over_torch", "<=", 1.2, "bcg", "structured_matvec_over_torch_bound"),
    ("structured_rmatvec_over_torch", "<=", 1.2, "bcg", "structured_rmatvec_over_torch_bound"),
    ("structured_f32_matvec_over_torch", "<=", 1.5, "bcg",
     "structured_f32_matvec_over_torch_bound"),
    ("structured_f32_rmatvec_over_torch", "<=", 1.5, "bcg",
     "structured_f32_rmatvec_over_torch_bound"),
    ("structured_over_csr", ">=", 3.0, "c", None),
    ("structured_batch_column_over_matvec", "<=", 0.5, "c",
     "structured_batch_column_over_matvec_bound"),
    ("structured_bytes_over_csr", "<=", 0.01, "bcg", None),
    ("structured_build_peak_over_csr", "<=", 0.01, "bcg", None),
    ("structured_build_s", "<=", 0.005, "c", None),
]

# What a --quick run says instead of a verdict: its sizes are not the targets'.
SMOKE_VERDICT = "smoke run: not comparable"


def _peak_build_bytes(config: Config, weight) -> int:
    """Peak bytes allocated (as traced by tracemalloc) while building."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        config.build(weight)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _build_figures(config: Config, op, weight, new_weight, *, threads, write_bandwidth, repeat,
                   cold_settle) -> dict:
    """Building: the CSR matrix, its transpose, the operator, ``with_weight``; their floors."""
    W = op.matrix
    matrix_bytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    r: dict[str, Any] = {}
    r["build_s"] = best_time(lambda: config.build(weight), repeat, min_time=0)
    r["build_ns_per_entry"] = r["build_s"] / W.nnz * 1e9
    r["transpose_build_s"] = best_time(lambda: config.build_transpose(weight), repeat,
                                       min_time=0)
    r["operator_build_s"] = best_time(lambda: config.operator(weight, threads=threads), repeat,
                                      min_time=0)
    r["rebuild_s"] = best_time(lambda: op.with_weight(new_weight), repeat, min_time=0)
    r["rebuild_speedup"] = r["build_s"] / r["rebuild_s"]
    r["rebuild_over_operator_build"] = r["operator_build_s"] / r["rebuild_s"]
    # Floors: a build writes the whole matrix, a rebuild only the values, into
    # new memory; their ratio bounds what pattern reuse can gain.
    r["build_floor_s"] = matrix_bytes / write_bandwidth
    # with_weight writes the values of the operator's product form (and
    # nothing else): timed as a write of that many bytes into fresh memory on
    # the same threads, since the speed of a write depends on its size.
    form = op.product_form
    # (the diagonals' stored arrays are all values; their whole DIA matrix is
    # not what with_weight writes)
    # (the structured form's are the weight)
    r["values_bytes"] = int(form.nbytes if form.name in ("diagonals", "structured")
                            else form.matrix.data.nbytes)
    r["rebuild_floor_s"] = r["values_bytes"] / measure_fresh_write(
        threads, r["values_bytes"], repeat)
    r["rebuild_speedup_bound"] = r["build_s"] / r["rebuild_floor_s"]
    r["build_peak_over_matrix"] = _peak_build_bytes(config, weight) / matrix_bytes
    if cold_settle:
        settle(cold_settle)
        start = time.perf_counter()
        config.build(weight)
        r["cold_build_s"] = time.perf_counter() - start
        r["cold_build_ns_per_entry"] = r["cold_build_s"] / W.nnz * 1e9
    return r


def _product_figures(op, x, y, *, bandwidth, repeat) -> dict:
    """``W @ x`` and ``W.T @ y``: threaded against scipy's serial product and the bound."""
    W = op.matrix
    matrix_bytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    r: dict[str, Any] = {}
    r["scipy_matvec_s"] = best_time(lambda: W @ x, repeat)
    matvec = time_stats(lambda: op.matvec(x), repeat)
    r["matvec_s"], r["matvec_median_s"] = matvec.min, matvec.median
    op.rmatvec(y)  # builds the transposed products' matrix once, outside the timing
    r["scipy_transpose_matvec_s"] = best_time(lambda: W.T @ y, repeat)
    rmatvec = time_stats(lambda: op.rmatvec(y), repeat)
    r["rmatvec_s"], r["rmatvec_median_s"] = rmatvec.min, rmatvec.median
    r["matvec_speedup"] = r["scipy_matvec_s"] / r["matvec_s"]
    r["rmatvec_speedup"] = r["scipy_matvec_s"] / r["rmatvec_s"]
    r["rmatvec_over_matvec"] = r["rmatvec_s"] / r["matvec_s"]
    # A product reads data + indices + indptr, reads x, writes y: of the CSR
    # matrix for scipy, of the operator's product form for matvec (the
    # structured form's weight is no bound: its products are GEMMs).
    vectors = x.nbytes + y.nbytes
    form = op.product_form
    r["product_bytes"] = form.nbytes
    r["form"] = form.name
    r["bound_s"] = (r["product_bytes"] + vectors) / bandwidth
    r["matvec_fraction_of_bound"] = r["bound_s"] / r["matvec_s"]
    # The most any product reading the CSR matrix could gain over scipy here.
    r["csr_speedup_bound"] = r["scipy_matvec_s"] / ((matrix_bytes + vectors) / bandwidth)
    # ... and any product reading the operator's product form.
    r["matvec_speedup_bound"] = r["scipy_matvec_s"] / r["bound_s"]
    return r


def _peer_figures(config: Config, op, weight, x, y, *, threads, repeat, peers) -> dict:
    """torch.sparse_csr (both directions, all threads) and sparse_convolution, on W.

    Each ratio is the peer's time over the operator's same figure, the two
    timed in alternating rounds (the same load for both): above 1, the
    operator is ahead.  ``skipped`` says why a peer has no figure.
    """
    r: dict[str, Any] = {"skipped": {}}
    skipped = r["skipped"]
    torch = peers.get("torch")
    if torch is None:
        skipped["torch_csr"] = "skipped: torch not installed"
    else:
        forward, backward, _ = compare.torch_csr_products(torch, op.matrix)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            own_f, own_b, peer_f, peer_b = paired_stats(
                [lambda: op.matvec(x), lambda: op.rmatvec(y), lambda: forward(x),
                 lambda: backward(y)], repeat)
        finally:
            torch.set_num_threads(old)
        del forward, backward
        r["torch_csr_matvec_s"], r["torch_csr_rmatvec_s"] = peer_f.min, peer_b.min
        # the operator's own times in those rounds, which the ratios divide by
        r["torch_csr_paired_matvec_s"], r["torch_csr_paired_rmatvec_s"] = own_f.min, own_b.min
        r["torch_csr_over_matvec"] = peer_f.min / own_f.min
        r["torch_csr_over_rmatvec"] = peer_b.min / own_b.min
    spconv = peers.get("sparse_convolution")
    peer = "skipped: not installed" if spconv is None else compare.spconv_peer(
        spconv, config, weight, op, x)
    if isinstance(peer, str):
        skipped["spconv"] = peer
        return r
    r["spconv_mode"], build, apply = peer
    own, theirs = paired_stats([lambda: config.build(weight), build], max(1, min(repeat, 3)),
                               min_time=0)
    r["spconv_build_s"], r["spconv_build_over_build"] = theirs.min, theirs.min / own.min
    own, theirs = paired_stats([lambda: op.matvec(x), apply], repeat)
    r["spconv_matvec_s"], r["spconv_over_matvec"] = theirs.min, theirs.min / own.min
    return r


def _float32_figures(config: Config, weight, x, y, *, threads, bandwidth, repeat) -> dict:
    """The products in float32: half the bytes of the values, against float64 and the bound."""
    op = config.operator(weight.astype(np.float32), threads=threads)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    r: dict[str, Any] = {}
    r["float32_matvec_s"] = best_time(lambda: op.matvec(x32), repeat)
    op.rmatvec(y32)  # its transposed form, outside the timing
    r["float32_rmatvec_s"] = best_time(lambda: op.rmatvec(y32), repeat)
    r["float32_product_bytes"] = op.product_form.nbytes
    r["float32_bound_s"] = (op.product_form.nbytes + x32.nbytes + y32.nbytes) / bandwidth
    r["float32_fraction_of_bound"] = r["float32_bound_s"] / r["float32_matvec_s"]
    return r


def _structured_figures(config: Config, weight, x, y, *, threads, repeat, peers,
                        matrix_bytes: int) -> dict:
    """The structured form (channel layers) against torch's direct kernels, the CSR, a batch.

    Each ratio is taken over times measured in alternating rounds (the same
    load for both).  Memory: what an operator holds after both products, and
    the peak while building it, over the CSR matrix's bytes.  Limits
    (``*_bound``): the layer's flops as one GEMM at this machine's BLAS rate
    (:func:`.timing.measure_layer_gemm`), over torch's time or, for the
    batch, over one product: the best ratio any product that runs them as
    GEMMs can reach here.
    """
    r: dict[str, Any] = {"skipped": {}}
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        op = config.operator(weight, threads=threads)
        r["structured_build_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    r["structured_build_s"] = best_time(lambda: config.operator(weight, threads=threads),
                                        repeat, min_time=0)
    op.matvec(x), op.rmatvec(y)
    r["structured_bytes"] = op.nbytes
    r["structured_bytes_over_csr"] = op.nbytes / matrix_bytes
    r["structured_build_peak_over_csr"] = r["structured_build_peak_bytes"] / matrix_bytes
    csr_matvec, _ = compare._csr_products(op, threads)
    own, csr = paired_stats([lambda: op.matvec(x), lambda: csr_matvec(x)], repeat)
    r["structured_matvec_s"], r["structured_over_csr"] = own.min, csr.min / own.min
    geometry = op.convolution.geometry
    gemm = {dtype: measure_layer_gemm(geometry, dtype, threads)
            for dtype in (np.float64, np.float32)}
    r["structured_gemm_s"], r["structured_f32_gemm_s"] = gemm[np.float64], gemm[np.float32]
    if config.batch:
        X = np.random.default_rng(2).standard_normal((len(x), config.batch))
        one, many = paired_stats([lambda: op.matvec(x), lambda: op.matmat(X)], repeat)
        r["structured_batch_column_over_matvec"] = many.min / config.batch / one.min
        r["structured_batch_column_over_matvec_bound"] = gemm[np.float64] / one.min
    torch = peers.get("torch")
    if torch is None:
        r["skipped"]["structured_torch"] = "skipped: torch not installed"
        return r
    for dtype, name in ((np.float64, ""), (np.float32, "f32_")):
        products = _torch_pair(torch, config, weight, dtype)
        if isinstance(products, str):
            r["skipped"]["structured_torch"] = f"skipped: {products}"
            return r
        mine = op if dtype == np.float64 else config.operator(weight.astype(dtype),
                                                              threads=threads)
        xv, yv = x.astype(dtype), y.astype(dtype)
        xt = torch.from_numpy(xv.reshape(mine.input_shape))
        yt = torch.from_numpy(yv.reshape(mine.output_shape))
        forward, backward = products
        calls = [functools.partial(mine.matvec, xv), functools.partial(mine.rmatvec, yv),
                 functools.partial(forward, xt), functools.partial(backward, yt)]
        with torch.no_grad(), compare._torch_threads(torch, threads):
            own_f, own_b, theirs_f, theirs_b = paired_stats(calls, repeat)
        r[f"structured_{name}matvec_s"], r[f"structured_{name}rmatvec_s"] = own_f.min, own_b.min
        r[f"torch_{name or 'f64_'}conv_s"] = theirs_f.min
        r[f"torch_{name or 'f64_'}adjoint_s"] = theirs_b.min
        r[f"structured_{name}matvec_over_torch"] = own_f.min / theirs_f.min
        r[f"structured_{name}rmatvec_over_torch"] = own_b.min / theirs_b.min
        r[f"structured_{name}matvec_over_torch_bound"] = gemm[dtype] / theirs_f.min
        r[f"structured_{name}rmatvec_over_torch_bound"] = gemm[dtype] / theirs_b.min
    return r


def _torch_pair(torch, config: Config, weight, dtype):
    """``(W @ x, W.T @ y)`` by torch on shaped single samples (tensors), or why not."""
    import torch.nn.grad as grad

    ndim = len(config.weight_shape) - 2
    kwargs = compare.torch_settings(config)
    if isinstance(kwargs, str):
        return kwargs
    if isinstance(kwargs["padding"], str):
        return "string padding"  # (conv2d_input takes sizes, not 'same')
    output_padding = kwargs.pop("output_padding", 0)
    w = torch.from_numpy(weight.astype(dtype))
    F = torch.nn.functional
    conv, conv_t = getattr(F, f"conv{ndim}d"), getattr(F, f"conv_transpose{ndim}d")
    # conv_transpose with the output size given back, as autograd runs it
    conv_input = getattr(grad, f"conv{ndim}d_input")
    if config.transposed:
        def forward(y):
            return conv_t(y[None], w, output_padding=output_padding, **kwargs)

        def backward(x):
            return conv(x[None], w, **kwargs)

        return forward, backward
    shape = (1, *config.input_shape)
    return (lambda x: conv(x[None], w, **kwargs)), (
        lambda y: conv_input(shape, w, y[None], **kwargs))


def _held_bytes(make) -> tuple[int, Any]:
    """Bytes still allocated (tracemalloc) when ``make()`` returns, and what it returned."""
    gc.collect()
    tracemalloc.start()
    try:
        value = make()
        return tracemalloc.get_traced_memory()[0], value
    finally:
        tracemalloc.stop()


def single_form_supported() -> bool:
    """Whether the operators take ``keep_transpose=`` (one stored form for both directions)."""
    return "keep_transpose" in inspect.signature(ConvOperator).parameters


def _single_form_figures(config: Config, weight, x, y, *, threads, repeat) -> dict:
    """``keep_transpose=False`` against the default: memory held after both products, speed.

    Skipped (with the reason) while the operators have no such option.
    """
    if not single_form_supported():
        return {"skipped": {"single_form": "skipped: ConvOperator has no keep_transpose option"}}

    def used(**options):
        op = config.operator(weight, threads=threads, **options)
        op.matvec(x)
        op.rmatvec(y)
        return op

    r: dict[str, Any] = {}
    r["default_held_bytes"], _ = _held_bytes(used)
    r["single_form_held_bytes"], op = _held_bytes(lambda: used(keep_transpose=False))
    r["single_form_memory_ratio"] = r["single_form_held_bytes"] / r["default_held_bytes"]
    r["single_form_matvec_s"] = best_time(lambda: op.matvec(x), repeat)
    r["single_form_rmatvec_s"] = best_time(lambda: op.rmatvec(y), repeat)
    r["single_form_rmatvec_over_matvec"] = r["single_form_rmatvec_s"] / r["single_form_matvec_s"]
    return r


def _batch_figures(op, batch: int, matvec_s: float, rng, *, threads, repeat) -> dict:
    """``matmat`` on ``batch`` columns against one product and its compute floor."""
    W = op.matrix
    X = rng.standard_normal((W.shape[1], batch))
    r: dict[str, float] = {"batch": batch}
    r["matmat_s"] = best_time(lambda: op.matmat(X), repeat)
    r["scipy_matmat_s"] = best_time(lambda: W @ X, max(1, repeat // 2))
    r["batch_over_matvec"] = r["matmat_s"] / matvec_s
    XF = np.asfortranarray(X)
    r["matmat_fortran_input_s"] = best_time(lambda: op.matmat(XF), repeat)
    r["separate_matvecs_s"] = best_time(
        lambda: [op.matvec(XF[:, j]) for j in range(batch)], max(1, repeat // 2)
    )
    samples = rng.standard_normal((batch, *op.input_shape))
    r["conv_batch_s"] = best_time(lambda: op.conv(samples), repeat)
    # Compute floor: 2 flops per entry and column at the rate BLAS reaches
    # on blocks of this shape (matmul on every thread, in the same run).
    rate = measure_block_gemm_rate(op, batch, threads)
    r["block_gemm_gflops"] = rate / 1e9
    r["batch_compute_bound_s"] = 2.0 * W.nnz * batch / rate
    r["batch_bound_over_matvec"] = r["batch_compute_bound_s"] / matvec_s
    return r


def run_config(
    config: Config,
    *,
    threads: int,
    bandwidth: float,
    write_bandwidth: float,
    repeat: int,
    cold_settle: float = 0.0,
    peers: dict | None = None,
) -> dict:
    """Every figure for one configuration (times in seconds, ratios as floats).

    Timings are the best of ``repeat`` back-to-back calls, so a build reuses
    the memory the previous one freed ("warm").  With ``cold_settle`` > 0 one
    more build runs after that many seconds idle, on memory the hypervisor
    has taken back ("cold").  The matrices are freed when this returns.
    """
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(config.weight_shape)
    new_weight = rng.standard_normal(config.weight_shape)
    op = config.operator(weight, threads=threads)
    W = op.matrix
    x = rng.standard_normal(W.shape[1])
    y = rng.standard_normal(W.shape[0])
    r = dict(config=config.name, description=config.description, threads=threads, nnz=W.nnz,
             shape=list(W.shape), matrix_bytes=W.data.nbytes + W.indices.nbytes + W.indptr.nbytes)
    r.update(_build_figures(config, op, weight, new_weight, threads=threads,
                            write_bandwidth=write_bandwidth, repeat=repeat,
                            cold_settle=cold_settle))
    r.update(_product_figures(op, x, y, bandwidth=bandwidth, repeat=repeat))
    if config.batch:
        r.update(_batch_figures(op, config.batch, r["matvec_s"], rng, threads=threads,
                                repeat=repeat))
    r.update(_peer_figures(config, op, weight, x, y, threads=threads, repeat=repeat,
                           peers=peers if peers is not None else compare.available_peers()[0]))
    del op, W
    gc.collect()  # before the float32 operator and the single-form ones are built
    r.update(_float32_figures(config, weight, x, y, threads=threads, bandwidth=bandwidth,
                              repeat=repeat))
    r["float32_speedup"] = r["matvec_s"] / r["float32_matvec_s"]
    r["float32_rmatvec_speedup"] = r["rmatvec_s"] / r["float32_rmatvec_s"]
    # Reading fewer bytes gains at most their ratio.
    r["float32_speedup_bound"] = r["bound_s"] / r["float32_bound_s"]
    gc.collect()
    single = _single_form_figures(config, weight, x, y, threads=threads, repeat=repeat)
    r["skipped"].update(single.pop("skipped", {}))
    r.update(single)
    if r["form"] == "structured":
        gc.collect()
        structured = _structured_figures(
            config, weight, x, y, threads=threads, repeat=repeat,
            peers=peers if peers is not None else compare.available_peers()[0],
            matrix_bytes=r["matrix_bytes"])
        r["skipped"].update(structured.pop("skipped", {}))
        r.update(structured)
    return r


def _verdicts(results: list[dict], smoke: bool = False) -> list[dict]:
    """One row per target and configuration it applies to; ``smoke``: a --quick run."""
    rows = []
    for figure, cmp, bound, applies, limit_name in TARGETS:
        for r in results:
            if r["config"] not in applies or r.get(figure) is None:
                continue
            value = r[figure]
            met = value <= bound if cmp == "<=" else value >= bound
            row = dict(config=r["config"], figure=figure, value=value, target=f"{cmp} {bound}",
                       ratio_to_target=value / bound, met=met)
            if limit_name in r:
                limit = r[limit_name]
                row["limit"] = limit
                row["reachable"] = limit <= bound if cmp == "<=" else limit >= bound
            row["verdict"] = SMOKE_VERDICT if smoke else _verdict_word(row)
            rows.append(row)
    return rows


def _verdict_word(v) -> str:
    if v["met"]:
        return "met"
    if v.get("reachable") is False:
        return f"NOT MET: the physical limit here is {v['limit']:.2f}"
    if "limit" in v:
        return f"NOT MET (physical limit here {v['limit']:.2f})"
    return "NOT MET"


def _ms_ratio(r: dict, time_key: str, ratio_key: str, skip_key: str) -> str:
    """``ms (ratio x)``, or the reason the figure is skipped."""
    if time_key not in r:
        return r.get("skipped", {}).get(skip_key, "skipped")
    return f"{r[time_key]*1e3:.2f} ({r[ratio_key]:.2f}x)"


def _mb(nbytes: float) -> str:
    return f"{nbytes/1e6:.0f} MB" if nbytes >= 1e7 else f"{nbytes/1e6:.2f} MB"


def _peer_lines(results) -> list[str]:
    """The sparse peers, float32 and the single stored form, per configuration."""
    head = (f"{'cfg':<4}{'Wx ms':>8}{'median':>8}{'torch CSR Wx':>22}{'torch CSR WTy':>22}"
            f"{'spconv Wx':>22}{'spconv build':>22}")
    lines = ["", "sparse peers on the same matrix: ms (peer / the operator's same figure; > 1: "
             "the operator is ahead); the operator's W@x min and median", head]
    for r in results:
        lines.append(
            f"{r['config']:<4}{r['matvec_s']*1e3:>8.2f}{r['matvec_median_s']*1e3:>8.2f}"
            f"{_ms_ratio(r, 'torch_csr_matvec_s', 'torch_csr_over_matvec', 'torch_csr'):>22}"
            f"{_ms_ratio(r, 'torch_csr_rmatvec_s', 'torch_csr_over_rmatvec', 'torch_csr'):>22}"
            f"{_ms_ratio(r, 'spconv_matvec_s', 'spconv_over_matvec', 'spconv'):>22}"
            f"{_ms_ratio(r, 'spconv_build_s', 'spconv_build_over_build', 'spconv'):>22}")
    lines += ["", "float32 products (the values take half the bytes): ms, float64 time over "
              "float32's, the most reading fewer bytes can gain (limit), fraction of the bound",
              f"{'cfg':<4}{'f32 Wx':>9}{'f32 WTy':>9}{'Wx x':>7}{'WTy x':>7}{'limit':>7}"
              f"{'of bound':>9}{'(f64)':>7}"]
    for r in results:
        lines.append(
            f"{r['config']:<4}{r['float32_matvec_s']*1e3:>9.2f}{r['float32_rmatvec_s']*1e3:>9.2f}"
            f"{r['float32_speedup']:>7.2f}{r['float32_rmatvec_speedup']:>7.2f}"
            f"{r['float32_speedup_bound']:>7.2f}{r['float32_fraction_of_bound']:>9.2f}"
            f"{r['matvec_fraction_of_bound']:>7.2f}")
    lines.append("\nkeep_transpose=False (one stored product form for both directions):")
    for r in results:
        if "single_form_memory_ratio" in r:
            lines.append(
                f"  ({r['config']}) held after matvec + rmatvec "
                f"{_mb(r['single_form_held_bytes'])} vs {_mb(r['default_held_bytes'])} "
                f"by default ({r['single_form_memory_ratio']:.2f}x); rmatvec "
                f"{r['single_form_rmatvec_s']*1e3:.2f} ms = "
                f"{r['single_form_rmatvec_over_matvec']:.2f}x its matvec")
        else:
            lines.append(f"  ({r['config']}) {r['skipped'].get('single_form', 'skipped')}")
    return lines


def _structured_lines(results) -> list[str]:
    """The channel layers' structured form: against torch, the CSR, a batch; its memory."""
    rows = [r for r in results if "structured_matvec_s" in r]
    if not rows:
        return []
    lines = ["", "structured form (channel layers; ms; over torch's same product in alternating "
             "rounds: float64 and float32; CSR x: the CSR product over it; batch/col: matmat "
             "per column over one matvec; kB held after both products, and over the CSR)",
             f"{'cfg':<4}{'Wx':>8}{'/torch':>7}{'WTy':>8}{'/torch':>7}{'f32 Wx':>8}{'/torch':>7}"
             f"{'f32 WTy':>8}{'/torch':>7}{'CSR x':>7}{'batch/col':>10}{'kB':>7}{'/CSR':>9}"
             f"{'build ms':>9}{'peak/CSR':>9}"]

    def cell(r, key, fmt, scale=1.0):
        width = int(fmt.split(".")[0])
        return format(r[key] * scale, fmt) if key in r else format("-", f">{width}")

    for r in rows:
        lines.append(
            f"{r['config']:<4}{cell(r, 'structured_matvec_s', '8.2f', 1e3)}"
            f"{cell(r, 'structured_matvec_over_torch', '7.2f')}"
            f"{cell(r, 'structured_rmatvec_s', '8.2f', 1e3)}"
            f"{cell(r, 'structured_rmatvec_over_torch', '7.2f')}"
            f"{cell(r, 'structured_f32_matvec_s', '8.2f', 1e3)}"
            f"{cell(r, 'structured_f32_matvec_over_torch', '7.2f')}"
            f"{cell(r, 'structured_f32_rmatvec_s', '8.2f', 1e3)}"
            f"{cell(r, 'structured_f32_rmatvec_over_torch', '7.2f')}"
            f"{cell(r, 'structured_over_csr', '7.2f')}"
            f"{cell(r, 'structured_batch_column_over_matvec', '10.2f')}"
            f"{cell(r, 'structured_bytes', '7.0f', 1e-3)}"
            f"{cell(r, 'structured_bytes_over_csr', '9.5f')}"
            f"{cell(r, 'structured_build_s', '9.3f', 1e3)}"
            f"{cell(r, 'structured_build_peak_over_csr', '9.5f')}")
    lines += ["", "the layers' flops as one GEMM per group at this machine's BLAS rate (BLAS "
              "threading it, data in memory; ms), and each product's time over it",
              f"{'cfg':<4}{'GEMM':>8}{'Wx':>7}{'WTy':>7}{'torch':>7}{'f32 GEMM':>9}{'Wx':>7}"
              f"{'WTy':>7}{'torch':>7}"]
    for r in rows:
        if "structured_gemm_s" not in r:
            continue
        cells = [f"{r['config']:<4}"]
        for name, width in (("", 8), ("f32_", 9)):
            gemm = r[f"structured_{name}gemm_s"]
            cells.append(f"{gemm * 1e3:{width}.2f}")
            for key in (f"structured_{name}matvec_s", f"structured_{name}rmatvec_s",
                        f"torch_{name or 'f64_'}conv_s"):
                cells.append(f"{r[key] / gemm:7.2f}" if key in r else f"{'-':>7}")
        lines.append("".join(cells))
    return lines


def _format(results, verdicts, machine) -> str:
    lines = [
        f"read bandwidth: {machine['bandwidth_1']/1e9:.1f} GB/s on 1 thread, "
        f"{machine['bandwidth_all']/1e9:.1f} GB/s on {machine['threads']} threads; "
        f"writing fresh memory {machine['fresh_write_all']/1e9:.1f} GB/s",
        "",
        f"{'cfg':<4}{'nnz':>12}{'MB':>8}{'build ns/e':>11}{'of floor':>9}{'peak/mat':>9}"
        f"{'rebuild x':>10}{'(bound)':>8}"
        f"{'scipy ms':>10}{'Wx ms':>8}{'WTy ms':>8}{'Wx x':>6}{'WTy x':>6}{'WTy/Wx':>7}"
        f"{'of bound':>9}",
    ]
    for r in results:
        lines.append(
            f"{r['config']:<4}{r['nnz']:>12,}{r['matrix_bytes']/1e6:>8.0f}"
            f"{r['build_ns_per_entry']:>11.2f}{r['build_floor_s']/r['build_s']:>9.2f}"
            f"{r['build_peak_over_matrix']:>9.2f}{r['rebuild_speedup']:>10.2f}"
            f"{r['rebuild_speedup_bound']:>8.2f}{r['scipy_matvec_s']*1e3:>10.2f}"
            f"{r['matvec_s']*1e3:>8.2f}{r['rmatvec_s']*1e3:>8.2f}{r['matvec_speedup']:>6.2f}"
            f"{r['rmatvec_speedup']:>6.2f}{r['rmatvec_over_matvec']:>7.2f}"
            f"{r['matvec_fraction_of_bound']:>9.2f}"
        )
    lines.append(
        f"\n{'cfg':<4}{'form':>10}{'form MB':>9}{'op build ms':>12}{'with_weight ms':>15}"
        f"{'op build x':>11}{'Wx x limit':>11}{'CSR limit':>10}"
    )
    for r in results:
        form = r["form"]
        lines.append(
            f"{r['config']:<4}{form:>10}{r['product_bytes']/1e6:>9.0f}"
            f"{r['operator_build_s']*1e3:>12.1f}{r['rebuild_s']*1e3:>15.1f}"
            f"{r['rebuild_over_operator_build']:>11.2f}{r['matvec_speedup_bound']:>11.2f}"
            f"{r['csr_speedup_bound']:>10.2f}"
        )
    for r in results:
        if "matmat_s" in r:
            lines.append(
                f"\nbatch of {r['batch']} on ({r['config']}): matmat {r['matmat_s']*1e3:.1f} ms = "
                f"{r['batch_over_matvec']:.2f}x one matvec; Fortran-ordered input "
                f"{r['matmat_fortran_input_s']*1e3:.1f} ms; {r['batch']} separate matvecs "
                f"{r['separate_matvecs_s']*1e3:.1f} ms; "
                f"op.conv(batch) {r['conv_batch_s']*1e3:.1f} ms"
                f"\n  compute floor: {2 * r['nnz'] * r['batch'] / 1e9:.1f} Gflop at "
                f"{r['block_gemm_gflops']:.0f} Gflop/s (numpy matmul on this operator's GEMM "
                f"shapes, all threads) = {r['batch_compute_bound_s']*1e3:.1f} ms = "
                f"{r['batch_bound_over_matvec']:.2f}x one matvec; scipy's serial W @ X "
                f"{r['scipy_matmat_s']*1e3:.1f} ms"
            )
    if "fresh_write_cold" in machine:
        lines.append(
            f"\ncold memory (after {machine['cold_settle_s']:.0f} s idle the hypervisor has taken "
            "freed pages back): "
            f"writing {machine['fresh_write_cold']/1e9:.2f} GB/s, i.e. "
            f"{12e9/machine['fresh_write_cold']:.1f} ns per float64+int32 entry at best"
        )
        for r in results:
            if "cold_build_ns_per_entry" in r:
                lines.append(f"  ({r['config']}) cold build "
                             f"{r['cold_build_ns_per_entry']:.2f} ns/entry "
                             f"(warm {r['build_ns_per_entry']:.2f})")
    lines.append(
        "\nbuild ns/e: warm build time per stored entry; of floor: the time to write the matrix "
        "into fresh memory over the build time; peak/mat: peak memory while building over the "
        "matrix; rebuild x: fresh build over with_weight; (bound): fresh build over writing the "
        "values of the operator's product form alone into fresh memory (the same size, timed in "
        "the run); Wx x, WTy x: threaded products over scipy's serial W @ x; of bound: "
        "bytes moved / read bandwidth over the product time (bytes of the operator's product "
        "form); form: what the operator's products read (the structured form, diagonals, or "
        "the CSR matrix); op build x: a new operator over with_weight; Wx x limit, CSR limit: "
        "scipy's W @ x over the time to read the product form, or the CSR matrix, at the measured "
        "bandwidth (the most a product reading it can gain)"
    )
    lines += _peer_lines(results)
    lines += _structured_lines(results)
    lines.append("\ntargets:" + (f" ({SMOKE_VERDICT}: --quick sizes are not the targets')"
                                  if machine.get("quick") else ""))
    for v in verdicts:
        lines.append(
            f"  ({v['config']}) {v['figure']:<32} {v['value']:8.2f}  target {v['target']:<7}"
            f" ratio {v['ratio_to_target']:.2f}  {v['verdict']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparse-tconv perf",
        description="Measure build and product speed against scipy and the bandwidth bound.",
    )
    parser.add_argument("--quick", action="store_true", help="small configurations, seconds")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="run only these configurations (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per timing")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure as JSON")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the cold-memory build figures (3 s idle each)")
    args = parser.parse_args(argv)
    problem = output_path_problem(args.json, "--json")
    if problem:
        parser.error(problem)
    try:
        configs = select(QUICK_CONFIGS if args.quick else CONFIGS, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        threads = resolve_threads(args.threads)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    repeat = args.repeat or (2 if args.quick else 5)
    size = (64 << 20) if args.quick else (1 << 30)
    machine: dict[str, Any] = dict(
        threads=threads,
        bandwidth_1=measure_bandwidth(1, size, repeat),
        bandwidth_all=measure_bandwidth(threads, size, repeat),
        fresh_write_all=measure_fresh_write(threads, size, repeat),
        date=time.strftime("%Y-%m-%d"),
        quick=bool(args.quick),
    )
    cold_settle = 0.0 if (args.quick or args.no_cold) else 3.0
    if cold_settle:
        machine["cold_settle_s"] = cold_settle
        machine["fresh_write_cold"] = measure_fresh_write(threads, size, cold=True,
                                                          settle_s=cold_settle)
    peers, notes = compare.available_peers()
    results = []
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] running now: ({config.name}) {config.description}",
              file=sys.stderr)
        results.append(run_config(config, threads=threads, bandwidth=machine["bandwidth_all"],
                                  write_bandwidth=machine["fresh_write_all"], repeat=repeat,
                                  cold_settle=cold_settle, peers=peers))
        gc.collect()  # the previous configuration's matrices, before the next is measured
    verdicts = _verdicts(results, smoke=args.quick)
    if args.quick:
        print(f"{SMOKE_VERDICT}: a --quick run measures small configurations in seconds; its "
              "figures check that everything runs, not the targets\n")
    print(_format(results, verdicts, machine))
    print("\n".join(f"note: {n}" for n in notes if "pylops" not in n))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=results, targets=verdicts, notes=notes), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
