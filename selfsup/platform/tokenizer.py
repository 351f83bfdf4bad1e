"""BEiT's visual tokenizer, fitted by the platform over the shards (`selfsup tokenizer fit`, or at
the start of a BEiT run that names none) and stored as a file beside the run."""

from __future__ import annotations

import io
import time

import torch

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import open_store
from selfsup.pipelines.views import Plain, make_views, to_model_input
from selfsup.platform.config import Config


def read_uri(uri: str, ep: Endpoint | None = None) -> bytes:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent, ep).read(name)


def tokenizer_inputs(cfg: Config, images: list[torch.Tensor]) -> torch.Tensor:
    """The images as the tokenizer is fitted on them: whole, at the view size, normalised as the
    model's input (a full crop at train time gives these pixels, and so the same tokens)."""
    size = cfg.view_size()
    return torch.cat([to_model_input(make_views(images[i:i + 1024], Plain(size=size), torch.Generator()),
                                     cfg.data.mean, cfg.data.std, cfg.model.in_chans)["image"]
                      for i in range(0, len(images), 1024)])


def fit_command(config: str, overrides: list[str], out_uri: str) -> str:
    """`selfsup tokenizer fit CONFIG --out URI`."""
    from selfsup.pipelines.endpoints import resolve_endpoint
    from selfsup.pipelines.storage import is_s3
    from selfsup.platform.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    if cfg.method.name != "beit":
        raise ConfigError(f"tokenizer fit is for method beit; {config} trains {cfg.method.name!r}")
    return fit_tokenizer(cfg, out_uri, resolve_endpoint() if is_s3(cfg.data.uri) or is_s3(out_uri) else None)


def fit_tokenizer(cfg: Config, out_uri: str, ep: Endpoint | None = None, log=print) -> str:
    """Fit k-means visual words on `method.tokenizer_samples` train images at the view size; write to out_uri."""
    from selfsup.methods.beit import fit_codebook
    from selfsup.platform.evaluate import load_labeled
    from selfsup.platform.step import build_method

    t0 = time.perf_counter()
    p = cfg.method_params()
    images, _ = load_labeled(cfg.data.uri, cfg.data.train_split, p.get("tokenizer_samples", 20000), cfg.data.seed, ep,
                             labeled=False)
    x = tokenizer_inputs(cfg, images)
    patch = build_method(cfg).patch
    state = fit_codebook(x, patch, p.get("vocab_size", 512), seed=cfg.data.seed)
    buf = io.BytesIO()
    torch.save(state, buf)
    parent, _, name = out_uri.rstrip("/").rpartition("/")
    open_store(parent, ep, create=True).write(name, buf.getvalue())
    log(f"tokenizer: {len(state['codebook'])} visual words from {len(images)} images in "
        f"{time.perf_counter() - t0:.0f}s -> {out_uri}")
    return out_uri
