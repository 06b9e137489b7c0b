"""Deconvolution benchmark: time to solution of Tikhonov problems, per preconditioner.

Run ``python -m sparse_tconv.tools.solve_bench`` (``--quick`` for a smoke run
of seconds, ``--json PATH`` for every raw figure, ``--plot PATH`` for the
residual-versus-iteration figure).  Every figure is a ratio measured within
one run, against plain ``scipy.sparse.linalg.cg`` on the same damped normal
equations (no preconditioner, the same ``rtol`` and threads); a time
includes the preconditioner's set-up.

Sections:

- *problems*: blurs (Gaussian 9x9, box 5x5, motion 1x11; a random 4->4
  channel 3x3 layer) with each padding mode and damp 1e-2 and 1e-3: plain CG,
  :func:`~sparse_tconv.solvers.tikhonov` with its automatic choice, and every
  construction of :func:`~sparse_tconv.solvers.preconditioner` (also
  without its border correction, and shifted, where that is the question);
- *exactness*: the FFT solve of circular padding against a tight-tolerance
  plain CG solution;
- *scaling*: iterations of the automatic choice from 128^2 to 512^2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import cg

from .. import ConvOperator
from .._parallel import resolve_threads
from .._preconditioning import build_preconditioner
from ..solvers import normal_operator, tikhonov
from .outputs import output_path_problem
from .timing import best_time

__all__ = [
    "Problem",
    "PROBLEMS",
    "QUICK_PROBLEMS",
    "ASV_PROBLEMS",
    "TARGETS",
    "plain_cg",
    "run_problem",
    "main",
]

RTOL = 1e-6


# ---------------------------------------------------------------------------
# The problems
# ---------------------------------------------------------------------------


def _gaussian(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return np.outer(g, g) / np.outer(g, g).sum()


def kernel(blur: str) -> np.ndarray:
    """The weight ``(C_out, C_in, kh, kw)`` of a named blur."""
    if blur == "gaussian":
        return _gaussian(9, 2.0)[None, None]
    if blur == "box":
        return np.full((1, 1, 5, 5), 1 / 25)
    if blur == "motion":
        return np.full((1, 1, 1, 11), 1 / 11)
    if blur == "disk":  # defocus, radius 4: symmetric, not separable
        t = np.arange(9) - 4
        disk = (t[:, None] ** 2 + t[None, :] ** 2 <= 16).astype(float)
        return (disk / disk.sum())[None, None]
    if blur == "random4":  # 4 -> 4 channels, 3x3, not symmetric, unit gain
        w = np.random.default_rng(0).standard_normal((4, 4, 3, 3))
        return w / np.sqrt(9 * 4)
    if blur == "colour3":  # 3 -> 3 channels: a 7x7 Gaussian with 10% cross-talk
        mix = 0.7 * np.eye(3) + 0.1
        return np.einsum("oc,kl->ockl", mix, _gaussian(7, 1.5))
    raise ValueError(f"unknown blur {blur!r}")


def sample_image(n: int, channels: int = 1) -> np.ndarray:
    """A square, a disc and a bar on a gentle wave, one per channel (shifted)."""
    images = []
    for c in range(channels):
        rows, cols = (np.mgrid[0:n, 0:n] + 0.5) / n
        rows = (rows + 0.13 * c) % 1.0
        image = 0.2 * np.sin(3 * cols) + 0.2
        image[(rows > 0.15) & (rows < 0.45) & (cols > 0.15) & (cols < 0.45)] += 0.8
        image[(rows - 0.65) ** 2 + (cols - 0.62) ** 2 < 0.04] += 0.5
        image[(rows > 0.55) & (rows < 0.9) & (cols > 0.15) & (cols < 0.24)] += 0.6
        images.append(image)
    return np.array(images)


@dataclass(frozen=True)
class Problem:
    """A deblurring problem: a blur with a padding mode on an n x n image, a damping."""

    blur: str
    mode: str
    n: int
    damp: float
    kinds: tuple[str, ...] = ()  # constructions to compare beyond tikhonov's choice

    @property
    def name(self) -> str:
        return f"{self.blur}-{self.mode}-{self.n}-{self.damp:g}"

    def operator(self, threads=None) -> ConvOperator:
        w = kernel(self.blur)
        return ConvOperator(w, (w.shape[1], self.n, self.n), padding="same",
                            padding_mode=self.mode, threads=threads)

    def data(self, op) -> np.ndarray:
        """The blurred image with Gaussian noise of 1e-3 times its RMS (seeded)."""
        clean = op.matvec(sample_image(self.n, op.input_shape[0]).ravel())
        noise = np.random.default_rng(1).standard_normal(clean.size)
        return clean + 1e-3 * np.sqrt(np.mean(clean**2)) * noise


# Each construction, and the ablations of the border correction and the shift.
_SINGLE = ("kronecker", "dct2", "dct2@0", "dct2-raw@0", "dct1", "dct1-raw", "circulant",
           "circulant-raw", "block_jacobi")
_MULTI = ("circulant@0", "circulant", "circulant@0.2", "dct2", "dct2@0.1", "block_jacobi")


def _problems(sizes: dict, n_multi: int) -> list[Problem]:
    """The target problems at ``sizes[damp]``, and the ablation of every construction.

    Every construction runs on the Gaussian (separable) and the disk (not) at
    damp 1e-2, and the DCT-II's shift on the disk at 1e-3; elsewhere
    tikhonov's choice alone.
    """
    out = []
    for damp, n in sizes.items():
        for blur in ("gaussian", "box", "motion", "disk"):
            for mode in ("zeros", "replicate", "reflect", "circular"):
                if mode == "circular" and blur != "gaussian":
                    continue
                kinds: tuple[str, ...] = ()
                if mode != "circular" and blur in ("gaussian", "disk") and damp == 1e-2:
                    kinds = _SINGLE
                elif mode in ("zeros", "replicate") and blur == "disk":
                    kinds = ("dct2", "dct2@0", "dct2@1e-4")
                out.append(Problem(blur, mode, n, damp, kinds))
        out.append(Problem("random4", "zeros", n_multi, damp, _MULTI))
        out.append(Problem("random4", "circular", n_multi, damp))
        out.append(Problem("colour3", "zeros", n_multi, damp, _MULTI))
    return out


# The sizes: 256^2 at damp 1e-2, 192^2 at 1e-3 (where plain CG takes 4-5x longer).
PROBLEMS = _problems({1e-2: 256, 1e-3: 192}, 96)
QUICK_PROBLEMS = [Problem("disk", m, 32, 1e-2, ("kronecker", "dct2", "dct1", "circulant"))
                  for m in ("zeros", "reflect")] + [
    Problem("gaussian", "replicate", 32, 1e-2),
    Problem("gaussian", "circular", 32, 1e-2),
    Problem("random4", "zeros", 16, 1e-2, ("circulant", "block_jacobi"))]
# The asv suite's: one per padding mode and the multi-channel layer, minutes in all.
ASV_PROBLEMS = {f"{p.blur}-{p.mode}": p for p in (
    Problem("gaussian", "zeros", 128, 1e-2), Problem("gaussian", "replicate", 128, 1e-2),
    Problem("gaussian", "reflect", 128, 1e-2), Problem("gaussian", "circular", 128, 1e-2),
    Problem("random4", "zeros", 48, 1e-2))}
# The iteration counts of the automatic choice, 128^2 to 512^2.
SCALING_SIZES, QUICK_SCALING_SIZES = (128, 256, 512), (16, 32)

# (figure, comparison, bound, which problems): the targets.  (The disk blur is
# reported beside them: not separable, and not among the blurs.)
_SYMMETRIC = ("gaussian", "box", "motion")
TARGETS = [
    ("speedup", ">=", 20.0, lambda p: p.mode == "circular" and p.blur != "random4"),
    ("speedup", ">=", 3.0, lambda p: p.mode in ("zeros", "replicate") and p.blur in _SYMMETRIC),
    ("speedup", ">=", 2.0, lambda p: p.mode == "reflect" and p.blur in _SYMMETRIC),
    ("speedup", ">=", 1.5, lambda p: p.blur == "random4" and p.mode == "zeros"),
]


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def _cg_counted(normal, b, rtol, maxiter, M, record=None):
    """scipy's CG: ``(x, iterations)``; ``record(xk)`` after each iteration if given."""
    steps = [0]

    def count(xk):
        steps[0] += 1
        if record is not None:
            record(xk)

    x, _ = cg(normal, b, rtol=rtol, maxiter=maxiter, M=M, callback=count)
    return x, steps[0]


