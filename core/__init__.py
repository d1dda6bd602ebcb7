"""Boundary Explorer engine: boundary pruning and pre-quantized mixed-precision switching.

Nothing in this package imports Streamlit; every function returns plain data
(dataclasses, tensors, pandas DataFrames) that the app and the CLIs render.
"""
