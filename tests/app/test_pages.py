"""The Streamlit app, driven headless with ``streamlit.testing.v1.AppTest`` (no server, no browser)."""
from __future__ import annotations

import io
import json

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import core.services.session_context
from core.common.formatting import fmt_bytes
from core.services.choices import load_choice, model_choices
from core.services.uploads import BUNDLE_FORMAT, export_bundle, settings_json
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.session import ExploreSession
from core.workloads.models import state_dict_digest as weights_fingerprint
from core.workloads.models import build
from core.services.teaching import worked_example
from tests.app.apptest_tools import no_errors, start
from tests.app.tune_tools import run_jobs



pytestmark = pytest.mark.usefixtures("fresh_caches")


def metric(at: AppTest, prefix: str):
    found = [m for m in at.metric if m.label.startswith(prefix)]
    assert found, f"no metric starting with {prefix!r}: {[m.label for m in at.metric]}"
    return found[0]


def percent(text: str) -> float:
    return float(text.replace("%", "").split("±")[0].strip())


def count(text: str) -> int:
    return int(text.replace(",", ""))


def histogram_spec(at: AppTest) -> dict:
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if "beta" in (spec["layout"].get("meta") or {}):
            return spec
    raise AssertionError("no histogram on the page")


def explorer(at: AppTest) -> ExploreSession:
    return at.session_state["explorer"]


# ---------------------------------------------------------------- every page

PAGES = [("pages/explore.py", "Explore"), ("pages/tune.py", "Tune"), ("pages/benchmark.py", "Benchmark"),
         ("pages/learn.py", "Learn"), ("pages/export.py", "Export")]


def test_every_page_renders():
    at = start()
    no_errors(at)
    for page, title in PAGES + PAGES[:1]:  # and back to Explore
        at.switch_page(page).run()
        no_errors(at)
        assert at.title and at.title[0].value.startswith(title), page
        assert at.sidebar.selectbox(key="model_key").value == model_choices()[0].key, page
        assert "Server-side update time" in at.main.caption[-1].value, page


# ---------------------------------------------------------------- Explore

def test_tau_moves_retention_and_histogram_beta():
    at = start(tau=0.1)
    no_errors(at)
    session = explorer(at)
    layer = at.selectbox(key="hist_layer").value
    low_tau = percent(metric(at, "Retention").value)
    beta_low = histogram_spec(at)["layout"]["meta"]["beta"]
    at.slider(key="tau").set_value(0.5).run()
    no_errors(at)
    assert at.slider(key="tau").value == 0.5
    high_tau = percent(metric(at, "Retention").value)
    spec = histogram_spec(at)
    beta_high = spec["layout"]["meta"]["beta"]
    assert high_tau < low_tau
    assert beta_high > beta_low
    assert beta_high == pytest.approx(0.5 * session.engine.max_abs(layer), rel=1e-6)
    lines = sorted(shape["x0"] for shape in spec["layout"]["shapes"])
    assert any(x == pytest.approx(beta_high) for x in lines) and any(x == pytest.approx(-beta_high) for x in lines)
    # the retention shown is the engine's, which follows the formula |W| ≥ τ·max|W|
    kept = sum(int((w.abs() >= w.abs().max() * 0.5).sum()) for w in map(session.engine.original_weight,
                                                                          session.engine.layer_names))
    total = sum(session.engine.original_weight(n).numel() for n in session.engine.layer_names)
    assert high_tau == pytest.approx(100 * kept / total, abs=0.05)
    assert "Server-side update time" in at.main.caption[-1].value


