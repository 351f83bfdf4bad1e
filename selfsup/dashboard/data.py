"""What the pages read, cached per server: runs, sweeps and checkpoints through the platform's own
readers (platform/runs.py owns the layout, so the dashboard reads exactly what training and
sweeps write), and the pictures they draw. Every name a page takes goes through `resolve_run`
or `check_name` first: nothing is read outside the root."""

from __future__ import annotations

import io
import os

import numpy as np
import streamlit as st
import torch
import torch.nn.functional as F

from selfsup.pipelines.storage import Endpoint, is_s3, join, open_store, resolve_endpoint
from selfsup.platform.runs import CONFIG, checkpoint_names, list_runs, list_sweeps, read_metrics, read_summary, \
    resolve_run, show_sweep

ROOT_ENV, TOKEN_ENV = "SELFSUP_DASHBOARD_ROOT", "SELFSUP_DASHBOARD_TOKEN"
LIVE_REFRESH_S = 5


def root() -> str:
    from selfsup.platform.cli import DEFAULT_RUNS

    return os.environ.get(ROOT_ENV) or DEFAULT_RUNS


@st.cache_resource
def endpoint(uri: str) -> Endpoint | None:
    # never starts a server: the dashboard only reads what is there
    return resolve_endpoint(start=False) if is_s3(uri) else None


@st.cache_data(ttl=LIVE_REFRESH_S, show_spinner=False)
def runs(root: str) -> tuple[list[dict], list[str]]:
    return list_runs(root, endpoint(root))


@st.cache_data(ttl=LIVE_REFRESH_S, show_spinner=False)
def sweeps(root: str) -> tuple[list[dict], list[str]]:
    return list_sweeps(root, endpoint(root))


@st.cache_data(ttl=LIVE_REFRESH_S, show_spinner=False)
def sweep(root: str, name: str) -> dict:
    return show_sweep(root, name, endpoint(root))


def run_uri(root: str, name: str) -> str:
    """The run's URI; RunError for a name that is not a run's (a path, `..`, a non-sweep `a/b`)."""
    if is_s3(name) or name.startswith(("/", ".", "~")):
        from selfsup.platform.runs import RunError

        raise RunError(f"run name {name!r} is not valid: the dashboard shows the runs under {root} only")
    return resolve_run(name, root, endpoint(root))


@st.cache_data(ttl=LIVE_REFRESH_S, show_spinner=False)
def metrics(root: str, name: str):
    """The run's metrics as a DataFrame, one row per report (train and eval)."""
    import pandas as pd

    return pd.DataFrame(read_metrics(open_store(run_uri(root, name), endpoint(root))))


@st.cache_data(ttl=LIVE_REFRESH_S, show_spinner=False)
def run_files(root: str, name: str) -> dict:
    """The run's summary, config text and checkpoints (name, complete or not, step)."""
    store = open_store(run_uri(root, name), endpoint(root))
    try:
        config = store.read_text(CONFIG)
    except FileNotFoundError:
        config = ""
    ckpts = [{"checkpoint": c, "step": int(c.split("-")[1]), "complete": store.exists(f"{c}/manifest.json")}
             for c in checkpoint_names(store)]
    return {"summary": read_summary(store), "config": config, "checkpoints": ckpts}


@st.cache_resource(max_entries=4, show_spinner="loading the checkpoint ...")
def model(root: str, name: str, checkpoint: str | None):
    """(config, method in eval mode, checkpoint used) of a run; checkpoints load weights only."""
    from selfsup.platform.evaluate import load_run

    uri = run_uri(root, name)
    return load_run(uri, endpoint(uri), checkpoint)


@st.cache_resource(max_entries=4, show_spinner="reading the data set ...")
def labeled(data_uri: str, split: str, limit: int, seed: int):
    """(images, labels, class names) of a split of a data set (a fixed subset of `limit`)."""
    from selfsup.pipelines.shards import load_manifest
    from selfsup.platform.evaluate import load_labeled

    ep = endpoint(data_uri)
    images, labels = load_labeled(data_uri, split, limit, seed, ep, strict=False)
    return images, labels, load_manifest(data_uri, ep).get("class_names") or []


def decode_upload(data: bytes, channels: int) -> torch.Tensor:
    """An uploaded picture as uint8 (C, H, W) with the run's number of channels."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    return torch.from_numpy(np.asarray(img).copy()).reshape(img.height, img.width, -1).permute(2, 0, 1)


def model_input(cfg, images: list[torch.Tensor], size: int | None = None) -> torch.Tensor:
    """Images as the run's backbone sees them in evaluation: centre square, resized, normalised."""
    from selfsup.pipelines.views import Plain, make_views, to_model_input

    v = make_views(images, Plain(size=size or cfg.eval.image_size or cfg.view_size()), torch.Generator())
    return to_model_input(v, cfg.data.mean, cfg.data.std, cfg.model.in_chans)["image"]


def to_pixels(x: torch.Tensor, cfg) -> torch.Tensor:
    """Model-input images (B, C, H, W) back to [0, 1] for display."""
    c = x.shape[1]
    mean = torch.tensor((cfg.data.mean * c)[:c]).view(1, c, 1, 1)
    std = torch.tensor((cfg.data.std * c)[:c]).view(1, c, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


# A perceptually ordered map (viridis' end points and three stops between): no matplotlib needed.
_CMAP = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def heat(m: torch.Tensor) -> torch.Tensor:
    """A (H, W) map in any range as an RGB (3, H, W) image in [0, 1], scaled to its own min-max."""
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    pos = m * (len(_CMAP) - 1)
    lo = pos.floor().long().clamp(max=len(_CMAP) - 2)
    t = (pos - lo).unsqueeze(-1)
    return ((1 - t) * _CMAP[lo] + t * _CMAP[lo + 1]).permute(2, 0, 1)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(..., N) patch maps to (..., size, size), nearest (a patch stays a square)."""
    side = int(maps.shape[-1] ** 0.5)
    flat = maps.reshape(-1, 1, side, side).float()
    return F.interpolate(flat, size=(size, size), mode="nearest").reshape(*maps.shape[:-1], size, size)


def as_image(x: torch.Tensor):
    """(C, H, W) in [0, 1] as an HxWxC uint8 array for st.image (grey drawn as RGB)."""
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def sweep_uri(root: str, name: str) -> str:
    from selfsup.platform.runs import check_name

    return join(root, check_name(name, "sweep"))
