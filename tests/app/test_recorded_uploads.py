"""An export of this app uploaded back is what it says: its recorded setting, shown as loaded; and a settings
file for another architecture is refused with a sentence."""
from __future__ import annotations

from core.common.formatting import fmt_bytes, fmt_pct
from core.method.config import CompressionConfig
from core.method.engine import Engine
from core.services.choices import load_choice, model_choices
from core.services.recorded import from_settings, settings_for_other_model
from core.services.uploads import export_bundle, packed_bytes, settings_json
from tests.app.apptest_tools import start, texts
from tests.app.test_pages import explorer, metric, no_errors

SETTING = CompressionConfig(tau=0.3, theta=0.3, b_low=4, b_high=8)


def _upload(at, name: str, data: bytes):
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    at.sidebar.file_uploader(key="upload_file").set_value((name, data, "application/octet-stream")).run()
    no_errors(at)
    return at


def test_a_packed_file_loads_back_at_its_setting_with_its_figures():
    loaded = load_choice(model_choices()[0].key)
    result = Engine(loaded.model).apply(SETTING)
    data = packed_bytes(result, loaded)
    at = _upload(start(tau=0.1), "model.packed", data)
    session = explorer(at)
    assert session.loaded.recorded is not None and session.loaded.recorded.config == SETTING
    assert at.session_state["tau"] == 0.3 and at.session_state["theta_relative"] == 0.3  # the sliders took it
    assert any("as it is" in i.value for i in at.info)
    assert metric(at, "Retention ρ").value == fmt_pct(result.retention)  # the file's weights, not pruned again
    assert metric(at, "Stored size").value == fmt_bytes(len(data))
    at.slider(key="tau").set_value(0.4).run()  # a move compresses the uploaded weights again, and says so
    no_errors(at)
    assert any("Compressing the uploaded weights again" in i.value for i in at.info)
    at.button(key="back_to_recorded").click().run()
    assert at.session_state["tau"] == 0.3 and any("as it is" in i.value for i in at.info)


def test_a_bundle_records_its_setting_and_repair():
    loaded = load_choice(model_choices()[0].key)
    result = Engine(loaded.model).apply(SETTING)
    data = export_bundle(result, loaded, bn_recalibrated=True)
    at = _upload(start(), "bundle.pt", data)
    recorded = explorer(at).loaded.recorded
    assert recorded.config == SETTING and recorded.repair == "bn" and recorded.file_bytes == len(data)


def test_settings_for_another_architecture_are_refused():
    choices = {c.key: c for c in model_choices()}
    other = load_choice("pretrained:cifar_cnn") if "pretrained:cifar_cnn" in choices else None
    assert other is not None
    text = settings_json(CompressionConfig(tau=0.45), other)
    at = start()
    at.switch_page("pages/export.py").run()
    at.file_uploader(key="settings_file").set_value(("s.json", text.encode(), "application/json")).run()
    at.button(key="apply_settings").click().run()
    assert not at.exception
    shown = texts(at.error)
    assert any("was not applied" in e and other.arch in e for e in shown), shown
    assert at.session_state["_keep_tau"] != 0.45  # the sliders (kept while another page shows) did not move


def test_the_recorded_setting_readers():
    loaded = load_choice(model_choices()[0].key)
    text = settings_json(SETTING, loaded, repair="reconstruct")
    recorded = from_settings(text, 123)
    assert recorded.config == SETTING and recorded.repair == "reconstruct" and recorded.kind == "bundle"
    assert from_settings(None, 1) is None and from_settings("{not json", 1) is None
    assert settings_for_other_model(text, loaded.arch, loaded.arch_kwargs) is None
    assert "exported for a" in settings_for_other_model(text, "other_arch", {})
    assert settings_for_other_model(SETTING.to_dict().__repr__(), "x", {}) is None  # not JSON: the reader says so
