"""Hostile files through the app itself (AppTest): the sidebar's checkpoint uploader and the Export page's
settings uploader. Each file gets an st.error, never an exception; file-derived text (names, keys) is
shown literally, never as markdown; the app keeps working (a slider move after the errors still updates);
nothing is written to the temporary folder or next to the app. One AppTest per uploader, reused.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.method.config import ConfigError
from core.services.uploads import MAX_UPLOAD_MB, read_settings, read_upload
from core.workloads.models import CheckpointError
from core.common.formatting import printable
from tests.services.test_hostile_inputs import (
    Payload,
    bundle,
    deep_json,
    forge,
    good_file,
    good_pt,
    resnet20_state,
    saved,
    state_with,
    table_bomb,
    torch_bomb,
)
from tests.app.apptest_tools import kept, start
from ui.errors import literal, unescape

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "zq7hostile"  # in every uploaded name: nothing named after an upload may appear on disk


@pytest.fixture(autouse=True)
def clean(fresh_caches, tmp_path, monkeypatch):
    """Fresh caches, a private temporary folder (must stay empty) and no file named after an upload."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield
    assert not list(temp.iterdir()), "the app wrote to the temporary folder"
    written = [p for top in ROOT.iterdir() if top.name not in {".git", ".venv"} and top.is_dir()
               for p in top.rglob(f"*{TOKEN}*")] + list(ROOT.glob(f"*{TOKEN}*"))
    assert not written, written


def retention(at: AppTest) -> str:
    return next(m.value for m in at.metric if m.label.startswith("Retention"))


def shown(element) -> str:
    """The text the browser displays for an alert whose body went through ui.errors.literal."""
    return unescape(element.value)


def assert_literal(body: str) -> None:
    """No markdown construct can act: every link, image, emphasis, code and HTML character is escaped."""
    for special in "[]()*_`<>!$:":
        unescaped = body.replace("\\\\", "").replace("\\" + special, "")
        assert special not in unescaped, (special, body)


# ---------------------------------------------------------------- the sidebar's checkpoint uploader

def sidebar_cases() -> list[tuple[str, bytes, str | None]]:
    """(name, bytes, architecture) of hostile uploads; names carry markdown, escape codes and odd bytes."""
    return [
        (f"[click me](http://evil.example/{TOKEN}).pt", b"not a checkpoint", "resnet20"),
        (f"![x](http://evil.example/{TOKEN}.png)__class__.pt", saved({"x": Payload(f"{TOKEN}.flag")}), "resnet20"),
        (f"\x1b[31m{TOKEN}\x1b[0m\0..\\/bomb.pt", torch_bomb(2 << 30), "resnet20"),
        ("模型" * 60 + f"{TOKEN}.safetensors", forge([["0", [20_000, 20_000], "float32", 0, 0, 0, None, None,
                                                    "index"]]), None),
        (f"{TOKEN} table $x$ :smile:.safetensors", table_bomb(), None),
        (f"{TOKEN}_hidden.pt", bundle(), None),
        (f"{TOKEN}_nan.pt", saved(state_with(fc__bias=torch.full((10,), float("nan")))), "resnet20"),
        (f"{TOKEN}.safetensors", good_pt()[:5000], "resnet20"),  # a cut torch file named .safetensors
        (f"www.{TOKEN}.example", saved(resnet20_state()), "cifar_cnn"),
    ]


