"""`selfsup data preview` and the dashboard's Views page: a grid of the views a config produces,
one row per sample."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from selfsup.pipelines.shards import load_manifest
from selfsup.pipelines.endpoints import resolve_endpoint
from selfsup.pipelines.storage import is_s3, open_store
from selfsup.pipelines.decode import Schema, shard_samples
from selfsup.pipelines.views import make_views
from selfsup.platform.config import ConfigError, load_config


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what `data preview --out` writes


def preview(config: str, overrides: list[str], out: str, samples: int = 8, seed: int = 0) -> int:
    from torchvision.utils import save_image

    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the picture to write (e.g. {path / 'views.png'})")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {path.parent} does not exist")
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(f"--out {out}: write a {', '.join(PICTURE_SUFFIXES)} file")

    grid, nrow = view_grid(load_config(config, overrides), samples, seed)
    save_image(grid, out, nrow=nrow, padding=2, pad_value=1.0)
    return len(grid)


def view_grid(cfg, samples: int = 8, seed: int = 0, start: bool = True) -> tuple[torch.Tensor, int]:
    """(images (samples * views, 3, H, W) in [0, 1], views per sample) from the first train shard."""
    ep = resolve_endpoint(start) if is_s3(cfg.data.uri) else None
    store = open_store(cfg.data.uri, ep)
    manifest = load_manifest(cfg.data.uri, store=store)
    splits = manifest["splits"]
    if cfg.data.train_split not in splits:
        raise ConfigError(f"data.train_split {cfg.data.train_split!r} is not a split of {cfg.data.uri} "
                          f"(it has: {', '.join(sorted(splits))})")
    shard = splits[cfg.data.train_split]["shards"][0]
    _, images, _ = shard_samples(store.read(shard["path"]), shard["sha256"], store.url(shard["path"]), Schema.of(manifest))
    views = make_views(images[:samples], cfg.data.views, torch.Generator().manual_seed(seed))
    imgs = [v for v in views.values() if v.dim() == 4]
    side = max(v.shape[-1] for v in imgs)
    cols = []
    for v in imgs:  # smaller views (local crops) padded to the largest, shown at their own scale
        pad = side - v.shape[-1]
        v = F.pad(v.float() / 255, (0, pad, 0, pad), value=1.0)
        cols.append(v.expand(-1, 3, -1, -1))
    if "mask" in views:  # masked patches greyed out beside the view
        img = cols[0].clone()
        p = cfg.data.views.patch_size
        m = views["mask"].view(len(img), 1, side // p, side // p).float()
        img = img * (1 - 0.7 * F.interpolate(m, scale_factor=p))
        cols.append(img)
    return torch.stack(cols, 1).flatten(0, 1), len(cols)
