"""``sparse-tconv bench``: the sparse-product peers compute what W computes, skipped
entries are marked, labels are human, the progress line names the step running now
(no timing assertions)."""

import io
import json
import re

import numpy as np
import pytest

from sparse_tconv import conv_matrix, conv_transpose_matrix
from sparse_tconv.tools import compare
from sparse_tconv.tools.cli import main
from sparse_tconv.tools.configs import Config
from sparse_tconv.tools.timing import Timing, paired_stats, time_stats

# --- the peers compute the same products as W ------------------------------------------------


def _matrix_and_vectors(config, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(config.weight_shape)
    W = config.build(weight)
    return weight, W, rng.standard_normal(W.shape[1]), rng.standard_normal(W.shape[0])


@pytest.mark.parametrize("config", [
    Config("2d", "", (3, 2, 3, 3), (2, 7, 6), dict(padding=1, stride=2)),
    Config("t", "", (2, 3, 4, 4), (2, 5, 5), dict(stride=2, padding=1), transposed=True),
    Config("1d", "", (1, 1, 5), (1, 30), dict(padding=2)),
])
def test_torch_csr_products_equal_w_and_its_transpose(config):
    torch = pytest.importorskip("torch")
    weight, W, x, y = _matrix_and_vectors(config)
    dense = W.toarray()  # the oracle: dense linear algebra on the same matrix
    forward, backward, build_s = compare.torch_csr_products(torch, W)
    np.testing.assert_allclose(forward(x).numpy(), dense @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backward(y).numpy(), dense.T @ y, rtol=1e-12, atol=1e-12)
    assert build_s >= 0
    np.testing.assert_array_equal(W.toarray(), dense)  # the tensors share W's arrays: untouched


# (geometry, the sparse_convolution mode it must map to)
_SPCONV_CASES = [
    (Config("valid", "", (1, 1, 3, 4), (1, 9, 8), dict(padding=0)), "valid"),
    (Config("full", "", (1, 1, 3, 4), (1, 9, 8), dict(padding=((2, 2), (3, 3)))), "full"),
    (Config("same", "", (1, 1, 5, 5), (1, 12, 10), dict(padding=2)), "same"),
    (Config("same-str", "", (1, 1, 3, 3), (1, 8, 8), dict(padding="same")), "same"),
    (Config("1d", "", (1, 1, 7), (1, 40), dict(padding=3)), "same"),
    (Config("1d-full", "", (1, 1, 7), (1, 40), dict(padding=6)), "full"),
]


@pytest.mark.parametrize("config, mode", _SPCONV_CASES, ids=[c.name for c, _ in _SPCONV_CASES])
def test_sparse_convolution_peer_equals_w_at_x(config, mode):
    spconv = pytest.importorskip("sparse_convolution")
    weight, W, x, _ = _matrix_and_vectors(config, seed=1)
    op = config.operator(weight)
    peer = compare.spconv_peer(spconv, config, weight, op, x)
    assert not isinstance(peer, str), peer
    found, build, apply = peer
    assert found == mode
    # the oracle: conv_matrix's W @ x (PyTorch's semantics, checked elsewhere against torch)
    np.testing.assert_allclose(np.asarray(apply()).ravel(), W @ x, rtol=1e-10, atol=1e-10)
    # a fresh build applied to the image (a 1-D signal as one row) gives the same
    image = config.input_shape[1:] if len(config.input_shape) == 3 else (1, *config.input_shape[1:])
    np.testing.assert_allclose(np.asarray(build()(x.reshape(image), batching=False)).ravel(),
                               W @ x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config, why", [
    (Config("3d", "", (1, 1, 3, 3, 3), (1, 5, 5, 5), dict(padding=1)), "3-D"),
    (Config("ch", "", (4, 2, 3, 3), (2, 8, 8), dict(padding=1)), "2->4 ch"),
    (Config("s2", "", (1, 1, 3, 3), (1, 8, 8), dict(stride=2)), "stride"),
    (Config("dil", "", (1, 1, 3, 3), (1, 9, 9), dict(dilation=2)), "dilation"),
    (Config("t", "", (1, 1, 3, 3), (1, 6, 6), {}, transposed=True), "transposed"),
    (Config("mode", "", (1, 1, 3, 3), (1, 8, 8), dict(padding=1, padding_mode="circular")),
     "padding mode"),
    # PyTorch's 'same' for an even kernel pads one more after; scipy's one more before
    (Config("even", "", (1, 1, 4, 4), (1, 9, 9), dict(padding="same")), "no mode fits"),
    (Config("lop", "", (1, 1, 3, 3), (1, 9, 9), dict(padding=((0, 2), (1, 1)))), "no mode fits"),
])
def test_sparse_convolution_skips_what_it_cannot_compute(config, why):
    spconv = pytest.importorskip("sparse_convolution")
    mode = compare.spconv_mode(spconv, config)
    assert mode.startswith("skipped: ") and why in mode


