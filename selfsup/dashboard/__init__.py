"""The Streamlit dashboard (`selfsup dashboard`): runs, sweeps, DINO attention maps, embeddings,
MAE/SimMIM reconstructions and augmentation views, read from the runs' storage."""

import re

# How `selfsup dashboard` (server.py) hands the root, the session token and its port to the app
# (data.py, app.py) and its token gate (asgi.py).
ROOT_ENV, TOKEN_ENV, PORT_ENV = "SELFSUP_DASHBOARD_ROOT", "SELFSUP_DASHBOARD_TOKEN", "SELFSUP_DASHBOARD_PORT"


def plain(text) -> str:
    """Text from storage (a run's error, a sweep's fields) for a Streamlit element that renders
    markdown: the characters of markup escaped (links, images, HTML, emphasis, code, LaTeX), so
    that `![](url)` in a summary.json is shown as it is, and the viewer's browser fetches nothing."""
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~$&])", r"\\\1", str(text))
