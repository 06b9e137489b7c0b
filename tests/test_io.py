"""save_operator / load_operator: scipy's .npz with the geometry and weight beside the matrix."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_transpose_matrix,
    load_operator,
    save_operator,
)
from sparse_tconv._forms import form_for
from sparse_tconv._io import GEOMETRY_KEY

from reference import random_array, seed_of

# (class, weight shape, input shape, keywords, dtype)
CASES = [
    (ConvOperator, (4, 2, 3, 3), (2, 9, 8), dict(stride=2, padding=1), np.float64),
    (ConvOperator, (6, 2, 3), (4, 13), dict(stride=2, padding=[(2, 1)], dilation=2, groups=2,
                                            padding_mode="circular"), np.float32),
    (ConvOperator, (3, 2, 2, 3), (2, 6, 7), dict(padding="same", padding_mode="reflect"),
     np.complex128),
    (ConvOperator, (2, 1, 2, 2, 3), (1, 4, 5, 6), dict(padding=(1, 0, 1),
                                                       padding_mode="replicate"), np.float64),
    (ConvTransposeOperator, (4, 3, 3), (4, 5), dict(stride=2, padding=1, output_padding=1),
     np.float64),
    (ConvTransposeOperator, (2, 3, 3), (2, 5), dict(dilation=3, output_padding=2), np.float32),
    (ConvTransposeOperator, (4, 3, 2, 3), (4, 3, 4), dict(stride=(2, 3), padding=(0, 1),
                                                         output_padding=(1, 2), groups=2),
     np.complex64),
]


def _ids(case):
    cls, wshape, ishape, kwargs, dtype = case
    return f"{cls.__name__}-{wshape}-{ishape}-{kwargs}-{np.dtype(dtype).name}"


def _op(case):
    cls, wshape, ishape, kwargs, dtype = case
    weight = random_array(np.random.default_rng(seed_of(_ids(case))), wshape, dtype)
    return cls(weight, ishape, **kwargs)


def _assert_same_csr(a, b):
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


def _assert_same_operator(again, op):
    assert type(again) is type(op)
    for name in ("input_shape", "output_shape", "stride", "padding", "dilation", "groups",
                 "padding_mode", "shape", "dtype"):
        assert getattr(again, name) == getattr(op, name), name
    if isinstance(op, ConvTransposeOperator):
        assert again.output_padding == op.output_padding
    assert again.weight.dtype == op.weight.dtype
    np.testing.assert_array_equal(again.weight, op.weight)
    _assert_same_csr(again.matrix, op.matrix)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_round_trip(tmp_path, case):
    op = _op(case)
    path = tmp_path / "W.npz"
    save_operator(path, op)
    # scipy reads the matrix as it reads its own files ...
    _assert_same_csr(sp.load_npz(path), op.matrix)
    # ... and load_operator rebuilds the operator, whose matrix is the saved one exactly.
    again = load_operator(path)
    _assert_same_operator(again, op)
    _assert_same_csr(again.matrix, sp.load_npz(path))
    # The matrix is that of the public builder with the recorded arguments.
    cls, wshape, ishape, kwargs, dtype = case
    builder = conv_transpose_matrix if cls is ConvTransposeOperator else conv_matrix
    _assert_same_csr(sp.load_npz(path), builder(op.weight, ishape, **kwargs))


def test_transposes_and_adjoints_round_trip(tmp_path):
    # The stride does not divide 8 - 3: the transpose needs output_padding 1 to give 8 back.
    rng = np.random.default_rng(seed_of("transposes"))
    fwd = ConvOperator(random_array(rng, (2, 1, 3), np.complex128), (1, 8), stride=2)
    back = ConvTransposeOperator(random_array(rng, (2, 3, 3), np.float64), (2, 4), stride=3,
                                 output_padding=2)
    for n, op in enumerate((fwd.T, fwd.H, back.T, back.H.H)):
        path = tmp_path / f"op{n}.npz"
        save_operator(path, op)
        again = load_operator(path)
        assert type(again) is type(op) and again.shape == op.shape
        assert again.input_shape == op.input_shape and again.output_shape == op.output_shape
        _assert_same_csr(again.matrix, op.matrix)
    assert load_operator(tmp_path / "op0.npz").output_padding == (1,)


def test_single_channel_operator_round_trips(tmp_path):
    op = ConvOperator(np.arange(9.0).reshape(3, 3), (6, 6), padding=1)
    save_operator(tmp_path / "k.npz", op)
    again = load_operator(tmp_path / "k.npz")
    assert again.input_shape == (1, 6, 6) and again.weight.shape == (1, 1, 3, 3)
    _assert_same_csr(again.matrix, op.matrix)


def test_file_objects_and_exact_paths(tmp_path):
    op = _op(CASES[0])
    buffer = io.BytesIO()
    save_operator(buffer, op)
    buffer.seek(0)
    _assert_same_operator(load_operator(buffer), op)
    buffer.seek(0)
    _assert_same_csr(sp.load_npz(buffer), op.matrix)
    # A path is written as given (numpy would append .npz), with no temporary file left.
    save_operator(tmp_path / "W.bin", op)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W.bin"]
    _assert_same_operator(load_operator(tmp_path / "W.bin"), op)
    # An existing file is replaced.
    other = _op(CASES[1])
    save_operator(tmp_path / "W.bin", other)
    _assert_same_operator(load_operator(str(tmp_path / "W.bin")), other)


@pytest.mark.parametrize("compress, kind", [(False, zipfile.ZIP_STORED),
                                            (True, zipfile.ZIP_DEFLATED)])
def test_compress_is_opt_in(tmp_path, compress, kind):
    op = ConvOperator(np.ones((8, 8, 3, 3)), (8, 16, 16), padding=1)
    path = tmp_path / "W.npz"
    save_operator(path, op, compress=compress)
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {kind}
    _assert_same_csr(sp.load_npz(path), op.matrix)
    _assert_same_operator(load_operator(path), op)


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "W.npz"
    path.write_bytes(b"precious")

    def interrupted(file, **arrays):
        file.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_operator(path, _op(CASES[0]))
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["W.npz"]


def test_plain_scipy_file_has_no_geometry(tmp_path):
    path = tmp_path / "plain.npz"
    sp.save_npz(path, conv_matrix(np.ones((2, 1, 3)), (1, 9)))
    with pytest.raises(ValueError, match=r"plain\.npz' has no sparse_tconv geometry .*"
                                         r"scipy\.sparse\.load_npz reads the matrix"):
        load_operator(path)


def _rewrite_geometry(source, target, change):
    """A copy of a saved file whose geometry record went through ``change``."""
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    record = json.loads(str(arrays[GEOMETRY_KEY]))
    arrays[GEOMETRY_KEY] = np.array(change(record))
    np.savez(target, **arrays)


@pytest.mark.parametrize("change, match", [
    (lambda r: "{not json", r"entry is not valid JSON"),
    (lambda r: json.dumps([1, 2]), r"entry is not a sparse_tconv geometry"),
    (lambda r: json.dumps({**r, "version": 2}), r"format version 2; this sparse_tconv .* reads "
                                                r"version 1"),
    (lambda r: json.dumps({**r, "operator": "Conv9d"}), r"unknown operator 'Conv9d'"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "stride"}),
     r"the geometry lacks \['stride'\]"),
    (lambda r: json.dumps({**r, "stride": [1, 1]}),
     r"the geometry gives a \(288, 144\) matrix.*file holds a \(80, 144\) matrix"),
    (lambda r: json.dumps({**r, "groups": 3}),
     r"bad\.npz': its geometry is refused by ConvOperator: .*divisible by groups=3"),
    (lambda r: json.dumps({**r, "padding_mode": "mirror"}),
     r"refused by ConvOperator: padding_mode must be one of"),
])
def test_malformed_geometry_is_refused(tmp_path, change, match):
    save_operator(tmp_path / "good.npz", _op(CASES[0]))
    _rewrite_geometry(tmp_path / "good.npz", tmp_path / "bad.npz", change)
    with pytest.raises(ValueError, match=match):
        load_operator(tmp_path / "bad.npz")


def test_files_that_are_not_archives(tmp_path):
    np.save(tmp_path / "w.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"w\.npy' is not an \.npz archive but a single"):
        load_operator(tmp_path / "w.npy")
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"w\.pkl' is not an \.npz archive"):
        load_operator(tmp_path / "w.pkl")
    with pytest.raises(FileNotFoundError):
        load_operator(tmp_path / "missing.npz")


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"op must be a ConvOperator or a ConvTransposeOperator, "
                                        r"got .*csr_array"):
        save_operator(tmp_path / "W.npz", conv_matrix(np.ones((2, 1, 3)), (1, 9)))
    with pytest.raises(TypeError, match=r"compress must be a bool, got compress='yes'"):
        save_operator(tmp_path / "W.npz", _op(CASES[0]), compress="yes")
    assert not (tmp_path / "W.npz").exists()


def test_load_passes_threads_and_max_bytes(tmp_path):
    op = _op(CASES[0])
    save_operator(tmp_path / "W.npz", op)
    assert load_operator(tmp_path / "W.npz", threads=1).threads == 1
    with pytest.raises(MemoryError, match=r"max_bytes=100"):
        load_operator(tmp_path / "W.npz", max_bytes=100)
    # The caller's own arguments are named as such, even for a file that is not there.
    with pytest.raises(ValueError, match=r"threads must be a positive integer or None, "
                                         r"got threads=0"):
        load_operator(tmp_path / "missing.npz", threads=0)
    with pytest.raises(TypeError, match=r"max_bytes must be an int, got max_bytes='1GB'"):
        load_operator(tmp_path / "W.npz", max_bytes="1GB")


@pytest.mark.parametrize("damage", ["empty", "truncated", "object weight", "text shape"])
def test_damaged_archives_are_a_value_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "W.npz"
    save_operator(path, _op(CASES[0]))
    if damage in ("empty", "truncated"):
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    else:
        with np.load(path) as archive:
            entries = dict(archive)
        if damage == "object weight":
            entries["sparse_tconv_weight"] = np.array([object()], dtype=object)
        else:
            entries["shape"] = np.array("many")
        np.savez(path, **entries)
    with pytest.raises(ValueError, match=r"W\.npz.*(not an \.npz archive, or a damaged one|"
                                         r"damaged archive)"):
        load_operator(path)


def test_pickles_of_the_operators_before_the_plan_still_load():
    # tests/data/operators_0.1.0.pkl: four operators (channel blocks, a float32
    # keep_transpose=False one, diagonals, a transposed reflect layer on the CSR) pickled by
    # the package before its products were routed by a plan (commit 0325af3), with their
    # products and product form then (the channel layers now get the structured form).
    # They load, multiply bit for bit as an operator built now from the same arguments,
    # and to rounding as then (the stored figures come from one processor)
    import pickle
    from pathlib import Path

    with open(Path(__file__).parent / "data" / "operators_0.1.0.pkl", "rb") as f:
        records = pickle.load(f)
    assert len(records) == 4
    for name, (op, forward, backward, _form_then) in records.items():
        x = np.arange(op.shape[1], dtype=op.dtype) / op.shape[1]
        y = np.arange(op.shape[0], dtype=op.dtype) / op.shape[0]
        fresh = type(op)(op.weight, op.input_shape, stride=op.stride, padding=op.padding,
                         dilation=op.dilation, groups=op.groups, padding_mode=op.padding_mode,
                         keep_transpose=op.keep_transpose,
                         **({"output_padding": op.output_padding}
                            if isinstance(op, ConvTransposeOperator) else {}))
        # (``_form_then``: the form it multiplied through then; now, what form_for gives)
        now = form_for(op.convolution.geometry).name
        assert op.product_form.name == fresh.product_form.name == now, name
        assert op.matvec(x).tobytes() == fresh.matvec(x).tobytes(), name
        assert op.rmatvec(y).tobytes() == fresh.rmatvec(y).tobytes(), name
        rtol = 1e-5 if op.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(op.matvec(x), forward, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(op.rmatvec(y), backward, rtol=rtol, atol=rtol)
