"""How numbers read in the app, the tables and the messages: one formatter per kind of quantity.

Bytes are binary units labelled as such (1 MiB = 2**20 bytes); fractions are shown as
percentages; durations switch from seconds to milliseconds below 10 ms.
"""
from __future__ import annotations

import math
import re
import unicodedata

KIB = 1024
MIB = 1024 ** 2


def fmt_bytes(n_bytes: float) -> str:
    """``n_bytes`` as KiB below 1 MiB, else MiB: ``"367.9 KiB"``, ``"44.66 MiB"``."""
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.2f} MiB"
    return f"{n_bytes / KIB:.1f} KiB"


def fmt_mib(mib: float) -> str:
    """A memory figure already in MiB: ``"674.2 MiB"``."""
    return f"{mib:.1f} MiB"


def fmt_pct(fraction: float, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``fmt_pct(0.3082) == "30.8 %"``.

    Never rounds something to nothing or a part to the whole: a fraction above 0 that would
    show as 0 reads ``"< 0.1 %"`` (20 weights kept of 11 M), one below 1 that would show as 100
    reads ``"> 99.9 %"`` (at ``digits`` = 1).
    """
    text = f"{100 * fraction:.{digits}f}"
    step = 10.0 ** -digits
    if 0 < fraction and float(text) == 0:
        return f"< {step:.{digits}f} %"
    if fraction < 1 and float(text) >= 100:
        return f"> {100 - step:.{digits}f} %"
    return f"{text} %"


def fmt_seconds(seconds: float) -> str:
    """``"0.123 s"`` from 10 ms up, ``"4.56 ms"`` below (three significant digits)."""
    return f"{seconds:.3g} s" if seconds >= 0.01 else f"{seconds * 1e3:.3g} ms"


def is_missing(value: object) -> bool:
    """None or NaN: shown as a dash, never as a number."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_kib(n_bytes: float) -> str:
    """Always in KiB, for tables whose rows should compare at a glance: ``"1068.8 KiB"``."""
    return f"{n_bytes / KIB:.1f} KiB"


_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")
_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def printable(text: object, limit: int = 200) -> str:
    """``text`` as one line fit to show a user: terminal escape sequences and control characters
    (including bidirectional overrides, which can disguise a file name) removed, line breaks and tabs
    made spaces, and at most ``limit`` characters (the middle elided with "…").

    For anything taken from a file or an exception before it goes into a message.
    """
    text = _ESCAPES.sub("", str(text))
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\n\r\v\f":
            kept.append(" ")
        elif category == "Cc" or (category == "Cf" and unicodedata.bidirectional(char) in _BIDI_CONTROLS):
            continue
        else:
            kept.append(char)
    text = " ".join("".join(kept).split())
    if len(text) > limit:
        head = (limit - 1) * 2 // 3
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    return text
