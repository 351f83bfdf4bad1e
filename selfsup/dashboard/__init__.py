"""The Streamlit dashboard (`selfsup dashboard`): runs, sweeps, DINO attention maps, embeddings,
MAE/SimMIM reconstructions and augmentation views, read from the runs' storage."""

# How `selfsup dashboard` (server.py) hands the root and the session token to the app (data.py, app.py).
ROOT_ENV, TOKEN_ENV = "SELFSUP_DASHBOARD_ROOT", "SELFSUP_DASHBOARD_TOKEN"