def plain_cg(op, y, damp, maxiter=None):
    """Plain scipy CG on the normal equations, ``W^H y`` included: ``(x, iterations)``.

    The baseline of every speed-up: no preconditioner, rtol :data:`RTOL`.
    """
    return _cg_counted(normal_operator(op, damp), op.rmatvec(y), RTOL, maxiter, None)


def _variant(op, damp: float, name: str):
    """The preconditioner a variant name stands for: ``kind[-raw][@shift]``.

    ``-raw``: without the border correction; ``@s``: shift ``s`` (default:
    the construction's own ``default_shift``, see :mod:`sparse_tconv._preconditioning`).
    """
    kind, _, shift = name.partition("@")
    kind, _, raw = kind.partition("-")
    return build_preconditioner(op, damp, kind, boost=float(shift) if shift else None,
                                correct=not raw)


def _timed(func, repeat: int) -> float:
    return best_time(func, repeat=repeat, min_time=0)


def run_problem(problem: Problem, *, repeat: int, threads: int, samples: int = 1) -> dict:
    """Every figure of one problem (times in seconds).

    Each time is :func:`~sparse_tconv.tools.timing.best_time` of ``repeat``
    rounds after its warm-up; plain CG and tikhonov are timed alternately
    ``samples`` times and the best of each kept.
    """
    op = problem.operator(threads)
    y = problem.data(op)
    damp = problem.damp
    op.rmatvec(y)  # the transposed product form, built once outside the timings
    n = op.shape[1]
    r: dict[str, Any] = dict(problem=problem.name, blur=problem.blur, mode=problem.mode,
                             n=problem.n, damp=damp, unknowns=n)
    last: dict[str, Any] = {}  # what the timed calls return (the same every time)

    def plain():
        last["plain"] = plain_cg(op, y, damp, 10 * n)[1]

    def solve():
        last["tikhonov"] = tikhonov(op, y, damp, rtol=RTOL)[1]

    # Interleaved, the best of ``samples``: a burst of load on the shared machine then
    # slows both sides of the ratio, not one.
    r["plain_s"], r["tikhonov_s"] = math.inf, math.inf
    for _ in range(samples):
        r["plain_s"] = min(r["plain_s"], _timed(plain, repeat))
        r["tikhonov_s"] = min(r["tikhonov_s"], _timed(solve, repeat))
    r["plain_iterations"] = last["plain"]
    info = last["tikhonov"]
    r.update(method=info.method, preconditioner=info.preconditioner,
             iterations=info.iterations, residual=info.residual, converged=info.converged)
    r["speedup"] = r["plain_s"] / r["tikhonov_s"]
    # Each construction: capped at the plain iterations (more would already lose).
    cap = r["plain_iterations"]
    r["kinds"] = {}
    for name in problem.kinds:
        try:
            M = _variant(op, damp, name)
        except NotImplementedError as exc:  # the construction does not apply here
            r["kinds"][name] = dict(iterations=0, converged=False, error=str(exc))
            continue
        _, kinfo = tikhonov(op, y, damp, rtol=RTOL, M=M, maxiter=cap)
        entry: dict[str, Any] = dict(iterations=kinfo.iterations, converged=kinfo.converged)
        if kinfo.converged:
            entry["s"] = _timed(lambda name=name: tikhonov(
                op, y, damp, rtol=RTOL, M=_variant(op, damp, name), maxiter=cap), repeat)
            entry["speedup"] = r["plain_s"] / entry["s"]
        r["kinds"][name] = entry
    return r