def test_hostile_uploads_in_the_sidebar():
    at = start(tau=0.2)
    before = retention(at)
    at.switch_page("pages/learn.py").run()  # the same sidebar on a light page: each run costs less
    at.sidebar.selectbox(key="model_key").set_value("upload").run()
    uploader = at.sidebar.file_uploader(key="upload_file").proto
    assert f"≤ {MAX_UPLOAD_MB} MB" in uploader.label and uploader.max_upload_size_mb == MAX_UPLOAD_MB
    cases = sidebar_cases()
    for name, data, arch in cases:
        at.sidebar.selectbox(key="upload_arch").set_value(arch or "auto (from a file exported by this app)")
        at.sidebar.file_uploader(key="upload_file").set_value((name, data, "application/octet-stream")).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        with pytest.raises(CheckpointError) as expected:
            read_upload(data, name, arch)
        (error,) = at.sidebar.error
        assert shown(error) == printable(f"Upload rejected: {expected.value}", 1000), name
        assert_literal(error.value)
        assert "uploaded_model" not in at.session_state
        assert not Path(f"{TOKEN}.flag").exists()
    assert len(cases) >= 9
    # the app keeps working: the default model is shown and a slider move still updates it
    at.switch_page("pages/explore.py").run()
    assert not at.exception and retention(at) == before
    at.slider(key="tau").set_value(0.6).run()
    assert not at.exception and retention(at) != before
    # a valid packed file whose name is over 255 bytes in UTF-8 (and holds markdown) loads
    name = f"**{TOKEN}** [x](http://e.example) " + "é" * 140 + ".safetensors"
    assert len(name.encode()) > 255
    at.sidebar.file_uploader(key="upload_file").set_value((name, good_file(), "application/octet-stream")).run()
    assert not at.exception and not at.sidebar.error, [e.value for e in at.sidebar.error]
    assert at.session_state["explorer"].key.startswith("upload:")
    note = [c.value for c in at.sidebar.caption if "uploaded packed model" in unescape(c.value)]
    assert note and "File name too long" not in note[0]
    assert_literal(note[0])


# ---------------------------------------------------------------- the Export page's settings uploader

SETTINGS = [
    ("include_norm.json", b'{"tau": 0.4, "include_norm": "yes"}'),
    ("deep.json", deep_json(100_000)),
    ("huge.json", b'{"tau": 0.4}' + b" " * 1_000_000),
    ("[link](http://evil.example).json", b'{"[text](http://evil.example)": 1}'),
    ("image.json", b'{"![x](http://evil.example/a.png)": 1}'),
    ("dunder.json", b'{"__class__": 1, "tau": 0.4}'),
    ("ansi\x1b[2J.json", b'{"\\u001b[31mred": 1}'),
    ("tau7.json", b'{"tau": 7}'),
    ("bits16.json", b'{"tau": 0.4, "theta": 0.3, "b_low": 4, "b_high": 16}'),  # not in the app's palette
]


