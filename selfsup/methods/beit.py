"""BEiT (Bao et al., 2022): blockwise-masked patches are replaced by a mask token and the encoder
predicts each masked patch's discrete visual token.

No pretrained dVAE can be downloaded here, so the platform fits its own tokenizer: k-means visual
words over per-patch normalised pixels (`selfsup tokenizer fit`, or automatically at the start of
a run, stored as `tokenizer.pt` beside the run). A tokenizer file is one of:
- a dict saved with torch.save: {"codebook": float tensor (V, patch*patch*C), "patch_size": int},
  read with weights_only=True;
- a TorchScript module (torch.jit.save) mapping images (B, C, H, W), normalised as the model's
  input, to token ids (B, N): a user's own dVAE tokenizer, for example.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.clustering import spherical_kmeans
from selfsup.methods.vit import MaskedViT, patchify


def normalised_patches(img: torch.Tensor, patch: int) -> torch.Tensor:
    x = patchify(img.float(), patch)
    return F.normalize(x - x.mean(-1, keepdim=True), dim=-1)


def fit_codebook(images: torch.Tensor, patch: int, vocab: int, iters: int = 20, seed: int = 0,
                 max_patches: int = 200_000) -> dict:
    """k-means visual words over (at most `max_patches` of) the normalised patches of `images` (M, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = normalised_patches(images, patch).flatten(0, 1)
    x = x[x.norm(dim=1) > 0]  # flat patches carry no word
    if len(x) > max_patches:
        x = x[torch.randperm(len(x), generator=g)[:max_patches]]
    if len(x) < vocab:
        raise ValueError(f"{len(x)} non-flat patches cannot make a vocabulary of {vocab} words")
    centroids, _ = spherical_kmeans(x, vocab, iters, g)
    return {"codebook": centroids, "patch_size": patch}


class BEiTParams(Params):
    vocab_size: int = Field(512, ge=2)
    tokenizer: str | None = None  # a URI of a tokenizer file; None: the run's own tokenizer.pt, fitted when absent
    tokenizer_samples: int = Field(20000, ge=1)  # images the k-means tokenizer is fitted on


class BEiT(Method):
    view_kind = "masked"
    mask_strategies = ("random", "blockwise")
    Params = BEiTParams

    def __init__(self, backbone, feat_dim, params: BEiTParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.encoder = MaskedViT(backbone)
        self.patch = self.encoder.patch_size
        chans = backbone.patch_embed.proj.in_channels
        self.register_buffer("codebook", torch.zeros(params.vocab_size, self.patch ** 2 * chans))
        self.scripted: nn.Module | None = None
        self.head = nn.Linear(feat_dim, params.vocab_size)

    def load_tokenizer(self, data: bytes, name: str = "tokenizer") -> None:
        """Load a tokenizer file's bytes (either format above)."""
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            try:
                self.scripted = torch.jit.load(io.BytesIO(data), map_location="cpu")
                return
            except Exception as e:
                raise ValueError(f"{name} is neither a codebook dict nor a TorchScript tokenizer ({e})") from None
        cb = state.get("codebook") if isinstance(state, dict) else None
        if cb is None or tuple(cb.shape) != tuple(self.codebook.shape) or state.get("patch_size") != self.patch:
            raise ValueError(f"{name}: expected a codebook of shape {tuple(self.codebook.shape)} for patch size "
                             f"{self.patch}, got {None if cb is None else tuple(cb.shape)}, patch {state.get('patch_size')}")
        self.codebook.copy_(cb)

    @torch.no_grad()
    @in_fp32  # the same tokens as at fitting time, in fp32
    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        if self.scripted is not None:
            return self.scripted(img).long()
        if not bool(self.codebook.abs().sum() > 0):
            raise RuntimeError("BEiT has no tokenizer loaded (see load_tokenizer)")
        return (normalised_patches(img, self.patch) @ self.codebook.float().T).argmax(-1)

    def forward(self, batch):
        img, mask = batch["image"], batch["mask"]
        target = self.tokens(img)
        tokens = self.encoder.with_mask_tokens(img, mask)
        logits = self.head(tokens[mask]).float()
        loss = F.cross_entropy(logits, target[mask])
        acc = (logits.argmax(-1) == target[mask]).float().mean()
        return {"loss": loss, "token_accuracy": acc, **collapse_probe(tokens.mean(1))}
