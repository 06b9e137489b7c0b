"""Argument checks, dtype rules and tolerances: one place for what every module validates.

Each check takes the value and the argument's name and returns the
normalised value, or raises a :class:`TypeError` (wrong kind) or
:class:`ValueError` (wrong value) whose message names the argument and echoes
the value.  Nothing here knows about convolutions beyond the names of the
padding modes: the geometry's own consistency rules (channels that match, a
kernel that fits) are in :mod:`._geometry`.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = [
    "PADDING_MODES",
    "SUPPORTED_DTYPES",
    "INT32_MAX",
    "INT64_MAX",
    "is_int",
    "is_sparse",
    "check_int",
    "check_positive_int",
    "check_non_negative_int",
    "check_bool",
    "check_tol",
    "check_positive_tol",
    "check_choice",
    "check_vector",
    "normalize_tuple",
    "normalize_shape",
    "normalize_padding",
    "check_padding_mode",
    "as_weight",
    "weight_and_dtype",
    "private_copy",
    "cast_if_safe",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in (np.float32, np.float64, np.complex64, np.complex128)
)
INT32_MAX = int(np.iinfo(np.int32).max)
INT64_MAX = int(np.iinfo(np.int64).max)


# ---------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------


def is_int(value) -> bool:
    """Whether ``value`` is an integer (numpy's included), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_sparse(value) -> bool:
    """Whether ``value`` is a scipy sparse array or matrix (any format).

    Unlike ``scipy.sparse.issparse`` it narrows nothing for the type checker,
    whose stubs give the formats' common base none of their attributes.
    """
    return isinstance(value, (sp.sparray, sp.spmatrix))


def check_int(value, name: str) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    return int(value)


def check_positive_int(value, name: str) -> int:
    value = check_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value}")
    return value


def check_non_negative_int(value, name: str) -> int:
    value = check_int(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {name}={value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    return bool(value)


def check_tol(value, name: str) -> float:
    """A finite, non-negative real number (a tolerance)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be non-negative and finite, got {name}={value!r}")
    return value


def check_positive_tol(value, name: str) -> float:
    """A finite, positive real number (a tolerance that must be reachable)."""
    value = check_tol(value, name)
    if value == 0.0:
        raise ValueError(f"{name} must be positive, got {name}={value!r}")
    return value


def check_vector(value, name: str) -> np.ndarray:
    """``value`` as a numeric ndarray of finite values (not copied when it is one).

    A TypeError for booleans and non-numeric data, a ValueError naming the
    first non-finite element.
    """
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nested sequences
        raise ValueError(f"{name} must be a rectangular numeric array") from None
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array, got {name}.dtype={arr.dtype}")
    if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.ravel()))[0]
        raise ValueError(
            f"{name} must be finite, got {name}.ravel()[{bad}]={arr.ravel()[bad].item()!r}"
        )
    return arr


def check_choice(value, choices, name: str) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {name}={value!r}")
    return value


# ---------------------------------------------------------------------------
# Shapes and per-dimension settings
# ---------------------------------------------------------------------------


def normalize_tuple(value, ndim: int, name: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ``ndim`` ints (an int is repeated)."""
    if is_int(value):
        return (int(value),) * ndim
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of {ndim} ints, got {name}={value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of {ndim} ints, got {name}={value!r}"
        ) from None
    if len(items) != ndim:
        raise ValueError(
            f"{name} must have one entry per spatial dimension ({ndim}), "
            f"got {len(items)}: {name}={value!r}"
        )
    if not all(is_int(v) for v in items):
        raise TypeError(f"{name} must contain only ints, got {name}={value!r}")
    return tuple(int(v) for v in items)


def normalize_shape(shape, name: str) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or is_int(shape):
        raise TypeError(f"{name} must be a sequence of ints, got {name}={shape!r}")
    try:
        items = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {name}={shape!r}") from None
    if not all(is_int(v) for v in items):
        raise TypeError(f"{name} must contain only ints, got {name}={shape!r}")
    items = tuple(int(v) for v in items)
    if any(v <= 0 for v in items):
        raise ValueError(f"{name} must contain only positive sizes, got {name}={items}")
    return items


def normalize_padding(padding, ndim: int) -> tuple[tuple[int, int], ...] | str:
    """Return ``((lo, hi), ...)`` per dimension, or the strings 'same'/'valid'."""
    if isinstance(padding, str):
        if padding in ("same", "valid"):
            return padding
        raise ValueError(
            "padding must be an int, a sequence of ints or (before, after) pairs, "
            f"'valid' or 'same', got padding={padding!r}"
        )
    if is_int(padding):
        pairs = ((int(padding), int(padding)),) * ndim
    else:
        try:
            items = tuple(padding)
        except TypeError:
            raise TypeError(
                "padding must be an int, a sequence of ints or (before, after) pairs, "
                f"'valid' or 'same', got padding={padding!r}"
            ) from None
        if len(items) != ndim:
            raise ValueError(
                f"padding must have one entry per spatial dimension ({ndim}), "
                f"got {len(items)}: padding={padding!r}"
            )
        entries: list[tuple[int, int]] = []
        for item in items:
            if is_int(item):
                entries.append((int(item), int(item)))
                continue
            try:
                pair = tuple(item)
            except TypeError:
                pair = ()
            if len(pair) != 2 or not all(is_int(v) for v in pair):
                raise TypeError(
                    "each padding entry must be an int or a (before, after) pair of ints, "
                    f"got {item!r} in padding={padding!r}"
                )
            entries.append((int(pair[0]), int(pair[1])))
        pairs = tuple(entries)
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"padding must be non-negative, got padding={padding!r}")
    return pairs


def check_padding_mode(padding_mode) -> str:
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES}, got padding_mode={padding_mode!r}"
        )
    return padding_mode


