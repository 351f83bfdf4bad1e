"""DeepCluster-v2 (Caron et al., 2020): k-means over a memory bank of every sample's embedding
(several heads with their own k), then every crop learns to classify its sample into its cluster
with the centroids as fixed prototypes.

The memory bank holds the first global crop's embedding of every sample seen, by index; k-means
runs at each epoch start and every `recluster_every_steps` (runs shorter than an epoch still
cluster), over the banks of all workers merged (the newest entry of each sample wins). A fresh run
clusters first as soon as the bank holds FIRST_BANK x the largest k samples (a few steps) rather
than learning nothing until step `recluster_every_steps`. Samples not yet clustered take the
nearest centroid; until the first clustering the loss is zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.backbones import mlp
from selfsup.methods.base import Method, Params, collapse_probe, in_fp32
from selfsup.methods.clustering import spherical_kmeans
from selfsup.methods.dist import world


@in_fp32
def cluster_loss(z: torch.Tensor, centroids: list[torch.Tensor], assigned: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of every crop's prototype scores against its sample's cluster, averaged over
    the k-means heads; a sample not clustered yet (-1) takes its first crop's nearest centroid.
    z: (n_crops * B, D), the first B rows the first global crop; assigned: (heads, B)."""
    B = assigned.shape[1]
    losses = []
    for cent, target in zip(centroids, assigned):
        nearest = (z[:B].detach() @ cent.T).argmax(1)
        target = torch.where(target >= 0, target, nearest).repeat(len(z) // B)
        losses.append(F.cross_entropy(z @ cent.T / temperature, target))
    return torch.stack(losses).mean()


class DeepClusterV2Params(Params):
    n_prototypes: list[int] = [300, 300, 300]  # one k-means head each; the paper: 3 x 3000 on ImageNet
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    temperature: float = Field(0.1, gt=0)
    kmeans_iters: int = Field(10, ge=1)
    recluster_every_steps: int = Field(100, ge=0)  # 0: only at epoch starts


class DeepClusterV2(Method):
    view_kind = "multi_crop"
    Params = DeepClusterV2Params
    FIRST_BANK = 4  # samples per centroid before the first k-means: fewer gives near-singleton clusters

    def __init__(self, backbone, feat_dim, params: DeepClusterV2Params, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        if not num_samples:
            raise ValueError("deepclusterv2 needs the train split's size (num_samples) for its memory bank")
        self.projector = mlp([feat_dim, p.proj_hidden_dim, p.proj_dim])
        for i, k in enumerate(p.n_prototypes):
            self.register_buffer(f"centroids{i}", torch.zeros(k, p.proj_dim))
        self.register_buffer("memory", torch.zeros(num_samples, p.proj_dim))
        self.register_buffer("written", torch.zeros(num_samples, dtype=torch.long))  # step of the last write, 0: never
        self.register_buffer("assignments", torch.full((len(p.n_prototypes), num_samples), -1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))
        self.global_batch = 0  # set by forward, read by after_step

    def start_epoch(self, epoch):
        if int(self.written.max()) > 0:
            self.recluster()

    @torch.no_grad()
    def recluster(self) -> None:
        memory, written = self.memory.clone(), self.written.clone()
        if world()[1] > 1:  # merge the workers' banks: the newest write of each sample wins
            newest = written.clone()
            torch.distributed.all_reduce(newest, op=torch.distributed.ReduceOp.MAX)
            mine = (written == newest) & (written > 0)
            memory[~mine] = 0
            torch.distributed.all_reduce(memory)
            owners = mine.long()
            torch.distributed.all_reduce(owners)
            memory /= owners.clamp_min(1)[:, None]  # a tie between workers: their mean
            written = newest
        seen = (written > 0).nonzero().squeeze(1)
        x = F.normalize(memory[seen], dim=1)
        g = torch.Generator().manual_seed(int(self.steps))  # the same on every worker
        self.assignments.fill_(-1)
        for i, k in enumerate(self.params.n_prototypes):
            c, a = spherical_kmeans(x.cpu(), min(k, len(x)), self.params.kmeans_iters, g)
            cent = getattr(self, f"centroids{i}")
            cent.zero_()
            cent[: len(c)] = c.to(cent.device)
            self.assignments[i, seen] = a.to(self.assignments.device)
        self.clustered.fill_(True)

    def forward(self, batch):
        globals_ = [v for k, v in sorted(batch.items()) if k.startswith("global")]
        locals_ = [v for k, v in sorted(batch.items()) if k.startswith("local")]
        idx = batch["index"]
        B = len(idx)
        z = torch.cat([F.normalize(self.projector(self.backbone(torch.cat(v))), dim=1) for v in (globals_, locals_) if v])
        if not bool(self.clustered):
            loss = z.sum() * 0.0  # nothing to learn yet; the graph stays whole for DDP
        else:
            centroids = [getattr(self, f"centroids{i}") for i in range(len(self.params.n_prototypes))]
            loss = cluster_loss(z, centroids, self.assignments[:, idx], self.params.temperature)
        self.global_batch = B * world()[1]
        with torch.no_grad():
            self.steps += 1
            self.memory[idx] = z[:B].detach().float()
            self.written[idx] = self.steps
        return {"loss": loss, **collapse_probe(z[:B])}

    def after_step(self, progress):
        every, steps = self.params.recluster_every_steps, int(self.steps)
        # Decided from the step count and global batch, the same on every worker: recluster() is collective.
        first = not bool(self.clustered) and steps * self.global_batch >= self.FIRST_BANK * max(self.params.n_prototypes)
        if first or (every and steps % every == 0):
            self.recluster()
