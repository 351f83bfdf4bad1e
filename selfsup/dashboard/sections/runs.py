"""Runs: the table of runs under the root with filters; the selected runs' curves overlaid, the
first one's config and checkpoints. Refreshes itself while a selected run is live."""

import altair as alt
import pandas as pd
import streamlit as st

from selfsup.dashboard import data, plain

# (column in metrics.jsonl, kind of row, chart title): elastic resizes show in `workers`
CURVES = [("loss", "train", "loss"), ("knn_top1", "eval", "kNN top-1 (%)"), ("lr", "train", "learning rate"),
          ("images_per_s", "train", "images/s"), ("workers", "train", "workers (world size)"),
          ("skipped_update", "train", "skipped updates (share of steps)"), ("bad_shards", "train", "bad shards")]
MAX_POINTS = 2000  # per run and curve: a 10,000-row run draws as fast as a short one

st.title("Runs")
root = data.root()
runs, bad = data.runs(root)
for line in bad:
    st.warning(plain(line))
if not runs:
    st.info(f"No runs under `{root}` yet: `selfsup train CONFIG` (or `make demo`) starts one.")
    st.stop()


def _num(v):
    return v if isinstance(v, (int, float)) else None


table = pd.DataFrame([{
    "name": r["name"], "method": r.get("method"), "backbone": r.get("backbone"), "status": r.get("status"),
    "step": _num(r.get("step")), "epoch": _num(r.get("epoch")), "best kNN": _num(r.get("knn_best")),
    "workers": _num(r.get("workers")), "images/s": _num(r.get("images_per_s")),
    "wall time (s)": _num(r.get("wall_time_s", r.get("elapsed_s"))), "started": r.get("started")}
    for r in runs]).sort_values("started", ascending=False, na_position="last")

c1, c2, c3 = st.columns(3)
statuses = c1.multiselect("status", sorted(table["status"].dropna().unique()))
methods = c2.multiselect("method", sorted(table["method"].dropna().unique()))
text = c3.text_input("name contains")
shown = table
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if methods:
    shown = shown[shown["method"].isin(methods)]
if text:
    shown = shown[shown["name"].str.contains(text, regex=False)]
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={"best kNN": st.column_config.NumberColumn(format="%.2f"),
                            "images/s": st.column_config.NumberColumn(format="%.0f"),
                            "epoch": st.column_config.NumberColumn(format="%.2f")})

names = list(shown["name"])
selected = st.multiselect("runs to plot (several overlay)", names, default=names[:1])
if not selected:
    st.stop()
live = any(r.get("status") == "running" for r in runs if r["name"] in selected)


def thin(df: pd.DataFrame) -> pd.DataFrame:
    if len(df) <= MAX_POINTS:
        return df
    step = -(-len(df) // MAX_POINTS)
    return pd.concat([df.iloc[::step], df.iloc[[-1]]]).drop_duplicates()


@st.fragment(run_every=data.LIVE_REFRESH_S if live else None)
def curves():
    frames = []
    for name in selected:
        m = data.metrics(root, name)
        if m.empty:
            continue
        for col, kind, title in CURVES:
            if col in m:
                rows = thin(m[(m["kind"] == kind) & m[col].notna()][["step", col]])
                frames.append(pd.DataFrame({"run": name, "curve": title, "step": rows["step"], "value": rows[col]}))
    if not frames:
        st.info("No metrics yet: the first rows come after `train.log_every_steps` steps.")
        return
    long = pd.concat(frames)
    cols = st.columns(2)
    for i, (_, _, title) in enumerate(c for c in CURVES if c[2] in set(long["curve"])):
        d = long[long["curve"] == title]
        chart = alt.Chart(d, title=title).mark_line(point=len(d) < 60).encode(
            x=alt.X("step:Q"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False), axis=alt.Axis(format="~g")),
            color=alt.Color("run:N", legend=alt.Legend(orient="bottom", labelLimit=400)),
            tooltip=["run", "step", "value"])
        cols[i % 2].altair_chart(chart, width="stretch")
    if live:
        st.caption(f"live: refreshing every {data.LIVE_REFRESH_S} s")


curves()
first = selected[0]
files = data.run_files(root, first)
if files["summary"].get("error"):
    st.error(plain(f"{first}: {files['summary']['error']}"))
left, right = st.columns(2)
with left.expander(f"config of {first}", expanded=False):
    st.code(files["config"] or "(no config.yaml)", language="yaml")
with right.expander(f"checkpoints of {first} ({len(files['checkpoints'])})", expanded=True):
    if files["checkpoints"]:
        st.dataframe(pd.DataFrame(files["checkpoints"]), hide_index=True, width="stretch")
    else:
        st.write("none yet")
