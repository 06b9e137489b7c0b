"""Seeded random test vectors, shared by the dot test and the iterative norms."""

from __future__ import annotations

import numpy as np

__all__ = ["generator", "work_dtype", "gaussian"]


def generator(rng) -> np.random.Generator:
    """``np.random.default_rng(rng)``, seed 0 for None, a TypeError naming ``rng`` otherwise."""
    try:
        return np.random.default_rng(0 if rng is None else rng)
    except (TypeError, ValueError):
        raise TypeError(
            f"rng must be an int seed, a numpy.random.Generator or None, got rng={rng!r}"
        ) from None


def work_dtype(dtype) -> np.dtype:
    """The dtype of random vectors for an operator: its own, or float64 if not inexact."""
    dtype = np.dtype(dtype)
    return dtype if dtype.kind in "fc" else np.dtype(np.float64)


def gaussian(gen: np.random.Generator, size: int, dtype: np.dtype) -> np.ndarray:
    """Standard normal draws in double precision, complex when ``dtype`` is (not cast)."""
    values = gen.standard_normal(size)
    if dtype.kind == "c":
        values = values + 1j * gen.standard_normal(size)
    return values
