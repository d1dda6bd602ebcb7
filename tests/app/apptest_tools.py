"""What the AppTest files share: the app's path, starting it with preset state, error checks, the user's image archives."""
from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

from ui.errors import unescape

APP = "../../app.py"  # AppTest resolves it against the calling test file's folder (tests/app/)
CIFAR_STATS = {"tv_mean": "0.4914, 0.4822, 0.4465", "tv_std": "0.2470, 0.2435, 0.2616"}


#: what the tests start from unless they say otherwise: no repair (the app's own default preset recalibrates
#: BatchNorm, which a test of the unrepaired figures would have to undo)
UNREPAIRED = {"repair": "none", "bn_recal": False}


def start(timeout: float = 120, **state) -> AppTest:
    """The app run once with ``state`` preset in its session state (conftest keeps the accuracy target at ±5 points).

    Without a ``repair`` (or ``bn_recal``) in ``state`` the app starts unrepaired (:data:`UNREPAIRED`).
    """
    at = AppTest.from_file(APP, default_timeout=timeout)
    if not {"repair", "bn_recal"} & set(state):
        state = {**UNREPAIRED, **state}
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def texts(elements) -> list[str]:
    """The text the browser shows for each alert (bodies go through ui.errors.literal)."""
    return [unescape(e.value) for e in elements]


def no_errors(at: AppTest) -> None:
    """No exception and no st.error on the page; the assertion names what was shown."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)


def chart_keys(at: AppTest) -> set[str]:
    return {c.proto.id for c in at.get("plotly_chart")}


def has_chart(at: AppTest, key: str) -> bool:
    """A plotly chart whose element id contains ``key`` is on the page."""
    return any(key in k for k in chart_keys(at))


def image_zip(classes: dict[str, int] | None, extra: dict[str, bytes] | None = None, loose: int = 0,
              shape: tuple[int, int] = (40, 40)) -> bytes:
    """A zip of random PNGs (``shape`` = height, width): ``classes`` as ImageFolder class folders under ``val/``,
    ``loose`` images at the top without a class, then the ``extra`` entries as given (name -> bytes)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        names = [f"val/{c}/{i}.png" for c, n in (classes or {}).items() for i in range(n)]
        for name in names + [f"{i}.png" for i in range(loose)]:
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(name, png.getvalue())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def kept(at: AppTest, key: str):
    """A widget's value also where its page does not draw it (Streamlit then drops the key; ui.state keeps a copy)."""
    state = at.session_state
    return state[key] if key in state else state["_keep_" + key]
