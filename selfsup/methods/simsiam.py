"""SimSiam (Chen & He, 2021): BYOL without the momentum target. A predictor on one branch and a
stop-gradient on the other are enough to prevent collapse; no negatives, no EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32


@in_fp32
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class SimSiamParams(Params):
    proj_dim: int = Field(2048, ge=1)
    pred_hidden_dim: int = Field(512, ge=1)


class SimSiam(Method):
    view_kind = "two_views"
    Params = SimSiamParams

    def __init__(self, backbone, feat_dim, params: SimSiamParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.projector = mlp([feat_dim, p.proj_dim, p.proj_dim, p.proj_dim], last_bn=True)
        self.predictor = mlp([p.proj_dim, p.pred_hidden_dim, p.proj_dim])

    def forward(self, batch):
        z = self.projector(self.backbone(torch.cat([batch["view0"], batch["view1"]])))
        z0, z1 = z.chunk(2)
        p0, p1 = self.predictor(z).chunk(2)
        loss = 0.5 * negative_cosine(p0, z1) + 0.5 * negative_cosine(p1, z0)
        return {"loss": loss, **collapse_probe(z0)}
