"""Streamlit-side helpers shared by ``app.py`` and the pages: session state, the sidebar, charts.

Presentation only: every number comes from ``core``.
"""