def test_even_kernel_same_really_differs_from_scipy_same():
    # the skip above is not a gap of the mapping: the two 'same' conventions differ here
    spconv = pytest.importorskip("sparse_convolution")
    rng = np.random.default_rng(2)
    w, x = rng.standard_normal((1, 1, 4, 4)), rng.standard_normal((9, 9))
    ours = conv_matrix(w, (1, 9, 9), padding="same") @ x.ravel()
    theirs = spconv.Toeplitz_convolution2d((9, 9), w[0, 0, ::-1, ::-1].copy(), mode="same",
                                           method="precomputed")(x, batching=False)
    assert theirs.size == ours.size and not np.allclose(theirs.ravel(), ours)


# --- one configuration through compare_config -------------------------------------------------

class _Recorder:
    """A Progress stand-in that remembers what was running when each timing started."""

    def __init__(self):
        self.running = None
        self.events = []

    def begin(self, label):
        self.running = label
        self.events.append(("begin", label))

    update = begin

    def end(self, result=""):
        self.events.append(("end", self.running))
        self.running = None


def _fast_timing(monkeypatch, recorder, seen):
    """Replace the timers by one call each, noting what was running at that moment."""
    def fake(func, repeat, min_time=0.05):
        seen.append(recorder.running)
        func()
        return Timing(1e-3, 2e-3, 3e-3, repeat)

    monkeypatch.setattr(compare, "_time", fake)
    monkeypatch.setattr(compare, "_paired", lambda funcs, repeat, min_time=0.05: [
        fake(f, repeat, min_time) for f in funcs])


_SMALL_2D = Config("s", "small 2-D", (1, 1, 3, 3), (1, 12, 12), dict(padding=1), batch=2)
_SMALL_3D = Config("v", "small 3-D", (1, 1, 3, 3, 3), (1, 6, 6, 6), dict(padding=1), batch=2)


def test_the_progress_names_the_step_that_runs(monkeypatch):
    recorder, seen = _Recorder(), []
    _fast_timing(monkeypatch, recorder, seen)
    peers, _ = compare.available_peers()
    r = compare.compare_config(_SMALL_2D, threads=1, bandwidth=1e10, repeat=1, peers=peers,
                               progress=recorder)
    # every timing ran while a step was running, and the steps came in the order of the work
    assert None not in seen
    steps = list(dict.fromkeys(seen))
    expected = ["operator", "direct kernels"]
    if "csr_torch" in r["times"]:
        expected += ["torch.sparse_csr"]
    if "spconv" in r["times"]:
        expected += ["sparse_convolution"]
    if "torch_f64_1t" in r["times"]:
        expected += ["torch.nn.functional"]
    assert len(steps) == len(expected)
    assert all(word in step for word, step in zip(expected, steps)), steps
    begins = [e for e in recorder.events if e[0] == "begin"]
    assert begins[0][1].startswith("(s) operator")
    assert sum(e[0] == "end" for e in recorder.events) == 3  # cli.py counts 3 per configuration


def test_progress_line_shows_the_running_step_and_the_clock():
    ticks = iter([100.0, 100.0, 103.0, 107.0, 110.0, 200.0])
    stream = io.StringIO()
    progress = compare.Progress(2, stream=stream, clock=lambda: next(ticks))
    progress.begin("(a) operator")
    progress.end()
    progress.begin("(a) direct kernels")
    progress.update("(a) direct kernels: fft")
    progress.end()
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("running: (a) operator") and "0/2 done" in lines[0]
    assert " 0 s" in lines[0]
    assert lines[1].endswith("running: (a) direct kernels") and "1/2 done" in lines[1]
    assert "7 s" in lines[2] and lines[2].endswith("running: (a) direct kernels: fft")
    assert "2/2 done" in lines[3] and "done: (a) direct kernels: fft" in lines[3]


