"""SimMIM (Xie et al., 2022): masked patches are replaced by a learned mask token, the encoder
sees every position, a linear head predicts the raw pixels, L1 loss on the masked patches."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.vit import MaskedViT, masked_mean, patch_stats, patchify, unpatchify


@in_fp32
def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_target: bool) -> torch.Tensor:
    """Mean absolute error over the masked patches' pixels; targets normalised per patch when norm_target."""
    if norm_target:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return masked_mean((pred - target).abs().mean(-1), mask)


class SimMIMParams(Params):
    # The paper regresses raw pixels; its repo's NORM_TARGET option (used for SwinV2) normalises
    # them over a local window. Per patch here, as MAE's norm_pix_loss.
    norm_target: bool = False


class SimMIM(Method):
    view_kind = "masked"
    mask_strategies = ("random", "blockwise")
    Params = SimMIMParams  # the mask ratio and patch size live in the view config

    def __init__(self, backbone, feat_dim, params: SimMIMParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.encoder = MaskedViT(backbone)
        self.patch = self.encoder.patch_size
        self.head = nn.Linear(feat_dim, self.patch ** 2 * backbone.patch_embed.proj.in_channels)

    def forward(self, batch):
        img, mask = batch["image"], batch["mask"]
        tokens = self.encoder.with_mask_tokens(img, mask)
        loss = masked_l1_loss(self.head(tokens), patchify(img, self.patch), mask, self.params.norm_target)
        return {"loss": loss, **collapse_probe(tokens.mean(1))}

    @torch.no_grad()
    def reconstruct(self, batch) -> dict[str, torch.Tensor]:
        """original, masked (masked patches zeroed) and reconstruction (the predicted pixels in the
        masked patches, the visible ones pasted back), in the model's input space; normalised
        predictions are mapped back with each patch's own mean and std."""
        img, mask = batch["image"], batch["mask"]
        pred = self.head(self.encoder.with_mask_tokens(img, mask)).to(img.dtype)
        target, m = patchify(img, self.patch), mask.unsqueeze(-1).to(img.dtype)
        if self.params.norm_target:
            mean, std = patch_stats(target)
            pred = pred * std + mean
        chans = img.shape[1]
        return {"original": img, "masked": unpatchify(target * (1 - m), self.patch, chans),
                "reconstruction": unpatchify(target * (1 - m) + pred * m, self.patch, chans)}
