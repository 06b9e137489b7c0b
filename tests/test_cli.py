"""The ``sparse-tconv`` command: every sub-command runs, writes what it says, and
rejects bad arguments with one line and a non-zero exit (no timing assertions)."""

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
    conv_transpose_matrix,
    load_operator,
)
from sparse_tconv.tools.cli import main


def test_bench_quick_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--config", "a", "--config", "g", "--repeat", "1",
                 "--json", str(js), "--plot", str(png)]) == 0
    report = json.loads(js.read_text())
    by_name = {r["config"]: r for r in report["results"]}
    assert set(by_name) == {"a", "g"}
    a = by_name["a"]
    assert a["nnz"] == conv_matrix_nnz((20, 10, 5, 5), (10, 16, 16), stride=3, padding=2).nnz
    for method in ("build", "csr", "csr_transpose", "csr_batch_per_column", "naive", "fast", "fft"):
        assert a["times"][method] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "direct kernels and peers" in out and "of bound" in out


def test_bench_peer_columns_follow_what_is_installed(tmp_path, monkeypatch, capsys):
    import sparse_tconv.tools.compare as compare

    real_import = compare._import
    monkeypatch.setattr(compare, "_import",
                        lambda name: None if name == "pylops" else real_import(name))
    js = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--config", "d", "--repeat", "1", "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert any("pylops not installed" in note for note in report["notes"])
    times = report["results"][0]["times"]
    assert "pylops_fft" not in times
    try:
        import torch  # noqa: F401
    except ImportError:
        assert not any(k.startswith("torch") for k in times)
    else:
        assert {"torch_f64_1t", "torch_f32_1t"} <= set(times)
    assert "note: pylops not installed" in capsys.readouterr().out


def test_pylops_peer_computes_the_same_convolution():
    pytest.importorskip("pylops")
    from sparse_tconv.tools.compare import pylops_operator
    from sparse_tconv.tools.configs import Config

    for config in (Config("d", "", (1, 1, 5, 5), (1, 20, 17), dict(padding=2)),
                   Config("e", "", (1, 1, 7), (1, 40), dict(padding=3)),
                   Config("f", "", (1, 1, 3, 3, 3), (1, 6, 5, 4), dict(padding=1))):
        rng = np.random.default_rng(0)
        weight = rng.standard_normal(config.weight_shape)
        x = rng.standard_normal(config.input_shape)
        expected = conv_matrix(weight, config.input_shape, **config.kwargs) @ x.ravel()
        np.testing.assert_allclose(pylops_operator(config, weight).matvec(x.ravel()), expected,
                                   rtol=1e-10, atol=1e-10)


