"""MoCo v3 (Chen, Xie & He, 2021): no queue; a momentum encoder gives keys, in-batch keys from
every worker are the negatives; a predictor on the query side; symmetrised loss. Defaults suit
ViTs (temperature 0.2); ResNets used 1.0 in the paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, cosine, ema_update, frozen_copy, in_fp32
from selfsup.methods.dist import gather, world


@in_fp32
def contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """This worker's queries against every worker's keys; the positive is the query's own key.
    Scaled by 2 * temperature as in the paper."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = gather(k)
    rank, _ = world()
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    return F.cross_entropy(q @ keys.T / temperature, labels) * 2 * temperature


class MoCoV3Params(Params):
    temperature: float = Field(0.2, gt=0)
    momentum: float = Field(0.99, ge=0, le=1)  # cosine to 1 over the run
    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)


class MoCoV3(Method):
    view_kind = "two_views"
    Params = MoCoV3Params

    def __init__(self, backbone, feat_dim, params: MoCoV3Params, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.projector = mlp([feat_dim, p.proj_hidden_dim, p.proj_hidden_dim, p.proj_dim], last_bn=True)
        self.predictor = mlp([p.proj_dim, p.pred_hidden_dim, p.proj_dim], last_bn=True)
        self.momentum_backbone, self.momentum_projector = frozen_copy(backbone), frozen_copy(self.projector)
        self.momentum = p.momentum

    def before_step(self, progress):
        self.momentum = cosine(self.params.momentum, 1.0, progress)

    def forward(self, batch):
        x = torch.cat([batch["view0"], batch["view1"]])
        z = self.projector(self.backbone(x))
        q0, q1 = self.predictor(z).chunk(2)
        with torch.no_grad():
            k0, k1 = self.momentum_projector(self.momentum_backbone(x)).chunk(2)
        t = self.params.temperature
        loss = contrastive(q0, k1, t) + contrastive(q1, k0, t)
        return {"loss": loss, "momentum": self.momentum, **collapse_probe(z)}

    def after_step(self, progress):
        ema_update(self.momentum_backbone, self.backbone, self.momentum)
        ema_update(self.momentum_projector, self.projector, self.momentum)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("momentum_")]
