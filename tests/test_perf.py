"""The performance engine (sparse_tconv.tools.perf) runs and records consistent figures
(no timing assertions)."""

import importlib.util
import json

import numpy as np
import pytest

from sparse_tconv import ConvOperator, conv_matrix_nnz
from sparse_tconv.tools import perf


def test_quick_run_writes_all_figures(tmp_path, capsys):
    path = tmp_path / "figures.json"
    assert perf.main(["--quick", "--config", "a", "--config", "g", "--repeat", "1",
                           "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    by_name = {r["config"]: r for r in report["results"]}
    assert set(by_name) == {"a", "g"}
    a = by_name["a"]
    assert a["nnz"] == conv_matrix_nnz((20, 10, 5, 5), (10, 16, 16), stride=3, padding=2).nnz
    for key in ("build_s", "scipy_matvec_s", "matvec_s", "rmatvec_s", "rebuild_s", "bound_s"):
        assert a[key] > 0
    assert {v["figure"] for v in report["targets"]} >= {"build_ns_per_entry", "matvec_speedup"}
    assert "targets:" in capsys.readouterr().out


def test_unknown_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        perf.main(["--quick", "--config", "zz"])
    assert exc.value.code == 2
    assert "unknown configuration(s) ['zz']" in capsys.readouterr().err


def test_quick_run_labels_figures_as_a_smoke_run(tmp_path, capsys):
    path = tmp_path / "figures.json"
    assert perf.main(["--quick", "--config", "d", "--config", "g", "--repeat", "2",
                      "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    out = capsys.readouterr().out
    assert report["targets"] and all(v["verdict"] == perf.SMOKE_VERDICT
                                      for v in report["targets"])
    assert "NOT MET" not in out and perf.SMOKE_VERDICT in out
    by_name = {r["config"]: r for r in report["results"]}
    for r in by_name.values():
        # float32 beside float64, against its own bound; min <= median
        assert r["float32_matvec_s"] > 0 and r["float32_product_bytes"] < r["product_bytes"]
        assert r["float32_speedup"] == pytest.approx(r["matvec_s"] / r["float32_matvec_s"])
        assert r["matvec_s"] <= r["matvec_median_s"]
        # keep_transpose=False: figures, or the reason they are missing
        assert "single_form_memory_ratio" in r or r["skipped"]["single_form"].startswith(
            "skipped: ")
    # A transposed layer is outside sparse_convolution's geometry; without the
    # package, its absence is the reason given first.
    installed = importlib.util.find_spec("sparse_convolution") is not None
    assert by_name["g"]["skipped"]["spconv"] == (
        "skipped: transposed" if installed else "skipped: not installed")
    try:
        import torch  # noqa: F401
    except ImportError:
        assert by_name["d"]["skipped"]["torch_csr"].startswith("skipped: ")
    else:
        d = by_name["d"]  # peer and operator timed in alternating rounds
        assert d["torch_csr_over_matvec"] == pytest.approx(
            d["torch_csr_matvec_s"] / d["torch_csr_paired_matvec_s"])
        g = by_name["g"]  # the structured form's limits: its layer's GEMM over torch's time
        assert g["structured_gemm_s"] > 0 and g["structured_f32_gemm_s"] > 0
        assert g["structured_f32_rmatvec_over_torch_bound"] == pytest.approx(
            g["structured_f32_gemm_s"] / g["torch_f32_adjoint_s"])
        assert "flops as one GEMM per group" in out
    assert "float32 products" in out and "sparse peers on the same matrix" in out


def test_full_run_verdicts_say_met_or_not_met():
    # verdicts compare each figure with its target; a smoke run replaces them all
    results = [dict(config="c", float32_speedup=1.7, float32_speedup_bound=2.0),
               dict(config="b", float32_speedup=1.2, float32_speedup_bound=1.1)]
    full = {v["config"]: v for v in perf._verdicts(results)}
    assert full["c"]["verdict"] == "met"
    assert full["b"]["verdict"].startswith("NOT MET: the physical limit here is 1.10")
    assert {v["verdict"] for v in perf._verdicts(results, smoke=True)} == {perf.SMOKE_VERDICT}


def test_single_form_figures_are_skipped_while_unsupported(monkeypatch):
    from sparse_tconv.tools.configs import QUICK_CONFIGS

    monkeypatch.setattr(perf, "single_form_supported", lambda: False)
    config = QUICK_CONFIGS[0]
    weight = config.random_weight()
    x = np.zeros(int(np.prod(config.input_shape)))
    r = perf._single_form_figures(config, weight, x, x, threads=1, repeat=1)
    assert r == {"skipped": {"single_form": "skipped: ConvOperator has no keep_transpose option"}}


def test_layer_gemm_restores_the_blas_threads():
    from sparse_tconv import _blas
    from sparse_tconv.tools import timing

    geometry = ConvOperator(np.ones((4, 2, 3, 3)), (2, 8, 8), padding=1).convolution.geometry
    before = [get() for get, _ in _blas._find_controls()]
    assert timing.measure_layer_gemm(geometry, np.float32, 1) > 0
    assert [get() for get, _ in _blas._find_controls()] == before
