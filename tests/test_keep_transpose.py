"""``keep_transpose=False``: one product form serves both directions (and ``.T``).

Oracles: dense linear algebra, the default operators (``keep_transpose=True``),
scipy's serial products, and the operator tests of ``test_operator``, rerun
here with ``keep_transpose=False`` as the constructors' default.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from test_operator import (  # noqa: F401  (rerun here, in the lean mode)
    test_dot_product_identity,
    test_dropped_operators_free_their_matrices_at_once,
    test_products_match_dense,
    test_scipy_solvers_accept_the_operator,
    test_shaped_batches_equal_single_samples,
    test_transpose_and_adjoint_operators,
    test_weight_is_copied_and_read_only,
    test_with_weight_shares_the_pattern,
)

from sparse_tconv import ConvOperator, ConvTransposeOperator, _parallel

from reference import random_array
from strategies import shrink_tiles

DTYPES = [np.float32, np.float64, np.complex64, np.complex128]

# (class, weight shape, input shape, keywords, form)
CASES = [
    (ConvOperator, (6, 4, 3, 3), (4, 9, 8), dict(padding=1, stride=(2, 1)), "structured"),
    (ConvOperator, (8, 2, 3, 3), (2, 9, 7), dict(padding=1), "structured"),  # W.T stored
    (ConvOperator, (6, 2, 3, 3), (4, 9, 8), dict(padding=1, groups=2, dilation=2),
     "structured"),
    (ConvTransposeOperator, (4, 3, 4), (4, 11), dict(stride=2, padding=1), "structured"),
    (ConvOperator, (1, 1, 3, 3), (1, 9, 8), dict(padding=1), "diagonals"),
    (ConvOperator, (1, 1, 5), (1, 40), dict(padding=[(3, 1)]), "diagonals"),
    (ConvOperator, (5, 3, 3, 3), (3, 8, 9), dict(padding=1, padding_mode="reflect"),
     "structured"),
    (ConvOperator, (4, 2, 3, 3), (4, 10, 9), dict(padding=2, groups=2,
                                                  padding_mode="circular"), "structured"),
    (ConvOperator, (6, 1, 3), (6, 30), dict(groups=6), "csr"),
    (ConvTransposeOperator, (3, 5, 3, 3), (3, 8, 9), dict(padding=1,
                                                          padding_mode="replicate"),
     "structured"),
    (ConvOperator, (1, 1, 3, 3), (1, 8, 9), dict(padding=1, padding_mode="reflect"),
     "padded_diagonals"),
    (ConvOperator, (1, 1, 3, 3), (1, 9, 8), dict(padding=1, stride=2), "csr"),
    (ConvOperator, (1, 1, 3, 3), (1, 9, 8), dict(padding=1, stride=(2, 1),
                                                 padding_mode="reflect"), "csr"),
    (ConvTransposeOperator, (4, 1, 3, 3), (4, 8, 9), dict(padding=1, groups=4,
                                                          padding_mode="replicate"), "csr"),
]
IDS = ["structured", "structured-wide-T", "structured-groups", "structured-transposed",
       "diagonals-2d", "diagonals-1d", "structured-reflect", "structured-circular-groups",
       "csr-depthwise", "structured-transposed-replicate", "padded-reflect", "csr-strided",
       "csr-strided-reflect", "csr-transposed-depthwise"]
BY_ID = dict(zip(IDS, CASES))


@pytest.fixture(autouse=True)
def lean_by_default(monkeypatch):
    """The constructors' default becomes keep_transpose=False (for the rerun tests)."""
    for cls in (ConvOperator, ConvTransposeOperator):
        monkeypatch.setitem(cls.__init__.__kwdefaults__, "keep_transpose", False)


@pytest.fixture
def thread_small(monkeypatch):
    """Thread even a small matrix, cut into as many parts (or tiles) as a large one."""
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_NNZ", 0)
    monkeypatch.setattr(_parallel, "SCATTER_PART_NNZ", 1)
    shrink_tiles(monkeypatch)


