"""Sweeps: a sweep's trials, its metric against each hyperparameter, a parallel-coordinates plot
of all of them, and the best trial's config to download (what `selfsup train` takes)."""

import altair as alt
import pandas as pd
import streamlit as st

from selfsup.dashboard import data, plain
from selfsup.pipelines.storage import open_store
from selfsup.platform.runs import BEST

st.title("Sweeps")
root = data.root()
sweeps, bad = data.sweeps(root)
for line in bad:
    st.warning(plain(line))
if not sweeps:
    st.info(f"No sweeps under `{root}` yet: `selfsup tune CONFIG --space SPACE.yaml` starts one.")
    st.stop()

name = st.selectbox("sweep", [s["name"] for s in sweeps])
state = data.sweep(root, name)
spec = state["spec"]
metric, keys = spec["metric"], list(spec["space"])
final = f"final_{metric}"
st.caption(plain(f"{state['status']} · searcher {spec['searcher']} · {metric} ({spec['mode']}) · "
                 f"{len(state['trials'])} trials · best: {state.get('best') or '-'}"))
trials = pd.DataFrame([{"trial": t["trial"], "status": t["status"], "stopped early": t["stopped_early"],
                        "step": t["step"], final: t[final], f"best_{metric}": t[f"best_{metric}"],
                        **{k: t["params"].get(k) for k in keys}} for t in state["trials"]])
st.dataframe(trials, hide_index=True, width="stretch")
if trials.empty:
    st.stop()

# Long form: parameter names (dotted config keys) stay values, never field names.
long = pd.DataFrame([{"trial": t["trial"], "status": t["status"], "parameter": k, "value": t["params"].get(k),
                      metric: t[final]} for t in state["trials"] for k in keys])
scored = long[long[metric].notna()]
if scored.empty:
    st.info(f"No trial has reported {metric} yet.")
else:
    cols = st.columns(min(3, len(keys)))
    for i, k in enumerate(keys):
        d = scored[scored["parameter"] == k]
        numeric = pd.to_numeric(d["value"], errors="coerce").notna().all()
        d = d.assign(value=pd.to_numeric(d["value"]) if numeric else d["value"].astype(str))
        chart = alt.Chart(d, title=f"{metric} against {k}").mark_circle(size=90).encode(
            x=alt.X("value:Q" if numeric else "value:N", title=k, scale=alt.Scale(zero=False)),
            y=alt.Y(f"{metric}:Q", scale=alt.Scale(zero=False)), color="status:N", tooltip=["trial", "value", metric])
        cols[i % len(cols)].altair_chart(chart, width="stretch")

    # Parallel coordinates: every parameter and the metric on its own 0-1 axis (min to max).
    axes = []
    for k in [*keys, metric]:
        d = scored[scored["parameter"] == keys[0]] if k == metric else scored[scored["parameter"] == k]
        raw = d[metric] if k == metric else d["value"]
        num = pd.to_numeric(raw, errors="coerce")
        if num.notna().all():
            span = (num.max() - num.min()) or 1.0
            pos = (num - num.min()) / span
        else:
            cats = sorted(raw.astype(str).unique())
            pos = raw.astype(str).map({c: i / max(1, len(cats) - 1) for i, c in enumerate(cats)})
        axes.append(pd.DataFrame({"trial": d["trial"].values, "axis": k, "position": pos.values,
                                  "value": raw.astype(str).values, metric: d[metric].values}))
    par = pd.concat(axes)
    chart = alt.Chart(par, title="parallel coordinates (each axis min to max)").mark_line(point=True).encode(
        x=alt.X("axis:N", sort=[*keys, metric], title=None), y=alt.Y("position:Q", axis=None),
        detail="trial:N", color=alt.Color(f"{metric}:Q", scale=alt.Scale(scheme="viridis")),
        tooltip=["trial", "axis", "value"])
    st.altair_chart(chart, width="stretch")

uri = data.sweep_uri(root, name)
try:
    best = open_store(uri, data.endpoint(uri)).read(BEST)
except FileNotFoundError:
    best = None
if best:
    st.download_button(f"best config ({state.get('best')}): best.yaml", best, file_name=f"{name}-best.yaml",
                       mime="application/x-yaml")
    with st.expander("best.yaml"):
        st.code(best.decode(), language="yaml")
else:
    st.caption("best.yaml is written when the sweep ends.")
