"""VICReg (Bardes, Ponce & LeCun, 2022): invariance (MSE between the views' embeddings), variance
(a hinge keeping each dimension's std above 1) and covariance (off-diagonal covariances to 0).

Variance and covariance use the global batch: embeddings are gathered from every worker with
gradients; the invariance term is a mean over local pairs, which DDP averages into the global mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.dist import gather_with_grad


def _var_cov(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = z.shape
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + 1e-4)
    var = F.relu(1 - std).mean()
    cov = z.T @ z / (n - 1)
    off = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
    return var, off / d


@in_fp32
def vicreg_loss(z0: torch.Tensor, z1: torch.Tensor, sim_w: float, var_w: float, cov_w: float) -> dict[str, torch.Tensor]:
    inv = F.mse_loss(z0, z1)
    g0, g1 = gather_with_grad(z0), gather_with_grad(z1)
    v0, c0 = _var_cov(g0)
    v1, c1 = _var_cov(g1)
    var, cov = v0 + v1, c0 + c1
    return {"loss": sim_w * inv + var_w * var + cov_w * cov, "invariance": inv, "variance": var, "covariance": cov}


class VICRegParams(Params):
    sim_weight: float = Field(25.0, ge=0)
    var_weight: float = Field(25.0, ge=0)
    cov_weight: float = Field(1.0, ge=0)
    proj_hidden_dim: int = Field(2048, ge=1)  # the paper: 8192 on ImageNet
    proj_dim: int = Field(2048, ge=1)


class VICReg(Method):
    view_kind = "two_views"
    Params = VICRegParams

    def __init__(self, backbone, feat_dim, params: VICRegParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.projector = mlp([feat_dim, params.proj_hidden_dim, params.proj_hidden_dim, params.proj_dim])

    def forward(self, batch):
        z0, z1 = self.projector(self.backbone(torch.cat([batch["view0"], batch["view1"]]))).chunk(2)
        p = self.params
        return {**vicreg_loss(z0, z1, p.sim_weight, p.var_weight, p.cov_weight), **collapse_probe(z0)}
