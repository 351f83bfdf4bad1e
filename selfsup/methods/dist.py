"""Collectives for losses that use statistics across workers. Without torch.distributed (one
process) each is the identity, so methods run unchanged on one machine."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each worker the gradient of the whole loss w.r.t. its own
    slice (an all_reduce of the gradients, then the local slice). With DDP averaging the
    parameter gradients, W workers then get exactly the gradient of one worker on the whole batch."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (same shape on every worker) from all workers along dim 0, with gradients."""
    return _GatherWithGrad.apply(x) if world()[1] > 1 else x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