def _pair(case, dtype, seed=0, **options):
    cls, weight_shape, input_shape, kwargs, _ = case
    weight = random_array(np.random.default_rng(seed), weight_shape, dtype)
    default = cls(weight, input_shape, keep_transpose=True, **kwargs)
    lean = cls(weight, input_shape, keep_transpose=False, **kwargs, **options)
    return default, lean


def _tol(dtype):
    single = np.dtype(dtype) in (np.float32, np.complex64)
    return dict(rtol=1e-4, atol=1e-4) if single else dict(rtol=1e-12, atol=1e-12)


def _products(op, rng, dtype):
    """Every product of ``op``, on inputs drawn from ``rng``."""
    x = random_array(rng, op.shape[1], dtype)
    y = random_array(rng, op.shape[0], dtype)
    X = random_array(rng, (op.shape[1], 3), dtype)
    Y = random_array(rng, (op.shape[0], 3), dtype)
    # the shaped products: this operator's and its transpose's
    forward, backward = ((op.conv, op.conv_transpose) if isinstance(op, ConvOperator)
                         else (op.conv_transpose, op.conv))
    return {
        "matvec": op.matvec(x), "rmatvec": op.rmatvec(y), "matmat": op.matmat(X),
        "rmatmat": op.rmatmat(Y), "T": op.T.matvec(y), "TT": op.T.rmatmat(X),
        "H": op.H.matvec(y), "shaped": forward(x.reshape(op.input_shape)),
        "shaped_back": backward(y.reshape(op.output_shape)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_products_equal_the_default_and_dense(case, dtype):
    default, lean = _pair(case, dtype)
    assert lean.product_form.name == case[-1] and lean.keep_transpose is False
    dense = default.matrix.toarray()
    got = _products(lean, np.random.default_rng(1), dtype)
    expected = _products(default, np.random.default_rng(1), dtype)
    rng = np.random.default_rng(1)
    x = random_array(rng, lean.shape[1], dtype)
    y = random_array(rng, lean.shape[0], dtype)
    np.testing.assert_allclose(got["matvec"], dense @ x, **_tol(dtype))
    np.testing.assert_allclose(got["rmatvec"], dense.conj().T @ y, **_tol(dtype))
    for name, value in got.items():
        assert value.dtype == np.dtype(dtype), name
        np.testing.assert_allclose(value, expected[name], **_tol(dtype), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.complex64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_results_do_not_depend_on_the_thread_count(case, dtype, thread_small):
    runs = [_products(_pair(case, dtype, threads=t)[1], np.random.default_rng(2), dtype)
            for t in (1, 2, 3)]
    for other in runs[1:]:
        for name, value in runs[0].items():
            np.testing.assert_array_equal(other[name], value, err_msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "diagonals"],
                         ids=[i for i, c in zip(IDS, CASES) if c[-1] == "diagonals"])
def test_diagonals_are_bit_for_bit_the_default(case, thread_small):
    # The transposed product sums each element over the diagonals in the
    # order of scipy's DIA kernel on W.T's diagonals.
    default, lean = _pair(case, np.float64, threads=3)
    got = _products(lean, np.random.default_rng(3), np.float64)
    expected = _products(default, np.random.default_rng(3), np.float64)
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_form_is_held_after_both_directions(case):
    default, lean = _pair(case, np.float64)
    for op in (default, lean):
        op.rmatvec(np.ones(op.shape[0]))
        op.matvec(np.ones(op.shape[1]))
    forms = {id(s.built) for s in (lean._forward_slot, lean._backward_slot)}
    assert len(forms) == 1 and lean._forward_slot.built is not None
    held = lean._forward_slot.built
    if case[-1] != "csr":  # the CSR form is the canonical matrix itself
        assert lean._matrix_slot.built is None and lean._tmatrix_slot.built is None
    assert lean.nbytes == sum(a.nbytes for a in held._arrays())
    # The default holds a second form of (about) as many bytes.
    default_forms = [default._forward_slot.built, default._backward_slot.built]
    assert all(f is not None for f in default_forms)
    if case[-1] in ("diagonals", "padded_diagonals"):
        # Their one form holds both matrices' banded diagonals (a few MB at any
        # size): the transposed product sums as W.T's own kernel does.
        assert lean.nbytes == default.nbytes
    elif case[-1] == "structured":
        # The weight (and, for W.T of stride 1, its flipped copy): the default's two
        # forms share the weight, the lean one holds no more than they do.
        assert lean.nbytes <= default.nbytes
    else:
        assert lean.nbytes <= 0.6 * default.nbytes
    # .T and .H (real) share the form, and build nothing more
    for other in (lean.T, lean.H, lean.T.T):
        other.matvec(np.ones(other.shape[1]))
        other.rmatvec(np.ones(other.shape[0]))
        assert other._forward_slot is lean._forward_slot
    assert lean.nbytes == sum(a.nbytes for a in held._arrays())


@pytest.mark.parametrize("stride", [1, 2])
def test_the_stored_orientation_and_product_form_say_so(stride):
    # The structured form of W.T of stride 1 holds the flipped weight too, on which
    # W.T's products gather windows as W's do: a lean operator of stride 1 stores W.T
    # (and both directions run as convolutions), one of stride 2 its own matrix W.
    op = ConvOperator(np.ones((8, 2, 3, 3)), (2, 9, 7), padding=1, stride=stride,
                      keep_transpose=False)
    info = op.product_form
    stores_transpose = stride == 1
    assert info.name == "structured" and info.transposed is stores_transpose
    assert info.matrix is None  # no scipy matrix: the weight's taps
    assert op._forward_slot.get().transposed is stores_transpose
    assert op.T.product_form.transposed is not stores_transpose
    assert op.T._forward_slot is op._forward_slot
    weight_bytes = op.weight.nbytes
    assert info.nbytes == (2 if stores_transpose else 1) * weight_bytes
    dense = op.matrix.toarray()
    x = np.random.default_rng(0).standard_normal(op.shape[1])
    y = np.random.default_rng(1).standard_normal(op.shape[0])
    np.testing.assert_allclose(op.matvec(x), dense @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.rmatvec(y), dense.T @ y, rtol=1e-12, atol=1e-12)
    default = ConvOperator(np.ones((8, 2, 3, 3)), (2, 9, 7), padding=1, stride=stride,
                           keep_transpose=True)
    assert default.product_form.transposed is False


@pytest.mark.parametrize("case_id", ["structured", "structured-wide-T", "diagonals-2d",
                                     "padded-reflect", "csr-strided-reflect",
                                     "csr-depthwise"])
def test_pickle_deepcopy_and_with_weight_keep_the_mode(case_id):
    case = BY_ID[case_id]
    default, lean = _pair(case, np.float64)
    rng = np.random.default_rng(4)
    y = rng.standard_normal(lean.shape[0])
    for op in (pickle.loads(pickle.dumps(lean)), copy.deepcopy(lean),
               pickle.loads(pickle.dumps(lean.T)).T):
        assert op.keep_transpose is False
        np.testing.assert_array_equal(op.rmatvec(y), lean.rmatvec(y))
    w2 = rng.standard_normal(lean.weight.shape)
    new = lean.with_weight(w2)
    fresh = type(lean)(w2, lean.input_shape, keep_transpose=False, **case[3])
    assert new.keep_transpose is False
    np.testing.assert_array_equal(new.rmatvec(y), fresh.rmatvec(y))
    old_form, new_form = lean._forward_slot.built, new._forward_slot.built
    assert new_form.transposed == old_form.transposed
    if case[-1] in ("structured", "padded_diagonals"):  # the new weight alone: nothing of
        # the old form
        assert not any(np.shares_memory(a, b)
                       for a in new_form._arrays() for b in old_form._arrays())
    else:
        if case[-1] == "csr":  # the canonical CSR, refilled on the old pattern
            assert np.shares_memory(new_form.matrix.indices, old_form.matrix.indices)
        assert not np.shares_memory(new_form.matrix.data, old_form.matrix.data)
    np.testing.assert_allclose(new.rmatvec(y), default.with_weight(w2).rmatvec(y),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("case_id", ["structured-wide-T", "csr-depthwise"])
def test_complex_adjoint_against_dense(dtype, case_id):
    case = BY_ID[case_id]
    default, lean = _pair(case, dtype)
    dense = default.matrix.toarray()
    rng = np.random.default_rng(5)
    y = random_array(rng, lean.shape[0], dtype)
    x = random_array(rng, lean.shape[1], dtype)
    H = lean.H
    assert H.keep_transpose is False
    np.testing.assert_allclose(H.matvec(y), dense.conj().T @ y, **_tol(dtype))
    np.testing.assert_allclose(H.rmatvec(x), dense @ x, **_tol(dtype))
    np.testing.assert_allclose(H.H.matvec(x), dense @ x, **_tol(dtype))
    np.testing.assert_allclose(lean.T.matvec(y), dense.T @ y, **_tol(dtype))


def test_non_finite_vectors_reach_only_the_rows_that_read_them():
    # Diagonals hold explicit zeros: a NaN goes to the canonical CSR instead.
    default, lean = _pair(BY_ID["diagonals-2d"], np.float64)
    y = np.ones(lean.shape[0])
    y[5] = np.nan
    np.testing.assert_array_equal(np.isnan(lean.rmatvec(y)), np.isnan(default.rmatvec(y)))
    np.testing.assert_array_equal(lean.rmatvec(y), default.matrix.T @ y)


def test_mixed_dtypes_widen_as_scipy():
    # (zeros padding on the structured form: its float64 product reads the float32
    # weight's values, as the CSR's entries, none a sum of folded taps)
    for case in (BY_ID["structured"], BY_ID["diagonals-2d"], BY_ID["padded-reflect"],
                 BY_ID["csr-depthwise"]):
        _, lean = _pair(case, np.float32)
        y = np.random.default_rng(6).standard_normal(lean.shape[0])  # float64
        got = lean.rmatvec(y)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, lean.matrix.T @ y, rtol=1e-12, atol=1e-12)
        assert lean.rmatvec(y + 1j).dtype == np.complex128


def test_keep_transpose_must_be_a_bool():
    with pytest.raises(TypeError, match="keep_transpose must be True or False, "
                                        "got keep_transpose='no'"):
        ConvOperator(np.ones((1, 1, 3)), (1, 9), keep_transpose="no")


def test_max_bytes_counts_the_stored_form():
    weight, shape = np.ones((8, 2, 3, 3)), (2, 9, 7)
    exact = ConvOperator(weight, shape, padding=1, keep_transpose=False).product_form.nbytes
    ConvOperator(weight, shape, padding=1, keep_transpose=False, max_bytes=exact)
    with pytest.raises(MemoryError, match=f"would need {exact} bytes"):
        ConvOperator(weight, shape, padding=1, keep_transpose=False, max_bytes=exact - 1)


STRUCTURED_CASES = [c for c in CASES if c[-1] == "structured"]
STRUCTURED_IDS = [i for i, c in zip(IDS, CASES) if c[-1] == "structured"]


@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=STRUCTURED_IDS)
def test_default_single_precision_vectors_run_on_their_forms(case, dtype, thread_small):
    # keep_transpose=True in single precision, the structured form cut into tiles
    # of one row that threads split: each vector product runs on the form that
    # the form's policy (vectors_via_transpose) names; results stay the matrix's,
    # to rounding, whatever the thread count.
    cls, weight_shape, input_shape, kwargs, _ = case
    weight = random_array(np.random.default_rng(4), weight_shape, dtype)
    results = []
    for threads in (1, 2, 3):
        op = cls(weight, input_shape, keep_transpose=True, threads=threads, **kwargs)
        rng = np.random.default_rng(5)
        x, y = random_array(rng, op.shape[1], dtype), random_array(rng, op.shape[0], dtype)
        results.append((op.matvec(x), op.rmatvec(y)))
        dense = op.matrix.toarray().astype(np.complex128)
        np.testing.assert_allclose(results[-1][0], dense @ x, **_tol(dtype))
        np.testing.assert_allclose(results[-1][1], dense.conj().T @ y, **_tol(dtype))
        # the forms built are those the two vector products read
        built = {name for name, slot in (("forward", op._forward_slot),
                                         ("backward", op._backward_slot))
                 if slot.built is not None}
        via = [op._form.vectors_via_transpose(op._geometry, t, op.dtype)
               for t in (op._transposed, not op._transposed)]
        assert built == {"backward" if via[0] else "forward", "forward" if via[1] else "backward"}
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)