def test_theta_moves_n_high_and_counts_switches():
    at = start(tau=0.2, quantize=True, theta_mode="relative", theta_relative=0.2)
    no_errors(at)
    n_high_before = count(metric(at, "High-precision weights").value)
    at.slider(key="theta_relative").set_value(0.6).run()
    no_errors(at)
    n_high_after = count(metric(at, "High-precision weights").value)
    switches = count(metric(at, "Chunk switches").value)
    engine = explorer(at).engine
    expected = 0
    for name in engine.layer_names:
        magnitude = engine.original_weight(name).abs()
        top = magnitude.max()
        expected += int(((magnitude >= top * 0.2) & (magnitude >= top * 0.2) & (magnitude < top * 0.6)).sum())
    assert n_high_after < n_high_before
    assert switches == n_high_before - n_high_after == expected > 0
    # switching quantization off hides n_high
    at.toggle(key="quantize").set_value(False).run()
    no_errors(at)
    assert metric(at, "High-precision weights").value == "–"


def test_per_layer_tau_override():
    at = start(tau=0.1)
    session = explorer(at)
    layer = at.selectbox(key="hist_layer").value
    before = percent(metric(at, "Retention").value)
    (editor,) = at.data_editor
    row = session.layer_names().index(layer)
    at.session_state[editor.key] = {"edited_rows": {row: {"τ override": 0.9}}, "added_rows": [], "deleted_rows": []}
    at.run()
    no_errors(at)
    assert at.session_state["layer_tau"] == {layer: 0.9}
    assert histogram_spec(at)["layout"]["meta"]["beta"] == pytest.approx(0.9 * session.engine.max_abs(layer), rel=1e-6)
    assert percent(metric(at, "Retention").value) < before
    other = next(n for n in session.layer_names() if n != layer)
    at.selectbox(key="hist_layer").set_value(other).run()
    assert histogram_spec(at)["layout"]["meta"]["beta"] == pytest.approx(0.1 * session.engine.max_abs(other), rel=1e-6)


def test_paper_option_prunes_batchnorm_and_is_labelled():
    at = start(tau=0.3)
    labels = [c.label for c in at.checkbox]
    assert any("paper code" in label and "norm" in label for label in labels)
    before = set(explorer(at).engine.layer_names)
    at.checkbox(key="include_norm").check().run()
    no_errors(at)
    layers = at.selectbox(key="hist_layer").options
    norms = set(explorer(at).engine.norm_layer_names)
    assert norms and norms <= set(layers) and before <= set(layers)


def test_bn_recalibration_level_recalibrates_a_copy():
    at = start(tau=0.4)
    session = explorer(at)
    before = weights_fingerprint(session.loaded.model)
    at.selectbox(key="repair").set_value("bn").run()
    no_errors(at)
    assert at.session_state["bn_recal"] is True  # the old toggle's key follows the level (the Export page reads it)
    result = session.apply(session.last_config)
    calibrated = session.repairs.model(result, "bn")
    assert calibrated is not result.model
    assert not torch.equal(calibrated.bn1.running_mean, result.model.bn1.running_mean)  # statistics re-estimated
    for name in session.engine.layer_names:  # weights untouched
        assert torch.equal(calibrated.get_submodule(name).weight, result.model.get_submodule(name).weight)
    assert weights_fingerprint(session.loaded.model) == before
    assert "BN recalibration" in metric(at, "Accuracy Δ vs dense").help


def test_full_accuracy_button_measures_and_caches(monkeypatch):
    from core.measure.accuracy import balanced_subset, eval_data, evaluate

    small = balanced_subset(eval_data("test"), 20, seed=1)  # stands in for the 10,000 images: same code path
    monkeypatch.setattr(core.services.session_context, "eval_data", lambda *args, **kwargs: small)
    at = start(tau=0.3)
    assert metric(at, "Accuracy · full test").value == "not measured"
    at.button(key="full_eval").click().run()
    no_errors(at)
    session = explorer(at)
    expected = evaluate(session.apply(session.last_config).model, small).accuracy
    assert metric(at, "Accuracy · full test").value == f"{100 * expected:.2f} %"
    at.slider(key="tau").set_value(0.5).run()
    assert metric(at, "Accuracy · full test").value == "not measured"  # a new setting, not measured yet
    at.slider(key="tau").set_value(0.3).run()
    assert metric(at, "Accuracy · full test").value == f"{100 * expected:.2f} %"  # cached per setting


