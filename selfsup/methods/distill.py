"""Distillation: a student (any timm model) learns the features of a frozen teacher.

As lightly-train's distillation, after Beyer et al. (2022), "Knowledge distillation: a good teacher
is patient and consistent": the teacher and the student see the same crop (both views of a pair,
each its own crop), mixed up with the batch permuted (a convex combination, weight uniform in 0-1).
- Global term, on the pooled features, the student's through a linear projection to the teacher's
  dimension: `loss: mse`, their mean squared error (lightly-train's v2); `loss: kl`, the KL
  divergence between the teacher's and the student's distributions over similarities to a queue of
  L2-normalised teacher embeddings (this batch's and past ones), temperature 0.07 (its v3).
- Patch term (`patch_weight`), where both models give spatial features (a CNN's map, a ViT's patch
  tokens): the student's map projected per position and resized bilinearly to the teacher's grid;
  MSE (`mse`), or the KL between each token's distributions over similarities to the image's own
  tokens (`kl`).
- The teacher is a selfsup run's backbone or an exported folder (`method.teacher`, a URI the
  platform loads and attaches with `set_teacher`; nothing is downloaded). It runs in eval mode under
  no-grad, in the step's autocast (bf16 where the device computes it), and neither its weights nor
  the queue go into checkpoints: a resume attaches the teacher again.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.methods.base import Method, Params, collapse_probe, in_fp32


def pooled_and_spatial(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled features (B, D), spatial features (B, D', h, w) or None) of a timm model; a model
    without timm's forward_features/forward_head (TorchScript) gives the pooled ones only."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return model(x), None
    f = model.forward_features(x)
    pooled = model.forward_head(f, pre_logits=True)
    if f.dim() == 4:  # a CNN's map, channels first; channels last (Swin-style) turned
        channels_last = f.shape[-1] == pooled.shape[1] and f.shape[1] != pooled.shape[1]
        return pooled, f.permute(0, 3, 1, 2) if channels_last else f
    prefix = getattr(model, "num_prefix_tokens", None)
    if f.dim() == 3 and prefix is not None:  # a ViT's tokens: the patches on their square grid
        tokens = f[:, prefix:]
        side = math.isqrt(tokens.shape[1])
        if side * side == tokens.shape[1]:
            return pooled, tokens.transpose(1, 2).reshape(len(f), -1, side, side)
    return pooled, None


@in_fp32
def queue_kl_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over the queue (K, D): each distribution is softmax(cos(x, queue) / T)."""
    s = F.normalize(student, dim=-1) @ queue.T / temperature
    t = F.normalize(teacher, dim=-1) @ queue.T / temperature
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1).detach(), reduction="batchmean")


@in_fp32
def token_kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """student, teacher (B, N, D): KL, per token, between the teacher's and the student's
    distributions over cosine similarities to the same image's tokens (its own model's), over T."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    ss = (s @ s.transpose(1, 2)).flatten(0, 1) / temperature
    tt = (t @ t.transpose(1, 2)).flatten(0, 1) / temperature
    return F.kl_div(F.log_softmax(ss, -1), F.softmax(tt, -1).detach(), reduction="batchmean")


class DistillParams(Params):
    teacher: str = Field(min_length=1)  # a selfsup run, or an export folder (timm, safetensors, torchscript)
    loss: Literal["mse", "kl"] = "kl"
    temperature: float = Field(0.07, gt=0)  # kl
    queue_size: int | None = Field(None, ge=1)  # kl; None: a quarter of the train split, at most 8192
    patch_weight: float = Field(1.0, ge=0)  # 0: the global term alone
    mixup: bool = True


class Distill(Method):
    view_kind = "two_views"
    Params = DistillParams

    def __init__(self, backbone, feat_dim, params: DistillParams, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        self.queue_size = params.queue_size or min(8192, max(16, (num_samples or 32768) // 4))
        # The projections take the teacher's dimension: made by set_teacher, or by loading a checkpoint
        # (evaluation and export need no teacher).
        self.register_state_dict_post_hook(_drop_teacher)
        self.register_load_state_dict_pre_hook(_projections_from_state)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    def set_teacher(self, teacher: nn.Module, input_size: tuple[int, int, int]) -> None:
        """Attach the frozen teacher; `input_size` (C, H, W) is what both models take."""
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
        was_training = self.backbone.training
        x = torch.zeros(2, *input_size)
        with torch.no_grad():
            t, t_map = pooled_and_spatial(teacher, x)
            s, s_map = pooled_and_spatial(self.backbone.eval(), x)
        self.backbone.train(was_training)
        self.teacher = teacher
        if not hasattr(self, "project"):
            self._make_projections(s.shape[1], t.shape[1], (s_map.shape[1], t_map.shape[1]) if s_map is not None
                                   and t_map is not None else None)
        self.register_buffer("queue", torch.zeros(self.queue_size, t.shape[1]), persistent=False)

    def _make_projections(self, student_dim: int, teacher_dim: int, patch_dims: tuple[int, int] | None) -> None:
        self.project = nn.Linear(student_dim, teacher_dim)
        nn.init.trunc_normal_(self.project.weight, std=0.02)
        if patch_dims:
            self.project_patch = nn.Linear(*patch_dims)
            nn.init.trunc_normal_(self.project_patch.weight, std=0.02)

    @torch.no_grad()
    def _enqueue(self, teacher: torch.Tensor) -> None:
        new = F.normalize(teacher.float(), dim=-1)[: self.queue_size]
        self.queue.copy_(torch.cat([new, self.queue])[: self.queue_size])

    def forward(self, batch):
        if not hasattr(self, "teacher"):
            raise RuntimeError("distill has no teacher attached (see set_teacher)")
        p = self.params
        x = torch.cat([batch["view0"], batch["view1"]])
        if p.mixup:
            lam = float(torch.rand(()))
            x = lam * x + (1 - lam) * x[torch.randperm(len(x), device=x.device)]
        with torch.no_grad():
            self.teacher.eval()
            t, t_map = pooled_and_spatial(self.teacher, x)
        s, s_map = pooled_and_spatial(self.backbone, x)
        z = self.project(s)
        if p.loss == "mse":
            global_ = F.mse_loss(z.float(), t.float())
        else:
            self._enqueue(t)
            global_ = queue_kl_loss(z, t, self.queue, p.temperature)
        out = {"global_loss": global_.detach()}
        loss = global_
        if hasattr(self, "project_patch") and p.patch_weight > 0:
            z_map = F.interpolate(self.project_patch(s_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size=t_map.shape[-2:],
                                  mode="bilinear", align_corners=False)
            zs, ts = z_map.flatten(2).transpose(1, 2), t_map.flatten(2).transpose(1, 2)  # (B, N, D)
            patch = F.mse_loss(zs.float(), ts.float()) if p.loss == "mse" else token_kl_loss(zs, ts, p.temperature)
            out["patch_loss"] = patch.detach()
            loss = loss + p.patch_weight * patch
        return {"loss": loss, **out, **collapse_probe(s)}


def _drop_teacher(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[k]


def _projections_from_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    w = state_dict.get(prefix + "project.weight")
    if w is not None and not hasattr(module, "project"):
        pw = state_dict.get(prefix + "project_patch.weight")
        module._make_projections(w.shape[1], w.shape[0], (pw.shape[1], pw.shape[0]) if pw is not None else None)


def _teacher_not_missing(module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith("teacher.")]
