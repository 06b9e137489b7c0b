"""Deconvolution benchmark: time to solution of Tikhonov problems, per preconditioner.

Run ``python -m sparse_tconv.tools.solve_bench`` (``--quick`` for a smoke run
of seconds, ``--section general`` for the general section alone, ``--json
PATH`` for every raw figure, ``--plot PATH`` for the residual-versus-iteration
figure).  Every figure is a ratio measured within one run, against plain
``scipy.sparse.linalg.cg`` on the same damped normal equations (no
preconditioner, the same ``rtol`` and threads); a time includes the
preconditioner's set-up.

Sections:

- *problems*: blurs (Gaussian 9x9, box 5x5, motion 1x11; a random 4->4
  channel 3x3 layer) with each padding mode and damp 1e-2 and 1e-3: plain CG,
  :func:`~sparse_tconv.solvers.tikhonov` with its automatic choice, and every
  construction of :func:`~sparse_tconv.solvers.preconditioner` (also
  without its border correction, and shifted, where that is the question);
- *exactness*: the FFT solve of circular padding against a tight-tolerance
  plain CG solution;
- *scaling*: iterations of the automatic choice from 128^2 to 512^2;
- *general* (issue 26): every padding mode; asymmetric, non-separable and
  random kernels; 1-D, 2-D and 3-D; one channel, depthwise and channel
  mixing; damp 1e-1 to 1e-4; ``L='gradient'``; a strided and a transposed
  convolution.  Plain CG against tikhonov's choice, and PyLops (``ConvolveND``
  and ``cgls``) run to the same residual where it poses the problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
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
from .compare import _pylops_skip, available_peers, pylops_operator
from .configs import Config
from .outputs import output_path_problem
from .timing import best_time

__all__ = [
    "Problem",
    "GeneralProblem",
    "PROBLEMS",
    "QUICK_PROBLEMS",
    "ASV_PROBLEMS",
    "GENERAL_PROBLEMS",
    "QUICK_GENERAL_PROBLEMS",
    "TARGETS",
    "GENERAL_TARGETS",
    "plain_cg",
    "pylops_equal_residual",
    "run_problem",
    "run_general",
    "main",
]

RTOL = 1e-6


# ---------------------------------------------------------------------------
# The problems
# ---------------------------------------------------------------------------


def _gaussian(size: int, sigma: float, ndim: int = 2) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    out = functools.reduce(np.multiply.outer, [g] * ndim)
    return out / out.sum()


def _ball(radius: int, ndim: int) -> np.ndarray:
    """The points within ``radius`` of the centre of a ``2 radius + 1`` cube, summing to 1."""
    offsets = np.indices((2 * radius + 1,) * ndim) - radius
    ball = ((offsets**2).sum(axis=0) <= radius**2).astype(float)
    return ball / ball.sum()


def _lshape() -> np.ndarray:
    """5x5, the first column and the last row: asymmetric along both axes."""
    w = np.zeros((5, 5))
    w[:, 0] = w[-1, :] = 1
    return w / w.sum()


def _unit_rows(w: np.ndarray) -> np.ndarray:
    """``w`` with each output channel's weights scaled to absolute sum 1."""
    return w / np.abs(w).sum(axis=tuple(range(1, w.ndim)), keepdims=True)


def _exponential() -> np.ndarray:
    """1-D, one-sided: ``exp(-t / 4)``, t = 0..14, summing to 1."""
    e = np.exp(-np.arange(15) / 4)
    return e / e.sum()


