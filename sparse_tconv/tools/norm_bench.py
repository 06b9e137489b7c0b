"""Certified norm bounds against scipy's ``svds`` and the Gram iteration, per layer.

Run ``sparse-tconv norms`` (or ``python -m sparse_tconv.tools.norm_bench``;
``--help`` for options).  For every layer it times
:func:`~sparse_tconv.spectral.norm_bounds` and reports the interval's width,
and, in the same run, scipy's ``svds`` on the explicit matrix (an estimate,
no certificate) and, where asked, the explicit Gram iteration
(``operator_norm(W, method='gram', iterations=6)``, the upper bound the
library had before).  The reference norm is a dense SVD for small matrices,
else ``svds``; the interval must contain it.

With ``--model`` (and ``--input-shape C,H,W``) it bounds every convolution of
a PyTorch model instead, by :func:`~sparse_tconv.spectral.model_norm_bounds`,
and prints the per-layer table, the total time and the product of the upper
bounds: a built-in architecture of :mod:`sparse_tconv.tools.models` with
seeded random weights (``--model resnet18 --seed 0``), a whole model saved
with ``torch.save`` (``--model model.pt``), or a state dict saved with
``torch.save`` loaded into a built-in architecture (``--model weights.pt
--arch resnet18``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse.linalg import svds

from .. import ConvOperator
from .._validation import check_tol
from ..spectral import ModelNormBounds, model_norm_bounds, norm_bounds, operator_norm
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
    *(Layer(f"{short}{c}" + ("" if size == 32 else f"x{size}"),
            f"Conv2d({c}->{c}, 3x3, padding 1, {mode}), {size}x{size}", (c, c, 3, 3),
            (c, size, size), dict(padding=1, padding_mode=mode))
      for short, mode in (("refl", "reflect"), ("repl", "replicate"))
      for c, size in ((32, 64), (64, 32), (64, 64))),
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


def _reference(op, svds_value: float) -> tuple[float, str]:
    """The norm, by a dense SVD when the matrix is small, else svds' (already computed)."""
    W = op.matrix
    if W.shape[0] * W.shape[1] <= _DENSE_REFERENCE:
        return float(np.linalg.norm(W.toarray(), 2)), "dense SVD"
    return svds_value, "svds"


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
    reference, how = _reference(op, svds_value)
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


# ---------------------------------------------------------------------------
# --model: every convolution of a model
# ---------------------------------------------------------------------------


def _architecture_names() -> str:
    from .models import ARCHITECTURES

    return ", ".join(ARCHITECTURES)


def _sample_shape(text: str) -> tuple[int, ...]:
    """``--input-shape C,H,W``: positive ints, one sample's shape."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be comma-separated integers (one sample's shape, "
                         f"no batch axis, e.g. 3,224,224), got {text!r}") from None
    if any(v < 1 for v in shape):
        raise ValueError(f"--input-shape must hold positive sizes, got {text!r}")
    return shape


def _first_line(exc: BaseException) -> str:
    """The reason in a torch error: after 'WeightsUnpickler error:', its first line."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ValueError(f"--model {path!r}: models are PyTorch modules; install PyTorch "
                         "(pip install 'sparse-tconv[torch]')") from None
    return torch


def _from_state_dict(path: str, arch: str):
    """A built-in architecture with the weights of a state dict file."""
    from .models import ARCHITECTURES

    torch = _import_torch(path)
    try:  # weights_only: tensors and plain containers, never arbitrary objects
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        raise ValueError(f"--model {path!r}: torch.load(weights_only=True) cannot read it as "
                         f"a state dict ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"--model {path!r} with --arch {arch}: the file must hold a state dict "
                         f"(parameter names to tensors), got a {type(state).__name__}")
    fc = state.get("fc.weight")
    options = {} if fc is None or fc.dim() != 2 else {"num_classes": int(fc.shape[0])}
    model = ARCHITECTURES[arch](**options)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--model {path!r} is not a state dict of --arch {arch}: "
                         f"{' '.join(str(exc).split())}") from None
    return model


