"""The performance engine (sparse_tconv.tools.perf) runs and records consistent figures
(no timing assertions)."""

import json

import pytest

from sparse_tconv import conv_matrix_nnz
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