def exactness(n: int, n_dense: int, damps, threads: int) -> list[dict]:
    """The FFT solve of a circular Gaussian blur against two independent solutions.

    Plain CG at rtol 1e-14 on n x n (its own error is up to the condition
    number times that), and numpy's dense solve of the normal equations on
    n_dense x n_dense.
    """
    rows = []
    for damp in damps:
        row: dict[str, Any] = dict(n=n, n_dense=n_dense, damp=damp)
        problem = Problem("gaussian", "circular", n, damp)
        op = problem.operator(threads)
        y = problem.data(op)
        x, info = tikhonov(op, y, damp)
        tight, steps = _cg_counted(normal_operator(op, damp), op.rmatvec(y), 1e-14,
                                   20 * n * n, None)
        row.update(vs_cg=_relative(x, tight), cg_iterations=steps, fft_residual=info.residual)
        small = Problem("gaussian", "circular", n_dense, damp)
        op = small.operator(threads)
        y = small.data(op)
        W = op.matrix.toarray()
        G = W.T @ W + damp * damp * np.eye(W.shape[1])
        row["vs_dense"] = _relative(tikhonov(op, y, damp)[0], np.linalg.solve(G, W.T @ y))
        row["dense_condition"] = float(np.linalg.cond(G))
        rows.append(row)
    return rows


