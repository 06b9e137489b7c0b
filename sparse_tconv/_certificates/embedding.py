"""Upper bounds from circulant embeddings of the layer (zero padding's structural bound)."""

from __future__ import annotations

from .. import _bounds
from .band import band_applies
from .base import Certificate, Interval

__all__ = ["CirculantEmbedding", "MoreGrids"]


class CirculantEmbedding(Certificate):
    """The bound of the layer embedded in a circulant on the first grid; always runs first.

    Its blocks' top singular vector also starts the lower bound's Lanczos run.
    """

    name = "circulant embedding"

    def applies(self, run: Interval) -> bool:
        return "embedding" not in run.notes

    def tighten(self, run: Interval) -> None:
        up = _bounds.upper_bound(run.structure, 0)
        run.notes["embedding"] = up
        run.upper = min(run.upper, up.value + up.margin)


class MoreGrids(Certificate):
    """The same bound on other grids, while the interval is open.

    The grids differ by a fraction of a percent, so they cannot make up for
    the padding map's norm (reflect, replicate): skipped where it is above
    ``1 + rtol``.  The first grid (the smallest) is usually the best: after
    two grids in a row that do not lower the bound, the rest are not tried
    (each costs as much as the first: 4 s for a 512-channel layer at 7x7).
    Skipped where the band certificate will run.
    """

    name = "more circulant grids"

    def applies(self, run: Interval) -> bool:
        # where the band certificate will run, it closes what grids only narrow
        return (run.open and run.structure.padding_norm <= 1 + run.rtol
                and not band_applies(run))

    def tighten(self, run: Interval) -> None:
        misses = 0
        for index in range(1, _bounds.EXTRA_GRIDS + 1):
            if not run.open or misses == 2:
                break
            more = _bounds.upper_bound(run.structure, index)
            misses = misses + 1 if more.value + more.margin >= run.upper else 0
            run.upper = min(run.upper, more.value + more.margin)
