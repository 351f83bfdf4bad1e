"""SwAV (Caron et al., 2020): swapped prediction of online cluster codes. Codes of each global
crop come from Sinkhorn-Knopp over the global batch (sums across workers: an equal share of the
batch per prototype); every other crop predicts them from its prototype scores. Multi-crop, an
optional queue of past embeddings for small batches, prototypes frozen early in the run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.dist import world


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        torch.distributed.all_reduce(x)
    return x


@torch.no_grad()
@in_fp32
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Codes (B, K) for scores (B, K) of this worker's samples, balanced over the global batch:
    every prototype gets 1/K of the mass, every sample 1/B (rows of the result sum to 1). Workers
    may hold different numbers of samples (DINOv2's masked patches)."""
    q = torch.exp(scores / eps).T  # (K, B)
    q /= _all_reduce(q.sum())
    k, b = q.shape
    b_total = _all_reduce(torch.tensor(float(b), device=q.device))
    for _ in range(iters):
        q /= _all_reduce(q.sum(1, keepdim=True))
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b_total
    return (q * b_total).T


@in_fp32
def swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over (code of crop i, every other crop v) of CE(code_i, softmax(scores_v / T))."""
    total, pairs = 0.0, 0
    for i, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v != i:
                total = total - (q * F.log_softmax(s / temperature, dim=1)).sum(1).mean()
                pairs += 1
    return total / pairs


class SwAVParams(Params):
    n_prototypes: int = Field(3000, ge=1)
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    temperature: float = Field(0.1, gt=0)
    sinkhorn_eps: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(3, ge=1)
    queue_length: int = Field(0, ge=0)  # per worker, per global crop; 0: no queue
    queue_start_fraction: float = Field(0.15, ge=0, le=1)
    freeze_prototypes_fraction: float = Field(0.01, ge=0, le=1)  # the paper: the first epoch's iterations


class SwAV(Method):
    view_kind = "multi_crop"
    Params = SwAVParams

    def __init__(self, backbone, feat_dim, params: SwAVParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.projector = mlp([feat_dim, p.proj_hidden_dim, p.proj_dim])
        self.prototypes = nn.Linear(p.proj_dim, p.n_prototypes, bias=False)
        # One queue of past global-crop embeddings: it only widens the batch Sinkhorn balances over.
        self.register_buffer("queue", torch.zeros(p.queue_length, p.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.progress = 0.0

    @torch.no_grad()
    def before_step(self, progress):
        self.progress = progress
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, batch):
        globals_ = [v for k, v in sorted(batch.items()) if k.startswith("global")]
        locals_ = [v for k, v in sorted(batch.items()) if k.startswith("local")]
        B = globals_[0].shape[0]
        z = [F.normalize(self.projector(self.backbone(torch.cat(g))), dim=1) for g in (globals_, locals_) if g]
        z = torch.cat(z)
        scores = list(self.prototypes(z).split(B))
        codes = []
        p = self.params
        queued = self.queue[: int(self.queue_filled)] if self.progress >= p.queue_start_fraction else self.queue[:0]
        for i in range(len(globals_)):
            s = torch.cat([self.prototypes(queued), scores[i]]).detach()
            codes.append(sinkhorn(s, p.sinkhorn_eps, p.sinkhorn_iters)[-B:])
        if p.queue_length:
            with torch.no_grad():
                new = z[: len(globals_) * B].detach()
                self.queue.copy_(torch.cat([new, self.queue])[: p.queue_length])
                self.queue_filled.fill_(min(p.queue_length, int(self.queue_filled) + len(new)))
        loss = swapped_prediction(scores, codes, p.temperature)
        return {"loss": loss, **collapse_probe(z[:B])}

    def after_backward(self, progress):
        if progress < self.params.freeze_prototypes_fraction:
            self.prototypes.weight.grad = None
