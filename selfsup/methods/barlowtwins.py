"""Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of the two views' embeddings,
standardised over the batch, should be the identity: on-diagonal terms to 1 (invariance),
off-diagonal terms to 0 (redundancy reduction) with weight lambda.

Statistics over the global batch: embeddings are gathered from every worker with gradients, so
each worker computes the one global loss and DDP's averaging yields exactly the gradient of one
worker on the whole batch (the usual all_reduce of the matrix without autograd leaves the
gradient off by a factor of the world size)."""

from __future__ import annotations

import torch
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.dist import gather_with_grad


@in_fp32
def barlow_twins_loss(z0: torch.Tensor, z1: torch.Tensor, lambd: float) -> torch.Tensor:
    z0, z1 = gather_with_grad(z0), gather_with_grad(z1)
    n = z0.shape[0]
    z0 = (z0 - z0.mean(0)) / z0.std(0, unbiased=False).clamp_min(1e-6)
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).clamp_min(1e-6)
    c = z0.T @ z1 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


class BarlowTwinsParams(Params):
    lambd: float = Field(0.0051, ge=0)
    proj_hidden_dim: int = Field(2048, ge=1)  # the paper: 8192 on ImageNet
    proj_dim: int = Field(2048, ge=1)


class BarlowTwins(Method):
    view_kind = "two_views"
    Params = BarlowTwinsParams

    def __init__(self, backbone, feat_dim, params: BarlowTwinsParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.projector = mlp([feat_dim, params.proj_hidden_dim, params.proj_hidden_dim, params.proj_dim], bias_last=False)

    def forward(self, batch):
        z0, z1 = self.projector(self.backbone(torch.cat([batch["view0"], batch["view1"]]))).chunk(2)
        return {"loss": barlow_twins_loss(z0, z1, self.params.lambd), **collapse_probe(z0)}
