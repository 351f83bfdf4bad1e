"""The dashboard's entry point, run by Streamlit (`selfsup dashboard` starts it, server.py).

Another user of the machine must not see the runs: every session needs the server's token (from
the URL `selfsup dashboard` prints, `?token=...`) before any page runs. The pages live in
`sections/`, not `pages/`: Streamlit serves a `pages/` folder beside the main script by itself,
at URLs that would skip this check."""

from __future__ import annotations

import hmac
import os

import streamlit as st

from selfsup.dashboard import TOKEN_ENV, plain
from selfsup.dashboard.data import root
from selfsup.pipelines.endpoints import StorageError

PAGES = [("runs", "Runs", ":material/monitoring:"), ("sweeps", "Sweeps", ":material/tune:"),
         ("attention", "Attention", ":material/visibility:"), ("embeddings", "Embeddings", ":material/scatter_plot:"),
         ("reconstructions", "Reconstructions", ":material/auto_fix_high:"), ("views", "Views", ":material/photo_library:")]


def authorised() -> bool:
    token = os.environ.get(TOKEN_ENV, "")
    if token and st.session_state.get("token_ok"):
        return True
    given = st.query_params.get("token", "")
    # no token configured: nobody gets in (the app was not started by `selfsup dashboard`)
    st.session_state["token_ok"] = bool(token) and hmac.compare_digest(given.encode(), token.encode())
    return st.session_state["token_ok"]


st.set_page_config(page_title="selfsup", page_icon=":material/monitoring:", layout="wide")
if not authorised():
    st.error("This dashboard needs its access token: open the address `selfsup dashboard` printed "
             "(it ends in `?token=...`).")
    st.stop()
here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sections")
nav = st.navigation([st.Page(os.path.join(here, f"{name}.py"), title=title, icon=icon, url_path=name)
                     for name, title, icon in PAGES])
st.sidebar.caption(f"runs under `{root()}`")
try:
    nav.run()
except StorageError as e:  # storage away, a run unreadable: one line, and the page stays up
    st.error(plain(" ".join(str(e).split())))
