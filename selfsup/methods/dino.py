"""DINO (Caron et al., 2021): self-distillation with no labels.

A student (backbone + DINO head) on every crop matches a teacher (an EMA of the student) on the
global crops. The teacher's outputs are centred (a running mean over the global batch) and
sharpened (a low temperature, warmed up); the head's weight-normalised last layer stays frozen
early in the run. Every schedule is over the run's progress (0..1), not over epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, cosine, ema_update, frozen_copy, in_fp32
from selfsup.methods.dist import world


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:  # fixed unit norms: DINO's choice for stability
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


@in_fp32
def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher distribution of each global crop and
    the student's distribution of every *other* crop, averaged over pairs and samples."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    return cross_entropy_pairs(student, targets, student_temp)


@in_fp32
def cross_entropy_pairs(student: list[torch.Tensor], targets: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Mean over pairs (target of global crop i, student logits of crop j != i) of the batch-mean
    cross-entropy; targets are distributions (centred and sharpened, or Sinkhorn-Knopp's codes)."""
    logps = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for i, q in enumerate(targets):
        for j, logp in enumerate(logps):
            if i == j:  # the same global crop: no signal
                continue
            total = total + torch.sum(-q.detach() * logp, dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean output over the global batch (summed across workers)."""
    out = torch.cat(teacher).float()
    batch_sum = out.sum(0, keepdim=True)
    count = torch.tensor([out.shape[0]], dtype=torch.float32, device=out.device)
    if world()[1] > 1:
        torch.distributed.all_reduce(batch_sum)
        torch.distributed.all_reduce(count)
    return center * momentum + batch_sum / count.clamp_min(1) * (1 - momentum)  # no rows (no masked patch): decay


def teacher_schedule(p, progress: float) -> tuple[float, float]:
    """(teacher temperature, EMA momentum) at `progress`: the temperature linear from its warm-up
    value over warmup_teacher_temp_fraction, the momentum cosine to 1 over the run."""
    w = p.warmup_teacher_temp_fraction
    ramp = min(1.0, progress / w) if w > 0 else 1.0
    temp = p.warmup_teacher_temp + (p.teacher_temp - p.warmup_teacher_temp) * ramp
    return temp, cosine(p.momentum_teacher, 1.0, progress)


class DINOParams(Params):
    out_dim: int = Field(4096, ge=1)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    norm_last_layer: bool = True
    # BN in the head's MLP (DINO's --use_bn_in_head, used with ResNets): batch statistics spread the
    # near-identical outputs of a fresh head apart, so short runs leave the uniform start sooner.
    use_bn_in_head: bool = False
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)  # after warm-up
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_fraction: float = Field(0.3, ge=0, le=1)  # DINO: 30 of 100 epochs
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum_teacher: float = Field(0.996, ge=0, le=1)  # cosine to 1 over the run
    freeze_last_layer_fraction: float = Field(0.01, ge=0, le=1)  # DINO: the first of 100 epochs


class DINO(Method):
    view_kind = "multi_crop"
    Params = DINOParams

    def __init__(self, backbone, feat_dim, params: DINOParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.head = DINOHead(feat_dim, params.out_dim, params.hidden_dim, params.bottleneck_dim,
                             norm_last_layer=params.norm_last_layer, use_bn=params.use_bn_in_head)
        self.teacher_backbone, self.teacher_head = frozen_copy(backbone), frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, params.out_dim))
        self.teacher_temp = params.warmup_teacher_temp
        self.momentum = params.momentum_teacher

    def before_step(self, progress):
        self.teacher_temp, self.momentum = teacher_schedule(self.params, progress)

    def forward(self, batch):
        globals_ = [v for k, v in sorted(batch.items()) if k.startswith("global")]
        locals_ = [v for k, v in sorted(batch.items()) if k.startswith("local")]
        with torch.no_grad():
            self.teacher_backbone.train(self.training)
            t = self.teacher_head(self.teacher_backbone(torch.cat(globals_))).chunk(len(globals_))
        # Student: one pass per resolution (crops of one size batch together).
        feats = self.backbone(torch.cat(globals_))
        s = list(self.head(feats).chunk(len(globals_)))
        if locals_:
            s += list(self.head(self.backbone(torch.cat(locals_))).chunk(len(locals_)))
        loss = dino_loss(s, list(t), self.center, self.params.student_temp, self.teacher_temp)
        self.center.copy_(updated_center(self.center, list(t), self.params.center_momentum))
        with torch.no_grad():
            probs = F.softmax((t[0].float() - self.center) / self.teacher_temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy, "teacher_temp": self.teacher_temp,
                "momentum": self.momentum, **collapse_probe(feats)}

    def after_backward(self, progress):
        if progress < self.params.freeze_last_layer_fraction:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, progress):
        ema_update(self.teacher_backbone, self.backbone, self.momentum)
        ema_update(self.teacher_head, self.head, self.momentum)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher_")]