def _relative(x, reference) -> float:
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def scaling(sizes, damps, threads: int) -> list[dict]:
    """Iterations of tikhonov's choice (and plain CG's at the smallest size) per size."""
    rows = []
    for blur, mode in (("gaussian", "zeros"), ("motion", "replicate"), ("disk", "zeros"),
                       ("disk", "replicate"), ("disk", "reflect")):
        for damp in damps:
            row: dict[str, Any] = dict(blur=blur, mode=mode, damp=damp, iterations={})
            for n in sizes:
                problem = Problem(blur, mode, n, damp)
                op = problem.operator(threads)
                _, info = tikhonov(op, problem.data(op), damp, rtol=RTOL)
                row["iterations"][n] = info.iterations
                row["preconditioner"] = info.preconditioner
            first, last = row["iterations"][sizes[0]], row["iterations"][sizes[-1]]
            row["growth"] = last / max(first, 1)
            rows.append(row)
    return rows


def residual_histories(problems: list[Problem], threads: int, maxiter: int) -> dict:
    """The relative residual of the normal equations after each CG iteration, per variant."""
    out = {}
    for problem in problems:
        op = problem.operator(threads)
        y = problem.data(op)
        normal, b = normal_operator(op, problem.damp), op.rmatvec(y)
        norm_b = float(np.linalg.norm(b))
        curves = {}
        kinds = ("none", *problem.kinds) if problem.kinds else ("none",)
        for name in kinds:
            history = [1.0]
            M = None if name == "none" else _variant(op, problem.damp, name)
            _cg_counted(normal, b, RTOL, maxiter, M, record=lambda xk, history=history,
                        normal=normal, b=b, norm_b=norm_b: history.append(
                            float(np.linalg.norm(b - normal.matvec(xk))) / norm_b))
            curves[name] = history
        out[problem.name] = curves
    return out


# ---------------------------------------------------------------------------
# Verdicts, tables, plot
# ---------------------------------------------------------------------------


def _problem_of(r: dict) -> Problem:
    return Problem(r["blur"], r["mode"], r["n"], r["damp"])