def test_realized_savings_button_measures_file_and_paths():
    at = start(tau=0.3, quantize=True, theta_relative=0.1, latency_batch=1)
    assert not [m for m in at.metric if m.label.startswith("Packed file")]  # measured on request only
    at.button(key="measure_realized").click().run()
    no_errors(at)
    session = explorer(at)
    realized = session.measurements.cached_realized(session.last_config, 1, "cpu")
    assert realized is not None and set(realized.paths["path"]) == {"dense", "sparse", "int8", "auto"}
    assert metric(at, "Packed file").value == fmt_bytes(realized.file_bytes)
    assert f"{realized.times_smaller:.1f}× smaller" in metric(at, "Packed file").delta
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "") for c in at.get("plotly_chart")]
    assert any(t.startswith("Measured latency per path") for t in titles), titles
    at.slider(key="tau").set_value(0.5).run()
    assert not [m for m in at.metric if m.label.startswith("Packed file")]  # a new setting: not measured yet


def test_synthetic_mlp_shows_output_deviation():
    at = start(model_key="synthetic:mlp", tau=0.2)
    no_errors(at)
    assert at.session_state["explorer"].key == "synthetic:mlp"
    first = float(metric(at, "Output deviation").value.rstrip(" %"))
    at.slider(key="tau").set_value(0.6).run()
    assert float(metric(at, "Output deviation").value.rstrip(" %")) > first > 0


def test_core_error_shows_st_error_not_traceback(monkeypatch):
    def broken(self, request):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ExploreSession, "update", broken)
    at = start()
    assert not at.exception
    assert any("simulated failure" in e.value for e in at.error)


def test_missing_cifar_data_is_a_note_not_an_error(monkeypatch, tmp_path):
    import core.measure.accuracy

    monkeypatch.setenv("BOUNDARY_CIFAR10_DIR", str(tmp_path))  # an empty folder: no archives
    core.measure.accuracy._eval_data.cache_clear()
    try:
        at = start()
        assert not at.exception and not at.error
        assert any("CIFAR-10 accuracy unavailable" in i.value and str(tmp_path) in i.value for i in at.info)
        assert percent(metric(at, "Retention").value) > 0  # everything else still works
        assert not [b for b in at.button if b.key == "full_eval"]  # nothing offered that cannot run
        at.slider(key="tau").set_value(0.4).run()
        assert not at.exception and not at.error
    finally:
        core.measure.accuracy._eval_data.cache_clear()


def test_two_sessions_stay_independent():
    first = start(tau=0.1)
    second = start(tau=0.6)
    no_errors(first)
    no_errors(second)
    assert explorer(first) is not explorer(second)
    # both share the one cached model object (read-only) ...
    assert explorer(first).loaded.model is explorer(second).loaded.model
    r1, r2 = percent(metric(first, "Retention").value), percent(metric(second, "Retention").value)
    assert r1 > r2
    second.slider(key="tau").set_value(0.8).run()
    first.run()
    # ... but neither sees the other's setting or result
    assert first.slider(key="tau").value == 0.1
    assert percent(metric(first, "Retention").value) == r1
    assert percent(metric(second, "Retention").value) < r2


def test_cached_model_is_never_modified():
    at = start(tau=0.2)
    model = explorer(at).loaded.model
    before = weights_fingerprint(model)
    for tau in (0.05, 0.3, 0.7, 0.95):
        at.slider(key="tau").set_value(tau).run()
    at.slider(key="theta_relative").set_value(0.9).run()
    at.select_slider(key="b_low").set_value(2).run()
    at.checkbox(key="include_norm").check().run()
    at.toggle(key="quantize").set_value(False).run()
    no_errors(at)
    assert explorer(at).loaded.model is model
    assert weights_fingerprint(model) == before
    assert weights_fingerprint(load_choice(explorer(at).key).model) == before  # as on disk / as built


def test_bad_bits_order_is_swapped_with_a_note():
    at = start(b_low=8, b_high=2)
    assert not at.exception
    assert any("swapped" in w.value for w in at.warning)


# ---------------------------------------------------------------- uploads and export

