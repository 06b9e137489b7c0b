"""The product forms as types: which form a geometry gets, exact predicted sizes,
the operator's documented accessor, and max_bytes refusing before anything is built."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparse_tconv
from sparse_tconv import ConvOperator, ConvTransposeOperator, ProductFormInfo, from_torch
from sparse_tconv._build import build
from sparse_tconv._forms import (
    FORMS,
    CsrForm,
    DiagonalForm,
    PaddedDiagonalForm,
    Request,
    Role,
    StructuredForm,
    form_for,
)
from sparse_tconv._geometry import Convolution, validate

from reference import random_array
from strategies import _kwargs, geometries


def _every_role(form, geom, w, transposed):
    """The form built in each role, for W (or W.T), with its canonical CSR at hand."""

    def canonical():
        return build(geom, w, transposed=transposed, threads=1)

    conv = Convolution(geom, w, transposed)
    return [form.build(Request(conv, role, 1, canonical))
            for role in (Role.FORWARD, Role.BACKWARD, Role.LEAN)]


@given(geometries(), st.sampled_from([np.float32, np.complex128]), st.integers(0, 2**32 - 1))
def test_predicted_bytes_are_the_built_forms_bytes(g, dtype, seed):
    rng = np.random.default_rng(seed)
    weight = random_array(rng, g["weight_shape"], dtype)
    w, geom = validate(weight, g["input_shape"], transposed=False, **_kwargs(g))
    form = form_for(geom)
    for transposed in (False, True):
        for built in _every_role(form, geom, w, transposed):
            assert type(built) is form and built.transposed is transposed
            assert built.nbytes == form.predict_nbytes(geom, w.dtype, transposed=transposed)


@pytest.mark.parametrize("weight_shape, input_shape, kwargs, expected", [
    ((4, 3, 3, 3), (3, 8, 8), dict(padding=1), StructuredForm),
    ((4, 3, 3, 3), (3, 8, 8), dict(padding=1, padding_mode="circular"), StructuredForm),
    ((4, 3, 3, 3), (3, 8, 8), dict(padding=1, padding_mode="reflect", stride=2),
     StructuredForm),
    ((4, 2, 3), (4, 9), dict(padding=1, padding_mode="replicate", groups=2), StructuredForm),
    ((1, 1, 3, 3), (1, 8, 8), dict(padding=1), DiagonalForm),
    ((1, 1, 3, 3), (1, 8, 8), dict(padding=1, stride=2), CsrForm),
    ((1, 1, 3, 3), (1, 8, 8), dict(padding=1, padding_mode="reflect"), PaddedDiagonalForm),
    ((1, 1, 3, 3), (1, 8, 8), dict(padding=1), DiagonalForm),
    ((1, 1, 3, 3), (1, 8, 8), dict(), PaddedDiagonalForm),  # 'valid': not the same size
    ((1, 1, 3, 3), (1, 8, 8), dict(padding=1, stride=(1, 2), padding_mode="reflect"), CsrForm),
    ((6, 1, 3), (6, 9), dict(groups=6), CsrForm),  # depthwise: one-entry blocks
])
def test_each_geometry_gets_its_form(weight_shape, input_shape, kwargs, expected):
    op = ConvOperator(np.ones(weight_shape), input_shape, **kwargs)
    info = op.product_form
    assert isinstance(info, ProductFormInfo) and info.name == expected.name
    stored = op._forward_slot.get()
    assert info.matrix is stored.matrix
    if expected is StructuredForm:
        # No scipy matrix: the weight (and a flipped copy), read-only.
        assert info.matrix is None
        arrays = stored._arrays()
        assert arrays[0].size == np.prod(weight_shape)
        assert all(a.size == np.prod(weight_shape) for a in arrays)
    elif expected is PaddedDiagonalForm:
        # No scipy matrix: the banded diagonals of the padded frame's convolution.
        assert info.matrix is None
        arrays = stored._arrays()
        assert all(not a.flags.writeable for a in arrays)
        assert info.nbytes == sum(a.nbytes for a in stored.banded.arrays())
    else:
        # What a product reads, counted from the scipy matrix itself.
        m = info.matrix
        arrays = [m.data, m.offsets] if m.format == "dia" else [m.data, m.indices, m.indptr]
    assert all(not a.flags.writeable for a in arrays)
    assert info.nbytes == sum(a.nbytes for a in arrays)
    x = np.random.default_rng(0).standard_normal(op.shape[1])
    np.testing.assert_allclose(op @ x, op.matrix @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, weight_shape, input_shape", [
    (ConvOperator, (4, 3, 3, 3), (3, 16, 16)),
    (ConvOperator, (1, 1, 5, 5), (1, 16, 16)),
    (ConvTransposeOperator, (4, 3, 3, 3), (4, 8, 8)),
])
def test_operators_refuse_a_form_beyond_max_bytes(cls, weight_shape, input_shape, monkeypatch):
    weight = np.ones(weight_shape)
    kwargs = dict(padding=2) if weight_shape[-1] == 5 else dict(padding=1)
    exact = cls(weight, input_shape, **kwargs).product_form.nbytes
    assert cls(weight, input_shape, max_bytes=exact, **kwargs).product_form.nbytes == exact
    # Refused before anything is built: every builder is made to fail.
    for form in FORMS:
        monkeypatch.setattr(form, "build", classmethod(lambda *a, **k: pytest.fail("built")))
    with pytest.raises(MemoryError, match=rf"would need {exact} bytes .*max_bytes={exact - 1}"):
        cls(weight, input_shape, max_bytes=exact - 1, **kwargs)
    with pytest.raises(ValueError, match=r"max_bytes must be a positive integer, got max_bytes=0"):
        cls(weight, input_shape, max_bytes=0, **kwargs)


def test_from_torch_passes_max_bytes():
    torch = pytest.importorskip("torch")
    layer = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    op, _ = from_torch(layer, (3, 16, 16))
    exact = op.product_form.nbytes
    with pytest.raises(MemoryError, match=f"more than max_bytes={exact - 1}"):
        from_torch(layer, (3, 16, 16), max_bytes=exact - 1)
    assert from_torch(layer, (3, 16, 16), max_bytes=op.product_form.nbytes)[0].shape == op.shape


def test_a_bad_thread_setting_fails_at_construction():
    with pytest.raises(ValueError, match="threads must be a positive integer or None"):
        ConvOperator(np.ones((1, 1, 3)), (1, 9), threads=-2)
    assert sparse_tconv.get_num_threads() >= 1
