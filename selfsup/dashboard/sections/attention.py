"""Attention: the last layer's CLS attention of a ViT checkpoint over an image, per head and their
mean, and DINO's thresholded masks (the fewest patches that hold a share of the attention mass).
The maps are computed in the ViT wrapper (methods/vit.py)."""

import streamlit as st
import torch

from selfsup.dashboard import data, pictures, plain
from selfsup.dashboard.widgets import pick_images, pick_model
from selfsup.methods.vit import as_vit, attention_masks, cls_attention

SHOW = 160  # pixels per picture on the page

st.title("Attention")
root = data.root()
name, cfg, method, used = pick_model(root, lambda r: str(r.get("backbone", "")).startswith(("vit", "deit")),
                                     why="ViT runs (DINO's attention is the classic)")
c1, c2, c3 = st.columns(3)
which = "student"
if hasattr(method, "teacher_backbone"):
    which = c1.radio("backbone", ["teacher", "student"], horizontal=True, help="DINO shows the teacher's maps")
try:
    vit = as_vit(method.teacher_backbone if which == "teacher" else method.backbone)
except ValueError as e:
    st.error(plain(e))
    st.stop()
layer = c2.number_input("block (-1: the last)", -len(vit.blocks), -1, -1)
keep = c3.slider("mask keeps this share of the attention", 0.1, 0.95, 0.6, 0.05)
image, caption = pick_images(cfg, "attention")

x = pictures.model_input(cfg, [image])
maps = cls_attention(vit, x, int(layer))[0]  # (heads, N)
masks = attention_masks(maps, keep)
mean = maps.mean(0)
pix = pictures.to_pixels(x, cfg)[0]


def big(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(t[None], size=(SHOW, SHOW), mode="nearest")[0]


st.caption(f"{name} · {used} · {which} · {len(maps)} heads · {int(len(mean) ** 0.5)}x{int(len(mean) ** 0.5)} patches · "
           f"{caption}")
st.subheader("image and the mean over heads")
up = pictures.upsample(mean, pix.shape[-1])
st.image([pictures.as_image(big(pix)), pictures.as_image(big(pictures.heat(up))),
          pictures.as_image(big(0.45 * pix.expand(3, -1, -1) + 0.55 * pictures.heat(up)))],
         caption=["input", "mean attention", "overlay"])
st.subheader("per head")
st.image([pictures.as_image(big(pictures.heat(pictures.upsample(m, pix.shape[-1])))) for m in maps],
         caption=[f"head {h}" for h in range(len(maps))])
st.subheader(f"thresholded: the patches that hold {keep:.0%} of each head's attention")
st.image([pictures.as_image(big(pix * pictures.upsample(m.float(), pix.shape[-1]).clamp(0.15, 1))) for m in masks],
         caption=[f"head {h}: {int(m.sum())} patches" for h, m in enumerate(masks)])
