"""BYOL (Grill et al., 2020): an online network predicts a target network's (an EMA of it)
projection of the other view; no negatives. The asymmetric predictor and the slowly moving
target prevent collapse. Default views: blur always on view0, rarely on view1, solarize on view1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, cosine, ema_update, frozen_copy, in_fp32


@in_fp32
def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch; z is the target (no gradient)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOLParams(Params):
    momentum: float = Field(0.996, ge=0, le=1)  # cosine to 1 over the run
    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)


class BYOL(Method):
    view_kind = "two_views"
    Params = BYOLParams

    def __init__(self, backbone, feat_dim, params: BYOLParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.projector = mlp([feat_dim, p.proj_hidden_dim, p.proj_dim])
        self.predictor = mlp([p.proj_dim, p.pred_hidden_dim, p.proj_dim])
        self.target_backbone, self.target_projector = frozen_copy(backbone), frozen_copy(self.projector)
        self.momentum = p.momentum

    def before_step(self, progress):
        self.momentum = cosine(self.params.momentum, 1.0, progress)

    def forward(self, batch):
        x = torch.cat([batch["view0"], batch["view1"]])
        z = self.projector(self.backbone(x))
        p0, p1 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t0, t1 = self.target_projector(self.target_backbone(x)).chunk(2)
        loss = regression_loss(p0, t1) + regression_loss(p1, t0)
        return {"loss": loss, "momentum": self.momentum, **collapse_probe(z)}

    def after_step(self, progress):
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("target_")]
