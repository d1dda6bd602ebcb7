"""Show text taken from files and exceptions as literal text, never as markdown.

``st.error``, ``st.warning``, ``st.caption`` and friends render their text as Streamlit's
GitHub-flavoured markdown: a file name or state_dict key written as ``[text](url)`` would
become a live link, ``![x](http://...)`` would make the browser fetch a URL, ``__class__``
would show as a bold "class", ``:smile:`` as an emoji, ``$x$`` as maths, ``a -> b`` as
"a → b", and ``www.host``, ``http://host`` or ``a@host`` as links. :func:`literal` makes any
text safe to put there, in three steps:

1. :func:`core.workloads.models.printable`: terminal escape codes and control characters are
   removed and line breaks become spaces, so the text is one line and no block syntax
   (headings, lists, quotes, tables, code blocks) can start anywhere but at its very beginning;
2. an invisible WORD JOINER (U+2060) goes after every ``:`` and ``@``, after ``www`` before a
   dot, and between two of ``-<>~=``. Streamlit rewrites some text *after* markdown has resolved
   backslash escapes (GFM's autolinks for URLs and e-mail addresses, its emoji and ``:streamlit:``
   and ``:material/…:`` icons, its arrows and dashes): the joiner breaks every one of those
   patterns, and the browser shows nothing for it;
3. every ASCII punctuation character markdown can act on is escaped with a backslash
   (CommonMark: a backslash before ASCII punctuation shows that character itself). The full
   stop is left alone (so "model.pt" stays searchable in tests and logs) except after leading
   digits, where "1." would start a list.

Checked in Chromium against Streamlit 1.67 (links, images, emphasis, code, HTML, maths, emoji,
icons, directives, arrows): the alert holds no element but its text, and that text, without the
joiners, equals the printable original. Tests compare with :func:`unescape`.
"""
from __future__ import annotations

import re

import streamlit as st

from core.common.formatting import printable

#: Longest message shown; longer ones keep their start and end (a file can put megabytes into one).
MAX_MESSAGE_CHARS = 1_000
JOINER = "\u2060"  # WORD JOINER: invisible, zero width, no line break
#: Where Streamlit's post-markdown rewrites would match: after ":" (URLs, emoji, icons) and "@"
#: (e-mail addresses), "www" before a dot, and pairs like "->", "<=", "--", "~=" (arrows, dashes).
_REWRITTEN = re.compile(r"(?<=[:@])|(?i:(?<=www)(?=\.))|(?<=[-<>~=])(?=[-<>~=])")
#: Every ASCII punctuation character but the full stop (handled below) and the quotes, comma,
#: semicolon, question mark and percent sign, which nothing in Streamlit's markdown acts on.
_SPECIAL = re.compile(r"""([\\`*_{}\[\]()<>#+\-!|~$:&@=^/])""")
_LIST_DOT = re.compile(r"^(\d+)\.")  # "1. " at the start makes an ordered list


def literal(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as markdown that displays exactly as the printable, one-line ``text``."""
    joined = _REWRITTEN.sub(JOINER, printable(text, limit))
    escaped = _SPECIAL.sub(r"\\\1", joined)
    return _LIST_DOT.sub(r"\1\\.", escaped)


def unescape(markdown: str) -> str:
    """The visible text of :func:`literal`'s output: backslash escapes undone, joiners dropped."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace(JOINER, "")


def show_error(message: object) -> None:
    """``st.error`` with ``message`` shown literally (it may hold names and text from files)."""
    st.error(literal(message))


def show_warning(message: object) -> None:
    """``st.warning`` with ``message`` shown literally."""
    st.warning(literal(message))


def show_caption(message: object) -> None:
    """``st.caption`` with ``message`` shown literally."""
    st.caption(literal(message))
