"""Clustering shared by methods that fit prototypes (DeepCluster-v2) or visual words (BEiT's tokenizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k, D) unit norm, assignment (N,)) of unit-norm x by cosine k-means."""
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(c))
        c = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), c)  # an empty cluster keeps its centroid
    return c, nearest(x, c)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the most cosine-similar centroid for each row, in chunks (bounded memory)."""
    return torch.cat([(x[i:i + chunk] @ c.T).argmax(1) for i in range(0, len(x), chunk)])
