"""Streamlit entry point: `spectra app [MODEL]` runs this file. Routing only."""

import streamlit as st

from app.views import export, model, plan_page, sensitivity_page, spectra_page, tensor_network

st.set_page_config(page_title="Spectra", layout="wide")
st.navigation(
    [
        st.Page(model.render, title="Model", url_path="home", default=True),
        # the default page is served at /, never at its own path: /model opens it too
        st.Page(model.render, title="Model", url_path="model", visibility="hidden"),
        st.Page(spectra_page.render, title="Spectra", url_path="spectra"),
        st.Page(tensor_network.render, title="Tensor network", url_path="tensor-network"),
        st.Page(sensitivity_page.render, title="Sensitivity", url_path="sensitivity"),
        st.Page(plan_page.render, title="Plan", url_path="plan"),
        st.Page(export.render, title="Export", url_path="export"),
    ]
).run()
