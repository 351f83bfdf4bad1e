"""SimMIM (Xie et al., 2022): masked patches are replaced by a learned mask token, the encoder
sees every position, a linear head predicts the raw pixels, L1 loss on the masked patches."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe
from selfsup.methods.vit import MaskedViT, masked_mean, patchify, unpatchify


class SimMIM(Method):
    view_kind = "masked"
    mask_strategies = ("random", "blockwise")
    Params = Params  # none of its own: the mask ratio and patch size live in the view config

    def __init__(self, backbone, feat_dim, params: Params, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.encoder = MaskedViT(backbone)
        self.patch = self.encoder.patch_size
        self.head = nn.Linear(feat_dim, self.patch ** 2 * backbone.patch_embed.proj.in_channels)

    def forward(self, batch):
        img, mask = batch["image"], batch["mask"]
        tokens = self.encoder.with_mask_tokens(img, mask)
        pred = self.head(tokens)
        loss = masked_mean((pred.float() - patchify(img, self.patch).float()).abs().mean(-1), mask)
        return {"loss": loss, **collapse_probe(tokens.mean(1))}

    @torch.no_grad()
    def reconstruct(self, batch) -> dict[str, torch.Tensor]:
        """original, masked (masked patches zeroed) and reconstruction (the predicted pixels in the
        masked patches, the visible ones pasted back), in the model's input space."""
        img, mask = batch["image"], batch["mask"]
        pred = self.head(self.encoder.with_mask_tokens(img, mask))
        target, m = patchify(img, self.patch), mask.unsqueeze(-1).to(img.dtype)
        chans = img.shape[1]
        return {"original": img, "masked": unpatchify(target * (1 - m), self.patch, chans),
                "reconstruction": unpatchify(target * (1 - m) + pred.to(img.dtype) * m, self.patch, chans)}
