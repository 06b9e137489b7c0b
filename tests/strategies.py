"""Hypothesis strategies and geometry helpers shared by the test modules.

Import them by name (pytest puts ``tests/`` on the path)::

    from strategies import _kwargs, geometries
"""

from __future__ import annotations

from hypothesis import strategies as st

from sparse_tconv._forms import panels, structured

__all__ = ["MODES", "SMALL_TILES", "geometries", "shrink_tiles", "_kwargs"]

MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def geometries(draw):
    """A valid convolution: channels, groups, and per-dim size/kernel/stride/..."""
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cpg, opg = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(MODES))
    max_size = {1: 12, 2: 7, 3: 5}[ndim]
    size, kernel, stride, dilation, padding = [], [], [], [], []
    for _ in range(ndim):
        n = draw(st.integers(1, max_size))
        if mode == "reflect":
            pad_max = n - 1
        elif mode == "circular":
            pad_max = n
        else:
            pad_max = 4
        lo = draw(st.integers(0, min(pad_max, 4)))
        hi = draw(st.integers(0, min(pad_max, 4)))
        d = draw(st.integers(1, 3))
        span = n + lo + hi  # the dilated kernel must fit in the padded input
        k = draw(st.integers(1, max(1, min(5, (span - 1) // d + 1))))
        size.append(n)
        kernel.append(k)
        stride.append(draw(st.integers(1, 4)))
        dilation.append(d)
        padding.append((lo, hi))
    return dict(
        weight_shape=(groups * opg, cpg, *kernel),
        input_shape=(groups * cpg, *size),
        stride=tuple(stride),
        padding=padding,
        dilation=tuple(dilation),
        groups=groups,
        padding_mode=mode,
    )


def _kwargs(g):
    """The convolution's keywords (stride, padding, ...) of a :func:`geometries` example."""
    return {k: g[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}


# The structured form's size thresholds, as (module, name, value): tiles of one
# output row (im2col) or pieces of a few columns (panel GEMMs) and two threads
# even for tiny products, so that small layers take the code paths (many
# tiles, threads splitting them, phases) large ones do.
SMALL_TILES = [(structured, "_TILE_ELEMENTS", 1), (structured, "_MAX_TILE_ELEMENTS", 1),
               (structured, "_SCATTER_TILE_ELEMENTS", 1), (structured, "_MIN_PARALLEL_MACS", 0),
               (panels, "_MIN_PARALLEL_MACS", 0), (panels, "_PIECE_MACS", 1),
               (panels, "_MIN_PIECE_COLUMNS", 0)]

# How shrink_tiles runs the structured products: im2col, or panel GEMMs in
# pieces of columns or in two ranges of output channels.
PANEL_CHOICES = [False, "columns", "channels"]


def shrink_tiles(monkeypatch, panel_gemms: bool | None = None) -> None:
    """Apply :data:`SMALL_TILES` for the test (pytest's ``monkeypatch``).

    ``panel_gemms``: True or "columns" runs every structured product as
    panel GEMMs (one per tap, :mod:`sparse_tconv._forms.panels`) in pieces
    of a few columns, "channels" in two ranges of output channels (where
    there are two), False as im2col, None as the form chooses (the thin
    channels of small test layers: im2col).
    """
    for module, name, value in SMALL_TILES:
        monkeypatch.setattr(module, name, value)
    huge = 1 << 62
    if panel_gemms == "channels":
        monkeypatch.setattr(panels, "_MIN_PIECE_COLUMNS", huge)
        monkeypatch.setattr(panels, "_MIN_PIECE_CHANNELS", 1)
    if panel_gemms:  # every geometry, however thin its blocks or many its taps
        for name, value in [("_MIN_PANEL_DEPTH", 1), ("_MIN_TRANSPOSED_DEPTH", 1),
                            ("_MAX_PANEL_TAPS", huge), ("_MAX_WASTE", huge),
                            ("_PANEL_DTYPES", "fdFD")]:
            monkeypatch.setattr(panels, name, value)
    elif panel_gemms is not None:  # no geometry
        monkeypatch.setattr(panels, "_MIN_PANEL_DEPTH", huge)
        monkeypatch.setattr(panels, "_MIN_TRANSPOSED_DEPTH", huge)
