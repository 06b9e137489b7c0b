"""Certified norm bounds: the interval contains the norm (dense SVD of the stored matrix)
for random geometries, and is as narrow as promised on fixed layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.sparse.linalg import svds

import sparse_tconv._bounds as bounds_module
from sparse_tconv import ConvOperator, ConvTransposeOperator, conv_matrix
from sparse_tconv._geometry import validate
from sparse_tconv.spectral import NormBounds, norm_bounds, operator_norm

from reference import random_array, seed_of
from strategies import _kwargs, geometries

# The reference's own rounding (LAPACK's SVD): a few ulps of the norm.
REFERENCE_RTOL = 1e-12


def _dense_norm(op) -> float:
    """The norm of the matrix the operator stores, by LAPACK's dense SVD in double precision."""
    return float(np.linalg.norm(op.matrix.toarray().astype(np.complex128), 2))


def _svds_norm(op) -> float:
    """ARPACK's estimate of the norm (converged to machine precision): for larger layers."""
    return float(svds(op.matrix, k=1, tol=0, return_singular_vectors=False)[0])


def _contains(bounds: NormBounds, norm: float) -> bool:
    return (bounds.lower <= norm * (1 + REFERENCE_RTOL)
            and norm * (1 - REFERENCE_RTOL) <= bounds.upper)


def _quiet_bounds(op, **kwargs) -> NormBounds:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a wide interval still holds
        return norm_bounds(op, **kwargs)


def _structural_only(patch) -> None:
    """No dense SVD and no inertia certificate: the structural bounds and Lanczos alone."""
    patch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)
    patch.setattr(bounds_module, "_INERTIA_GRAM_NNZ", 0)
    patch.setattr(bounds_module, "_BORDER_OPERATIONS", 0)


@pytest.fixture
def structural_only(monkeypatch):
    """The structural upper bound and the Lanczos lower bound alone."""
    _structural_only(monkeypatch)


@pytest.fixture
def no_dense(monkeypatch):
    """No dense SVD: what the inertia certificate closes, it closes on its own."""
    monkeypatch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)


