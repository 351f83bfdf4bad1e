"""The method interface. A method is plain PyTorch (no Ray): it can train on any machine.

A method is an `nn.Module` around a timm backbone that
- declares the kind of views it consumes (`view_kind`: two_views, multi_crop or masked; the
  pipeline builds them, see selfsup/pipelines/views.py for the batch keys),
- declares its hyperparameters as a pydantic model (`Params`), addressable as `method.<name>`
  in configs and sweeps,
- returns from `forward(batch)` a dict holding `loss` and named metrics (plain floats or 0-d tensors),
- updates its non-gradient state in `after_step(progress)` (EMA teachers, momentum schedules),
  and its schedules in `before_step(progress)`; `progress` is the fraction of the run done, in
  [0, 1], so schedules follow the steps the run will really take, budgeted or not,
- keeps the backbone at `self.backbone`: evaluation reads features from it,
- may size itself to the data (`num_samples`: the train split's size, for queues and memory
  banks) and act at epoch starts (`start_epoch`, e.g. DeepCluster's k-means),
- reports a collapse probe (`collapse_probe`) of its embeddings with its metrics.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Method(nn.Module):
    view_kind: ClassVar[str]
    mask_strategies: ClassVar[tuple[str, ...]] = ()  # for view_kind "masked": the strategies it can use
    masks_global_crops: ClassVar[bool] = False  # for view_kind "multi_crop": it reads data.views.masks
    Params: ClassVar[type[Params]] = Params

    def __init__(self, backbone: nn.Module, feat_dim: int, params: Params, num_samples: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.params = params
        self.num_samples = num_samples

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_step(self, progress: float) -> None:
        """Set schedules that depend on how far the run is (0 at the start, 1 at the end)."""

    def after_backward(self, progress: float) -> None:
        """Adjust gradients before the optimizer step (e.g. freeze a layer early in the run)."""

    def after_step(self, progress: float) -> None:
        """Update non-gradient state after the optimizer step (EMA teachers, queues)."""

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of each epoch (also the first epoch after a resume)."""

    def student_parameters(self):
        """What the optimizer trains (the default: every parameter that requires grad)."""
        return [p for p in self.parameters() if p.requires_grad]


def in_fp32(fn):
    """Run a loss (or a target computation) in fp32 inside bf16 autocast: autocast runs matmuls
    (similarities, cross-correlations, prototype scores) in bf16 whatever their inputs' dtype, and a
    loss needs more than bf16's 8 bits of mantissa. Floating-point tensor arguments arrive as fp32."""

    def as32(a):
        if torch.is_tensor(a):
            return a.float() if a.is_floating_point() else a
        if isinstance(a, (list, tuple)):
            return type(a)(as32(x) for x in a)
        return a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*as32(args), **{k: as32(v) for k, v in kwargs.items()})

    return wrapper


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine from `start` at progress 0 to `end` at progress 1."""
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def collapse_probe(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two signs of collapse of embeddings z (B, D): `embed_std`, the mean per-dimension std of the
    L2-normalised embeddings (0 when collapsed; about 1/sqrt(D) when spread), and `embed_rank`, the
    effective rank (exp of the entropy of the normalised singular values; 1 when collapsed)."""
    z = torch.nn.functional.normalize(z.detach().float(), dim=1)
    std = z.std(0).mean()
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
    return {"embed_std": std, "embed_rank": rank}


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that takes no gradient: the start of an EMA teacher, target or key encoder."""
    import copy

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad = False
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)
