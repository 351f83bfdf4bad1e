"""Views: what a config's augmentations make of the first training shard (`selfsup data preview`),
for a shipped config or a run's own, with `key=value` overrides."""

import streamlit as st
import torch.nn.functional as F

from selfsup.dashboard import data, pictures, plain
from selfsup.platform.config import ConfigError, configure, load_config, load_yaml, shipped_configs
from selfsup.platform.preview import view_grid

st.title("Views")
root = data.root()
runs, _ = data.runs(root)
c1, c2 = st.columns([1, 2])
source = c1.radio("config", ["shipped", "a run's"], index=1 if runs else 0, horizontal=True)  # the user's data first
if source == "shipped":
    names = sorted(shipped_configs())
    config = c2.selectbox("shipped config", names, index=names.index("demo") if "demo" in names else 0)
else:
    if not runs:
        st.info(f"No runs under `{root}` yet.")
        st.stop()
    config = c2.selectbox("run", [r["name"] for r in runs])
overrides = st.text_input("overrides (key=value ...)", placeholder="data.views.view0.jitter_strength=0.8")
c1, c2 = st.columns(2)
samples = c1.slider("samples", 1, 16, 6)
seed = c2.number_input("seed", 0, 10**6, 0)
try:
    if source == "shipped":
        cfg = load_config(config, overrides.split())
    else:
        cfg = configure(load_yaml(data.run_files(root, config)["config"]) or {}, overrides.split())
    grid, per_row = view_grid(cfg, samples, int(seed), start=False)
except (ConfigError, ValueError) as e:
    st.error(plain(e))
    st.stop()
except Exception as e:  # the data set unreachable, say: one line
    st.error(plain(f"{type(e).__name__}: {e}"))
    st.stop()
side = max(128, grid.shape[-1] * 2)

for i in range(0, len(grid), per_row):
    row = F.interpolate(grid[i:i + per_row], size=(side, side), mode="nearest")
    st.image([pictures.as_image(v) for v in row])
st.caption(f"{cfg.data.uri} · {cfg.data.views.kind} · {per_row} pictures per sample (masks greyed)")