def test_missing_peers_are_named_once_not_per_configuration(monkeypatch):
    # nothing installed: the peers' columns are left out, and one note names each library
    _fast_timing(monkeypatch, _Recorder(), [])
    results = [compare.compare_config(c, threads=1, bandwidth=1e10, repeat=1, peers={})
               for c in (_SMALL_2D, _SMALL_3D)]
    _, notes = _available_with(monkeypatch, installed=())
    machine = dict(date="d", threads=1, bandwidth_all=1e10, bandwidth_1=1e10)
    text = compare.format_comparison(results, machine, notes)
    assert "skipped: not installed" not in text and "not installed" not in text.split("note:")[0]
    peer_table = text.split("Sparse products on the same matrix")[1].split("\n\n")[0]
    header = peer_table.splitlines()[1]
    assert "scipy 1t W@x" in header and "torch" not in header and "spconv" not in header
    direct_header = text.split("direct kernels and peers")[1].splitlines()[1]
    assert "torch" not in direct_header and "PyLops" not in direct_header
    for library in ("torch", "pylops", "sparse_convolution"):
        assert text.count(f"note: {library} not installed") == 1
    assert "pip install torch==2.13.0" in text  # the README's pin, not a plain torch
    for r in results:
        assert sorted(r["not_installed"]) == ["pylops", "sparse_convolution", "torch"]
        assert not any(k.startswith(("torch", "csr_torch", "spconv", "pylops"))
                       for k in [*r["times"], *r["skipped"]])
    assert compare.missing_peers(results) == ["PyTorch", "PyLops", "sparse_convolution"]
    assert "torch" not in compare.markdown_table(results)


def _available_with(monkeypatch, installed):
    """available_peers() as if only the libraries in ``installed`` could be imported."""
    real = compare._import
    monkeypatch.setattr(compare, "_import", lambda name: real(name) if name in installed else None)
    return compare.available_peers()


def test_sparse_convolution_skip_names_the_geometry(monkeypatch):
    pytest.importorskip("sparse_convolution")
    _fast_timing(monkeypatch, _Recorder(), [])
    peers, _ = compare.available_peers()
    r = compare.compare_config(_SMALL_3D, threads=1, bandwidth=1e10, repeat=1, peers=peers)
    assert r["skipped"]["spconv"] == "skipped: 3-D" and "spconv" not in r["times"]


# --- labels ----------------------------------------------------------------------------------

def test_labels_are_human_and_tables_show_no_internal_keys(monkeypatch):
    _fast_timing(monkeypatch, _Recorder(), [])
    peers, notes = compare.available_peers()
    r = compare.compare_config(_SMALL_2D, threads=2, bandwidth=1e10, repeat=1, peers=peers)
    assert compare.label("csr_transpose") == "sparse matrix W.T @ y"
    assert compare.label("torch_f32_2t") == "torch conv f32, 2 threads"
    assert compare.label("csr_torch", 2).endswith("2 threads")
    machine = dict(date="d", threads=2, bandwidth_all=1e10, bandwidth_1=1e10)
    text = compare.format_comparison([r], machine, notes)
    for key in [*r["times"], *r["skipped"]]:
        assert compare.label(key) != key
        if "_" in key:
            assert not re.search(rf"(?<![\w.]){key}(?!\w)", text), key


