"""build_rows (a row range of W or W.T on its own) against build(...)[a:b], bit for bit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_tconv._build import build
from sparse_tconv._build_rows import balanced_row_ranges, build_rows, row_offsets
from sparse_tconv._geometry import conv_geometry, conv_transpose_geometry
from sparse_tconv._parallel import balanced_ranges as _row_blocks

from reference import random_array, seed_of
from strategies import geometries

# (name, weight shape, input shape, arguments, transposed convolution?)
CASES = [
    ("1d", (3, 2, 3), (2, 7), dict(padding=1), False),
    ("1d-strided-dilated-groups", (4, 1, 4), (2, 11),
     dict(stride=2, padding=[(2, 1)], dilation=2, groups=2), False),
    ("1d-reflect", (2, 2, 5), (2, 9), dict(padding=[(4, 3)], padding_mode="reflect"), False),
    ("2d-reflect-groups", (4, 2, 3, 3), (4, 6, 5),
     dict(stride=2, padding=[(1, 2), (0, 1)], dilation=(1, 2), groups=2,
          padding_mode="reflect"), False),
    ("2d-replicate-depthwise", (6, 1, 3, 3), (3, 5, 5),
     dict(stride=2, padding=2, groups=3, padding_mode="replicate"), False),
    ("2d-circular", (2, 3, 3, 2), (3, 4, 5), dict(padding=(2, 1), padding_mode="circular"),
     False),
    ("2d-same-even-kernel", (2, 2, 4, 3), (2, 5, 6), dict(padding="same", dilation=(1, 2)),
     False),
    ("2d-empty-rows", (2, 1, 2, 2), (1, 3, 3), dict(padding=3), False),
    ("3d-circular", (2, 2, 2, 3, 2), (2, 4, 5, 6),
     dict(stride=(1, 2, 1), padding=1, padding_mode="circular"), False),
    ("3d-zeros-strided", (3, 1, 2, 2, 3), (3, 5, 4, 7),
     dict(stride=(2, 1, 3), padding=[1, 0, (1, 2)], groups=3), False),
    ("1d-transposed-output-padding", (2, 3, 3), (2, 5),
     dict(stride=3, padding=1, output_padding=2, dilation=3), True),
    ("2d-transposed-groups", (4, 1, 3, 2), (4, 3, 4),
     dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2), True),
    ("3d-transposed-reflect", (2, 2, 3, 2, 3), (2, 3, 3, 2),
     dict(stride=(1, 2, 2), padding=1, padding_mode="reflect"), True),
]


def _geometry(weight_shape, input_shape, kwargs, transposed_conv):
    make = conv_transpose_geometry if transposed_conv else conv_geometry
    return make(weight_shape, input_shape, **kwargs)


def assert_same_rows(block, whole, a, b):
    """``block`` is ``whole[a:b]``: same structure and the same bits."""
    expected = whole[a:b]
    assert block.shape == (b - a, whole.shape[1])
    assert block.has_canonical_format
    assert block.data.dtype == whole.data.dtype
    assert block.indices.dtype == whole.indices.dtype  # int32 for both, at these sizes
    np.testing.assert_array_equal(block.indptr, expected.indptr)
    np.testing.assert_array_equal(block.indices, expected.indices)
    assert block.data.tobytes() == expected.data.tobytes()


def _ranges(n_rows, rng, boundaries):
    """Edge ranges, ranges cut at every boundary (+-1) and random ones."""
    cuts = sorted({0, n_rows, *(c + e for c in boundaries for e in (-1, 0, 1)
                                if 0 <= c + e <= n_rows)})
    pairs = {(0, n_rows), (0, 0), (n_rows, n_rows), (0, 1), (n_rows - 1, n_rows)}
    grid = [(a, b) for a in cuts for b in cuts if a <= b]
    pairs |= {grid[i] for i in rng.choice(len(grid), size=min(len(grid), 120), replace=False)}
    starts = rng.integers(0, n_rows + 1, size=30)
    stops = rng.integers(0, n_rows + 1, size=30)
    pairs |= {(int(min(a, b)), int(max(a, b))) for a, b in zip(starts, stops)}
    return sorted(pairs)


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rows_equal_slices_of_the_whole_matrix(case, transpose):
    name, weight_shape, input_shape, kwargs, transposed_conv = case
    geom = _geometry(weight_shape, input_shape, kwargs, transposed_conv)
    rng = np.random.default_rng(seed_of(name, transpose))
    weight = random_array(rng, geom.weight_shape, np.float64)
    whole = build(geom, weight, transposed=transpose, threads=1)
    n_rows = whole.shape[0]
    # Boundaries of row channels and of the first spatial dimension: where
    # the range decomposition switches between its boxes.
    per_channel = n_rows // (geom.in_channels if transpose else geom.out_channels)
    per_row = per_channel // (geom.input_size[0] if transpose else geom.output_size[0])
    boundaries = [*range(0, n_rows + 1, per_channel), *range(0, n_rows + 1, per_row)]
    for a, b in _ranges(n_rows, rng, boundaries):
        assert_same_rows(build_rows(geom, weight, a, b, transposed=transpose, threads=1),
                         whole, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.complex128])
@pytest.mark.parametrize("threads", [1, 3])
def test_rows_in_every_dtype_and_thread_count(dtype, threads):
    geom = conv_geometry((4, 2, 3, 3), (4, 9, 8), stride=(2, 1), padding=2, groups=2,
                         padding_mode="reflect")
    rng = np.random.default_rng(seed_of(np.dtype(dtype).name, threads))
    weight = random_array(rng, geom.weight_shape, dtype)
    for transpose in (False, True):
        whole = build(geom, weight, transposed=transpose, threads=1)
        for a, b in [(0, whole.shape[0]), (5, 61), (17, 18), (33, whole.shape[0] - 2)]:
            block = build_rows(geom, weight, a, b, transposed=transpose, threads=threads)
            assert_same_rows(block, whole, a, b)


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_row_offsets_and_balanced_ranges(case, transpose):
    name, weight_shape, input_shape, kwargs, transposed_conv = case
    geom = _geometry(weight_shape, input_shape, kwargs, transposed_conv)
    weight = np.ones(geom.weight_shape)
    indptr = build(geom, weight, transposed=transpose, threads=1).indptr
    n_rows = len(indptr) - 1
    np.testing.assert_array_equal(
        row_offsets(geom, np.arange(n_rows + 1), transposed=transpose), indptr
    )
    assert row_offsets(geom, n_rows, transposed=transpose) == indptr[-1]
    for parts in (1, 2, 3, 7, n_rows, n_rows + 5):
        ranges = balanced_row_ranges(geom, parts, transposed=transpose)
        assert ranges == _row_blocks(indptr, parts)  # the threaded products' rule
        assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
        assert all(a < b for a, b in ranges)
        assert all(r0[1] == r1[0] for r0, r1 in zip(ranges, ranges[1:]))


@given(geometries(), st.booleans(), st.data())
def test_random_rows_of_random_geometries(g, transpose, data):
    geom = conv_geometry(
        g["weight_shape"], g["input_shape"],
        **{k: g[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")},
    )
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    weight = random_array(np.random.default_rng(seed), geom.weight_shape, np.float64)
    whole = build(geom, weight, transposed=transpose, threads=1)
    n_rows = whole.shape[0]
    np.testing.assert_array_equal(
        row_offsets(geom, np.arange(n_rows + 1), transposed=transpose), whole.indptr
    )
    for _ in range(3):
        a = data.draw(st.integers(0, n_rows), label="row_start")
        b = data.draw(st.integers(a, n_rows), label="row_stop")
        assert_same_rows(build_rows(geom, weight, a, b, transposed=transpose, threads=2),
                         whole, a, b)
    parts = data.draw(st.integers(1, n_rows + 2), label="parts")
    assert balanced_row_ranges(geom, parts, transposed=transpose) == _row_blocks(whole.indptr,
                                                                                  parts)


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
def test_memory_is_that_of_the_block(transpose):
    """Rows of a matrix of ~7 TB: only the block's bytes are allocated."""
    geom = conv_geometry((512, 512, 3, 3), (512, 512, 512), padding=1,
                         padding_mode="reflect")
    assert geom.nnz > 6e11
    weight = np.ones(geom.weight_shape, dtype=np.float32)
    n_rows = 512 * 512 * 512
    a = n_rows // 2 - 700  # crosses a row channel boundary
    _ = geom.forward_maps, geom.transpose_maps  # the per-dimension maps (O(512)), shared
    tracemalloc.start()
    try:
        block = build_rows(geom, weight, a, a + 1500, transposed=transpose, threads=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    nbytes = block.data.nbytes + block.indices.nbytes + block.indptr.nbytes
    expected = np.diff(row_offsets(geom, [a, a + 1500], transposed=transpose))[0]
    assert block.nnz == expected > 1500 * 512 * 4
    assert block.indices.dtype == np.int32
    assert peak < 2 * nbytes + (1 << 20)


def test_rows_of_a_single_channel_match_its_slice():
    geom = conv_geometry((1, 1, 3), (1, 6), padding=1, padding_mode="circular")
    weight = np.array([[[1.0, 2.0, 4.0]]])
    block = build_rows(geom, weight, 0, 2, transposed=False, threads=1)
    np.testing.assert_array_equal(
        block.toarray(), [[2.0, 4.0, 0, 0, 0, 1.0], [1.0, 2.0, 4.0, 0, 0, 0]]
    )


def test_bad_row_ranges():
    geom = conv_geometry((2, 1, 3), (1, 5))
    weight = np.ones(geom.weight_shape)
    n_rows = 2 * 3
    with pytest.raises(ValueError, match=r"row_start must not exceed row_stop, got "
                                         r"row_start=4, row_stop=2"):
        build_rows(geom, weight, 4, 2, transposed=False, threads=1)
    with pytest.raises(ValueError, match=rf"row_stop must be in \[0, {n_rows}\].*row_stop=7"):
        build_rows(geom, weight, 0, 7, transposed=False, threads=1)
    with pytest.raises(ValueError, match=r"row_start must be in \[0, 5\].*row_start=-1"):
        build_rows(geom, weight, -1, 2, transposed=True, threads=1)
    with pytest.raises(TypeError, match=r"row_start must be an int, got row_start=1.0"):
        build_rows(geom, weight, 1.0, 2, transposed=False, threads=1)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\].*\[0, 7\]"):
        row_offsets(geom, [0, 7], transposed=False)
    with pytest.raises(TypeError, match=r"rows must be integers, got rows.dtype=float64"):
        row_offsets(geom, [0.5], transposed=False)
    with pytest.raises(ValueError, match=r"parts must be a positive integer, got parts=0"):
        balanced_row_ranges(geom, 0, transposed=False)
    with pytest.raises(TypeError, match=r"parts must be an int, got parts='2'"):
        balanced_row_ranges(geom, "2", transposed=False)
