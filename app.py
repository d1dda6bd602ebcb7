"""Boundary Explorer: ``streamlit run app.py``.

The entry point sets up the page navigation; every page starts with
``ui.sidebar.page_setup()``, which draws the shared sidebar (model and device pickers) and
returns this session's explorer. All computation lives in ``core``; per-user state lives
in ``st.session_state``.
"""
import streamlit as st

st.set_page_config(page_title="Boundary Explorer", page_icon=":material/content_cut:", layout="wide")

import ui.charts, ui.explore_view, ui.sidebar  # noqa: E401,E402,F401  the pages' heavy imports, before the freeze
from core.common.memory import freeze_startup_objects, start_memory_janitor  # noqa: E402
from core.services.threads import configure_threads  # noqa: E402  (after set_page_config)
from ui.session_reaper import reap_expired_sessions  # noqa: E402
from ui.server_log import log_server_conditions  # noqa: E402

configure_threads()
freeze_startup_objects()  # once per process: the collections of every later run skip them (see its docstring)
# once per process: closed sessions' memory goes back to the OS even when nobody is on
start_memory_janitor(tasks=(reap_expired_sessions,))
log_server_conditions()  # once per process, to the server's log: what it really runs under
pages = [
    st.Page("pages/explore.py", title="Explore", icon=":material/tune:", default=True),
    st.Page("pages/tune.py", title="Tune", icon=":material/show_chart:"),
    st.Page("pages/benchmark.py", title="Benchmark", icon=":material/timer:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
st.navigation(pages).run()