def test_hostile_settings_on_the_export_page():
    at = start(tau=0.2)
    at.switch_page("pages/export.py").run()
    assert not at.exception
    uploader = at.file_uploader(key="settings_file")
    assert uploader.proto.max_upload_size_mb == 1 and "≤ 1 MB" in uploader.proto.label
    for name, text in SETTINGS:
        at.file_uploader(key="settings_file").set_value((name, text, "application/json"))
        if any(b.key == "apply_settings" for b in at.button):
            at.button(key="apply_settings").click()
        at.run()
        if not any(e for e in at.error):  # the first file: the button appears with it
            at.button(key="apply_settings").click().run()
        assert not at.exception, (name, [e.value for e in at.exception])
        (error,) = at.error
        if name == "bits16.json":  # a valid setting, refused by apply_config: the app's palette lacks 16
            reason = "bit-widths 4/16 are not in the app's palette (2, 3, 4, 8)"
        else:
            with pytest.raises(ConfigError) as refused:
                read_settings(text)
            reason = str(refused.value).rstrip(".")
        expected = (f"{printable(name, 80)} is not a settings file this app can apply: {reason}. "
                    "Export a settings file above and load that one.")
        assert shown(error) == printable(expected, 1000), name
        assert_literal(error.value)
        assert kept(at, "tau") == 0.2 and kept(at, "include_norm") is False, name
    # unknown layer names are applied without them, with a warning that shows them literally
    text = json.dumps({"tau": 0.3, "layer_tau": {"[evil](http://x.example)": 0.5, "__class__": 0.2}}).encode()
    at.file_uploader(key="settings_file").set_value(("layers.json", text, "application/json"))
    at.button(key="apply_settings").click().run()
    assert not at.exception and not at.error
    (warning,) = [w for w in at.warning if "not applied" in unescape(w.value)]
    assert "[evil](http://x.example)" in shown(warning) and "__class__" in shown(warning)
    assert_literal(warning.value)
    assert at.session_state["tau"] == 0.3 and at.session_state["layer_tau"] == {}
    # an absolute θ above every weight is applied, and said so (not silently replaced by 0.3·max|W|)
    text = json.dumps({"tau": 0.3, "theta": 1e6, "theta_mode": "absolute"}).encode()
    at.file_uploader(key="settings_file").set_value(("theta.json", text, "application/json"))
    at.button(key="apply_settings").click().run()
    assert not at.exception and not at.error
    assert any("above every weight" in unescape(w.value) for w in at.warning)
    assert at.session_state["theta_absolute"] == 1e6
    at.switch_page("pages/explore.py").run()
    assert not at.exception and at.session_state["theta_absolute"] == 1e6
    at.session_state["quantize"] = False
    # the Explore page runs with what was applied, and after the errors a slider move still updates
    at.switch_page("pages/explore.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    before = retention(at)
    at.slider(key="tau").set_value(0.7).run()
    assert not at.exception and retention(at) != before


# ---------------------------------------------------------------- literal text, in Streamlit's own renderer

MARKDOWN_CASES = [
    "[click](http://evil.example/x) and ![img](http://evil.example/a.png)",
    "__class__ and *em* and **bold** and ~~strike~~ and ~one~",
    "`code` and ``two`` and <b>html</b> and <http://auto.example> &amp; &lt;x&gt;",
    "$x^2$ and $$y$$ and \\(z\\) and \\[w\\]",
    ":smile: :red[colored] :material/home: :blue-background[bg] :small[s] :streamlit:",
    "www.evil.example and http://evil.example/path and user@evil.example and mailto:a@b.example",
    "# heading? no, mid-line # and > quote and - list + plus = eq | pipe",
    "1. looks like a list",
    "# starts like a heading",
    "back\\slash \\n \\* \\_ and trailing backslash\\",
    "模型 é 🙂 tab\there newline\nhere ANSI \x1b[31mred\x1b[0m NUL\0 RTL \u202eabc",
    "[x][ref] and [ref]: http://evil.example and footnote[^1] and [^1]: note",
    "a -> b <- c <-> d -- e >= f <= g ~= h and 8:30 and C:\\path",
    "a_b_c snake_case state.dict 'conv1.weight' \"quoted\" 50 % done; ok? yes",
]


@pytest.mark.parametrize("text", MARKDOWN_CASES)
def test_literal_shows_the_text_itself(text):
    body = literal(text)
    assert unescape(body) == printable(text, 1000)
    assert_literal(body)


@pytest.mark.browser
def test_literal_text_in_a_real_browser(tmp_path):
    """Streamlit's renderer (GFM, emoji, icons, maths, arrows) turns none of the cases into anything but text,
    and the browser requests nothing from the URLs in them."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not found (see .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api")
    script = tmp_path / "alerts.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom ui.errors import show_error\n"
                      f"for text in {MARKDOWN_CASES!r}:\n    show_error(text)\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
                               "--server.address", "127.0.0.1", "--server.port", str(port),
                               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "streamlit exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "streamlit did not start"
            time.sleep(0.5)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://127.0.0.1:{port}")
            selector = '[data-testid="stAlertContentError"]'
            page.wait_for_function(f"document.querySelectorAll('{selector}').length >= {len(MARKDOWN_CASES)}",
                                   timeout=60_000)
            for alert, text in zip(page.query_selector_all(selector), MARKDOWN_CASES):
                assert alert.inner_text().strip().replace("\u2060", "") == printable(text, 1000)
                assert alert.evaluate("e => e.querySelectorAll('a, img, strong, em, del, code, li, h1, h2, "
                                      "blockquote, .katex, [role=img]').length") == 0, text
            browser.close()
        assert not [url for url in requested if "evil" in url]
    finally:
        server.terminate()
        server.wait(timeout=10)
