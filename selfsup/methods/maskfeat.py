"""MaskFeat (Wei et al., 2022): masked patches replaced by a mask token; a linear head regresses
the HOG features of the masked patches (L2). HOG is computed on the fly in torch, on whatever
device the batch is on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe
from selfsup.methods.vit import MaskedViT, masked_mean


def hog(img: torch.Tensor, patch: int, cell: int, bins: int = 9) -> torch.Tensor:
    """Per-patch HOG (B, N, (patch/cell)^2 * bins): unsigned gradient orientations of the grey image
    in `bins` bins weighted by magnitude, summed per cell, each cell's histogram L2-normalised."""
    g = img.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0]], device=img.device).view(1, 1, 1, 3)
    gx = F.conv2d(F.pad(g, (1, 1, 0, 0), mode="replicate"), kx)
    gy = F.conv2d(F.pad(g, (0, 0, 1, 1), mode="replicate"), kx.view(1, 1, 3, 1))
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    ori = torch.atan2(gy, gx) % math.pi
    idx = (ori / math.pi * bins).long().clamp_(max=bins - 1)
    hist = torch.zeros(g.shape[0], bins, *g.shape[2:], device=img.device).scatter_(1, idx, mag)
    hist = F.avg_pool2d(hist, cell) * cell * cell  # (B, bins, H/cell, W/cell)
    hist = F.normalize(hist, dim=1)
    B, _, hc, wc = hist.shape
    r = patch // cell
    hist = hist.reshape(B, bins, hc // r, r, wc // r, r).permute(0, 2, 4, 3, 5, 1)
    return hist.reshape(B, (hc // r) * (wc // r), r * r * bins)


class MaskFeatParams(Params):
    hog_bins: int = Field(9, ge=2)
    hog_cell: int | None = Field(None, ge=1)  # pixels; None: half the patch (the paper: 8 px cells, 16 px patches)


class MaskFeat(Method):
    view_kind = "masked"
    mask_strategies = ("random", "blockwise")
    Params = MaskFeatParams

    def __init__(self, backbone, feat_dim, params: MaskFeatParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.encoder = MaskedViT(backbone)
        self.patch = self.encoder.patch_size
        self.cell = params.hog_cell or max(1, self.patch // 2)
        if self.patch % self.cell:
            raise ValueError(f"method.hog_cell {self.cell} does not divide the patch size {self.patch}")
        self.head = nn.Linear(feat_dim, (self.patch // self.cell) ** 2 * params.hog_bins)

    def forward(self, batch):
        img, mask = batch["image"], batch["mask"]
        tokens = self.encoder.with_mask_tokens(img, mask)
        with torch.no_grad(), torch.autocast(img.device.type, enabled=False):  # HOG in fp32
            target = hog(img, self.patch, self.cell, self.params.hog_bins)
        loss = masked_mean((self.head(tokens).float() - target).pow(2).mean(-1), mask)
        return {"loss": loss, **collapse_probe(tokens.mean(1))}
