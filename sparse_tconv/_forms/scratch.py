"""Per-thread scratch arrays of the structured form's products (frames, tiles, pieces)."""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["scratch"]

# The largest scratch array (a frame, a tile's or piece's buffer) a thread
# keeps per slot between products (see scratch).  A thread that runs products
# holds at most five frame-sized slots ("frame", "sums", "lattices",
# "widened", "wide": 320 MB) and its tiles' or pieces' buffers; the pool's
# threads hold only those.
_SCRATCH_BYTES = 1 << 26
_local = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array for ``slot`` of this thread, kept for its next products.

    Memory freed and mapped again is slow to touch on these VMs (page faults
    on every product): allocating the frame and the tiles' buffers afresh
    cost 1.0 of 4.2 ms on the 64->64 3x3 layer at 56x56.  Each thread keeps
    one buffer per slot, up to ``_SCRATCH_BYTES``; larger ones are allocated
    for the product alone.  A slot's array is never returned to the caller.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _SCRATCH_BYTES:
        return np.empty(shape, dtype=dtype)
    store = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    buffer = store.get(slot)
    if buffer is None or buffer.nbytes < nbytes:
        # (float64 elements: aligned for any dtype numpy multiplies)
        buffer = store[slot] = np.empty(-(-nbytes // 8), dtype=np.float64)
    return buffer.view(np.uint8)[:nbytes].view(dtype).reshape(shape)