def _whole_model(path: str):
    """A whole ``torch.nn.Module`` saved with ``torch.save`` (runs the file's pickled code)."""
    torch = _import_torch(path)
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"--model {path!r}: torch.load cannot read it ({_first_line(exc)})"
                         ) from None
    if isinstance(model, dict):
        raise ValueError(f"--model {path!r} holds a dict (a state dict?), not a model: name its "
                         f"architecture with --arch (one of {_architecture_names()})")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {path!r} holds a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def _load_model(args):
    """The model of ``--model``, ``--arch`` and ``--seed``, and how to name it."""
    from .models import ARCHITECTURES

    name = args.model
    if args.arch is not None and args.arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {_architecture_names()}, got {args.arch!r}")
    if name in ARCHITECTURES and not os.path.exists(name):
        if args.arch is not None:
            raise ValueError(f"--arch names the architecture of a state dict file; --model "
                             f"{name} is a built-in architecture already")
        seed = 0 if args.seed is None else args.seed
        return ARCHITECTURES[name](seed=seed), f"{name} (random weights, seed {seed})"
    if not os.path.isfile(name):
        raise ValueError(f"--model {name!r} is neither a file nor a built-in architecture "
                         f"({_architecture_names()})")
    if args.seed is not None:
        raise ValueError(f"--seed is for a built-in architecture's random weights; --model "
                         f"{name!r} is a file with its own")
    if args.arch is not None:
        return _from_state_dict(name, args.arch), f"{name} (state dict, {args.arch})"
    return _whole_model(name), name


def _row_figures(index: int, row) -> dict:
    geometry = {f.name: getattr(row.geometry, f.name)
                for f in dataclasses.fields(row.geometry)}
    return dict(index=index, name=row.name, description=row.description,
                transposed=row.transposed, input_shape=row.input_shape,
                output_shape=row.output_shape, lower=row.lower, upper=row.upper, gap=row.gap,
                seconds=row.seconds, build_seconds=row.build_seconds,
                certified=row.certified, reason=row.reason, geometry=geometry)


def _model_figures(result: ModelNormBounds, label: str, date: str) -> dict:
    return dict(date=date, model=label, input_shape=result.input_shape, rtol=result.rtol,
                convolutions=len(result), seconds=result.seconds,
                build_seconds=result.build_seconds, upper_product=result.upper_product,
                uncertified=[row.name for row in result.uncertified],
                results=[_row_figures(i, row) for i, row in enumerate(result, 1)])


def _main_model(parser, args) -> int:
    """``--model``: bound every convolution of a model; exit 0 when it ran."""
    for option, given in (("--quick", args.quick), ("--config", args.config),
                          ("--no-gram", args.no_gram)):
        if given:
            parser.error(f"{option} is for the built-in layers; it does not apply with --model")
    if args.input_shape is None:
        parser.error("--model needs --input-shape C,H,W (one sample's shape, no batch axis, "
                     "e.g. 3,224,224)")
    problem = output_path_problem(args.json, "--json")
    if problem:
        parser.error(problem)
    try:
        rtol = check_tol(args.rtol, "--rtol")
        shape = _sample_shape(args.input_shape)
        model, label = _load_model(args)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))
    print(f"bounding every convolution of {label} on input {'x'.join(map(str, shape))} "
          f"(rtol {rtol:g})", file=sys.stderr)
    try:
        result = model_norm_bounds(model, shape, rtol=rtol)
    except (ValueError, TypeError) as exc:
        parser.error(f"--model {args.model!r} on --input-shape {args.input_shape}: {exc}")
    date = time.strftime("%Y-%m-%d")
    print(f"{date}, float64; norm_bounds of every convolution of {label}, input "
          f"{'x'.join(map(str, shape))}\n")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_model_figures(result, label, date), f, indent=1)
    return 0


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
    model = parser.add_argument_group(
        "a whole model", "bound every convolution of a PyTorch model instead of the built-in "
        "layers (spectral.model_norm_bounds)")
    model.add_argument(
        "--model", metavar="PATH_OR_NAME",
        help="a built-in architecture (resnet18, convnet: random weights, see --seed), a whole "
             "torch.nn.Module saved with torch.save (loaded with torch.load(weights_only=False), "
             "which runs the file's pickled code: only for files you trust), or with --arch a "
             "state dict saved with torch.save (loaded with weights_only=True)")
    model.add_argument("--input-shape", metavar="C,H,W",
                       help="one sample's shape, no batch axis (required with --model)")
    model.add_argument("--arch", metavar="NAME",
                       help="the built-in architecture of the state dict in --model "
                            "(resnet18, convnet)")
    model.add_argument("--seed", type=_seed, default=None,
                       help="seed of a built-in architecture's random weights (default 0)")
    args = parser.parse_args(argv)
    if args.model is not None:
        return _main_model(parser, args)
    for option, given in (("--input-shape", args.input_shape), ("--arch", args.arch),
                          ("--seed", args.seed)):
        if given is not None:
            parser.error(f"{option} is for --model")
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


def _seed(text: str) -> int:
    """An argparse type: a non-negative int (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}"
                                         ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
