"""Streamlit-free services behind the pages: model choices, uploads and exports, the explore session, histograms, teaching."""
