"""Streamlit entry point: `spectra app [MODEL]` runs this file. Routing only."""

import streamlit as st

from app.pages import model

st.set_page_config(page_title="Spectra", layout="wide")
st.navigation([st.Page(model.render, title="Model", url_path="model", default=True)]).run()
