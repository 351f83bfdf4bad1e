"""What the pages read, cached per server: runs, sweeps and checkpoints through the platform's own
readers (platform/runs.py owns the layout, so the dashboard reads exactly what training and
sweeps write), and the pictures they draw. Every name a page takes goes through `resolve_run`
or `check_name` first: nothing is read outside the root."""

from __future__ import annotations

import os

import streamlit as st

from selfsup.dashboard import ROOT_ENV
from selfsup.pipelines.endpoints import Endpoint, resolve_endpoint
from selfsup.pipelines.storage import is_s3, join, open_store
from selfsup.platform.runs import CONFIG, checkpoint_names, list_runs, list_sweeps, read_metrics, read_summary, \
    resolve_run, show_sweep

LIVE_REFRESH_S = 5


def root() -> str:
    from selfsup.platform.api import DEFAULT_RUNS

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
def _read(data_uri: str, split: str, limit: int, seed: int):
    from selfsup.pipelines.shards import load_manifest
    from selfsup.platform.evaluate import load_labeled

    ep = endpoint(data_uri)
    images, labels = load_labeled(data_uri, split, limit, seed, ep, strict=False, labeled=False)
    return images, labels, load_manifest(data_uri, ep).get("class_names") or []


def labeled(cfg, which: str, limit: int):
    """(images, labels (-1: none), class names) of a fixed subset of `limit` of a run's evaluation
    images, `which` = "train" (the kNN memory) or "test" (the queries): from eval.data_uri, else
    data.uri; a set without that split (an unlabeled one, say) gives its training split."""
    from selfsup.pipelines.shards import load_manifest

    uri = cfg.eval_uri()
    split = cfg.eval.test_split if which == "test" else cfg.eval.train_split
    if split not in load_manifest(uri, endpoint(uri))["splits"]:
        split = cfg.data.train_split
    return _read(uri, split, limit, cfg.data.seed + (which == "test"))


def class_name(classes: list[str], y: int) -> str:
    return "unlabeled" if y < 0 else classes[y] if y < len(classes) else str(y)


def sweep_uri(root: str, name: str) -> str:
    from selfsup.platform.runs import check_name

    return join(root, check_name(name, "sweep"))


EMBEDDING_COLUMNS = ("key", "label", "split", "embedding")


@st.cache_resource(max_entries=4, show_spinner="reading the embeddings ...")
def embeddings(root: str, folder: str, split: str | None, limit: int, seed: int = 0):
    """(keys, labels (-1: none), features (N, D)) of a fixed random subset of `limit` rows of a
    `selfsup embed` output: `folder` under the root (names only: nothing outside it is read), the
    rows of `split` or, when it has none of that split, all of them."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch

    from selfsup.pipelines.storage import fs_and_path
    from selfsup.platform.runs import RunError, check_name

    parts = folder.strip("/").split("/")
    for p in parts:
        check_name(p, "folder")
    uri = join(root, *parts)
    fs, path = fs_and_path(uri, endpoint(root))
    try:
        ds = pads.dataset(path, filesystem=fs, format="parquet")
        missing = [c for c in EMBEDDING_COLUMNS if c not in ds.schema.names]
        if missing:
            raise RunError(f"{uri} is not a `selfsup embed` output (no {', '.join(missing)} column)")
        table = ds.to_table(columns=list(EMBEDDING_COLUMNS))
    except (OSError, ValueError) as e:  # pyarrow: no such folder, not Parquet, unreadable
        raise RunError(f"{uri}: {' '.join(str(e).split())[:300]}") from None
    if split is not None and pc.any(pc.equal(table["split"], split)).as_py():
        table = table.filter(pc.equal(table["split"], split))
    if limit < table.num_rows:
        table = table.take(np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:limit]))
    if not table.num_rows:
        raise RunError(f"{uri} holds no rows")
    emb = table["embedding"].combine_chunks()
    feats = torch.from_numpy(emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).copy())
    labels = torch.tensor(table["label"].fill_null(-1).to_pylist(), dtype=torch.long)
    return table["key"].to_pylist(), labels, torch.nn.functional.normalize(feats.float(), dim=1)
