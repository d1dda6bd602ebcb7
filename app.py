"""Boundary Explorer: placeholder entry point until the app pages land."""
import streamlit as st

st.set_page_config(page_title="Boundary Explorer", layout="wide")
st.title("Boundary Explorer")
st.write("Boundary pruning and on-the-fly quantization switching. The explorer pages are coming.")
