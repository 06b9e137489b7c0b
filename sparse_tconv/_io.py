"""Files: a convolution's CSR matrix together with its geometry and weight.

The file is scipy's own ``.npz`` format for a CSR array (the keys ``data``,
``indices``, ``indptr``, ``format``, ``shape`` and ``_is_array`` of
:func:`scipy.sparse.save_npz`), so :func:`scipy.sparse.load_npz` reads it;
two more entries, which scipy does not read, make the operator rebuildable:

- ``sparse_tconv_geometry``: a JSON string (a 0-d unicode array, so no
  pickle is needed) naming the operator class and its arguments;
- ``sparse_tconv_weight``: the weight, in the layout of that class.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ._geometry import ConvGeometry, given_shapes, transpose_output_padding
from ._operator import ConvOperator, ConvTransposeOperator, _ConvOperatorBase
from ._parallel import resolve_threads
from ._validation import check_positive_int
from ._version import __version__

__all__ = ["save_operator", "load_operator", "operator_record", "write_npz",
           "GEOMETRY_KEY", "WEIGHT_KEY"]

GEOMETRY_KEY = "sparse_tconv_geometry"
WEIGHT_KEY = "sparse_tconv_weight"
_FORMAT = "sparse_tconv.operator"
_VERSION = 1
_CLASSES = {cls.__name__: cls for cls in (ConvOperator, ConvTransposeOperator)}


def operator_record(geom: ConvGeometry, weight: np.ndarray, *, transposed: bool) -> dict:
    """The JSON-able arguments of the operator of ``geom`` (transposed or not)."""
    given, result = given_shapes(geom, transposed)
    record = dict(
        format=_FORMAT,
        version=_VERSION,
        written_by=f"sparse_tconv {__version__}",
        operator=(ConvTransposeOperator if transposed else ConvOperator).__name__,
        input_shape=list(given),
        output_shape=list(result),
        weight_shape=list(weight.shape),
        dtype=str(weight.dtype),
        stride=list(geom.stride),
        padding=[list(pair) for pair in geom.padding],
        dilation=list(geom.dilation),
        groups=geom.groups,
        padding_mode=geom.padding_mode,
    )
    if transposed:
        record["output_padding"] = list(transpose_output_padding(geom))
    return record


def _name(file) -> str:
    return repr(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else repr(file)


def write_npz(file, matrix, geom: ConvGeometry, weight: np.ndarray, *, transposed: bool,
              compress: bool = False) -> None:
    """Write the CSR ``matrix`` of ``geom`` with its geometry and weight (see module doc).

    A path is written to a temporary file beside it, renamed when complete:
    an interrupted write leaves no truncated file under that name.
    """
    if getattr(matrix, "format", None) != "csr":
        raise TypeError(f"matrix must be a scipy CSR array, got {type(matrix).__name__}")
    record = operator_record(geom, weight, transposed=transposed)
    arrays = {
        # scipy.sparse.save_npz's keys, as it writes them
        "indices": matrix.indices,
        "indptr": matrix.indptr,
        "format": b"csr",
        "shape": matrix.shape,
        "data": matrix.data,
        "_is_array": True,
        GEOMETRY_KEY: np.array(json.dumps(record)),
        WEIGHT_KEY: np.ascontiguousarray(weight),
    }
    savez = np.savez_compressed if compress else np.savez
    if not isinstance(file, (str, os.PathLike)):
        savez(file, **arrays)
        return
    path = Path(file)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as handle:  # a file object: savez adds no '.npz'
            savez(handle, **arrays)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def save_operator(file, op, *, compress=False) -> None:
    """Write an operator's matrix with its geometry and weight to an ``.npz`` file.

    The file is the one :func:`scipy.sparse.save_npz` writes for
    ``op.matrix``, so ``scipy.sparse.load_npz(file)`` reads the matrix back;
    it also holds the geometry and the weight, from which
    :func:`load_operator` rebuilds the operator.

    Parameters
    ----------
    file : str, path-like or file object
        Where to write.  A path is written as given (no ``.npz`` is
        appended), replacing an existing file, and only once complete (the
        data go to a temporary file beside it first).
    op : ConvOperator or ConvTransposeOperator
        What to save: :attr:`~ConvOperator.matrix` (the matrix ``op @ x``
        applies, built now if the products use another form), the weight and
        ``input_shape``, ``stride``, ``padding`` (as ``(before, after)``
        pairs), ``dilation``, ``groups``, ``padding_mode`` and, for a
        :class:`ConvTransposeOperator`, ``output_padding``.
    compress : bool, optional
        Compress the arrays (zip deflate).  Default ``False``: writing is
        then limited by the disk.  A convolution matrix compresses well (its
        values repeat the weight at every position, its indices are
        regular): about 10x smaller for a 64 -> 64 channel 3x3 layer on
        56x56, but about four times slower to write (17 s instead of 4 s
        for its 1.4 GB on a 2-core machine) and slower to read.

    Raises
    ------
    TypeError
        If ``op`` is not a :class:`ConvOperator` or
        :class:`ConvTransposeOperator`, or ``compress`` not a bool.
    OSError
        If the file cannot be written.

    See Also
    --------
    load_operator, scipy.sparse.load_npz

    Notes
    -----
    The matrix is stored as scipy stores it (keys ``data``, ``indices``,
    ``indptr``, ``format``, ``shape``, ``_is_array``); the geometry is a
    JSON string under ``sparse_tconv_geometry`` and the weight an array
    under ``sparse_tconv_weight``, keys scipy does not read.  Nothing is
    pickled.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import scipy.sparse as sp
    >>> from sparse_tconv import ConvOperator, load_operator, save_operator
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((4, 2, 3, 3)), (2, 8, 8), stride=2, padding=1)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "W.npz")
    ...     save_operator(path, op)
    ...     W = sp.load_npz(path)
    ...     again = load_operator(path)
    >>> (W != op.matrix).nnz, type(again).__name__, again.input_shape, again.padding
    (0, 'ConvOperator', (2, 8, 8), ((1, 1), (1, 1)))
    """
    if not isinstance(op, _ConvOperatorBase):
        kind = type(op)
        raise TypeError(
            "op must be a ConvOperator or a ConvTransposeOperator, got an object of type "
            f"{kind.__module__}.{kind.__qualname__}"
        )
    if not isinstance(compress, (bool, np.bool_)):
        raise TypeError(f"compress must be a bool, got compress={compress!r}")
    transposed = isinstance(op, ConvTransposeOperator)
    write_npz(file, op.matrix, op.convolution.geometry, op.weight, transposed=transposed,
              compress=bool(compress))


# What reading a member of a truncated, hand-edited or corrupted archive raises: a
# missing member, an object array refused, a 0-d or text entry, a cut-short file.
_DAMAGED = (KeyError, TypeError, ValueError, EOFError, OSError, zipfile.BadZipFile)


def _read_record(archive, name: str) -> dict:
    """The geometry record of an open archive, checked."""
    if GEOMETRY_KEY not in archive.files or WEIGHT_KEY not in archive.files:
        raise ValueError(
            f"{name} has no sparse_tconv geometry (it was not written by "
            "sparse_tconv.save_operator or `sparse-tconv matrix --save`); "
            "scipy.sparse.load_npz reads the matrix it holds"
        )
    try:
        text = str(archive[GEOMETRY_KEY])
    except _DAMAGED as exc:
        raise ValueError(f"{name}: damaged archive ({type(exc).__name__}: {exc})") from None
    try:
        record = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: its {GEOMETRY_KEY} entry is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{name}: its {GEOMETRY_KEY} entry is not a sparse_tconv geometry")
    if record.get("version") != _VERSION:
        raise ValueError(
            f"{name} holds geometry format version {record.get('version')!r}; this "
            f"sparse_tconv ({__version__}) reads version {_VERSION}"
        )
    if not isinstance(record.get("operator"), str) or record["operator"] not in _CLASSES:
        raise ValueError(f"{name}: unknown operator {record.get('operator')!r}")
    return record


def _read_archive(archive, name: str):
    """The geometry record, the weight and the matrix's shape of an open archive."""
    with archive:
        record = _read_record(archive, name)
        try:
            weight = archive[WEIGHT_KEY]
            shape = tuple(int(n) for n in archive["shape"])
        except _DAMAGED as exc:
            raise ValueError(f"{name}: damaged archive ({type(exc).__name__}: {exc})") from None
    return record, weight, shape


