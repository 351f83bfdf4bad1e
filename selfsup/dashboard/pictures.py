"""Pictures for the model pages: images in and out of a run's model space, heat maps, patch
maps at image size (kept apart from data.py so the Runs and Sweeps pages never import torch)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def decode_upload(data: bytes, channels: int) -> torch.Tensor:
    """An uploaded picture as uint8 (C, H, W) with the run's number of channels. Damaged images and
    images over the pixel cap raise before they are decoded."""
    from PIL import Image

    from selfsup.pipelines.decode import check_pixels

    check_pixels(data)
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