def test_bad_upload_shows_an_error_and_keeps_the_model():
    at = start()
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    at.sidebar.selectbox(key="upload_arch").set_value("resnet20").run()
    at.sidebar.file_uploader(key="upload_file").set_value(("broken.pt", b"this is not a checkpoint",
                                                           "application/octet-stream")).run()
    assert not at.exception
    errors = [e.value for e in at.sidebar.error]
    assert errors and "Upload rejected" in errors[0] and "broken.pt" in errors[0]
    assert "uploaded_model" not in at.session_state
    notes = [i.value for i in at.sidebar.info]
    assert any(n.startswith("No file loaded") for n in notes) and not any("Nothing uploaded yet" in n for n in notes)
    assert at.title[0].value == "Explore"  # the page still works with the default model


def test_upload_of_an_export_loads_back():
    loaded = load_choice(model_choices()[0].key)
    result = Engine(loaded.model).apply(CompressionConfig(tau=0.3, theta=0.4, b_low=2, b_high=8))
    data = export_bundle(result, loaded)
    at = start()
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    at.sidebar.file_uploader(key="upload_file").set_value(("export.pt", data, "application/octet-stream")).run()
    no_errors(at)
    session = explorer(at)
    assert session.key.startswith("upload:") and session.loaded.arch == loaded.arch
    for name in session.engine.layer_names:
        assert torch.equal(session.engine.original_weight(name), result.weights[name])


def test_export_page_and_settings_roundtrip():
    at = start(tau=0.35, theta_relative=0.45, b_low=3, b_high=8)
    at.switch_page("pages/export.py").run()
    no_errors(at)
    labels = [b.label for b in at.get("download_button")] if at.get("download_button") else []
    assert any("Download model" in label for label in labels) and any("settings" in label for label in labels)
    loaded = explorer(at).loaded
    config = CompressionConfig(tau=0.35, theta=0.45, b_low=3, b_high=8)
    text = settings_json(config, loaded)
    assert CompressionConfig.from_dict(json.loads(text)) == config
    bundle = torch.load(io.BytesIO(export_bundle(explorer(at).apply(config), loaded)), weights_only=True)
    assert bundle["format"] == BUNDLE_FORMAT and bundle["arch"] == loaded.arch
    assert set(bundle["masks"]) == {f"{n}.weight" for n in explorer(at).engine.layer_names}
    # a settings file sets the sliders; a foreign one is an error
    other = settings_json(CompressionConfig(tau=0.55, theta=0.25, theta_mode="fraction", b_low=2, b_high=4), loaded)
    at.file_uploader(key="settings_file").set_value(("s.json", other.encode(), "application/json")).run()
    at.button(key="apply_settings").click().run()
    no_errors(at)
    assert (at.session_state["tau"], at.session_state["theta_mode"], at.session_state["theta_fraction"],
            at.session_state["b_low"], at.session_state["b_high"]) == (0.55, "fraction", 0.25, 2, 4)
    at.file_uploader(key="settings_file").set_value(("bad.json", b'{"tau": 7}', "application/json")).run()
    at.button(key="apply_settings").click().run()
    assert not at.exception and any("not a settings file" in e.value for e in at.error)
    assert at.session_state["tau"] == 0.55
    # the packed file: its measured size is shown, and it loads back bit for bit through the upload path
    at.session_state["tau"], at.session_state["theta_mode"] = 0.35, "relative"
    at.session_state["b_low"], at.session_state["b_high"] = 3, 8
    at.run()
    at.button(key="pack_model").click().run()
    no_errors(at)
    (packed,) = at.session_state["_packed"].values()
    assert metric(at, "File size").value == fmt_bytes(len(packed))
    expected = explorer(at).apply(config).weights
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    at.sidebar.file_uploader(key="upload_file").set_value(("m.safetensors", packed, "application/octet-stream")).run()
    no_errors(at)
    assert explorer(at).key.startswith("upload:")
    for name, weight in expected.items():
        if name in explorer(at).engine.layer_names:
            assert torch.equal(explorer(at).engine.original_weight(name), weight)