def _arguments(record: dict, name: str) -> dict:
    keys = ["input_shape", "stride", "padding", "dilation", "groups", "padding_mode"]
    if record["operator"] == ConvTransposeOperator.__name__:
        keys.append("output_padding")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{name}: the geometry lacks {missing}")
    args = {k: record[k] for k in keys}
    for k in ("input_shape", "stride", "dilation", "output_padding"):
        if k in args and isinstance(args[k], list):
            args[k] = tuple(args[k])
    if isinstance(args["padding"], list):
        args["padding"] = tuple(tuple(p) if isinstance(p, list) else p for p in args["padding"])
    return args


def load_operator(file, *, threads=None, max_bytes=None):
    """Rebuild the operator saved by :func:`save_operator` or ``sparse-tconv matrix --save``.

    Parameters
    ----------
    file : str, path-like or file object
        An ``.npz`` file with a sparse_tconv geometry.
    threads, max_bytes : int, optional
        As for :class:`ConvOperator` (not saved: they belong to the machine).

    Returns
    -------
    ConvOperator or ConvTransposeOperator
        The class that was saved, with its weight (and dtype) and geometry;
        its :attr:`~ConvOperator.matrix` equals the saved matrix exactly.

    Raises
    ------
    TypeError, ValueError
        For invalid ``threads`` or ``max_bytes`` (checked before the file is
        read).
    ValueError
        If the file has no sparse_tconv geometry (a plain
        :func:`scipy.sparse.save_npz` file: read it with
        :func:`scipy.sparse.load_npz`), is not an ``.npz`` archive, or its
        geometry is malformed or does not match its matrix.
    OSError
        If the file cannot be read.
    MemoryError
        If ``max_bytes`` is exceeded.

    See Also
    --------
    save_operator

    Notes
    -----
    Only the geometry and the weight are read; the operator is rebuilt from
    them (about a nanosecond per entry), not from the saved arrays, which
    are left unread on disk.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from sparse_tconv import ConvTransposeOperator, load_operator, save_operator
    >>> w = np.arange(24.0).reshape(4, 2, 3)
    >>> op = ConvTransposeOperator(w, (4, 5), stride=2, output_padding=1)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "WT.npz")
    ...     save_operator(path, op)
    ...     again = load_operator(path)
    >>> type(again).__name__, again.output_shape, again.output_padding
    ('ConvTransposeOperator', (2, 12), (1,))
    >>> np.array_equal(again.weight, w)
    True
    """
    name = _name(file)
    if threads is not None:
        resolve_threads(threads)
    if max_bytes is not None:
        check_positive_int(max_bytes, "max_bytes")
    with contextlib.ExitStack() as stack:
        # A path is opened here, so that it is closed whatever np.load raises
        # (it leaves its own handle open on a truncated archive).
        if isinstance(file, (str, os.PathLike)):
            file = stack.enter_context(open(file, "rb"))
        try:
            archive = np.load(file, allow_pickle=False)
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # a pickle, empty, cut short
            raise ValueError(f"{name} is not an .npz archive, or a damaged one "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{name} is not an .npz archive but a single .npy array")
        record, weight, shape = _read_archive(archive, name)
    cls = _CLASSES[record["operator"]]

    arguments = _arguments(record, name)
    try:
        op = cls(weight, **arguments, threads=threads, max_bytes=max_bytes)
    except (ValueError, TypeError) as exc:  # the caller's arguments were checked first
        raise ValueError(f"{name}: its geometry is refused by {cls.__name__}: {exc}") from None
    if op.shape != shape or list(op.output_shape) != record.get("output_shape"):
        raise ValueError(
            f"{name}: the geometry gives a {op.shape} matrix with output shape "
            f"{op.output_shape}, but the file holds a {shape} matrix and records output shape "
            f"{record.get('output_shape')}"
        )
    return op