# Each named weight, ``(C_out, C_in // groups, *k)`` (``_GROUPS``: the groups where not 1).
_KERNELS = {
    "gaussian": lambda: _gaussian(9, 2.0)[None, None],
    "box": lambda: np.full((1, 1, 5, 5), 1 / 25),
    "motion": lambda: np.full((1, 1, 1, 11), 1 / 11),
    "disk": lambda: _ball(4, 2)[None, None],  # defocus, radius 4: symmetric, not separable
    # 4 -> 4 channels, 3x3, not symmetric, unit gain
    "random4": lambda: np.random.default_rng(0).standard_normal((4, 4, 3, 3)) / np.sqrt(9 * 4),
    # 3 -> 3 channels: a 7x7 Gaussian with 10% cross-talk
    "colour3": lambda: np.einsum("oc,kl->ockl", 0.7 * np.eye(3) + 0.1, _gaussian(7, 1.5)),
    # The general section's (issue 26): asymmetric, non-separable, random, 1-D and 3-D.
    "anti7": lambda: np.fliplr(np.eye(7))[None, None] / 7,  # anti-diagonal motion
    "lshape5": lambda: _lshape()[None, None],
    "vert9": lambda: np.full((1, 1, 9, 1), 1 / 9),
    "box3": lambda: np.full((1, 1, 3, 3), 1 / 9),
    "mix3": lambda: _unit_rows(np.random.default_rng(0).standard_normal((3, 3, 3, 3))),
    "depthwise3": lambda: np.stack([_gaussian(7, s) for s in (1.0, 1.5, 2.0)])[:, None],
    # a colour image under one anti-diagonal motion: depthwise, not separable
    "motion3": lambda: np.stack([np.fliplr(np.eye(7)) / 7] * 3)[:, None],
    "random5": lambda: np.random.default_rng(0).standard_normal((1, 1, 5, 5)) / 5,
    "exp15": lambda: _exponential()[None, None],
    "gauss1d": lambda: _gaussian(15, 3.0, 1)[None, None],  # 1-D, symmetric
    "gauss3d": lambda: _gaussian(5, 1.0, 3)[None, None],
    "ball3d": lambda: _ball(2, 3)[None, None],
}
_GROUPS = {"depthwise3": 3, "motion3": 3}


def kernel(blur: str) -> np.ndarray:
    """The weight ``(C_out, C_in // groups, *k)`` of a named kernel (a blur, or a layer)."""
    if blur not in _KERNELS:
        raise ValueError(f"unknown blur {blur!r}")
    return _KERNELS[blur]()


def sample_image(n: int, channels: int = 1, ndim: int = 2) -> np.ndarray:
    """A square, a disc and a bar on a gentle wave, one per channel (shifted).

    In ``ndim`` dimensions (``n`` per axis): a cube, a ball and a bar along
    the first axis; the first axis is the rows, the last the columns.
    """
    images = []
    for c in range(channels):
        grid = (np.indices((n,) * ndim) + 0.5) / n
        cols = grid[-1].copy()
        grid[0] = (grid[0] + 0.13 * c) % 1.0
        rows, across = grid[0], grid[1:]  # (across: empty in 1-D, the bar its rows)
        image = 0.2 * np.sin(3 * cols) + 0.2
        image[np.all((grid > 0.15) & (grid < 0.45), axis=0)] += 0.8
        centre = np.array([0.65] + [0.62] * (ndim - 1)).reshape((ndim,) + (1,) * ndim)
        image[((grid - centre) ** 2).sum(axis=0) < 0.04] += 0.5
        bar = (rows > 0.55) & (rows < 0.9) & np.all((across > 0.15) & (across < 0.24), axis=0)
        image[bar] += 0.6
        images.append(image)
    return np.array(images)


def blurred_data(op) -> np.ndarray:
    """``op`` applied to :func:`sample_image` on its input, with Gaussian noise of 1e-3
    times its RMS (seeded)."""
    channels, *size = op.input_shape
    clean = op.matvec(sample_image(size[0], channels, len(size)).ravel())
    noise = np.random.default_rng(1).standard_normal(clean.size)
    return clean + 1e-3 * np.sqrt(np.mean(clean**2)) * noise


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
        return blurred_data(op)


# Each construction, and the ablations of the border correction and the shift.
_SINGLE = ("kronecker", "dct2", "dct2@0", "dct2-raw@0", "dct1", "dct1-raw", "circulant",
           "circulant-raw", "block_jacobi")
_MULTI = ("circulant@0", "circulant", "circulant@0.2", "dct2", "dct2@0.1", "bordered",
          "block_jacobi")


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
# The asv suite's: one per padding mode, the multi-channel layer and the anti-diagonal
# motion (the lines construction and its ring), minutes in all.
ASV_PROBLEMS = {f"{p.blur}-{p.mode}": p for p in (
    Problem("gaussian", "zeros", 128, 1e-2), Problem("gaussian", "replicate", 128, 1e-2),
    Problem("gaussian", "reflect", 128, 1e-2), Problem("gaussian", "circular", 128, 1e-2),
    Problem("random4", "zeros", 48, 1e-2), Problem("anti7", "reflect", 128, 5e-3))}
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
# The general problems (issue 26): every class tikhonov's choice must not lose on
# ---------------------------------------------------------------------------


