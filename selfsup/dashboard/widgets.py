"""Widgets the model pages share: pick a run and one of its complete checkpoints, and load it."""

from __future__ import annotations

import streamlit as st

from selfsup.dashboard import data, pictures, plain


def pick_model(root: str, wanted=lambda summary: True, why: str = "runs"):
    """Selectboxes for a run (those `wanted` keeps, newest first) and a complete checkpoint; returns
    (run name, config, method, checkpoint) or stops the page with a message."""
    runs, _ = data.runs(root)
    runs = sorted((r for r in runs if wanted(r)), key=lambda r: r.get("started") or "", reverse=True)
    if not runs:
        st.info(f"No {why} under `{root}` yet.")
        st.stop()
    c1, c2 = st.columns([2, 1])
    name = c1.selectbox("run", [r["name"] for r in runs])
    ckpts = [c["checkpoint"] for c in data.run_files(root, name)["checkpoints"] if c["complete"]]
    if not ckpts:
        st.info(f"{name} has no complete checkpoint yet.")
        st.stop()
    ckpt = c2.selectbox("checkpoint", ckpts[::-1])
    try:
        cfg, method, used = data.model(root, name, ckpt)
    except Exception as e:  # a page shows why, in one line, and stays up
        st.error(plain(f"{name} {ckpt}: {type(e).__name__}: {e}"))
        st.stop()
    return name, cfg, method, used


def pick_images(cfg, key: str, allow_upload: bool = True):
    """One image of the run's test split (by index) or an uploaded one: (uint8 (C,H,W), caption)."""
    source = st.radio("image", ["from the run's test split", "upload"] if allow_upload else ["from the run's test split"],
                      horizontal=True, key=f"{key}-source")
    if source == "upload":
        up = st.file_uploader("an image (PNG or JPEG)", type=["png", "jpg", "jpeg"], key=f"{key}-upload")
        if up is None:
            st.stop()
        try:
            return pictures.decode_upload(up.getvalue(), cfg.model.in_chans), up.name
        except Exception as e:
            st.error(plain(f"{up.name} is not an image this page can read ({type(e).__name__}: {e})"))
            st.stop()
    images, labels, classes = data.labeled(cfg, "test", 500)
    i = st.number_input(f"test image (0-{len(images) - 1})", 0, len(images) - 1, 0, key=f"{key}-index")
    return images[i], f"test #{i}: {data.class_name(classes, int(labels[i]))}"
