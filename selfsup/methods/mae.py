"""MAE (He et al., 2021): mask 75% of the patches, encode only the visible ones, reconstruct the
masked patches' (per-patch normalised) pixels with a light decoder; the loss counts masked patches
only. The mask comes with the batch (the pipeline's `masked` view, strategy random)."""

from __future__ import annotations

import torch
from pydantic import Field
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.vit import MaskedViT, masked_mean, patch_stats, patchify, unpatchify


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) indices of the unmasked patches in order; every row of `mask` must mask as many."""
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every image must keep the same number of patches (use a random mask of a fixed ratio)")
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]


@in_fp32
def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over the masked patches only; targets normalised per patch when norm_pix."""
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return masked_mean((pred - target).pow(2).mean(-1), mask)


class MAEParams(Params):
    decoder_dim: int = Field(128, ge=1)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_pix_loss: bool = True


class MAE(Method):
    view_kind = "masked"
    mask_strategies = ("random", "blockwise")
    Params = MAEParams

    def __init__(self, backbone, feat_dim, params: MAEParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.encoder = MaskedViT(backbone)
        n = backbone.patch_embed.num_patches
        self.patch = self.encoder.patch_size
        self.chans = backbone.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(feat_dim, p.decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, p.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n + 1, p.decoder_dim))
        self.decoder = nn.Sequential(*[Block(p.decoder_dim, p.decoder_heads, qkv_bias=True) for _ in range(p.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(p.decoder_dim)
        self.decoder_pred = nn.Linear(p.decoder_dim, self.patch ** 2 * self.chans)
        nn.init.trunc_normal_(self.decoder_mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def _predict(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = visible_indices(mask)
        latent = self.encoder.visible(img, keep)  # (B, 1 + K, D)
        x = self.decoder_embed(latent)
        B, N, d = mask.shape[0], mask.shape[1], x.shape[-1]
        full = self.decoder_mask_token.to(x.dtype).expand(B, N, d).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], 1) + self.decoder_pos.to(x.dtype)
        return self.decoder_pred(self.decoder_norm(self.decoder(x)))[:, 1:], latent

    def forward(self, batch):
        img, mask = batch["image"], batch["mask"]
        pred, latent = self._predict(img, mask)
        loss = masked_patch_loss(pred, patchify(img, self.patch), mask, self.params.norm_pix_loss)
        return {"loss": loss, **collapse_probe(latent[:, 0])}

    @torch.no_grad()
    def reconstruct(self, batch) -> dict[str, torch.Tensor]:
        """original, masked (masked patches zeroed) and reconstruction (visible patches pasted back)
        images, in the model's input space; norm_pix predictions are mapped back with each
        patch's own mean and std, as in the MAE paper's figures."""
        img, mask = batch["image"], batch["mask"]
        pred, _ = self._predict(img, mask)
        target = patchify(img, self.patch)
        if self.params.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = pred * std + mean
        m = mask.unsqueeze(-1).to(pred.dtype)
        return {"original": img, "masked": unpatchify(target * (1 - m), self.patch, self.chans),
                "reconstruction": unpatchify(target * (1 - m) + pred * m, self.patch, self.chans)}