# ---------------------------------------------------------------- Tune, Benchmark, Learn

def test_tune_sweep_answers_and_applies_tau(tmp_path, monkeypatch):
    monkeypatch.setenv("BOUNDARY_CACHE_DIR", str(tmp_path))  # a fresh sweep cache
    at = start(tau=0.05)
    at.switch_page("pages/tune.py").run()
    at.slider(key="tune_tau_max").set_value(0.3).run()
    at.slider(key="tune_steps").set_value(3).run()
    at.toggle(key="tune_bn").set_value(False).run()
    at.toggle(key="tune_quant").set_value(False).run()  # pruning only (the app starts on 4/8-bit weights)
    run_jobs(at.button(key="tune_run").click().run())
    no_errors(at)
    frame = at.session_state["tune_frame"]
    assert set(frame["method"]) == {"dense", "boundary", "global_magnitude"}
    assert sorted(frame.loc[frame["method"] == "boundary", "tau"]) == [0.0, 0.15, 0.3]
    assert len(at.get("plotly_chart")) >= 3
    at.number_input(key="tune_points").set_value(100.0).run()  # every τ is within 100 points
    assert any("τ = 0.3 no repair" in m.value for m in at.markdown)
    at.button(key="tune_apply_none").click().run()
    assert at.session_state["tau"] == 0.3 and at.session_state["quantize"] is False


def test_benchmark_page_runs_the_synthetic_benchmark():
    at = start()
    at.switch_page("pages/benchmark.py").run()
    at.button(key="bench_syn_run").click().run()
    no_errors(at)
    df = at.session_state["bench_syn"]
    assert len(df) == 5 and df["retention"].between(0, 1).all()
    tables = at.dataframe
    assert any("paper (quoted)" in t.value.columns for t in tables)


def test_learn_example_follows_tau_and_theta():
    at = start()
    at.switch_page("pages/learn.py").run()
    no_errors(at)
    assert len(at.latex) >= 3 and len(at.code) >= 2
    at.slider(key="learn_tau").set_value(0.5).run()
    example = worked_example(0.5, 0.6, 2, 4)
    assert any(f"β = τ·max|W| = {example.beta:.3f}" in m.value for m in at.markdown)
    assert any(f"kept {int(example.keep.sum())} of 64" in m.value for m in at.markdown)


# ---------------------------------------------------------------- the model picker

def _ship(folder, arch: str = "resnet20") -> dict:
    """A checkpoint + card in ``folder``, as core.train writes them (untrained weights, seed 0)."""
    from core.workloads.models import sha256_file

    torch.manual_seed(0)
    path = folder / f"{arch}.pt"
    torch.save(build(arch).state_dict(), path)
    card = {"arch": arch, "file": path.name, "sha256": sha256_file(path), "mean": [0.4914, 0.4822, 0.4465],
            "std": [0.2470, 0.2435, 0.2616], "test_accuracy": 0.5, "test_set": "a test card"}
    (folder / f"{arch}.json").write_text(json.dumps(card))
    return card


def test_shipped_checkpoint_is_the_default_and_a_damaged_one_is_an_error(monkeypatch, tmp_path):
    import core.workloads.models

    monkeypatch.setattr(core.workloads.models, "CHECKPOINT_DIR", tmp_path)
    _ship(tmp_path)
    at = start()
    no_errors(at)
    assert at.sidebar.selectbox(key="model_key").value == "pretrained:resnet20"
    session = explorer(at)
    assert session.loaded.trained and "50.00 %" in session.loaded.note
    reference = build("resnet20")
    reference.load_state_dict(torch.load(tmp_path / "resnet20.pt", weights_only=True))
    assert weights_fingerprint(session.loaded.model) == weights_fingerprint(reference.eval())
    with open(tmp_path / "resnet20.pt", "ab") as handle:  # the file no longer matches its card
        handle.write(b"tampered")
    st.cache_resource.clear()
    damaged = start()
    assert not damaged.exception
    assert any("SHA256" in e.value for e in damaged.error)
