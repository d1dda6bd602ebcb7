"""One line in the server's log, once per process: the conditions it serves under (read by benchmarks/load_test.py)."""
from __future__ import annotations

import functools
import json
import logging

import streamlit as st

from core.services.server_conditions import server_conditions

#: the line's prefix; the rest of the line is JSON
PREFIX = "boundary-explorer server conditions: "
#: Streamlit settings that change how the server behaves under load (from .streamlit/config.toml or flags)
STREAMLIT_OPTIONS = ("server.fileWatcherType", "server.runOnSave", "server.disconnectedSessionTTL",
                     "runner.postScriptGC", "runner.fastReruns")


@functools.cache
def log_server_conditions() -> dict:
    """Log :func:`core.services.server_conditions.server_conditions` and :data:`STREAMLIT_OPTIONS`, once per process."""
    conditions = {**server_conditions(), "streamlit": st.__version__,
                  "options": {name: st.get_option(name) for name in STREAMLIT_OPTIONS}}
    logging.getLogger("boundary_explorer").warning(PREFIX + json.dumps(conditions, sort_keys=True))
    return conditions