def test_plot_has_human_legends_and_hatched_skipped_bars(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    # sparse_convolution skips the 3-D layer (a hatched bar); torch and PyLops are missing
    spconv = pytest.importorskip("sparse_convolution")
    _fast_timing(monkeypatch, _Recorder(), [])
    results = [compare.compare_config(c, threads=1, bandwidth=1e10, repeat=1,
                                      peers={"sparse_convolution": spconv})
               for c in (_SMALL_2D, _SMALL_3D)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    compare.plot_comparison(results, tmp_path / "b.png")
    (fig,) = figures
    legends = [t.get_text() for ax in fig.axes if ax.get_legend()
               for t in ax.get_legend().get_texts()]
    assert "sparse matrix W.T @ y (over its W @ x)" in legends
    assert "scipy CSR W @ x, 1 thread" in legends
    keys = {k for r in results for k in [*r["times"], *r["skipped"]] if "_" in k}
    assert not any(re.search(rf"(?<![\w.]){k}(?!\w)", t) for k in keys for t in legends)
    # the missing libraries: one legend entry, no bar
    missing = [t for t in legends if t.startswith("not installed")]
    assert missing == ["not installed, left out: PyTorch, PyLops"]
    skipped = sum(len(r["skipped"]) for r in results)
    hatched = [p for ax in fig.axes for p in ax.patches if p.get_hatch()]
    assert skipped > 0 and len(hatched) == skipped  # one placeholder per skipped entry
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum(t.startswith("skipped: ") for t in texts) == skipped
    assert not any("not installed" in t for t in texts)
    assert any(t.endswith(" ms") for t in texts)  # absolute times beside the ratios
    plt.close(fig)


# --- timing statistics -----------------------------------------------------------------------

def test_time_stats_orders_its_rounds():
    calls = []
    t = time_stats(lambda: calls.append(1), repeat=4, min_time=0)
    assert t.rounds == 4 and t.min <= t.median <= t.max and t.spread >= 1.0
    assert len(calls) == 2 + 4  # warm-up, the calibration call, one call per round


def test_paired_stats_alternate_their_rounds(monkeypatch):
    from sparse_tconv.tools import timing

    monkeypatch.setattr(timing, "_SETTLE_S", 0)  # one untimed call before each timed one
    calls = []
    a, b = paired_stats([lambda: calls.append("a"), lambda: calls.append("b")], repeat=3,
                        min_time=0)
    # warm-up and calibration, then rounds: settle, timed call
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert a.rounds == b.rounds == 3 and a.min <= a.median <= a.max


def test_paired_stats_settle_each_function_before_timing_it(monkeypatch):
    import time

    from sparse_tconv.tools import timing

    monkeypatch.setattr(timing, "_SETTLE_S", 0.01)
    starts, fast = [], []

    def slow():
        starts.append(time.perf_counter())
        time.sleep(0.002)

    paired_stats([slow, lambda: fast.append(1)], repeat=1, min_time=0)
    # after warm-up and calibration: untimed calls for 10 ms, then the timed one
    # (which starts 10 ms after the first untimed call, less the few us
    # between reading the clock and that call)
    rounds = starts[2:]
    assert len(rounds) >= 2 and rounds[-1] - rounds[0] >= 0.009
    assert len(fast) >= 4  # warm-up, calibration, at least one untimed, the timed


# --- the command -----------------------------------------------------------------------------

def test_bench_quick_reports_min_median_and_spread(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--config", "d", "--config", "g", "--repeat", "2",
                 "--no-distributed", "--json", str(js), "--plot", str(png)]) == 0
    report = json.loads(js.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in report["results"]:
        for t in r["timing"].values():
            assert t["min"] <= t["median"] <= t["max"]
        assert set(r["times"]).isdisjoint(r["skipped"])
    g = {r["config"]: r for r in report["results"]}["g"]
    assert g["skipped"]["spconv"] == "skipped: transposed"
    out = capsys.readouterr().out
    assert "spread (median / min over 2 round(s)" in out
    assert "Sparse products on the same matrix" in out


def test_transposed_config_peers_multiply_its_own_matrix():
    # for a transposed configuration W is conv_transpose_matrix: the peers get that one
    torch = pytest.importorskip("torch")
    config = Config("t", "", (2, 3, 4, 4), (2, 5, 5), dict(stride=2, padding=1), transposed=True)
    weight, W, x, y = _matrix_and_vectors(config)
    expected = conv_transpose_matrix(weight, (2, 5, 5), stride=2, padding=1)
    forward, _, _ = compare.torch_csr_products(torch, W)
    np.testing.assert_allclose(forward(x).numpy(), expected @ x, rtol=1e-12, atol=1e-12)