@given(geometries(), st.sampled_from([np.float32, np.float64, np.complex64, np.complex128]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_the_interval_contains_the_norm(g, dtype, transposed, seed):
    # Every padding mode, stride, dilation, groups, 1-D to 3-D, real and complex,
    # single and double precision, and the transposed convolution.
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], dtype)
    op = ConvOperator(weight, g["input_shape"], **_kwargs(g))
    op = op.T if transposed else op
    with pytest.MonkeyPatch.context() as patch:  # the structural bounds, not a dense SVD
        _structural_only(patch)
        structural = _quiet_bounds(op)
    with pytest.MonkeyPatch.context() as patch:  # the inertia certificate, not a dense SVD
        patch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)
        certified = _quiet_bounds(op)
    with_dense = _quiet_bounds(op)
    norm = _dense_norm(op)
    assert _contains(structural, norm), (structural, norm)
    assert _contains(certified, norm), (certified, norm)
    assert _contains(with_dense, norm), (with_dense, norm)
    assert 0.0 <= with_dense.lower <= with_dense.upper


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("input_shape, kwargs", [
    ((4, 9, 8), dict(stride=2)),
    ((4, 9, 8), dict(stride=(2, 3), padding=(1, 2))),
    ((4, 7, 5), dict(padding=3, groups=2)),  # zero padding: rows that read nothing
    ((4, 6), dict(stride=4, padding=((3, 2),), groups=4)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
def test_one_tap_layers_are_exact(mode, input_shape, kwargs, dtype):
    # a 1x1 kernel: W is the channel matrix (x) the position map, the norm their product
    ndim = len(input_shape) - 1
    rng = np.random.default_rng(seed_of("one-tap", mode, str(input_shape), str(kwargs)))
    weight = random_array(rng, (8, 4 // kwargs.get("groups", 1), *(1,) * ndim), dtype)
    op = ConvOperator(weight, input_shape, padding_mode=mode, **kwargs)
    bounds = norm_bounds(op)
    assert bounds.gap < 1e-9
    assert _contains(bounds, _dense_norm(op))
    assert _contains(norm_bounds(op.T), _dense_norm(op))


@pytest.mark.parametrize("weight_shape, input_shape, kwargs, exact", [
    ((8, 6, 3, 3), (6, 1, 1), dict(padding=1), True),  # the centre tap alone reads the input
    ((8, 3, 3), (6, 2), dict(padding=2, dilation=2, groups=2), True),
    ((4, 4, 3, 3), (4, 1, 1), dict(padding=(1, 2), dilation=(1, 2), stride=(3, 1)), True),
    ((8, 6, 3, 3), (6, 2, 2), dict(padding=1), False),  # every tap reads something
    ((8, 6, 3, 3), (6, 1, 1), dict(padding=1, padding_mode="replicate"), False),
])
def test_layers_with_one_active_tap_are_exact(weight_shape, input_shape, kwargs, exact):
    # zero padding: taps that only ever read padding contribute nothing, and with one
    # tap left W is its channel matrix (x) an injective position map
    rng = np.random.default_rng(seed_of("active-tap", str(input_shape), str(kwargs)))
    op = ConvOperator(rng.standard_normal(weight_shape), input_shape, **kwargs)
    found = bounds_module.exact_single_tap(bounds_module.structure_of(op))
    assert (found is not None) == exact
    if exact:
        assert found.gap < 1e-9 and _contains(found, _dense_norm(op))
    assert _contains(norm_bounds(op), _dense_norm(op))


@pytest.mark.parametrize("shape", [(5, 3, 12), (5, 12, 3), (5, 4, 4)])
def test_the_block_norms_by_gram_matrices_hold_their_margin(shape):
    # wide and tall blocks take the largest eigenvalue of the smaller Gram matrix; the
    # norm is within the margin of LAPACK's SVD
    rng = np.random.default_rng(seed_of("gram-blocks", str(shape)))
    blocks = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    abs_bound = float(max(np.linalg.norm(np.abs(b), 2) for b in blocks))
    squares, error = bounds_module._top_squares(blocks, abs_bound)
    exact = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    margin = max(bounds_module._norm_margin(float(q), error) for q in squares)
    np.testing.assert_array_less(np.abs(np.sqrt(squares) - exact), margin + 1e-12 * exact)
    assert (error > 0) == (max(shape[1:]) >= 2 * min(shape[1:]))


def _layer(weight_shape, input_shape, seed_text, **kwargs):
    rng = np.random.default_rng(seed_of("norm-bounds", seed_text))
    fan_in = int(np.prod(weight_shape[1:]))
    return ConvOperator(rng.standard_normal(weight_shape) / np.sqrt(fan_in), input_shape,
                        **kwargs)


@pytest.mark.parametrize("weight_shape, input_shape, kwargs, gap", [
    # zero padding at 32 per dimension: 1%
    ((8, 4, 3, 3), (4, 32, 32), dict(padding=1), 1e-2),
    ((8, 4, 3, 3), (4, 32, 32), dict(stride=2, padding=1), 1e-2),
    ((8, 8, 5), (8, 64), dict(padding=2, dilation=2), 1e-2),
    ((8, 2, 3, 3), (8, 32, 32), dict(padding=1, groups=4), 1e-2),
    # a small input (16 per dimension): 5%
    ((4, 4, 5, 5), (4, 16, 16), dict(padding=2), 5e-2),
    ((2, 2, 3, 3, 3), (2, 12, 16, 16), dict(padding=1), 5e-2),
])
def test_zero_padding_gaps(weight_shape, input_shape, kwargs, gap, structural_only):
    op = _layer(weight_shape, input_shape, repr((weight_shape, kwargs)), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the promised width: no warning
        bounds = norm_bounds(op, rtol=gap)
    assert bounds.gap <= gap
    assert _contains(bounds, _svds_norm(op))


@pytest.mark.parametrize("kwargs", [
    dict(padding=1),
    dict(stride=2, padding=((0, 1), (1, 0))),  # strided: a polyphase circulant
    dict(padding=2, dilation=2, groups=2),
])
def test_circular_padding_is_exact(kwargs):
    op = _layer((4, 2 if "groups" in kwargs else 4, 3, 3), (4, 16, 16), repr(kwargs),
                padding_mode="circular", **kwargs)
    bounds = norm_bounds(op)
    assert bounds.gap < 1e-9
    assert _contains(bounds, _dense_norm(op))


def test_the_transpose_has_the_same_bounds(structural_only):
    op = _layer((8, 4, 3, 3), (4, 16, 16), "transpose", stride=2, padding=1)
    forward, backward = norm_bounds(op), norm_bounds(op.T)
    assert forward.upper == backward.upper  # the same structure
    norm = _dense_norm(op)
    assert _contains(forward, norm) and _contains(backward, norm)
    transposed = ConvTransposeOperator(op.weight, op.output_shape, stride=2, padding=1,
                                       output_padding=1)
    assert _contains(norm_bounds(transposed), norm)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_reflect_and_replicate_hold_and_say_when_they_are_wide(mode, structural_only):
    # The border duplicates input elements: the norm can exceed the circulant's,
    # and the structural bound carries the padding map's norm.
    op = _layer((4, 4, 3, 3), (4, 16, 16), mode, stride=2, padding=1, padding_mode=mode)
    with pytest.warns(RuntimeWarning, match=rf"{mode}.*padding map's norm 2"):
        bounds = norm_bounds(op, rtol=1e-3)
    assert _contains(bounds, _dense_norm(op))


@given(geometries(), st.sampled_from([np.float32, np.float64, np.complex128]),
       st.integers(0, 2**32 - 1))
def test_the_inertia_certificate_is_on_the_right_side_of_the_norm(g, dtype, seed):
    # Just above ||W||^2 the certificate holds and stays within rounding of the
    # shift; just below it, some eigenvalue exceeds the shift and it says so.
    rng = np.random.default_rng(seed)
    op = ConvOperator(random_array(rng, g["weight_shape"], dtype), g["input_shape"],
                      **_kwargs(g))
    norm = _dense_norm(op)
    structure = bounds_module.structure_of(op)
    if norm < 1e-3 * structure.abs_bound:  # (nearly) all taps read padding
        return
    above = bounds_module.inertia_upper(structure, (norm * (1 + 1e-4)) ** 2)
    assert above is not None
    # (the stored matrix of a padding mode that sums taps, in single precision, may
    # differ from the product forms' by the merge rounding, which the bound adds)
    slack = 2 * bounds_module._merge_margin(structure)
    assert norm * (1 - REFERENCE_RTOL) <= above <= norm * (1 + 1e-4) * (1 + 1e-6) + slack
    assert bounds_module.inertia_upper(structure, (norm * (1 - 1e-4)) ** 2) is None


@pytest.mark.parametrize("weight_shape, input_shape, kwargs", [
    ((8, 4, 3, 3), (4, 32, 32), dict(stride=2, padding=1, padding_mode="reflect")),
    ((4, 4, 3, 3), (4, 32, 32), dict(padding=1, padding_mode="replicate")),
    ((4, 4, 5), (4, 256), dict(padding=2, padding_mode="reflect")),
    # zero padding on 16-wide sub-lattices (dilation 2), where the circulant is 1.5% off
    ((16, 4, 3, 3), (16, 32, 32), dict(groups=4, dilation=2, padding=2)),
])
def test_the_inertia_certificate_closes_what_the_structure_leaves_open(
        weight_shape, input_shape, kwargs, no_dense):
    op = _layer(weight_shape, input_shape, repr((weight_shape, kwargs)), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the promised width: no warning
        bounds = norm_bounds(op, rtol=1e-2)
    assert bounds.gap <= 1e-2
    assert _contains(bounds, _svds_norm(op))


@given(geometries(), st.booleans(), st.integers(0, 2**32 - 1))
def test_the_border_frame_holds_every_column_the_padding_changes(g, wide, seed):
    # Oracle: the columns of W that differ from zero padding's W, both built by
    # conv_matrix; outside the frame they must be zero padding's exactly.
    if g["padding_mode"] not in ("reflect", "replicate"):
        return
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(g["weight_shape"])
    kwargs = _kwargs(g)
    W = conv_matrix(weight, g["input_shape"], **kwargs).toarray()
    Wz = conv_matrix(weight, g["input_shape"], **{**kwargs, "padding_mode": "zeros"}).toarray()
    _, geom = validate(weight, g["input_shape"], transposed=False, **kwargs)
    frame = bounds_module.border_frame(geom, wide=wide)
    assert np.array_equal(W[:, ~frame], Wz[:, ~frame])


@given(st.sampled_from(["reflect", "replicate"]), st.integers(1, 2), st.integers(8, 14),
       st.integers(1, 2), st.sampled_from([np.float32, np.float64, np.complex128]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_the_border_certificate_is_on_the_right_side_of_the_norm(
        mode, padding, size, stride, dtype, transposed, seed):
    # Whatever shift it is offered (from well below the norm to above), what the
    # certificate returns is at least the norm of the stored matrix (dense SVD).
    rng = np.random.default_rng(seed)
    cls = ConvTransposeOperator if transposed else ConvOperator
    weight = random_array(rng, (3, 2, 2 * padding + 1, 3), dtype)
    op = cls(weight, (3 if transposed else 2, size, size - 1), stride=stride,
             padding=padding, padding_mode=mode)
    norm = _dense_norm(op)
    structure = bounds_module.structure_of(op)
    for start in (0.5, 0.9, 0.99, 1.0):
        upper = bounds_module.border_upper(structure, start * norm, (0.0, 0.01, 0.05, 0.2))
        assert upper is None or upper >= norm * (1 - REFERENCE_RTOL)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("channels", [2, 4])
def test_the_border_certificate_narrows_layers_past_the_inertia_certificate(
        mode, channels, monkeypatch):
    # The inertia certificate and the dense SVD switched off: the border
    # certificate alone brings reflect and replicate within 10% (from 50-100%).
    monkeypatch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)
    monkeypatch.setattr(bounds_module, "_INERTIA_GRAM_NNZ", 0)
    op = _layer((channels, channels, 3, 3), (channels, 24, 24), mode, padding=1,
                padding_mode=mode)
    bounds = _quiet_bounds(op)
    assert bounds.gap <= 0.1
    assert _contains(bounds, _dense_norm(op))
    # and on the same layer without it, the structure's bound is far wider
    monkeypatch.setattr(bounds_module, "_BORDER_OPERATIONS", 0)
    assert _quiet_bounds(op).gap > 0.3


def test_small_matrices_get_a_dense_svd_when_the_structure_is_loose():
    op = _layer((2, 2, 3, 3), (2, 10, 10), "dense", padding=1, padding_mode="reflect")
    bounds = norm_bounds(op, rtol=1e-6)
    norm = _dense_norm(op)
    assert bounds.gap <= 1e-6 and _contains(bounds, norm)


def test_a_zero_operator_and_taps_that_only_read_padding():
    assert norm_bounds(ConvOperator(np.zeros((2, 2, 3)), (2, 9), padding=1)) == (0.0, 0.0)
    # Every tap of every row falls into the zero padding: W = 0 for a nonzero weight.
    op = ConvOperator(np.ones((1, 1, 1)), (1, 3), padding=2, stride=5)
    bounds = _quiet_bounds(op)
    assert bounds.lower == 0.0 and bounds.upper >= 0.0


def test_gram_on_a_convolution_is_the_structural_bound():
    op = _layer((8, 4, 3, 3), (4, 32, 32), "gram", padding=1)
    upper = operator_norm(op, method="gram")
    assert upper == _quiet_bounds(op, maxiter=1).upper  # the same computation
    norm = _svds_norm(op)
    assert norm * (1 - REFERENCE_RTOL) <= upper <= norm * 1.01
    # Gram iteration on the explicit matrix when the steps are given, as before.
    explicit = operator_norm(op, method="gram", iterations=2)
    assert explicit >= norm * (1 - REFERENCE_RTOL) and explicit != upper


@pytest.mark.parametrize("op, kwargs, error, match", [
    (np.eye(3), {}, TypeError, r"op must be a ConvOperator, ConvTransposeOperator or "
                               r"DistributedConvOperator.*got op of type ndarray"),
    (None, dict(rtol=-1.0), ValueError, r"rtol must be non-negative and finite, got rtol=-1\.0"),
    (None, dict(maxiter=0), ValueError, r"maxiter must be a positive integer, got maxiter=0"),
    (None, dict(rtol="1"), TypeError, r"rtol must be a real number"),
])
def test_errors(op, kwargs, error, match):
    op = ConvOperator(np.ones((2, 2, 3)), (2, 9)) if op is None else op
    with pytest.raises(error, match=match):
        norm_bounds(op, **kwargs)


# --- the certificates' registry --------------------------------------------------------------

_CERTIFIED_LAYERS = [
    ((4, 3, 3, 3), (3, 12, 12), dict(padding=1)),
    ((4, 3, 3, 3), (3, 12, 12), dict(padding=1, padding_mode="reflect")),
    ((3, 3, 5), (3, 30), dict(padding=2, padding_mode="replicate")),
    ((6, 3, 3, 3), (3, 14, 14), dict(padding=2, dilation=2, stride=2)),
]


class _Checked:
    """A certificate that checks, after it ran, that it only narrowed an interval that holds."""

    def __init__(self, inner, exact, ran):
        self.inner, self.name, self.exact, self.ran = inner, inner.name, exact, ran

    def applies(self, run):
        return self.inner.applies(run)

    def tighten(self, run):
        before = (run.lower, run.upper)
        self.inner.tighten(run)
        self.ran.append(self.name)
        assert run.lower >= before[0] and run.upper <= before[1], self.name
        exact = self.exact
        assert run.lower <= exact * (1 + 1e-12) and exact <= run.upper * (1 + 1e-12), self.name


# (layer, certificates left out): without the border and inertia certificates the small
# reflect layer reaches the dense SVD; the 3-D reflect layer is past the inertia's size
# (lowered to 256 rows for the test, and the dense SVD left out), so the border
# certificate runs
_BORDER_LAYER = ((2, 2, 3, 3, 3), (2, 8, 8, 8), dict(padding=1, padding_mode="reflect"))
# a zero-padded layer past the inertia certificate and the dense SVD (both lowered to
# nothing for the test): the band certificate closes it
_BAND_LAYER = ((8, 6, 3, 3), (6, 6, 5), dict(padding=1))
_CERTIFICATE_CASES = [*((layer, ()) for layer in _CERTIFIED_LAYERS),
                      (_CERTIFIED_LAYERS[1], ("border", "inertia")),
                      (_BORDER_LAYER, ("dense SVD",)),
                      (_BAND_LAYER, ())]
_RAN: set[str] = set()


@pytest.mark.parametrize("layer, left_out", _CERTIFICATE_CASES)
def test_every_certificate_only_narrows_an_interval_that_holds(monkeypatch, layer, left_out):
    # after each step of the run the interval still contains the dense SVD's norm, and no
    # step widens it
    from sparse_tconv import _certificates

    weight_shape, input_shape, kwargs = layer
    rng = np.random.default_rng(seed_of("certificates", str(kwargs), str(input_shape)))
    op = ConvOperator(rng.standard_normal(weight_shape), input_shape, **kwargs)
    exact = np.linalg.norm(op.matrix.toarray(), 2)
    ran: list[str] = []
    registry = tuple(_Checked(c, exact, ran) for c in _certificates.CERTIFICATES
                     if c.name not in left_out)
    monkeypatch.setattr(_certificates, "CERTIFICATES", registry)
    if layer is _BORDER_LAYER:
        monkeypatch.setattr(bounds_module, "_INERTIA_ORDER_3D", 256)
    if layer is _BAND_LAYER:
        monkeypatch.setattr(bounds_module, "_INERTIA_GRAM_NNZ", 0)
        monkeypatch.setattr(bounds_module, "_DENSE_SVD_ENTRIES", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the border leaves a few percent
        bounds = norm_bounds(op, rtol=1e-3)
    assert ran[:2] == ["circulant embedding", "Lanczos"]
    assert bounds.lower <= exact * (1 + 1e-12) and exact <= bounds.upper * (1 + 1e-12)
    _RAN.update(ran)


def test_the_cases_above_run_every_certificate():
    from sparse_tconv import _certificates

    if len(_RAN) == 0:
        pytest.skip("run with the cases above")
    names = {c.name for c in _certificates.CERTIFICATES}
    assert _RAN == names, names - _RAN


def test_a_new_certificate_is_one_class_in_the_registry(monkeypatch):
    # a certificate that closes the interval at once (here from the dense matrix, for the
    # test): norm_bounds runs it where the registry places it, and the later ones see a
    # closed interval and do not run
    from sparse_tconv import _certificates

    op = ConvOperator(np.random.default_rng(3).standard_normal((4, 3, 3, 3)), (3, 10, 10),
                      padding=1, padding_mode="reflect")
    exact = np.linalg.norm(op.matrix.toarray(), 2)

    class Oracle(_certificates.Certificate):
        name = "oracle"

        def applies(self, run):
            return run.open

        def tighten(self, run):
            run.lower, run.upper = exact * (1 - 1e-9), exact * (1 + 1e-9)

    ran = []

    class Never(_certificates.Certificate):
        name = "never"

        def applies(self, run):
            return run.open

        def tighten(self, run):
            ran.append(self.name)

    registry = (*_certificates.CERTIFICATES[:2], Oracle(), Never())
    monkeypatch.setattr(_certificates, "CERTIFICATES", registry)
    bounds = norm_bounds(op, rtol=1e-3)
    assert bounds.gap < 1e-8 and ran == []