def test_bench_geometry_from_the_command_line(tmp_path):
    js = tmp_path / "bench.json"
    assert main(["bench", "--weight-shape", "4,2,3", "--input-shape", "2,50", "--stride", "2",
                 "--padding", "1:2", "--repeat", "1", "--no-peers", "--json", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert r["nnz"] == conv_matrix_nnz((4, 2, 3), (2, 50), stride=2, padding=[(1, 2)]).nnz


@pytest.mark.parametrize("suffix", [".npz", ".mtx"])
def test_matrix_saves_the_matrix_it_reports(tmp_path, capsys, suffix):
    path = tmp_path / f"W{suffix}"
    args = ["matrix", "--weight-shape", "3,2,3,3", "--input-shape", "2,7,6", "--padding", "same",
            "--padding-mode", "reflect", "--seed", "4", "--save", str(path)]
    assert main(args) == 0
    weight = np.random.default_rng(4).standard_normal((3, 2, 3, 3))
    expected = conv_matrix(weight, (2, 7, 6), padding="same", padding_mode="reflect")
    saved = sp.load_npz(path) if suffix == ".npz" else scipy.io.mmread(path)
    assert saved.shape == expected.shape
    np.testing.assert_array_equal(sp.csr_array(saved).toarray(), expected.toarray())
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"nnz {expected.nnz:,}" in lines[0]  # predicted before building
    assert lines[0].startswith("predicted:")
    # The geometry as the operator takes it: 'same' resolved to PyTorch's (1, 1) per dimension.
    assert lines[1] == ("geometry:  ConvOperator, input (2, 7, 6) -> output (3, 7, 6), weight "
                        "(3, 2, 3, 3), stride (1, 1), padding ((1, 1), (1, 1)), dilation (1, 1), "
                        "groups 1, padding_mode 'reflect'")
    assert [line.split(":")[0] for line in lines] == [
        "predicted", "geometry", "weight", "built", "writing", "saved"]
    assert lines[4].startswith(f"writing:   {path} (") and lines[4].endswith("uncompressed) ...")
    if suffix == ".npz":
        op = load_operator(path)  # the geometry travels with the matrix
        assert isinstance(op, ConvOperator) and op.padding_mode == "reflect"
        np.testing.assert_array_equal(op.weight, weight)
        assert (op.matrix != expected).nnz == 0
        assert "load_operator() rebuilds the operator" in lines[5]
    else:
        assert "(.mtx has no geometry)" in lines[5]


def test_matrix_transposed_with_output_padding(tmp_path):
    path = tmp_path / "WT.npz"
    assert main(["matrix", "--weight-shape", "4,2,3,3", "--input-shape", "4,5,5", "--transposed",
                 "--stride", "2", "--output-padding", "1", "--dtype", "float32",
                 "--save", str(path)]) == 0
    weight = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    expected = conv_transpose_matrix(weight, (4, 5, 5), stride=2, output_padding=1)
    saved = sp.load_npz(path)
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved.toarray(), expected.toarray())
    op = load_operator(path)
    assert isinstance(op, ConvTransposeOperator)
    assert op.output_padding == (1, 1) and op.stride == (2, 2) and op.input_shape == (4, 5, 5)
    assert (op.matrix != expected).nnz == 0 and op.dtype == np.float32


def test_crossover_quick_writes_the_map(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "map.png", tmp_path / "map.json"
    assert main(["crossover", "--quick", "--repeat", "1", "--plot", str(png), "--json",
                 str(js)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = json.loads(js.read_text())["cells"]
    assert len(cells) == 2 * 2 * 1
    for cell in cells:
        assert cell["nnz"] == conv_matrix_nnz(
            (cell["channels"],) * 2 + (cell["kernel"],) * 2,
            (cell["channels"], cell["image"], cell["image"]),
            padding="same",
        ).nnz
    assert "winner" in capsys.readouterr().out


def test_crossover_skips_matrices_over_the_budget(tmp_path):
    pytest.importorskip("matplotlib")
    js = tmp_path / "map.json"
    assert main(["crossover", "--channels", "2", "--kernels", "3", "--images", "8",
                 "--max-nnz", "10", "--repeat", "1", "--plot", str(tmp_path / "m.png"),
                 "--json", str(js)]) == 0
    (cell,) = json.loads(js.read_text())["cells"]
    assert "csr" not in cell["times"] and cell["winner"] in ("fast", "fft")


@pytest.mark.parametrize(
    "args, message",
    [
        (["matrix", "--weight-shape", "3,2,3,3", "--input-shape", "5,7,7"],
         r"input_shape\[0\]=5 channels do not match"),
        (["matrix", "--weight-shape", "3,x", "--input-shape", "2,7"],
         r"--weight-shape must be comma-separated integers, got '3,x'"),
        (["matrix", "--weight-shape", "3,2,3", "--input-shape", "2,7", "--padding", "1:2:3"],
         r"--padding pairs are before:after, got '1:2:3'"),
        (["matrix", "--weight-shape", "3,2,3", "--input-shape", "2,7", "--save", "W.txt"],
         r"--save must end in .npz or .mtx, got 'W.txt'"),
        (["matrix", "--weight-shape", "3,2,3", "--input-shape", "2,7", "--output-padding", "1"],
         r"--output-padding applies to --transposed"),
        (["matrix", "--weight-shape", "3,2,3", "--input-shape", "2,7", "--stride", "2",
          "--padding", "same"], r"padding='same'"),
        (["bench", "--config", "zz", "--quick"], r"unknown configuration\(s\) \['zz'\]"),
        (["bench", "--weight-shape", "3,2,3"], r"give both --weight-shape and --input-shape"),
        (["crossover", "--channels", "a"], r"--channels must be comma-separated integers"),
        (["bench", "--threads", "0", "--quick"], r"threads must be a positive integer"),
        (["bench", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--config", "a"],
         r"either --config or a geometry"),
        (["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--save", "/no/such/W.npz"],
         r"--save: the folder of '/no/such/W.npz' does not exist"),
        (["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--output-padding", "0,1"],
         r"--output-padding applies to --transposed"),
        (["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--save", "W.mtx",
          "--compress"], r"--compress applies to --save FILE\.npz only"),
        (["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--weight-key", "a"],
         r"--weight-key applies to a torch \.pt/\.pth --weight file only"),
        (["matrix", "--weight", "W.txt", "--input-shape", "1,9"],
         r"--weight must be a \.npy, \.pt or \.pth file, got 'W\.txt'"),
        (["matrix", "--weight", "/no/such/w.npy", "--input-shape", "1,9"],
         r"--weight: '/no/such/w\.npy' does not exist or is not a file"),
        (["matrix", "--weight-shape", "3,3", "--input-shape", "9,9", "--groups", "3"],
         r"single-channel weight .* needs groups=1, got groups=3"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    assert re.search(message, err)


def test_max_bytes_refuses_before_building(capsys):
    assert main(["matrix", "--weight-shape", "8,8,3,3", "--input-shape", "8,64,64",
                 "--max-bytes", "1000"]) == 1
    err = capsys.readouterr().err
    assert "more than max_bytes=1000" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["matrix"], ["bench", "--repeat", "-1"],
                                  ["bench", "--batch", "0"], ["crossover", "--max-nnz", "x"],
                                  ["matrix", "--input-shape", "1,9"],
                                  ["matrix", "--weight-shape", "2,1,3", "--weight", "w.npy",
                                   "--input-shape", "1,9"]])
def test_argparse_errors_exit_2(capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "usage: sparse-tconv" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sparse_tconv", "matrix", "--weight-shape", "2,1,3",
         "--input-shape", "1,9"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    nnz = conv_matrix_nnz((2, 1, 3), (1, 9)).nnz
    assert f"nnz {nnz:,}" in result.stdout


def test_perf_forwards_to_the_benchmark_engine(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["perf", "--config", "zz", "--quick"])
    assert exc.value.code == 2
    assert "unknown configuration(s) ['zz']" in capsys.readouterr().err


def test_bench_distributed_section(tmp_path, capsys):
    pytest.importorskip("distributed")
    js = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--config", "a", "--repeat", "1", "--no-peers",
                 "--distributed", "--json", str(js)]) == 0
    figures = json.loads(js.read_text())["distributed"]
    assert figures["nnz"] == conv_matrix_nnz((16, 16, 3, 3), (16, 32, 32), padding=1).nnz
    # x goes out once and y comes back once per matvec.
    assert figures["sent"] >= 16 * 32 * 32 * 8 and figures["received"] >= 16 * 32 * 32 * 8
    assert "distributed (dask LocalCluster" in capsys.readouterr().out


def test_bench_without_dask_says_so(tmp_path, monkeypatch, capsys):
    import sparse_tconv.tools.compare as compare

    real_import = compare._import
    monkeypatch.setattr(compare, "_import",
                        lambda name: None if name == "distributed" else real_import(name))
    assert main(["bench", "--weight-shape", "2,1,3", "--input-shape", "1,20", "--repeat", "1",
                 "--no-peers"]) == 0
    assert "note: dask not installed" in capsys.readouterr().out
    assert main(["bench", "--quick", "--distributed", "--config", "a", "--repeat", "1",
                 "--no-peers"]) == 2
    assert "--distributed needs dask" in capsys.readouterr().err


@pytest.mark.parametrize("geometry", [
    # (before, after) pairs torch cannot take, and a 4-d convolution it has no function for
    ["--weight-shape", "2,1,3,3", "--input-shape", "1,9,8", "--padding", "0:1,1:2"],
    ["--weight-shape", "1,1,2,2,2,2", "--input-shape", "1,4,4,4,4"],
])
def test_bench_peers_skip_what_they_cannot_compute(tmp_path, geometry):
    torch = pytest.importorskip("torch")  # noqa: F841
    js = tmp_path / "bench.json"
    assert main(["bench", *geometry, "--repeat", "1", "--no-distributed", "--json", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert not any(k.startswith("torch") for k in r["times"]) and r["times"]["fast"] > 0


def test_bench_torch_columns_with_symmetric_pairs(tmp_path):
    pytest.importorskip("torch")
    js = tmp_path / "bench.json"
    assert main(["bench", "--weight-shape", "2,1,3,3", "--input-shape", "1,9,8", "--padding",
                 "1:1,2:2", "--repeat", "1", "--no-distributed", "--json", str(js)]) == 0
    (r,) = json.loads(js.read_text())["results"]
    assert {"torch_f64_1t", "torch_f32_1t"} <= set(r["times"])


def test_user_errors_come_before_optional_imports(capsys, monkeypatch):
    # Without matplotlib, a bad argument is still reported as itself.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["crossover", "--channels", "a"]) == 2
    assert "--channels must be comma-separated integers" in capsys.readouterr().err
    assert main(["crossover", "--quick"]) == 2
    assert "plotting needs matplotlib" in capsys.readouterr().err


def _refuse_to_measure(monkeypatch):
    import sparse_tconv.tools.compare as compare

    def measured(*args, **kwargs):
        raise AssertionError("the benchmark ran before the arguments were checked")

    for name in ("machine_figures", "compare_config", "run_crossover"):
        monkeypatch.setattr(compare, name, measured)


@pytest.mark.parametrize("args, message", [
    (["bench", "--quick", "--json", "/no/such/dir/x.json"],
     r"--json: the folder of '/no/such/dir/x.json' does not exist"),
    (["bench", "--quick", "--plot", "/no/such/dir/x.png"],
     r"--plot: the folder of '/no/such/dir/x.png' does not exist"),
    (["crossover", "--quick", "--json", "/no/such/dir/x.json"],
     r"--json: the folder of '/no/such/dir/x.json' does not exist"),
])
def test_output_paths_are_checked_before_the_run(capsys, monkeypatch, args, message):
    _refuse_to_measure(monkeypatch)
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_perf_checks_its_output_path_first(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["perf", "--quick", "--json", "/no/such/dir/x.json"])
    assert exc.value.code == 2
    assert "--json: the folder of '/no/such/dir/x.json' does not exist" in capsys.readouterr().err


def test_bench_refuses_a_geometry_too_large_for_the_machine(capsys, monkeypatch):
    _refuse_to_measure(monkeypatch)
    args = ["bench", "--weight-shape", "1,1,3", "--input-shape", "1,100000000000"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "more than max_bytes=" in err and "a quarter of this machine's memory" in err
    assert main([*args, "--max-bytes", "1000"]) == 1
    assert "more than max_bytes=1,000 (--max-bytes)" in capsys.readouterr().err


def test_matrix_save_does_not_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "W.npz"
    path.write_bytes(b"precious")
    args = ["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--save", str(path)]
    assert main(args) == 2
    assert f"--save: '{path}' exists; pass --force to overwrite it" in capsys.readouterr().err
    assert path.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0
    saved = sp.load_npz(path)
    weight = np.random.default_rng(0).standard_normal((2, 1, 3))
    np.testing.assert_array_equal(saved.toarray(), conv_matrix(weight, (1, 9)).toarray())


def test_seed_errors_name_the_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["matrix", "--weight-shape", "2,1,3", "--input-shape", "1,9", "--seed", "-1"])
    assert exc.value.code == 2
    assert "argument --seed: must be a non-negative integer, got -1" in capsys.readouterr().err


def test_a_huge_matrix_is_refused_without_allocating_it(capsys):
    # A (1, 10**9) input: 56 GB of matrix, refused on its predicted size.
    import tracemalloc

    args = ["matrix", "--weight-shape", "1,1,3", "--input-shape", "1,1000000000",
            "--max-bytes", "1000"]
    tracemalloc.start()
    try:
        assert main(args) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    captured = capsys.readouterr()
    assert "nnz 2,999,999,994" in captured.out  # predicted first
    assert "more than max_bytes=1000" in captured.err
    assert peak < 1 << 20  # not one array of the size of the output


def test_norms_quick_writes_the_intervals(tmp_path, capsys):
    js = tmp_path / "norms.json"
    assert main(["norms", "--quick", "--config", "circ", "--config", "s2", "--json",
                 str(js)]) == 0
    results = {r["layer"]: r for r in json.loads(js.read_text())["results"]}
    assert set(results) == {"circ", "s2"}
    for r in results.values():  # the interval holds the dense SVD's norm
        assert r["reference_by"] == "dense SVD" and r["contains"]
        assert r["lower"] <= r["reference"] * (1 + 1e-9) <= r["upper"] * (1 + 2e-9)
    assert results["circ"]["gap"] < 1e-9  # circular padding: exact
    assert "svds/b" in capsys.readouterr().out


def test_norms_unknown_layer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["norms", "--quick", "--config", "zz"])
    assert exc.value.code == 2
    assert "unknown configuration(s) ['zz']" in capsys.readouterr().err


def test_solve_quick_writes_its_figures(tmp_path):
    js = tmp_path / "solve.json"
    assert main(["solve", "--quick", "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["results"] and report["exactness"]
    # The exact FFT solve agrees with the dense solve, whatever the machine's speed.
    assert all(row["vs_dense"] <= 1e-8 and row["fft_residual"] <= 1e-12
               for row in report["exactness"])
    assert all(r["residual"] <= 1e-6 or not r["converged"] for r in report["results"])


# --- matrix --weight: a trained layer's weight from a file -----------------------------------


def _matrix_lines(capsys):
    return capsys.readouterr().out.splitlines()


def test_matrix_weight_from_npy_keeps_its_dtype(tmp_path, capsys):
    weight = np.random.default_rng(5).standard_normal((4, 3, 3, 2)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    path = tmp_path / "W.npz"
    assert main(["matrix", "--weight", str(tmp_path / "w.npy"), "--input-shape", "3,8,7",
                 "--stride", "2", "--padding", "0:1,1:0", "--save", str(path)]) == 0
    expected = conv_matrix(weight, (3, 8, 7), stride=2, padding=((0, 1), (1, 0)))
    saved = sp.load_npz(path)
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved.toarray(), expected.toarray())
    op = load_operator(path)
    np.testing.assert_array_equal(op.weight, weight)
    assert op.padding == ((0, 1), (1, 0)) and op.stride == (2, 2)
    lines = _matrix_lines(capsys)
    assert "float32 values" in lines[0]
    assert lines[2] == f"weight:    (4, 3, 3, 2), float32, from {tmp_path / 'w.npy'}"
    # --dtype converts it.
    assert main(["matrix", "--weight", str(tmp_path / "w.npy"), "--input-shape", "3,8,7",
                 "--dtype", "complex128", "--save", str(tmp_path / "Wc.npz")]) == 0
    saved = sp.load_npz(tmp_path / "Wc.npz")
    assert saved.dtype == np.complex128
    np.testing.assert_array_equal(saved.toarray(), conv_matrix(weight.astype(np.complex128),
                                                               (3, 8, 7)).toarray())


def test_matrix_single_channel_weight(tmp_path, capsys):
    kernel = np.arange(9.0).reshape(3, 3)
    np.save(tmp_path / "k.npy", kernel)
    assert main(["matrix", "--weight", str(tmp_path / "k.npy"), "--input-shape", "7,6",
                 "--padding", "1", "--save", str(tmp_path / "K.npz")]) == 0
    expected = conv_matrix(kernel[None, None], (1, 7, 6), padding=1)
    np.testing.assert_array_equal(sp.load_npz(tmp_path / "K.npz").toarray(), expected.toarray())
    assert "input (1, 7, 6) -> output (1, 7, 6), weight (1, 1, 3, 3)" in _matrix_lines(capsys)[1]


def test_matrix_weight_from_torch_files(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv1d(4, 2, 5))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save(model[0].weight.detach().to(torch.bfloat16), tmp_path / "w.pt")
    w0 = model[0].weight.detach().numpy()
    args = ["--input-shape", "3,9,8", "--padding", "1"]
    # A state dict's entry, by its key; and the same in a nested checkpoint.
    for file, key in (("model.pt", "0.weight"), ("ckpt.pth", "state_dict.0.weight")):
        out = tmp_path / f"{file}.npz"
        assert main(["matrix", "--weight", str(tmp_path / file), "--weight-key", key, *args,
                     "--save", str(out)]) == 0
        saved = sp.load_npz(out)
        assert saved.dtype == np.float32
        np.testing.assert_array_equal(saved.toarray(),
                                      conv_matrix(w0, (3, 9, 8), padding=1).toarray())
        x = torch.randn(1, 3, 9, 8)
        np.testing.assert_allclose(saved @ x.numpy().ravel(),
                                   (model[0](x) - model[0].bias[:, None, None]).detach().numpy()
                                   .ravel(), rtol=1e-4, atol=1e-5)
    # A bare tensor, in bfloat16: widened exactly to float32.
    assert main(["matrix", "--weight", str(tmp_path / "w.pt"), *args,
                 "--save", str(tmp_path / "bf.npz")]) == 0
    expected = conv_matrix(model[0].weight.detach().to(torch.bfloat16).float().numpy(),
                           (3, 9, 8), padding=1)
    np.testing.assert_array_equal(sp.load_npz(tmp_path / "bf.npz").toarray(), expected.toarray())
    capsys.readouterr()


@pytest.fixture
def weight_files(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save([torch.ones(3)], tmp_path / "list.pt")
    np.save(tmp_path / "w.npy", np.ones((4, 3, 3, 3)))
    (tmp_path / "fake.pt").write_bytes((tmp_path / "w.npy").read_bytes())
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "short.npy", np.ones((4, 3)))
    np.save(tmp_path / "text.npy", np.array(["a", "b", "c"]))
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--weight", "model.pt"],
     r"--weight '.*model\.pt' holds a state dict: name the entry with --weight-key: "
     r"0\.weight \(4, 3, 3, 3\), 1\.weight \(2, 4, 1, 1\)$"),
    (["--weight", "model.pt", "--weight-key", "2.weight"],
     r"--weight-key '2\.weight' is not in '.*model\.pt'; its candidates: 0\.weight \(4, 3, 3, 3\)"),
    (["--weight", "model.pt", "--weight-key", "0.bias"],
     r"a weight has shape \(out_channels, .*got shape \(4,\)"),
    (["--weight", "list.pt"], r"holds a list, not a tensor or a state dict"),
    (["--weight", "fake.pt"],
     r"torch\.load\(weights_only=True\) cannot read it \(.*\); it reads tensors and state dicts"),
    (["--weight", "obj.npy"], r"--weight '.*obj\.npy': not a numeric \.npy array"),
    (["--weight", "short.npy"], r"got shape \(4, 3\)"),
    (["--weight", "text.npy"], r"a weight must be numeric, got dtype <U1"),
    (["--weight", "w.npy", "--input-shape", "2,9,9"], r"input_shape\[0\]=2 channels do not match"),
])
def test_matrix_weight_file_errors_name_the_option(weight_files, capsys, args, message):
    args = [a if not a.endswith((".pt", ".npy")) else str(weight_files / a) for a in args]
    if "--input-shape" not in args:
        args += ["--input-shape", "3,9,9"]
    assert main(["matrix", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err.strip()), err


def test_matrix_weight_pt_without_torch(tmp_path, capsys, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert main(["matrix", "--weight", str(tmp_path / "w.pt"), "--input-shape", "3,9,9"]) == 2
    assert re.search(r"--weight '.*w\.pt': reading a \.pt/\.pth file needs PyTorch "
                     r"\(pip install 'sparse-tconv\[torch\]'\)", capsys.readouterr().err)


@pytest.mark.parametrize("flags, kind", [([], zipfile.ZIP_STORED),
                                         (["--compress"], zipfile.ZIP_DEFLATED)])
def test_matrix_compress_is_opt_in(tmp_path, capsys, flags, kind):
    path = tmp_path / "W.npz"
    assert main(["matrix", "--weight-shape", "4,2,3,3", "--input-shape", "2,9,9",
                 "--save", str(path), *flags]) == 0
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {kind}
    weight = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    np.testing.assert_array_equal(sp.load_npz(path).toarray(),
                                  conv_matrix(weight, (2, 9, 9)).toarray())
    lines = _matrix_lines(capsys)
    how = "compressed" if flags else "uncompressed"
    assert re.fullmatch(rf"writing:   {re.escape(str(path))} \(.* of arrays, {how}\) \.\.\.",
                        lines[-2])
    assert re.match(rf"saved:     {re.escape(str(path))} \(.*\) in \d+\.\d s, ", lines[-1])


def test_matrix_refuses_max_bytes_before_drawing_the_weight(capsys):
    # the random weight alone would be 720 GB: --max-bytes refuses first
    assert main(["matrix", "--weight-shape", "100000,100000,3,3", "--input-shape",
                 "100000,6,6", "--max-bytes", "1000"]) == 1
    assert "more than max_bytes=1000 (--max-bytes)" in capsys.readouterr().err


@pytest.mark.parametrize("rtol", ["-1", "nan"])
def test_norms_refuses_a_bad_rtol_as_a_usage_error(rtol, capsys):
    from sparse_tconv.tools import norm_bench

    with pytest.raises(SystemExit) as info:
        norm_bench.main(["--quick", "--rtol", rtol])
    assert info.value.code == 2
    assert "--rtol must be non-negative and finite" in capsys.readouterr().err


# -- sparse-tconv norms --model: every convolution of a model -------------------------------


@pytest.fixture
def model_files(tmp_path):
    """A whole module, a convnet state dict (seed 3) and a resnet18-shaped mismatch."""
    torch = pytest.importorskip("torch")
    from sparse_tconv.tools.models import convnet

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="circular"))
    torch.save(model, tmp_path / "whole.pt")
    torch.save(convnet(seed=3).state_dict(), tmp_path / "convnet.pt")
    torch.save([torch.ones(3)], tmp_path / "list.pt")
    (tmp_path / "fake.pt").write_bytes(b"not a torch file")
    return tmp_path, model


def test_norms_model_whole_module(model_files, capsys):
    import math

    path, model = model_files
    js = path / "norms.json"
    assert main(["norms", "--model", str(path / "whole.pt"), "--input-shape", "2,8,8",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert lines[header + 1].split()[:2] == ["1", "0"]
    assert "Conv2d(2->3, 3x3, stride 1, padding 1, zeros) on 2x8x8" in lines[header + 1]
    assert lines[header + 2].split()[:2] == ["2", "3"]
    assert "Conv2d(3->2, 3x3, stride 2, padding 1, circular) on 3x4x4" in lines[header + 2]
    assert "2 convolutions on input 2x8x8" in out
    assert "every convolution certified to rtol 0.01" in out
    figures = json.loads(js.read_text())
    rows = figures["results"]
    assert [r["name"] for r in rows] == ["0", "3"]
    assert [r["input_shape"] for r in rows] == [[2, 8, 8], [3, 4, 4]]
    assert figures["upper_product"] == math.prod(r["upper"] for r in rows)
    assert f"product of the upper bounds: {figures['upper_product']:.6g}" in out
    for r in rows:
        assert r["lower"] <= r["upper"] and r["certified"] and r["gap"] <= 0.01
        assert r["geometry"]["padding_mode"] in ("zeros", "circular")
    assert figures["uncertified"] == [] and figures["convolutions"] == 2


def test_norms_model_state_dict_with_arch(model_files, capsys):
    from sparse_tconv.spectral import model_norm_bounds
    from sparse_tconv.tools.models import convnet

    path, _ = model_files
    js = path / "norms.json"
    assert main(["norms", "--model", str(path / "convnet.pt"), "--arch", "convnet",
                 "--input-shape", "3,4,4", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["results"]
    expected = model_norm_bounds(convnet(seed=3), (3, 4, 4))  # the file's weights, not seed 0
    assert [(r["name"], r["lower"], r["upper"]) for r in rows] == [
        (e.name, e.lower, e.upper) for e in expected]
    assert "(state dict, convnet)" in capsys.readouterr().out


def test_norms_model_builtin_and_uncertified_rows(capsys):
    pytest.importorskip("torch")
    assert main(["norms", "--model", "convnet", "--seed", "1", "--input-shape", "3,4,4",
                 "--rtol", "0"]) == 0  # it ran: exit 0 even with rows not certified
    out = capsys.readouterr().out
    assert "convnet (random weights, seed 1)" in out
    assert "* not certified to rtol 0 (5 of 5" in out
    assert re.search(r"^  #1 conv1: the interval \[", out, flags=re.MULTILINE)
    table = out.split("\n\n")[1].splitlines()
    assert all(line.endswith("*") for line in table[1:])


@pytest.mark.parametrize("args, message", [
    (["--model", "convnet"], r"--model needs --input-shape C,H,W"),
    (["--input-shape", "3,8,8"], r"--input-shape is for --model"),
    (["--arch", "convnet"], r"--arch is for --model"),
    (["--seed", "2", "--quick"], r"--seed is for --model"),
    (["--model", "convnet", "--input-shape", "3,x,8"],
     r"--input-shape must be comma-separated integers"),
    (["--model", "convnet", "--input-shape", "3,0,8"], r"--input-shape must hold positive"),
    (["--model", "convnet", "--input-shape", "3,8,8", "--quick"],
     r"--quick is for the built-in layers; it does not apply with --model"),
    (["--model", "convnet", "--input-shape", "3,8,8", "--rtol", "-1"],
     r"--rtol must be non-negative"),
    (["--model", "convnet", "--input-shape", "3,8,8", "--seed", "-1"],
     r"--seed: must be a non-negative integer"),
    (["--model", "nonesuch", "--input-shape", "3,8,8"],
     r"--model 'nonesuch' is neither a file nor a built-in architecture \(resnet18, convnet\)"),
    (["--model", "convnet", "--input-shape", "3,8,8", "--arch", "convnet"],
     r"--arch names the architecture of a state dict file"),
    (["--model", "convnet.pt", "--input-shape", "3,8,8", "--arch", "vgg"],
     r"--arch must be one of resnet18, convnet, got 'vgg'"),
    (["--model", "convnet.pt", "--input-shape", "3,8,8"],
     r"holds a dict \(a state dict\?\), not a model: name its architecture with --arch"),
    (["--model", "convnet.pt", "--input-shape", "3,8,8", "--arch", "resnet18"],
     r"is not a state dict of --arch resnet18: Error\(s\) in loading state_dict"),
    (["--model", "convnet.pt", "--input-shape", "3,8,8", "--seed", "1"],
     r"--seed is for a built-in architecture's random weights"),
    (["--model", "whole.pt", "--input-shape", "2,8,8", "--arch", "convnet"],
     r"torch\.load\(weights_only=True\) cannot read it as a state dict"),
    (["--model", "list.pt", "--input-shape", "2,8,8"], r"holds a list, not a torch\.nn\.Module"),
    (["--model", "list.pt", "--input-shape", "2,8,8", "--arch", "convnet"],
     r"the file must hold a state dict \(parameter names to tensors\), got a list"),
    (["--model", "fake.pt", "--input-shape", "2,8,8"], r"torch\.load cannot read it"),
    (["--model", "whole.pt", "--input-shape", "3,8,8"],
     r"on --input-shape 3,8,8: the model's forward pass failed on zeros of shape \(1, 3, 8, 8\)"),
])
def test_norms_model_argument_errors_exit_2(model_files, capsys, args, message):
    from sparse_tconv.tools import norm_bench

    path, _ = model_files
    args = [str(path / a) if a.endswith(".pt") else a for a in args]
    with pytest.raises(SystemExit) as info:
        norm_bench.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sparse-tconv norms" in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("model", ["convnet", "whole.pt"])
def test_norms_model_without_torch(tmp_path, capsys, monkeypatch, model):
    from sparse_tconv.tools import norm_bench

    (tmp_path / "whole.pt").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(SystemExit) as info:
        norm_bench.main(["--model", str(tmp_path / model) if model.endswith(".pt") else model,
                         "--input-shape", "3,8,8"])
    assert info.value.code == 2
    assert re.search(r"PyTorch.*pip install '?sparse-tconv\[torch\]", capsys.readouterr().err)