def _centred(k: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """'same'-like ``(before, after)`` padding per dimension, for any stride."""
    return tuple(((kk - 1) // 2, kk - 1 - (kk - 1) // 2) for kk in k)


@dataclass(frozen=True)
class GeneralProblem:
    """A Tikhonov problem of any class: a named kernel (its dimension: 1-D to 3-D) with a
    padding mode on an input of ``n`` per axis, a damping, a stride, the transposed
    convolution or not, and ``L`` (None or ``'gradient'``)."""

    blur: str
    mode: str
    n: int
    damp: float
    stride: int = 1
    transposed: bool = False  # a ConvTransposeOperator (its input: n per axis)
    L: str | None = None

    @property
    def ndim(self) -> int:
        return kernel(self.blur).ndim - 2

    @property
    def name(self) -> str:
        suffixes = (f"-{self.ndim}d" if self.ndim != 2 else "",
                    f"-s{self.stride}" if self.stride != 1 else "",
                    "-T" if self.transposed else "", "-grad" if self.L == "gradient" else "")
        return f"{self.blur}-{self.mode}-{self.n}-{self.damp:g}" + "".join(suffixes)

    def config(self) -> Config:
        """The geometry, as the ``bench`` configurations hold it (and PyLops reads it)."""
        w = kernel(self.blur)
        groups = _GROUPS.get(self.blur, 1)
        channels = w.shape[0] if self.transposed else w.shape[1] * groups
        # 'same' is the centred padding compare's PyLops check recognises; it does not
        # take a stride, and a transposed convolution takes the pairs.
        plain = self.stride == 1 and not self.transposed
        kwargs = dict(padding="same" if plain else _centred(w.shape[2:]),
                      padding_mode=self.mode, stride=self.stride, groups=groups)
        return Config(self.name, "", w.shape, (channels,) + (self.n,) * self.ndim, kwargs,
                      transposed=self.transposed)

    def operator(self, threads=None):
        """The ConvOperator, or the ConvTransposeOperator."""
        return self.config().operator(kernel(self.blur), threads=threads)

    def data(self, op) -> np.ndarray:
        """The blurred sample (any dimension and channels) with 1e-3 relative noise (seeded)."""
        return blurred_data(op)


def _general_problems() -> list[GeneralProblem]:
    """Issue 26's classes, at sizes where plain CG takes up to about 2 s on two cores
    (the whole section a few minutes)."""
    G = GeneralProblem
    return [
        *(G("anti7", m, 256, 5e-3) for m in ("zeros", "replicate", "reflect")),
        *(G("lshape5", m, 160, 5e-3) for m in ("zeros", "reflect")),
        G("vert9", "replicate", 256, 5e-3),
        G("box3", "reflect", 240, 1e-2),
        G("mix3", "zeros", 80, 1e-2), G("mix3", "zeros", 80, 1e-3),
        G("mix3", "replicate", 96, 1e-2),
        G("depthwise3", "replicate", 128, 1e-2),
        G("motion3", "replicate", 128, 5e-3),
        G("random5", "zeros", 96, 1e-2),
        # (quick: plain CG takes milliseconds, and a preconditioner's set-up as long)
        G("exp15", "zeros", 2048, 1e-3),
        G("gauss1d", "replicate", 4096, 1e-4),  # a harder 1-D problem
        G("gauss3d", "zeros", 32, 1e-2), G("ball3d", "replicate", 32, 1e-2),
        G("disk", "zeros", 128, 1e-2, stride=2),
        G("disk", "zeros", 128, 1e-2, transposed=True),
        G("disk", "zeros", 128, 1e-2, L="gradient"),
        G("anti7", "zeros", 128, 5e-3, L="gradient"),
        G("disk", "zeros", 128, 1e-1), G("disk", "zeros", 128, 1e-4),
    ]


GENERAL_PROBLEMS = _general_problems()
# The same classes at sizes of seconds in all: n per axis by dimension.
_QUICK_N = {1: 256, 2: 24, 3: 8}
QUICK_GENERAL_PROBLEMS = [dataclasses.replace(p, n=_QUICK_N[p.ndim])
                          for p in GENERAL_PROBLEMS]

# (figure, comparison, bound, which results): the targets on every problem.
GENERAL_TARGETS = [
    ("speedup", ">=", 0.9, lambda r: True),
    ("speedup", ">=", 1.5, lambda r: r["blur"] == "mix3"),  # channel mixing
    ("vs_pylops", ">=", 1.0, lambda r: "vs_pylops" in r),  # tikhonov ahead of PyLops
    ("vs_deepinv", ">=", 1.0, lambda r: "vs_deepinv" in r),  # ... and of deepinv
]
# And on the hard ones (plain CG needs at least HARD_ITERATIONS): HARD_SPEEDUP on at
# least HARD_SHARE of them.
HARD_ITERATIONS, HARD_SPEEDUP, HARD_SHARE = 200, 3.0, 2 / 3


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


def plain_cg(op, y, damp, maxiter=None, *, L=None):
    """Plain scipy CG on the normal equations, ``W^H y`` included: ``(x, iterations)``.

    The baseline of every speed-up: no preconditioner, rtol :data:`RTOL`;
    ``L`` as :func:`~sparse_tconv.solvers.tikhonov` takes it.
    """
    return _cg_counted(normal_operator(op, damp, L=L), op.rmatvec(y), RTOL, maxiter, None)


def _normal_residual(normal, b, x) -> float:
    """``||b - normal x|| / ||b||``: the relative residual tikhonov reports."""
    return float(np.linalg.norm(b - normal.matvec(x)) / np.linalg.norm(b))


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


def _time_alternately(funcs: dict, repeat: int, samples: int) -> dict[str, float]:
    """The best time of each function, measured in turn ``samples`` times.

    Interleaved: a burst of load on the shared machine then slows every side
    of a ratio, not one.
    """
    best = dict.fromkeys(funcs, math.inf)
    for _ in range(samples):
        for name, func in funcs.items():
            best[name] = min(best[name], _timed(func, repeat))
    return best


def _race(op, y, damp, *, L=None, repeat: int, samples: int, others=None) -> dict:
    """Plain CG against tikhonov's automatic choice: times, iterations, the choice.

    Each time is :func:`~sparse_tconv.tools.timing.best_time` of ``repeat``
    rounds after its warm-up, the best of ``samples`` alternate measurements;
    ``others`` (name: function) are timed in the same rounds, as ``name_s``.
    """
    op.rmatvec(y)  # the transposed product form, built once outside the timings
    n = op.shape[1]
    last: dict[str, Any] = {}  # what the timed calls return
    # (every choice tikhonov made is reported, should its safeguard ever differ)
    choices: set[str] = set()

    def plain():
        last["plain"] = plain_cg(op, y, damp, 10 * n, L=L)[1]

    def solve():
        last["tikhonov"] = tikhonov(op, y, damp, L=L, rtol=RTOL)[1]
        choices.add(last["tikhonov"].preconditioner)

    times = _time_alternately({"plain": plain, "tikhonov": solve, **(others or {})},
                              repeat, samples)
    r: dict[str, Any] = {f"{name}_s": t for name, t in times.items()}
    info = last["tikhonov"]
    r.update(plain_iterations=last["plain"], method=info.method,
             preconditioner="|".join(sorted(choices)), iterations=info.iterations,
             residual=info.residual, converged=info.converged,
             speedup=r["plain_s"] / r["tikhonov_s"])
    return r


def run_problem(problem: Problem, *, repeat: int, threads: int, samples: int = 1) -> dict:
    """Every figure of one problem (times in seconds): :func:`_race`, then each
    construction of ``problem.kinds``."""
    op = problem.operator(threads)
    y = problem.data(op)
    damp = problem.damp
    r: dict[str, Any] = dict(problem=problem.name, blur=problem.blur, mode=problem.mode,
                             n=problem.n, damp=damp, unknowns=op.shape[1])
    r.update(_race(op, y, damp, repeat=repeat, samples=samples))
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
        curves = {}
        kinds = ("none", *problem.kinds) if problem.kinds else ("none",)
        for name in kinds:
            history = [1.0]
            M = None if name == "none" else _variant(op, problem.damp, name)
            _cg_counted(normal, b, RTOL, maxiter, M, record=lambda xk, history=history,
                        normal=normal, b=b: history.append(_normal_residual(normal, b, xk)))
            curves[name] = history
        out[problem.name] = curves
    return out


def pylops_skip(problem: GeneralProblem) -> str | None:
    """Why PyLops' ConvolveND with cgls cannot pose this problem (None: it can).

    One channel, stride 1, not transposed, an odd kernel centred, zero
    padding (compare's check), and ``L = I`` (cgls damps ``||x||``).
    """
    if problem.L is not None:
        return f"L={problem.L!r}"
    if problem.mode != "zeros":
        return f"{problem.mode} padding"
    return _pylops_skip(problem.config())


def pylops_equal_residual(Op, op, y, damp: float, maxiter: int):
    """PyLops' cgls run to our tolerance: ``(x, iterations, residual)``.

    Steps :class:`pylops.optimization.cls_basic.CGLS` from zero until its
    iterate's residual ``||W^H (W x - y) + damp^2 x|| / ||W^H y||``, measured
    with ``op`` (ours), is at most :data:`RTOL`: the first iteration that
    reaches it, or ``maxiter`` (then above it).  cgls minimises
    ``||Op x - y||^2 + damp^2 ||x||^2`` (its ``setup`` squares ``damp``):
    the same problem.
    """
    from pylops.optimization.cls_basic import CGLS  # type: ignore[import-untyped, import-not-found, unused-ignore]

    normal, b = normal_operator(op, damp), op.rmatvec(y)
    solver = CGLS(Op)
    x = solver.setup(y, niter=maxiter, damp=damp, tol=0.0)
    residual = _normal_residual(normal, b, x)
    while residual > RTOL and solver.iiter < maxiter:
        x = solver.step(x)
        residual = _normal_residual(normal, b, x)
    return x, solver.iiter, residual


class _PyLopsRun:
    """PyLops' cgls to tikhonov's residual, a contestant of :func:`_race`.

    The iterations that reach it are found on construction, untimed; a call
    is a ``cgls`` run of exactly as many (``tol=0``), its iterate kept as ``x``.
    """

    def __init__(self, problem: GeneralProblem, op, y):
        self.Op = pylops_operator(problem.config(), kernel(problem.blur))
        self.y, self.damp = y, problem.damp
        # at most 10 n iterations: scipy cg's default cap, and plain CG's here
        _, self.iterations, _ = pylops_equal_residual(self.Op, op, y, self.damp,
                                                      10 * op.shape[1])
        self.x = None

    def __call__(self):
        from pylops.optimization.basic import cgls  # type: ignore[import-untyped, import-not-found, unused-ignore]

        # x0 None: the zero start (setup's x0 branch damps by damp, not damp**2)
        self.x = np.ravel(cgls(self.Op, self.y, niter=self.iterations, damp=self.damp,
                               tol=0.0)[0])


def deepinv_skip(problem: GeneralProblem) -> str | None:
    """Why deepinv's ``Blur`` with ``prox_l2`` cannot pose this problem (None: it can).

    One 2-D kernel for every channel (``Blur`` broadcasts its filter), stride 1,
    not transposed, ``L = I`` (``prox_l2`` damps ``||x - z||``).
    """
    if problem.L is not None:
        return f"L={problem.L!r}"
    if problem.ndim != 2:
        return f"{problem.ndim}-D"
    if problem.stride != 1 or problem.transposed:
        return "stride" if problem.stride != 1 else "transposed"
    w = kernel(problem.blur)
    groups = _GROUPS.get(problem.blur, 1)
    if w.shape[1] != 1 or w.shape[0] != groups or any(not np.array_equal(k, w[0]) for k in w):
        return "channels"
    return None


class _DeepinvRun:
    """deepinv's ``Blur(filter, padding=mode).prox_l2`` (its CG, float64, CPU) to
    tikhonov's residual, a contestant of :func:`_race`.

    ``prox_l2(z=0, y, gamma)`` solves ``(A^H A + I / gamma) x = A^H y``: with
    ``gamma = 1 / damp**2`` our normal equations, and its stopping rule (the
    recursive residual over ``||b||``) our residual's; its CG's ``eps`` (1e-8
    added to the step's denominators) set to 1e-300, without which it stalls
    short of rtol.  deepinv convolves (the
    filter flipped against torch's correlation): the filter is the kernel
    reversed, and the operator and its adjoint are checked against ours on a
    random vector.  The
    tolerance is lowered tenfold from rtol until the iterate meets rtol on our
    residual (found on construction, untimed).
    """

    def __init__(self, problem: GeneralProblem, op, y):
        import torch
        from deepinv.physics import Blur  # type: ignore[import-untyped, import-not-found, unused-ignore]

        w = kernel(problem.blur)[:1, :1, ::-1, ::-1]
        padding = "constant" if problem.mode == "zeros" else problem.mode
        self.physics = Blur(filter=torch.from_numpy(np.ascontiguousarray(w)), padding=padding)
        x = np.random.default_rng(0).standard_normal(op.shape[1])
        ours = op @ x
        theirs = self.physics.A(torch.from_numpy(x.reshape(1, *op.input_shape))).numpy()
        if theirs.size != ours.size or not np.allclose(theirs.ravel(), ours, atol=1e-12):
            raise NotImplementedError("deepinv's Blur is not this operator")
        back = self.physics.A_adjoint(torch.from_numpy(ours.reshape(1, *op.output_shape)))
        if not np.allclose(back.numpy().ravel(), op.rmatvec(ours), atol=1e-10):
            # (measured: replicate padding with the 9x1 kernel, off by 16 in 24x24)
            raise NotImplementedError("deepinv's adjoint is not W^T")
        self.y = torch.from_numpy(np.ascontiguousarray(y.reshape(1, *op.output_shape)))
        self.gamma, self.maxiter = 1.0 / problem.damp**2, 10 * op.shape[1]
        normal, b = normal_operator(op, problem.damp), op.rmatvec(y)
        self.tol = RTOL
        while True:
            self()
            self.residual = _normal_residual(normal, b, self.x)
            if self.residual <= RTOL or self.tol < 1e-14:
                break
            self.tol /= 10

    def __call__(self):
        # (eps: its CG adds 1e-8 to the step's denominators by default, which near rtol
        # 1e-6 outweighs them: the residual stalled at 2.7e-6 on the anti-diagonal)
        self.x = np.ravel(self.physics.prox_l2(None, self.y, self.gamma, max_iter=self.maxiter,
                                               tol=self.tol, eps=1e-300).numpy())


def run_general(problem: GeneralProblem, *, repeat: int, threads: int, samples: int = 1,
                pylops: Any = None, deepinv: bool = False) -> dict:
    """Every figure of one general problem: :func:`_race`, with PyLops in it where it
    poses the problem (``pylops``: its module, None when missing: no PyLops figures),
    and deepinv where it is installed and poses it."""
    op = problem.operator(threads)
    y = problem.data(op)
    damp = problem.damp
    r: dict[str, Any] = dict(problem=problem.name, blur=problem.blur, mode=problem.mode,
                             n=problem.n, ndim=problem.ndim, damp=damp, stride=problem.stride,
                             transposed=problem.transposed, L=problem.L,
                             unknowns=op.shape[1])
    peer = None
    others: dict[str, Any] = {}
    if pylops is not None:
        r["pylops_skip"] = pylops_skip(problem)
        peer = None if r["pylops_skip"] else _PyLopsRun(problem, op, y)
        if peer:
            others["pylops"] = peer
    inverse = None
    if deepinv:
        r["deepinv_skip"] = deepinv_skip(problem)
        if not r["deepinv_skip"]:
            try:
                inverse = _DeepinvRun(problem, op, y)
            except NotImplementedError as exc:
                r["deepinv_skip"] = str(exc)
        if inverse:
            others["deepinv"] = inverse
    r.update(_race(op, y, damp, L=problem.L, repeat=repeat, samples=samples,
                   others=others or None))
    if peer:
        residual = _normal_residual(normal_operator(op, damp), op.rmatvec(y), peer.x)
        r.update(pylops_iterations=peer.iterations, pylops_residual=residual,
                 pylops_converged=residual <= RTOL, vs_pylops=r["pylops_s"] / r["tikhonov_s"])
    if inverse:
        residual = _normal_residual(normal_operator(op, damp), op.rmatvec(y), inverse.x)
        r.update(deepinv_tol=inverse.tol, deepinv_residual=residual,
                 deepinv_converged=residual <= RTOL,
                 vs_deepinv=r["deepinv_s"] / r["tikhonov_s"])
    return r


def peer_notes() -> tuple[Any, bool, list[str]]:
    """PyLops' module (None when missing), whether deepinv loads, and the notes on the
    peers left out."""
    found, notes = available_peers()
    notes = [note for note in notes if note.startswith("pylops")]
    try:  # (not only ImportError: torchvision fails with a RuntimeError on a torch it misses)
        importlib.import_module("deepinv")
    except Exception as exc:
        notes.append(f"deepinv not available: {exc}; its column is left out (it loads with "
                     "torch 2.14.1 and torchvision 0.29.1; with torch 2.13 torchvision 0.28 "
                     "fails, 'operator torchvision::nms does not exist')")
        return found.get("pylops"), False, notes
    return found.get("pylops"), True, notes


# ---------------------------------------------------------------------------
# Verdicts, tables, plot
# ---------------------------------------------------------------------------


def _problem_of(r: dict) -> Problem:
    return Problem(r["blur"], r["mode"], r["n"], r["damp"])


def _target_rows(results: list[dict], targets, subject=lambda r: r) -> list[dict]:
    """A row per target and result it applies to (``applies(subject(r))``)."""
    rows = []
    for figure, cmp, bound, applies in targets:
        for r in results:
            if not applies(subject(r)):
                continue
            value = r[figure]
            rows.append(dict(problem=r["problem"], figure=figure, value=value,
                             target=f"{cmp} {bound}", met=value >= bound))
    return rows


def verdicts(results: list[dict], exact_rows, scaling_rows) -> list[dict]:
    rows = _target_rows(results, TARGETS, _problem_of)
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


def general_verdicts(general: list[dict]) -> list[dict]:
    """:data:`GENERAL_TARGETS` per problem, and the share of the hard problems at
    :data:`HARD_SPEEDUP` (no row when none is hard)."""
    rows = _target_rows(general, GENERAL_TARGETS)
    hard = [r for r in general if r["plain_iterations"] >= HARD_ITERATIONS]
    if hard:
        share = sum(r["speedup"] >= HARD_SPEEDUP for r in hard) / len(hard)
        rows.append(dict(problem=f"{len(hard)} with plain it >= {HARD_ITERATIONS}",
                         figure=f"share >= {HARD_SPEEDUP:g}x", value=share,
                         target=f">= {HARD_SHARE:.3g}", met=share >= HARD_SHARE))
    return rows


def _kind_cell(entry: dict) -> str:
    if "error" in entry:
        return "n/a"
    if not entry["converged"]:
        return f">{entry['iterations']}"
    return f"{entry['iterations']} ({entry['speedup']:.1f}x)"


_RACE_HEADER = (f"{'problem':<30}{'plain it':>9}{'plain s':>9}{'tikhonov':>22}{'it':>6}"
                f"{'s':>9}{'speedup':>9}")


def _race_cells(r: dict) -> str:
    """A result's plain CG and tikhonov columns (those of :data:`_RACE_HEADER`)."""
    how = r["method"] if r["method"] == "fft" else f"cg+{r['preconditioner']}"
    return (f"{r['problem']:<30}{r['plain_iterations']:>9}{r['plain_s']:>9.3f}"
            f"{how:>22}{r['iterations']:>6}{r['tikhonov_s']:>9.3f}{r['speedup']:>8.1f}x")


def _pylops_cells(r: dict) -> str:
    """PyLops' iterations (>N: short of rtol at the cap), seconds and tikhonov's lead;
    or why it cannot pose the problem."""
    if r.get("pylops_skip"):
        return f"   n/a: {r['pylops_skip']}"
    iterations = f"{'' if r['pylops_converged'] else '>'}{r['pylops_iterations']}"
    return f"{iterations:>10}{r['pylops_s']:>9.3f}{r['vs_pylops']:>9.1f}x"


def _deepinv_cells(r: dict) -> str:
    """deepinv's tolerance (>: short of rtol at the smallest), seconds and tikhonov's lead;
    or why it cannot pose the problem."""
    if r.get("deepinv_skip"):
        return f"   n/a: {r['deepinv_skip']}"
    tol = f"{'' if r['deepinv_converged'] else '>'}{r['deepinv_tol']:.0e}"
    return f"{tol:>10}{r['deepinv_s']:>9.3f}{r['vs_deepinv']:>9.1f}x"


def format_general(general: list[dict]) -> list[str]:
    """The general section's table: plain CG, tikhonov's choice, PyLops and deepinv."""
    peer = any("pylops_skip" in r for r in general)  # (PyLops installed)
    inverse = any("deepinv_skip" in r for r in general)  # (deepinv loads)
    lines = ["general problems (issue 26): every padding mode, kernel class, dimension, "
             "channel layout, damping, L, stride and transposition"]
    header = _RACE_HEADER + (f"{'pylops it':>10}{'s':>9}{'vs pylops':>10}" if peer else "")
    lines.append(header + (f"{'dinv tol':>10}{'s':>9}{'vs dinv':>10}" if inverse else ""))
    for r in general:
        row = _race_cells(r) + (_pylops_cells(r) if peer else "")
        if inverse:  # (after a note on PyLops, in its own column still)
            row = row.ljust(len(header)) + _deepinv_cells(r)
        lines.append(row)
    if peer:
        lines.append(f"pylops: ConvolveND (FFT, zero boundary) + cgls(damp=damp, tol=0) for "
                     f"the iterations at which its iterate first meets rtol {RTOL:g} on our "
                     "normal equations (found beforehand, untimed); vs pylops: its time over "
                     "tikhonov's")
    if inverse:
        lines.append("dinv: deepinv's Blur(filter reversed, padding=mode).prox_l2(0, y, "
                     "1/damp^2, eps=1e-300), its CG in float64 on the CPU, at the largest "
                     f"tolerance (rtol, then tenfold smaller) whose iterate meets rtol "
                     f"{RTOL:g} on our normal equations (found beforehand, untimed); vs dinv: "
                     "its time over tikhonov's")
    return lines


def format_results(results, exact_rows, scaling_rows, checks, machine, general=(),
                   notes=()) -> str:
    lines = [f"{machine['threads']} threads, rtol {RTOL:g}, {machine['date']}; speed-ups are "
             "plain scipy cg's time over each method's (set-up included), same run", ""]
    if results:
        lines.append(_RACE_HEADER)
        lines += [_race_cells(r) for r in results]
    if general:
        lines += [""] * bool(results) + format_general(list(general))
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
    lines += [f"note: {n}" for n in notes]
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


def _run_each(problems, run, **kwargs) -> list[dict]:
    """``run(problem, **kwargs)`` for each problem, its name on stderr first."""
    out = []
    for i, problem in enumerate(problems, 1):
        print(f"[{i}/{len(problems)}] {problem.name}", file=sys.stderr, flush=True)
        out.append(run(problem, **kwargs))
    return out


def _problems_section(quick: bool, repeat: int, threads: int):
    """The problems, exactness and scaling sections: their rows."""
    results = _run_each(QUICK_PROBLEMS if quick else PROBLEMS, run_problem, repeat=repeat,
                        threads=threads, samples=1 if quick else 2)
    print("exactness, scaling", file=sys.stderr, flush=True)
    exact_rows = exactness(16 if quick else 128, 16 if quick else 48, (1e-2, 1e-3), threads)
    scaling_rows = scaling(QUICK_SCALING_SIZES if quick else SCALING_SIZES, (1e-2, 1e-3),
                           threads)
    return results, exact_rows, scaling_rows


def _general_section(quick: bool, repeat: int, threads: int) -> tuple[list[dict], list[str]]:
    """The general section's rows, and the notes on the peers left out."""
    pylops, deepinv, notes = peer_notes()
    if deepinv:  # (its products on the same threads as ours)
        import torch

        torch.set_num_threads(threads)
    general = _run_each(QUICK_GENERAL_PROBLEMS if quick else GENERAL_PROBLEMS, run_general,
                        repeat=repeat, threads=threads, samples=1 if quick else 2,
                        pylops=pylops, deepinv=deepinv)
    return general, notes


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
    parser.add_argument("--section", choices=("all", "problems", "general"), default="all",
                        help="problems: the blurs, exactness and scaling; general: issue 26's "
                             "problem classes, with PyLops (default: all)")
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
    results: list[dict] = []
    exact_rows: list[dict] = []
    scaling_rows: list[dict] = []
    if args.section in ("all", "problems"):
        results, exact_rows, scaling_rows = _problems_section(args.quick, repeat, threads)
    general: list[dict] = []
    notes: list[str] = []
    if args.section in ("all", "general"):
        general, notes = _general_section(args.quick, repeat, threads)
    checks = verdicts(results, exact_rows, scaling_rows) + general_verdicts(general)
    machine = dict(threads=threads, date=time.strftime("%Y-%m-%d"), rtol=RTOL)
    print(format_results(results, exact_rows, scaling_rows, checks, machine, general, notes))
    histories = None
    if args.plot:
        print("residual histories", file=sys.stderr, flush=True)
        histories = residual_histories(plotted_problems(args.quick), threads, 400)
        plot_histories(histories, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=results, exactness=exact_rows,
                           scaling=scaling_rows, general=general, targets=checks,
                           histories=histories, notes=notes), f, indent=1)
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
