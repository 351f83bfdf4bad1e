"""SimCLR (Chen et al., 2020): two views, an MLP projector, NT-Xent over every view in the
global batch; negatives are gathered from all workers with gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.dist import gather_with_grad, world


@in_fp32
def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent for this worker's pairs (z0[i], z1[i]) against all views of all workers.

    Each of the 2B local views is an anchor; its positive is its pair, its negatives the other
    2N - 2 views of the global batch of N pairs. Returns the mean over local anchors, so the mean
    over workers equals one worker's loss on the whole batch."""
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    B = z0.shape[0]
    rank, _ = world()
    local = torch.cat([z0, z1])  # (2B, d)
    everyone0, everyone1 = gather_with_grad(z0), gather_with_grad(z1)
    N = everyone0.shape[0]
    keys = torch.cat([everyone0, everyone1])  # (2N, d): all first views, then all second views
    logits = local @ keys.T / temperature
    own = torch.arange(B, device=z0.device) + rank * B
    self_idx = torch.cat([own, own + N])  # each anchor's own position among the keys
    pos_idx = torch.cat([own + N, own])
    logits[torch.arange(2 * B, device=z0.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


class SimCLRParams(Params):
    temperature: float = Field(0.2, gt=0)
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)


class SimCLR(Method):
    view_kind = "two_views"
    Params = SimCLRParams

    def __init__(self, backbone, feat_dim, params: SimCLRParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.projector = mlp([feat_dim, params.proj_hidden_dim, params.proj_dim])

    def forward(self, batch):
        x = torch.cat([batch["view0"], batch["view1"]])  # one backbone pass: BN sees both views
        z = self.projector(self.backbone(x))
        z0, z1 = z.chunk(2)
        return {"loss": nt_xent(z0, z1, self.params.temperature), **collapse_probe(z0)}
