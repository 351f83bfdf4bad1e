"""MoCo v2 (Chen et al., 2020): a momentum key encoder and a queue of past keys as negatives.

Shuffle-BN, made DDP-safe: the key encoder's batch (gathered from all workers) is permuted and
run in separate BN groups, so BN statistics never see a query's own key beside it; on one worker
the batch is still split into `shuffle_groups` groups, as on that many GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, cosine, ema_update, frozen_copy, in_fp32
from selfsup.methods.dist import gather, world


@in_fp32
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log(exp(q.k+/t) / (exp(q.k+/t) + sum over the queue exp(q.n/t))), inputs L2-normalised."""
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """encoder(x) with the global batch permuted and split into BN groups; rows returned in x's order."""
    rank, w = world()
    everyone = gather(x)
    n = everyone.shape[0]
    perm = torch.randperm(n, device=x.device)
    if w > 1:
        torch.distributed.broadcast(perm, 0)
    mine = perm.view(w, -1)[rank]  # this worker's share of the shuffled global batch
    out = torch.cat([encoder(chunk) for chunk in everyone[mine].chunk(groups)])
    all_out = torch.empty(n, out.shape[1], device=x.device, dtype=out.dtype)
    all_out[perm] = gather(out)
    return all_out.view(w, -1, out.shape[1])[rank]


class MoCoV2Params(Params):
    temperature: float = Field(0.2, gt=0)
    queue_size: int | None = Field(None, ge=1)  # None: a quarter of the train split, at most 65536
    momentum: float = Field(0.99, ge=0, le=1)  # cosine to 1 over the run (0.999 fixed in the paper's 200 epochs)
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    shuffle_groups: int = Field(2, ge=1)  # BN groups per worker for the key encoder


class MoCoV2(Method):
    view_kind = "two_views"
    Params = MoCoV2Params

    def __init__(self, backbone, feat_dim, params: MoCoV2Params, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.projector = mlp([feat_dim, params.proj_hidden_dim, params.proj_dim], bn=False)
        self.key_backbone, self.key_projector = frozen_copy(backbone), frozen_copy(self.projector)
        size = params.queue_size or min(65536, max(256, (num_samples or 65536) // 4))
        self.register_buffer("queue", F.normalize(torch.randn(size, params.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.momentum = params.momentum

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather(keys)
        size, n = len(self.queue), len(keys)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys[-size:] if n > size else keys
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def before_step(self, progress):
        self.momentum = cosine(self.params.momentum, 1.0, progress)

    def forward(self, batch):
        q = F.normalize(self.projector(self.backbone(batch["view0"])).float(), dim=1)
        key_net = nn.Sequential(self.key_backbone, self.key_projector)
        with torch.no_grad():
            k = F.normalize(shuffled_forward(key_net, batch["view1"], self.params.shuffle_groups).float(), dim=1)
        loss = info_nce(q, k, self.queue.clone(), self.params.temperature)
        self._enqueue(k)
        return {"loss": loss, "momentum": self.momentum, **collapse_probe(q)}

    def after_step(self, progress):
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("key_")]
