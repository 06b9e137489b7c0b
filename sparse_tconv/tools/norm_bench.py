"""Certified norm bounds against scipy's ``svds`` and the Gram iteration, per layer.

Run ``sparse-tconv norms`` (or ``python -m sparse_tconv.tools.norm_bench``;
``--help`` for options).  For every layer it times
:func:`~sparse_tconv.spectral.norm_bounds` and reports the interval's width,
and, in the same run, scipy's ``svds`` on the explicit matrix (an estimate,
no certificate) and, where asked, the explicit Gram iteration
(``operator_norm(W, method='gram', iterations=6)``, the upper bound the
library had before).  The reference norm is a dense SVD for small matrices,
else ``svds``; the interval must contain it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse.linalg import svds

from .. import ConvOperator
from .._validation import check_tol
from ..spectral import norm_bounds, operator_norm
from .configs import select
from .outputs import output_path_problem
from .timing import best_time

__all__ = ["Layer", "LAYERS", "QUICK_LAYERS", "run_layer", "main"]

# Dense SVD as the reference up to this many entries; svds beyond.
_DENSE_REFERENCE = 16_000_000


@dataclass(frozen=True)
class Layer:
    """One layer to bound: a weight shape, an input, its settings."""

    name: str
    description: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    gram: bool = False  # also time the explicit Gram iteration (slow: tens of seconds)

    def operator(self) -> ConvOperator:
        rng = np.random.default_rng(0)
        fan_in = int(np.prod(self.weight_shape[1:]))
        weight = rng.standard_normal(self.weight_shape) / np.sqrt(fan_in)
        return ConvOperator(weight, self.input_shape, **self.kwargs)


LAYERS = [
    Layer("s2", "Conv2d(16->32, 3x3, stride 2, padding 1), 32x32", (32, 16, 3, 3), (16, 32, 32),
          dict(stride=2, padding=1), gram=True),
    Layer("c64", "Conv2d(64->64, 3x3, padding 1), 32x32", (64, 64, 3, 3), (64, 32, 32),
          dict(padding=1), gram=True),
    Layer("small", "Conv2d(4->4, 5x5, padding 2), 16x16", (4, 4, 5, 5), (4, 16, 16),
          dict(padding=2)),
    Layer("grp", "Conv2d(32->32, 3x3, groups 4, dilation 2, padding 2), 32x32",
          (32, 8, 3, 3), (32, 32, 32), dict(groups=4, dilation=2, padding=2)),
    Layer("1d", "Conv1d(8->8, 5, padding 2), 256", (8, 8, 5), (8, 256), dict(padding=2)),
    Layer("3d", "Conv3d(4->4, 3x3x3, padding 1), 16^3", (4, 4, 3, 3, 3), (4, 16, 16, 16),
          dict(padding=1)),
    Layer("circ", "Conv2d(64->64, 3x3, padding 1, circular), 32x32", (64, 64, 3, 3),
          (64, 32, 32), dict(padding=1, padding_mode="circular")),
    Layer("refl", "Conv2d(16->32, 3x3, stride 2, padding 1, reflect), 32x32", (32, 16, 3, 3),
          (16, 32, 32), dict(stride=2, padding=1, padding_mode="reflect")),
    Layer("repl", "Conv2d(4->4, 3x3, padding 1, replicate), 32x32", (4, 4, 3, 3),
          (4, 32, 32), dict(padding=1, padding_mode="replicate")),
    Layer("refl16", "Conv2d(4->4, 5x5, padding 2, reflect), 16x16", (4, 4, 5, 5), (4, 16, 16),
          dict(padding=2, padding_mode="reflect")),
    # past the inertia certificate's size: the border certificate
    Layer("refl32", "Conv2d(32->32, 3x3, padding 1, reflect), 32x32", (32, 32, 3, 3),
          (32, 32, 32), dict(padding=1, padding_mode="reflect")),
    Layer("repl32", "Conv2d(32->32, 3x3, padding 1, replicate), 32x32", (32, 32, 3, 3),
          (32, 32, 32), dict(padding=1, padding_mode="replicate")),
]

QUICK_LAYERS = [
    Layer("s2", "Conv2d(4->8, 3x3, stride 2, padding 1), 16x16", (8, 4, 3, 3), (4, 16, 16),
          dict(stride=2, padding=1)),
    Layer("small", "Conv2d(2->2, 5x5, padding 2), 12x12", (2, 2, 5, 5), (2, 12, 12),
          dict(padding=2)),
    Layer("circ", "Conv2d(4->4, 3x3, padding 1, circular), 16x16", (4, 4, 3, 3), (4, 16, 16),
          dict(padding=1, padding_mode="circular")),
    Layer("refl", "Conv2d(2->2, 3x3, padding 1, reflect), 12x12", (2, 2, 3, 3), (2, 12, 12),
          dict(padding=1, padding_mode="reflect")),
]


def _timed(func):
    start = time.perf_counter()
    value = func()
    return value, time.perf_counter() - start


def _reference(op) -> tuple[float, str]:
    """The norm, by a dense SVD when the matrix is small, else by svds."""
    W = op.matrix
    if W.shape[0] * W.shape[1] <= _DENSE_REFERENCE:
        return float(np.linalg.norm(W.toarray(), 2)), "dense SVD"
    return float(svds(W, k=1, return_singular_vectors=False)[0]), "svds"


def run_layer(layer: Layer, *, gram: bool, rtol: float) -> dict:
    """Every figure for one layer (times in seconds)."""
    op = layer.operator()
    _ = op.matrix  # svds and the Gram iteration read it: built outside their timings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a wide interval is a figure here
        bounds = norm_bounds(op, rtol=rtol)
        # The best of a few calls after a warm-up one (first calls pay for
        # BLAS threads waking up); svds and the Gram iteration, seconds to
        # minutes each, are timed once.
        bounds_s = best_time(lambda: norm_bounds(op, rtol=rtol), repeat=3, min_time=0)
    svds_value, svds_s = _timed(lambda: float(svds(op.matrix, k=1,
                                                   return_singular_vectors=False)[0]))
    reference, how = _reference(op)
    r: dict[str, Any] = dict(
        layer=layer.name, description=layer.description, lower=bounds.lower,
        upper=bounds.upper, gap=bounds.gap, bounds_s=bounds_s, svds=svds_value, svds_s=svds_s,
        reference=reference, reference_by=how,
        contains=bool(bounds.lower <= reference * (1 + 1e-9)
                      and reference * (1 - 1e-9) <= bounds.upper),
        upper_over_reference=bounds.upper / reference - 1,
        svds_over_bounds=svds_s / bounds_s,
    )
    if gram and layer.gram:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value, seconds = _timed(lambda: operator_norm(op.matrix, method="gram",
                                                          iterations=6))
        r.update(gram=value, gram_s=seconds, gram_over_bounds=seconds / bounds_s,
                 gram_over_reference=value / reference - 1)
    return r


def _format(results: list[dict], date: str) -> str:
    lines = [
        f"{date}, float64; norm_bounds vs scipy's svds on the explicit matrix (an estimate) "
        "and the explicit Gram iteration (6 steps, a bound)",
        "",
        f"{'layer':<7}{'lower':>10}{'upper':>10}{'gap %':>8}{'bounds s':>10}{'svds s':>9}"
        f"{'svds/b':>8}{'up-ref %':>10}{'gram s':>9}{'gram/b':>8}{'gram-ref %':>11}  contains",
    ]
    for r in results:
        gram = (f"{r['gram_s']:>9.2f}{r['gram_over_bounds']:>8.0f}"
                f"{100 * r['gram_over_reference']:>11.2f}" if "gram_s" in r
                else f"{'-':>9}{'-':>8}{'-':>11}")
        lines.append(
            f"{r['layer']:<7}{r['lower']:>10.5f}{r['upper']:>10.5f}{100 * r['gap']:>8.3f}"
            f"{r['bounds_s']:>10.3f}{r['svds_s']:>9.3f}{r['svds_over_bounds']:>8.1f}"
            f"{100 * r['upper_over_reference']:>10.3f}{gram}  {r['contains']}"
        )
    lines.append("")
    lines += [f"  ({r['layer']}) {r['description']}; reference by {r['reference_by']}"
              for r in results]
    lines.append("\ngap: upper / lower - 1; svds/b, gram/b: their time over norm_bounds'; "
                 "up-ref: the upper bound over the reference norm")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="sparse-tconv norms",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layers, seconds")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="run only these layers (repeatable)")
    parser.add_argument("--rtol", type=float, default=1e-2, help="norm_bounds' rtol")
    parser.add_argument("--no-gram", action="store_true",
                        help="skip the explicit Gram iteration (tens of seconds per layer)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure as JSON")
    args = parser.parse_args(argv)
    try:
        layers = select(QUICK_LAYERS if args.quick else LAYERS, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    problem = output_path_problem(args.json, "--json")
    if problem:
        parser.error(problem)
    try:
        check_tol(args.rtol, "--rtol")
    except ValueError as exc:
        parser.error(str(exc))
    results = []
    for i, layer in enumerate(layers, 1):
        print(f"[{i}/{len(layers)}] {layer.name}: {layer.description}", file=sys.stderr)
        results.append(run_layer(layer, gram=not args.no_gram and not args.quick,
                                 rtol=args.rtol))
    date = time.strftime("%Y-%m-%d")
    print(_format(results, date))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=date, results=results), f, indent=1)
    return 0 if all(r["contains"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
