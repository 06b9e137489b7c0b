"""The ``sparse-tconv`` command (also ``python -m sparse_tconv``).

``bench`` compares the CSR product with direct kernels and peers, ``matrix``
builds (and saves) W for a geometry given on the command line, with random
weights or a trained layer's weight read from a file, ``crossover``
maps where each method is fastest, ``perf`` runs the performance figures of
:mod:`sparse_tconv.tools.perf`.  User errors print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import conv_matrix, conv_matrix_nnz, conv_transpose_matrix, conv_transpose_matrix_nnz
from .._geometry import ConvGeometry, validate
from .._io import write_npz
from .._parallel import resolve_threads
from .._validation import INT64_MAX, PADDING_MODES, as_weight
from . import compare, perf
from .configs import Config, select
from .norm_bench import _first_line
from .outputs import output_path_problem

__all__ = ["main"]

_PROG = "sparse-tconv"


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    return values


def _int_or_tuple(text: str, name: str):
    values = _ints(text, name)
    return values[0] if len(values) == 1 else values


def _int_at_least(minimum: int, words: str):
    """An argparse type: an int >= ``minimum`` (argparse names the option in its message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {words} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {words} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _output_path(path, option: str, *, force: bool = True) -> None:
    """Refuse an output path before any work (see :func:`.outputs.output_path_problem`)."""
    problem = output_path_problem(path, option, force=force)
    if problem:
        raise UsageError(problem)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return None


def _check_sizes(configs, max_bytes) -> None:
    """Refuse, before anything is built, configurations whose matrix exceeds ``max_bytes``.

    The default is a quarter of this machine's memory: a run holds the CSR
    matrix, the operator's product forms of W and W.T and the vectors, about
    three times the matrix.
    """
    origin = "--max-bytes"
    if max_bytes is None:
        memory = _physical_memory()
        if memory is None:
            return
        max_bytes, origin = memory // 4, "a quarter of this machine's memory; set --max-bytes"
    for config in configs:
        size = config.predicted_size()
        if size.nbytes > max_bytes:
            raise MemoryError(
                f"configuration {config.name} ({config.description}): the matrix would need "
                f"{size.nbytes:,} bytes (nnz={size.nnz:,}), more than max_bytes={max_bytes:,} "
                f"({origin})"
            )


def _padding(text: str):
    """'same', 'valid', '2', '1,2' (per dimension) or '0:1,1:2' ((before, after) per dimension)."""
    if text in ("same", "valid"):
        return text
    if ":" in text:
        pairs = []
        for part in text.split(","):
            pair = _ints(part.replace(":", ","), "--padding")
            if len(pair) != 2:
                raise UsageError(f"--padding pairs are before:after, got {part!r}")
            pairs.append(pair)
        return tuple(pairs)
    return _int_or_tuple(text, "--padding")


def _add_geometry(parser: argparse.ArgumentParser, required: bool,
                  weight_file: bool = False) -> None:
    """The geometry options; ``weight_file``: ``--weight``, exclusive with ``--weight-shape``."""
    g = parser.add_argument_group("geometry (PyTorch's conventions)")
    weight = g.add_mutually_exclusive_group(required=required) if weight_file else g
    weight.add_argument("--weight-shape", required=required and not weight_file,
                        metavar="O,I,K...",
                        help="weight shape, e.g. 64,3,7,7 (Conv layout; ConvTranspose layout "
                             "with --transposed); K... alone for one channel in and out")
    if weight_file:
        weight.add_argument("--weight", metavar="PATH",
                            help="the weight itself: a .npy file, or a torch .pt/.pth file "
                                 "holding a tensor or a state dict (see --weight-key)")
        g.add_argument("--weight-key", metavar="KEY",
                       help="the state-dict entry of --weight, e.g. conv1.weight "
                            "(nested dicts: keys joined by '.')")
    g.add_argument("--input-shape", required=required, metavar="C,L...",
                   help="one input sample, e.g. 3,224,224 (L... alone with a K... weight)")
    g.add_argument("--stride", default="1", metavar="S[,S...]")
    g.add_argument("--padding", default="0",
                   help="P, P1,P2,..., before:after pairs (0:1,1:2), 'same' or 'valid'")
    g.add_argument("--dilation", default="1", metavar="D[,D...]")
    g.add_argument("--groups", type=int, default=1)
    g.add_argument("--padding-mode", default="zeros",
                   choices=PADDING_MODES)
    g.add_argument("--transposed", action="store_true", help="a transposed convolution")
    g.add_argument("--output-padding", default="0", metavar="A[,A...]",
                   help="transposed convolution only")


def _geometry(args, weight_shape: tuple[int, ...] | None = None) -> Config:
    """The configuration of the command line; ``weight_shape`` replaces ``--weight-shape``."""
    kwargs = dict(
        stride=_int_or_tuple(args.stride, "--stride"),
        padding=_padding(args.padding),
        dilation=_int_or_tuple(args.dilation, "--dilation"),
        groups=args.groups,
        padding_mode=args.padding_mode,
    )
    if args.transposed:
        kwargs["output_padding"] = _int_or_tuple(args.output_padding, "--output-padding")
    elif any(_ints(args.output_padding, "--output-padding")):
        raise UsageError("--output-padding applies to --transposed convolutions only")
    if weight_shape is None:
        weight_shape = _ints(args.weight_shape, "--weight-shape")
    input_shape = _ints(args.input_shape, "--input-shape")
    config = Config("cli", f"weight {weight_shape}, input {input_shape}", weight_shape,
                    input_shape, kwargs, transposed=args.transposed,
                    batch=getattr(args, "batch", None) or 8)
    config.predicted_size()  # validates every argument, allocates nothing
    return config


def _threads(args) -> int:
    return resolve_threads(args.threads)


def _write_json(path, payload) -> None:
    Path(path).write_text(json.dumps(payload, indent=1))


# --- bench -----------------------------------------------------------------------------------

def _bench(args) -> int:
    threads = _threads(args)
    if args.weight_shape or args.input_shape:
        if not (args.weight_shape and args.input_shape):
            raise UsageError("give both --weight-shape and --input-shape")
        if args.config:
            raise UsageError("give either --config or a geometry (--weight-shape ...), not both")
        configs = [_geometry(args)]
    else:
        configs = compare.BENCH_QUICK_CONFIGS if args.quick else compare.BENCH_CONFIGS
        try:
            configs = select(configs, args.config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.batch is not None:
            configs = [c.with_batch(args.batch) for c in configs]
    _check_sizes(configs, args.max_bytes)
    _output_path(args.json, "--json")
    _output_path(args.plot, "--plot")
    if args.plot:
        compare._pyplot()  # matplotlib missing: say so now, not after the run
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    peers, notes = compare.available_peers() if not args.no_peers else ({}, ["peers skipped"])
    machine = compare.machine_figures(threads, args.quick, repeat)
    progress = compare.Progress(3 * len(configs))
    results = [
        compare.compare_config(c, threads=threads, bandwidth=machine["bandwidth_all"],
                                repeat=repeat, peers=peers, progress=progress)
        for c in configs
    ]
    print(compare.format_comparison(results, machine, notes))
    distributed = _distributed_figures(args, threads, configs)
    if args.json:
        _write_json(args.json, dict(machine=machine, results=results, notes=notes,
                                    distributed=distributed))
    if args.plot:
        compare.plot_comparison(results, args.plot,
                                 f"sparse-tconv bench, {machine['date']}, {threads} threads")
    return 0


def _distributed_figures(args, threads, configs):
    """Distributed vs local products on one geometry, when dask is installed.

    The geometry given on the command line (a convolution, not a transposed
    one), else a 64->64 layer (16->16 with --quick).
    """
    if args.no_distributed or (args.quick and not args.distributed):
        return None
    if compare._import("distributed") is None:
        if args.distributed:
            raise UsageError("--distributed needs dask: pip install 'sparse-tconv[dask]'")
        print("\nnote: dask not installed: the distributed comparison is omitted "
              "(pip install 'sparse-tconv[dask]' to add it)")
        return None
    from .dask_bench import bench_distributed, format_distributed

    (given,) = configs if configs[0].name == "cli" else (None,)
    if given is not None and not given.transposed:
        shapes, kwargs = (given.weight_shape, given.input_shape), given.kwargs
    elif args.quick:
        shapes, kwargs = ((16, 16, 3, 3), (16, 32, 32)), dict(padding=1)
    else:
        shapes, kwargs = ((64, 64, 3, 3), (64, 56, 56)), dict(padding=1)
    print(f"\ndistributed (dask LocalCluster, 2 workers x 1 thread) vs local ({threads} threads), "
          f"weight {shapes[0]}, input {shapes[1]}, {kwargs}; medians:", flush=True)
    repeats = args.repeat if args.repeat is not None else 5
    result = bench_distributed(*shapes, threads=threads, repeats=repeats, **kwargs)
    print(format_distributed(result))
    return result


# --- matrix ----------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".npy", ".pt", ".pth")


def _matrix(args) -> int:
    _check_save_options(args)
    weight = _read_weight(args.weight, args.weight_key, args.input_shape) if args.weight else None
    config = _geometry(args, None if weight is None else weight.shape)
    # The weight's own dtype unless --dtype (float64 for random weights), by the builders' rule.
    dtype = as_weight(np.empty(0, "float64" if weight is None else weight.dtype), args.dtype).dtype
    size_of = conv_transpose_matrix_nnz if config.transposed else conv_matrix_nnz
    size = size_of(config.weight_shape, config.input_shape, dtype=dtype, **config.kwargs)
    print(f"predicted: shape {size.shape}, nnz {size.nnz:,}, {size.nbytes:,} bytes "
          f"({size.dtype} values, {size.index_dtype} indices)")
    # Over the budget: refused before the weight is drawn (a size no machine can hold is
    # the builder's ValueError below, which names input_shape).
    if args.max_bytes is not None and args.max_bytes < size.nbytes <= INT64_MAX:
        raise MemoryError(f"the matrix would need {size.nbytes} bytes (nnz={size.nnz}), more "
                          f"than max_bytes={args.max_bytes} (--max-bytes)")
    if weight is None:
        weight = np.random.default_rng(args.seed).standard_normal(config.weight_shape).astype(dtype)
        source = f"{config.weight_shape}, random normal (--seed {args.seed})"
    else:
        entry = f"[{args.weight_key!r}]" if args.weight_key else ""
        source = f"{weight.shape}, {weight.dtype}, from {args.weight}{entry}"
    # The geometry and weight as the builder reads them, and as a saved .npz records them.
    w, geom = validate(weight, config.input_shape, transposed=config.transposed, dtype=dtype,
                       **config.kwargs)
    print(f"geometry:  {_describe(geom, config.transposed)}")
    _output_path(args.save, "--save", force=args.force)
    print(f"weight:    {source}")
    builder = conv_transpose_matrix if config.transposed else conv_matrix
    start = time.perf_counter()
    W = builder(weight, config.input_shape, dtype=dtype, max_bytes=args.max_bytes, **config.kwargs)
    seconds = time.perf_counter() - start
    nbytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    print(f"built:     shape {W.shape}, nnz {W.nnz:,}, {nbytes:,} bytes in {seconds*1e3:.1f} ms "
          f"({seconds / max(W.nnz, 1) * 1e9:.2f} ns per entry)")
    if args.save:
        _save(W, args.save, geom, w, transposed=config.transposed, compress=args.compress)
    return 0


def _check_save_options(args) -> None:
    if args.save and Path(args.save).suffix not in (".npz", ".mtx"):
        raise UsageError(f"--save must end in .npz or .mtx, got {args.save!r}")
    if args.compress and not (args.save and args.save.endswith(".npz")):
        raise UsageError("--compress applies to --save FILE.npz only")
    if args.weight_key is not None and not (
            args.weight and Path(args.weight).suffix.lower() in (".pt", ".pth")):
        raise UsageError("--weight-key applies to a torch .pt/.pth --weight file only")


def _describe(geom: ConvGeometry, transposed: bool) -> str:
    """The operator's arguments, as load_operator rebuilds them from a saved .npz."""
    shapes = (geom.output_shape, geom.input_shape) if transposed else (
        geom.input_shape, geom.output_shape)
    text = (f"{'ConvTransposeOperator' if transposed else 'ConvOperator'}, input {shapes[0]} "
            f"-> output {shapes[1]}, weight {geom.weight_shape}, stride {geom.stride}, "
            f"padding {geom.padding}, dilation {geom.dilation}, groups {geom.groups}, "
            f"padding_mode {geom.padding_mode!r}")
    if transposed:
        text += f", output_padding {geom.output_padding}"
    return text


def _read_weight(path: str, key: str | None, input_shape: str) -> np.ndarray:
    """The weight of ``--weight PATH`` (and ``--weight-key``), checked before any build."""
    suffix = Path(path).suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise UsageError(f"--weight must be a .npy, .pt or .pth file, got {path!r}")
    if not Path(path).is_file():
        raise UsageError(f"--weight: {path!r} does not exist or is not a file")
    weight = _read_npy(path) if suffix == ".npy" else _read_torch(path, key)
    if weight.dtype == np.bool_ or not np.issubdtype(weight.dtype, np.number):
        raise UsageError(f"--weight {path!r}: a weight must be numeric, got dtype {weight.dtype}")
    spatial = len(_ints(input_shape, "--input-shape"))
    if weight.ndim < 3 and weight.ndim != spatial:
        raise UsageError(
            f"--weight {path!r}: a weight has shape (out_channels, in_channels // groups, "
            f"*kernel_size), or (*kernel_size) alone for one channel in and out (as many "
            f"dimensions as --input-shape), got shape {weight.shape}"
        )
    return weight


def _read_npy(path: str) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except ValueError as exc:  # e.g. an object array, which would need pickle
        raise UsageError(f"--weight {path!r}: not a numeric .npy array ({exc})") from None
    if not isinstance(value, np.ndarray):
        value.close()
        raise UsageError(f"--weight {path!r} is an .npz archive, not a .npy array")
    return value


def _read_torch(path: str, key: str | None) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise UsageError(
            f"--weight {path!r}: reading a .pt/.pth file needs PyTorch "
            "(pip install 'sparse-tconv[torch]'); or save the weight with numpy.save as .npy"
        ) from None
    from .._validation import _as_array

    try:  # weights_only: tensors and plain containers, never arbitrary objects
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        raise UsageError(
            f"--weight {path!r}: torch.load(weights_only=True) cannot read it "
            f"({_first_line(exc)}); it reads tensors and state dicts, not pickled objects"
        ) from None
    if isinstance(value, torch.Tensor):
        if key is not None:
            raise UsageError(f"--weight-key {key!r}: {path!r} holds one tensor, not a state dict")
        tensor = value
    elif isinstance(value, dict):
        tensors = _tensors(torch, value)
        if key is None or key not in tensors:
            raise UsageError(_key_problem(path, key, tensors))
        tensor = tensors[key]
    else:
        raise UsageError(f"--weight {path!r} holds a {type(value).__name__}, not a tensor "
                         "or a state dict")
    if tensor.layout != torch.strided:
        raise UsageError(f"--weight {path!r}: the weight is a {tensor.layout} tensor, not dense")
    return _as_array(tensor)


def _tensors(torch, mapping, prefix: str = "") -> dict:
    """The tensors of a (nested) state dict, by their keys joined with '.'."""
    found = {}
    for name, value in mapping.items():
        if isinstance(value, torch.Tensor):
            found[f"{prefix}{name}"] = value
        elif isinstance(value, dict):
            found.update(_tensors(torch, value, f"{prefix}{name}."))
    return found


def _key_problem(path: str, key: str | None, tensors: dict) -> str:
    """Which keys to give: the tensors that can be convolution weights (ndim >= 3) first."""
    weights = [k for k, t in tensors.items() if t.dim() >= 3] or list(tensors)
    shown = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in weights[:12])
    if len(weights) > 12:
        shown += f", ... ({len(weights) - 12} more)"
    if not tensors:
        return f"--weight {path!r} holds a dict with no tensors"
    if key is None:
        return f"--weight {path!r} holds a state dict: name the entry with --weight-key: {shown}"
    return f"--weight-key {key!r} is not in {path!r}; its candidates: {shown}"


def _human(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _save(W, path: str, geom: ConvGeometry, weight, *, transposed: bool, compress: bool) -> None:
    """Write W (with its geometry and weight for .npz), saying so before and after."""
    import scipy.io

    nbytes = W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    how = "compressed" if compress else "uncompressed"
    print(f"writing:   {path} ({_human(nbytes)} of arrays, {how}) ...", flush=True)
    start = time.perf_counter()
    if path.endswith(".npz"):
        write_npz(path, W, geom, weight, transposed=transposed, compress=compress)
        note = "with its geometry: sparse_tconv.load_operator() rebuilds the operator"
    else:
        scipy.io.mmwrite(path, W)
        note = "the matrix only (.mtx has no geometry)"
    seconds = time.perf_counter() - start
    print(f"saved:     {path} ({_human(os.path.getsize(path))}) in {seconds:.1f} s, {note}")


# --- crossover -------------------------------------------------------------------------------

def _crossover(args) -> int:
    threads = _threads(args)
    grid = compare.crossover_grid(args.quick)
    for key in ("channels", "kernels", "images"):
        value = getattr(args, key)
        if value:
            grid[key] = list(_ints(value, f"--{key}"))
    _output_path(args.json, "--json")
    _output_path(args.plot, "--plot")
    compare._pyplot()  # matplotlib missing: say so now, after the arguments, before the run
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    machine = dict(threads=threads, date=time.strftime("%Y-%m-%d"))
    n_cells = len(grid["channels"]) * len(grid["kernels"]) * len(grid["images"])
    cells = compare.run_crossover(grid, threads=threads, repeat=repeat,
                                   max_nnz=args.max_nnz, progress=compare.Progress(n_cells))
    print(compare.format_crossover(cells, machine))
    compare.plot_crossover(cells, args.plot,
                            f"fastest 2-D convolution, {machine['date']}, {threads} threads")
    print(f"map written to {args.plot}")
    if args.json:
        _write_json(args.json, dict(machine=machine, grid=grid, cells=cells))
    return 0


# --- parser ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="CSR product vs direct kernels and peers")
    bench.add_argument("--quick", action="store_true", help="small configurations, seconds")
    bench.add_argument("--config", action="append", metavar="NAME",
                       help="run only these built-in configurations (repeatable)")
    bench.add_argument("--no-peers", action="store_true", help="skip PyTorch and PyLops")
    bench.add_argument("--distributed", action="store_true",
                       help="also with --quick: time the dask operator (needs the dask extra)")
    bench.add_argument("--no-distributed", action="store_true",
                       help="skip the dask comparison (run by default when dask is installed)")
    bench.add_argument("--batch", type=_positive_int, default=None,
                       help="columns of the batched product (default 8)")
    bench.add_argument("--max-bytes", type=_positive_int, default=None,
                       help="refuse configurations whose CSR matrix is larger than this "
                            "(default: a quarter of this machine's memory)")
    _add_common(bench)
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart")
    _add_geometry(bench, required=False)

    matrix = sub.add_parser("matrix", help="build W for a geometry, optionally save it")
    _add_geometry(matrix, required=True, weight_file=True)
    matrix.add_argument("--dtype", default=None,
                        choices=["float32", "float64", "complex64", "complex128"],
                        help="value dtype (default: that of --weight; float64 for random "
                             "weights)")
    matrix.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the random weights (with --weight-shape)")
    matrix.add_argument("--max-bytes", type=_positive_int, default=None,
                        help="refuse to build a matrix larger than this")
    matrix.add_argument("--save", metavar="PATH",
                        help="write W as .npz (scipy.sparse.load_npz reads it; it also holds the "
                             "geometry and weight, for sparse_tconv.load_operator) or as .mtx "
                             "(Matrix Market: the matrix only, no geometry)")
    matrix.add_argument("--compress", action="store_true",
                        help="compress the .npz: often 10x smaller, about 4x slower to write")
    matrix.add_argument("--force", action="store_true", help="overwrite the --save file")

    cross = sub.add_parser("crossover", help="map where CSR, direct and FFT kernels win")
    cross.add_argument("--quick", action="store_true", help="a 2x2 grid, seconds")
    cross.add_argument("--channels", metavar="C,...", help="channel counts (in = out)")
    cross.add_argument("--kernels", metavar="K,...", help="kernel sizes")
    cross.add_argument("--images", metavar="N,...", help="image sizes (N x N)")
    cross.add_argument("--max-nnz", type=_positive_int, default=150_000_000,
                       help="skip building matrices larger than this")
    cross.add_argument("--plot", metavar="PATH", default="crossover.png",
                       help="where to write the heat map (default crossover.png)")
    _add_common(cross)

    sub.add_parser("norms", help="certified norm bounds vs svds and the Gram iteration, or of "
                   "every convolution of a model with --model "
                   "(python -m sparse_tconv.tools.norm_bench)", add_help=False)
    sub.add_parser("solve", help="Tikhonov deconvolution: time to solution vs plain CG "
                   "(python -m sparse_tconv.tools.solve_bench)", add_help=False)
    sub.add_parser("perf", help="the performance figures (python -m sparse_tconv.tools.perf)",
                   add_help=False)
    return parser


def _add_common(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--repeat", type=_positive_int, default=None, help="rounds per timing")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure as JSON")


_COMMANDS = {"bench": _bench, "matrix": _matrix, "crossover": _crossover}


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perf"]:
        return perf.main(argv[1:])
    if argv[:1] == ["norms"]:
        from . import norm_bench

        return norm_bench.main(argv[1:])
    if argv[:1] == ["solve"]:
        from . import solve_bench

        return solve_bench.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, ImportError) as exc:
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"{_PROG} {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{_PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
