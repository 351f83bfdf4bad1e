"""Reconstructions of an MAE or SimMIM checkpoint: original, masked input, reconstruction, with the
run's own masking (strategy and ratio from its config)."""

import streamlit as st
import torch

from selfsup.dashboard import data, pictures, plain
from selfsup.dashboard.widgets import pick_model
from selfsup.pipelines.views import make_views

SHOW = 128

st.title("Reconstructions")
root = data.root()
name, cfg, method, used = pick_model(root, lambda r: r.get("method") in ("mae", "simmim"), why="MAE or SimMIM runs")
images, labels, classes = data.labeled(cfg, "test", 500)
c1, c2, c3 = st.columns(3)
most = min(16, len(images))
n = c1.slider("test images", 1, most, min(6, most)) if most > 1 else 1
ratio = c2.slider("mask ratio", 0.1, 0.9, float(cfg.data.views.ratio), 0.05)
seed = c3.number_input("mask seed", 0, 10**6, 0)
size = cfg.data.views.view.size
spec = cfg.data.views.model_copy(update={"ratio": ratio})
mask = make_views(images[:n], spec, torch.Generator().manual_seed(int(seed)))["mask"]
x = pictures.model_input(cfg, images[:n], size)  # the whole image, not an augmented crop
try:
    out = method.reconstruct({"image": x, "mask": mask})
except ValueError as e:  # MAE keeps the same number of patches per image: a random mask only
    st.error(plain(e))
    st.stop()


def big(t):
    return pictures.as_image(torch.nn.functional.interpolate(t[None], size=(SHOW, SHOW), mode="nearest")[0])


st.caption(f"{name} · {used} · {cfg.data.views.strategy} masking of {ratio:.0%} of "
           f"{(size // cfg.data.views.patch_size) ** 2} patches")
pix = {k: pictures.to_pixels(v, cfg) for k, v in out.items()}
for j in range(n):
    st.image([big(pix[k][j]) for k in ("original", "masked", "reconstruction")],
             caption=[f"original ({data.class_name(classes, int(labels[j]))})", "masked input", "reconstruction"])
