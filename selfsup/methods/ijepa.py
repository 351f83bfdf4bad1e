"""I-JEPA (Assran et al., 2023): from a context block, a narrow predictor predicts the target
encoder's (an EMA of the context encoder) representations of several target blocks; smooth L1
in representation space, no pixel reconstruction, no hand-made views.

Masks come with the batch (the `masked` view, strategy multiblock): `context` (B, N) and
`targets` (B, K, N). As in the paper's collator, each block is cut to the smallest size in the
batch so that blocks batch together."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, cosine, ema_update, frozen_copy
from selfsup.methods.vit import MaskedViT


def block_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, m) patch indices of each row's True entries, cut to the smallest count m in the batch."""
    m = int(mask.sum(1).min())
    if m == 0:
        raise ValueError("a block mask is empty for some image")
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]


class Predictor(nn.Module):
    """A narrow ViT: context tokens + mask tokens at the target positions -> target representations."""

    def __init__(self, dim: int, n_patches: int, pred_dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.pos = nn.Parameter(torch.zeros(1, n_patches, pred_dim))
        self.blocks = nn.Sequential(*[Block(pred_dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(pred_dim)
        self.proj = nn.Linear(pred_dim, dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        d = self.pos.shape[-1]
        pos = self.pos.expand(len(ctx), -1, -1)
        x = self.embed(ctx) + pos.gather(1, ctx_idx.unsqueeze(-1).expand(-1, -1, d))
        t = self.mask_token.to(x.dtype) + pos.gather(1, tgt_idx.unsqueeze(-1).expand(-1, -1, d)).to(x.dtype)
        x = self.norm(self.blocks(torch.cat([x, t], 1)))
        return self.proj(x[:, -tgt_idx.shape[1]:])


class IJEPAParams(Params):
    pred_dim: int = Field(96, ge=1)  # the paper: 384 for ViT-H
    pred_depth: int = Field(4, ge=1)
    pred_heads: int = Field(3, ge=1)
    momentum: float = Field(0.996, ge=0, le=1)  # cosine to 1 over the run


class IJEPA(Method):
    view_kind = "masked"
    mask_strategies = ("multiblock",)
    Params = IJEPAParams

    def __init__(self, backbone, feat_dim, params: IJEPAParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.encoder = MaskedViT(backbone)
        self.target_encoder = frozen_copy(self.encoder)
        self.predictor = Predictor(feat_dim, backbone.patch_embed.num_patches, p.pred_dim, p.pred_depth, p.pred_heads)
        self.momentum = p.momentum

    def before_step(self, progress):
        self.momentum = cosine(self.params.momentum, 1.0, progress)

    def forward(self, batch):
        img, context, targets = batch["image"], batch["context"], batch["targets"]
        with torch.no_grad():
            h = self.target_encoder.all_tokens(img)[:, self.encoder.prefix:]
            h = F.layer_norm(h.float(), h.shape[-1:])
        ctx_idx = block_indices(context)
        ctx = self.encoder.visible(img, ctx_idx)[:, self.encoder.prefix:]
        losses = []
        for k in range(targets.shape[1]):
            tgt_idx = block_indices(targets[:, k])
            pred = self.predictor(ctx, ctx_idx, tgt_idx)
            want = h.gather(1, tgt_idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            losses.append(F.smooth_l1_loss(pred.float(), want))
        return {"loss": torch.stack(losses).mean(), "momentum": self.momentum, **collapse_probe(ctx.mean(1))}

    def after_step(self, progress):
        ema_update(self.target_encoder, self.encoder, self.momentum)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("target_")]