def verdicts(results: list[dict], exact_rows, scaling_rows) -> list[dict]:
    rows = []
    for figure, cmp, bound, applies in TARGETS:
        for r in results:
            if not applies(_problem_of(r)):
                continue
            value = r[figure]
            rows.append(dict(problem=r["problem"], figure=figure, value=value,
                             target=f"{cmp} {bound}", met=value >= bound))
    for e in exact_rows:
        for figure, n in (("vs_cg", e["n"]), ("vs_dense", e["n_dense"])):
            rows.append(dict(problem=f"gaussian-circular-{n}-{e['damp']:g}",
                             figure=f"fft_{figure}", value=e[figure], target="<= 1e-08",
                             met=e[figure] <= 1e-8))
    for s in scaling_rows:
        rows.append(dict(problem=f"{s['blur']}-{s['mode']}-{s['damp']:g}",
                         figure="iteration_growth", value=s["growth"], target="<= 1.5",
                         met=s["growth"] <= 1.5))
    return rows


def _kind_cell(entry: dict) -> str:
    if "error" in entry:
        return "n/a"
    if not entry["converged"]:
        return f">{entry['iterations']}"
    return f"{entry['iterations']} ({entry['speedup']:.1f}x)"


def format_results(results, exact_rows, scaling_rows, checks, machine) -> str:
    lines = [f"{machine['threads']} threads, rtol {RTOL:g}, {machine['date']}; speed-ups are "
             "plain scipy cg's time over each method's (set-up included), same run", ""]
    lines.append(f"{'problem':<30}{'plain it':>9}{'plain s':>9}{'tikhonov':>22}{'it':>6}"
                 f"{'s':>9}{'speedup':>9}")
    for r in results:
        how = r["method"] if r["method"] == "fft" else f"cg+{r['preconditioner']}"
        lines.append(f"{r['problem']:<30}{r['plain_iterations']:>9}{r['plain_s']:>9.3f}"
                     f"{how:>22}{r['iterations']:>6}{r['tikhonov_s']:>9.3f}"
                     f"{r['speedup']:>8.1f}x")
    named = [r for r in results if r["kinds"]]
    if named:
        lines.append("\neach construction: iterations (speed-up over plain cg); "
                     ">N: not converged within plain cg's N iterations; -raw: without the "
                     "border correction; @s: shifted by s times the model's largest eigenvalue")
        for r in named:
            cells = "  ".join(f"{k}: {_kind_cell(v)}" for k, v in r["kinds"].items())
            lines.append(f"  {r['problem']:<28} {cells}")
    if exact_rows:
        lines.append("\nexactness (circular): the FFT solve against plain cg at rtol 1e-14, "
                     "and against numpy's dense solve")
        for e in exact_rows:
            lines.append(f"  damp {e['damp']:g}: {e['n']}^2 vs cg {e['vs_cg']:.1e} "
                         f"({e['cg_iterations']} iterations; FFT residual "
                         f"{e['fft_residual']:.1e}); {e['n_dense']}^2 vs dense "
                         f"{e['vs_dense']:.1e} (condition {e['dense_condition']:.0e})")
    if scaling_rows:
        sizes = list(scaling_rows[0]["iterations"])
        lines.append("\nscaling: tikhonov's iterations at " + ", ".join(f"{n}^2" for n in sizes))
        for s in scaling_rows:
            counts = " ".join(f"{s['iterations'][n]:>5}" for n in sizes)
            lines.append(f"  {s['blur']:>8} {s['mode']:<9} damp {s['damp']:<6g} "
                         f"{s['preconditioner']:<6} {counts}   growth {s['growth']:.2f}")
    lines.append("\ntargets:")
    for v in checks:
        lines.append(f"  {v['problem']:<30} {v['figure']:<18} {v['value']:9.3g}  target "
                     f"{v['target']:<8} {'met' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("plotting needs matplotlib: pip install 'sparse-tconv[bench]'") from None
    return plt


_COLOURS = {"none": "black", "kronecker": "C1", "dct2": "C2", "dct1": "C3", "circulant": "C4",
            "block_jacobi": "C5"}


def plot_histories(histories: dict, path) -> None:
    """One panel per problem: relative residual against iteration, per preconditioner.

    One colour per construction in every panel; a variant (``-raw``, ``@s``)
    is dashed in its construction's colour.
    """
    plt = _pyplot()
    names = list(histories)
    cols = min(len(names), 2)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        for kind, history in histories[name].items():
            base = kind.partition("@")[0].partition("-")[0]
            ax.semilogy(np.maximum(history, 5e-8), color=_COLOURS.get(base, "grey"),
                        linestyle="-" if kind == base else "--",
                        label="plain cg" if kind == "none" else kind,
                        linewidth=1.8 if kind == "none" else 1.2)
        ax.axhline(RTOL, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(3e-8, 2)  # (an exact construction drops below: drawn at the floor)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative residual")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _check_folder(parser, path, option):
    problem = output_path_problem(path, option)
    if problem:
        parser.error(problem)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparse-tconv solve",
        description="Time Tikhonov deconvolution: plain CG against the structured "
                    "preconditioners and the exact FFT solve.",
    )
    parser.add_argument("--quick", action="store_true", help="small problems, seconds")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per timing")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure as JSON")
    parser.add_argument("--plot", metavar="PATH", help="residual-versus-iteration PNG")
    args = parser.parse_args(argv)
    _check_folder(parser, args.json, "--json")
    _check_folder(parser, args.plot, "--plot")
    try:
        threads = resolve_threads(args.threads)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be a positive integer, got {args.repeat}")
    repeat = args.repeat or 1
    problems = QUICK_PROBLEMS if args.quick else PROBLEMS
    results = []
    for i, problem in enumerate(problems, 1):
        print(f"[{i}/{len(problems)}] {problem.name}", file=sys.stderr, flush=True)
        results.append(run_problem(problem, repeat=repeat, threads=threads,
                                   samples=1 if args.quick else 2))
    print("exactness, scaling", file=sys.stderr, flush=True)
    exact_rows = exactness(16 if args.quick else 128, 16 if args.quick else 48, (1e-2, 1e-3),
                           threads)
    scaling_rows = scaling(QUICK_SCALING_SIZES if args.quick else SCALING_SIZES,
                           (1e-2, 1e-3), threads)
    checks = verdicts(results, exact_rows, scaling_rows)
    machine = dict(threads=threads, date=time.strftime("%Y-%m-%d"), rtol=RTOL)
    print(format_results(results, exact_rows, scaling_rows, checks, machine))
    histories = None
    if args.plot:
        print("residual histories", file=sys.stderr, flush=True)
        histories = residual_histories(plotted_problems(args.quick), threads, 400)
        plot_histories(histories, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=results, exactness=exact_rows,
                           scaling=scaling_rows, targets=checks, histories=histories), f,
                      indent=1)
    return 0


def plotted_problems(quick: bool) -> list[Problem]:
    """The problems of the residual-versus-iteration figure, with the variants drawn."""
    n, n_multi = (32, 16) if quick else (256, 96)
    each = ("kronecker", "dct2", "dct1", "circulant", "block_jacobi")
    shown = [Problem("disk", m, n, 1e-2, each) for m in ("zeros", "replicate", "reflect")]
    shown.append(Problem("gaussian", "replicate", n, 1e-2, each))
    shown.append(Problem("disk", "zeros", n * 3 // 4, 1e-3, ("dct2", "dct2@0", "dct1")))
    shown.append(Problem("random4", "zeros", n_multi, 1e-2,
                         ("circulant@0", "circulant", "dct2", "block_jacobi")))
    return shown


if __name__ == "__main__":
    sys.exit(main())