# ---------------------------------------------------------------------------
# Weights, dtypes and sizes
# ---------------------------------------------------------------------------


def _as_array(weight) -> np.ndarray:
    """``weight`` as an ndarray; a torch tensor through a detached CPU copy.

    torch refuses ``np.asarray`` on a tensor that requires grad, and numpy
    has no bfloat16 (widened exactly to float32 here).  torch is not
    imported: a tensor is recognised by its type's module.
    """
    if is_sparse(weight):
        raise TypeError(f"weight must be a dense array, got a scipy sparse "
                        f"{type(weight).__name__}; pass weight.toarray()")
    if isinstance(weight, np.ma.MaskedArray):
        raise TypeError("weight must be a plain array, got a masked array: its mask would be "
                        "ignored; pass weight.filled(0) for masked weights as zeros")
    if type(weight).__module__.split(".")[0] == "torch" and hasattr(weight, "detach"):
        tensor = weight.detach()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy(force=True)
    try:
        return np.asarray(weight)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"weight must be a rectangular numeric array: {exc}") from None


def as_weight(weight, dtype=None) -> np.ndarray:
    """Return a private, read-only copy of ``weight`` in the result dtype.

    Integer weights become float64 and float16 becomes float32; the result is
    one of float32, float64, complex64, complex128.
    """
    return private_copy(*weight_and_dtype(weight, dtype))


def weight_and_dtype(weight, dtype=None) -> tuple[np.ndarray, np.dtype]:
    """``weight`` as an array (not copied where it is one) and the dtype of its copy.

    Everything :func:`as_weight` checks, without the copy: a caller checks the
    shapes first, so that a weight whose copy would not fit (a broadcast
    view, say) is refused for its shape before anything is allocated.
    """
    arr = _as_array(weight)
    if arr.dtype == np.bool_:
        raise TypeError("weight must be numeric, got a boolean weight (dtype=bool)")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype.kind in "mM":  # (timedelta64
        # is an integer type to numpy)
        raise TypeError(f"weight must be a numeric array, got weight.dtype={arr.dtype}")
    target: np.dtype
    if dtype is None:
        if np.issubdtype(arr.dtype, np.integer):
            target = np.dtype(np.float64)
        elif arr.dtype == np.float16:
            target = np.dtype(np.float32)
        else:
            target = arr.dtype.newbyteorder("=")  # byte order is not a dtype choice
        if target not in SUPPORTED_DTYPES:
            raise TypeError(
                f"weight.dtype={arr.dtype} is not supported; use one of "
                f"{[str(t) for t in SUPPORTED_DTYPES]} (or pass dtype=)"
            )
    else:
        try:
            target = np.dtype(dtype).newbyteorder("=")
        except TypeError:
            raise TypeError(f"dtype must be a numpy dtype, got dtype={dtype!r}") from None
        if target not in SUPPORTED_DTYPES:
            raise TypeError(
                f"dtype must be one of {[str(t) for t in SUPPORTED_DTYPES]}, got dtype={target}"
            )
        if np.issubdtype(arr.dtype, np.complexfloating) and target.kind != "c":
            raise TypeError(
                f"cannot use dtype={target} for a complex weight (weight.dtype={arr.dtype}): "
                "the imaginary part would be discarded"
            )
    return arr, target


def private_copy(arr: np.ndarray, target: np.dtype) -> np.ndarray:
    """A read-only copy of ``arr`` in ``target`` (see :func:`weight_and_dtype`)."""
    try:
        out = np.array(arr, dtype=target, copy=True)
    except MemoryError as exc:  # a broadcast view, say: its copy is as large as its shape
        raise MemoryError(f"weight.shape={arr.shape} needs {arr.size * target.itemsize} bytes "
                          f"as {target}, which this machine could not allocate for the "
                          f"operator's own copy ({exc})") from None
    out.flags.writeable = False
    return out


def cast_if_safe(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` in ``dtype`` when the conversion loses nothing, else ``x`` unchanged.

    A product's input is brought to the matrix's dtype this way (an int16 or
    float32 vector for a float64 matrix); one that needs a wider dtype (a
    float64 vector for a float32 matrix, a complex one for a real matrix)
    keeps it, and the caller falls back to scipy's own product, which widens.
    """
    if x.dtype != dtype and np.can_cast(x.dtype, dtype, casting="safe"):
        return x.astype(dtype)
    return x
