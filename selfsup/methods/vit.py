"""A wrapper over timm's VisionTransformer for masked image modeling and attention maps.

- `visible(img, keep)`: encode only the patches in `keep` (MAE, I-JEPA drop the rest),
- `with_mask_tokens(img, mask)`: a learned mask token in place of masked patches (SimMIM, BEiT, MaskFeat),
- `cls_attention(vit, img, layer)`: per-head attention of the CLS token over the patches (each map
  sums to 1), and `attention_masks(maps, keep)`: DINO's thresholded maps, the smallest set of
  patches that holds `keep` of a map's mass (what the dashboard's Attention page draws),
- `patchify` / `unpatchify`: images <-> (B, N, p*p*C) patches, row-major, as the masks index them;
  `masked_mean`: a per-patch loss averaged over the masked patches.
Any timm ViT size and patch size with a class token; position embeddings are added before
tokens are dropped, so kept tokens keep their positions.
"""

from __future__ import annotations

import torch
from torch import nn


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, C: int) -> torch.Tensor:
    B, N, _ = x.shape
    h = w = int(N ** 0.5)
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * p, w * p)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's pixel mean and std (B, N, 1): the per-patch target normalisation of MAE."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-patch loss (B, N) over the masked patches only."""
    m = mask.float()
    return (per_patch * m).sum() / m.sum()


class MaskedViT(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
            raise ValueError(f"masked image modeling needs a timm VisionTransformer with a class token, got {type(vit).__name__}")
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.prefix = vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _embed(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.vit.patch_embed(img)  # (B, N, D), or (B, h, w, D) with dynamic_img_size
        if mask is not None:
            shape = x.shape
            x = x.reshape(shape[0], -1, shape[-1])
            if mask.shape[1] != x.shape[1]:
                raise ValueError(f"the mask has {mask.shape[1]} patches, the image {x.shape[1]}: data.views.patch_size "
                                 f"must be the model's patch size ({self.patch_size})")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = (x * (1 - w) + self.mask_token.to(x.dtype) * w).reshape(shape)
        return self.vit.norm_pre(self.vit._pos_embed(x))

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(self.vit.blocks(x))

    def visible(self, img: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Tokens (B, prefix + K, D) of the prefix and the K patches `keep` (B, K) indexes."""
        x = self._embed(img)
        patches = x[:, self.prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self._blocks(torch.cat([x[:, :self.prefix], patches], 1))

    def with_mask_tokens(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D), the masked ones (True in mask (B, N)) replaced by the mask token."""
        return self._blocks(self._embed(img, mask))[:, self.prefix:]

    def all_tokens(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every token (B, prefix + N, D); with `mask`, the masked patches enter as the mask token."""
        return self._blocks(self._embed(img, mask))

    def cls_attention(self, img: torch.Tensor, layer: int = -1) -> torch.Tensor:
        return cls_attention(self.vit, img, layer)


def as_vit(backbone: nn.Module) -> nn.Module:
    """The timm VisionTransformer of a backbone (a MaskedViT's own), or ValueError naming what it is."""
    from timm.models.vision_transformer import VisionTransformer

    vit = backbone.vit if isinstance(backbone, MaskedViT) else backbone
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        raise ValueError(f"attention maps need a ViT with a class token; this backbone is a {type(vit).__name__}")
    return vit


@torch.no_grad()
def cls_attention(vit: nn.Module, img: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """(B, heads, N): softmax attention of the CLS token over the N patches in block `layer` of a
    timm ViT, renormalised over the patches (the rest goes to prefix tokens) so each map sums to 1.
    Recomputed from the block's q and k: timm's fused attention never materialises the weights."""
    blocks = list(vit.blocks)
    layer = layer % len(blocks)
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(img)))
    for b in blocks[:layer]:
        x = b(x)
    blk = blocks[layer]
    attn = blk.attn
    y = blk.norm1(x)
    B, T, _ = y.shape
    qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    cls = a[:, :, 0, vit.num_prefix_tokens:]
    return cls / cls.sum(-1, keepdim=True)


def attention_masks(maps: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Boolean masks (same shape as `maps`, (..., N) each summing to 1): per map, the fewest
    patches whose attention adds up to at least `keep` (DINO's figures use 0.6)."""
    v, idx = maps.sort(-1, descending=True)
    before = v.cumsum(-1) - v  # mass of the patches ranked above this one
    # 1e-6: float32 sums (six patches of 0.1 add up to 0.59999996) must not cost a patch more
    return torch.zeros_like(maps, dtype=torch.bool).scatter(-1, idx, before < keep - 1e-6)
