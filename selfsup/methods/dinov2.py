"""DINOv2 (Oquab et al., 2023): DINO's image-level self-distillation plus iBOT's masked-patch loss
and the KoLeo regulariser, on a ViT.

- DINO's loss on the pooled (class) token: the student on every crop matches the EMA teacher on
  the other global crops (dino.py's loss and head).
- iBOT (Zhou et al., 2022): the student's global crops are masked blockwise (the pipeline draws the
  masks, `data.views.masks`: an image is masked with probability 0.5, at a ratio of 0.1-0.5); at
  each masked patch the student's patch token matches the teacher's, which saw the unmasked crop.
  The patch head is the DINO head (`separate_ibot_head: false`, the official default) or its own.
- KoLeo (Sablayrolles et al., 2019) on the student's class tokens of each global crop: it spreads
  them by pushing each away from its nearest neighbour in the batch.
- The teacher's outputs are centred by an EMA of their mean (`centering: ema`) or turned into
  balanced codes by Sinkhorn-Knopp over the global batch (`sinkhorn_knopp`, 3 iterations; swav.py's,
  summed across workers), each for the class and the patch outputs.
- LayerScale and drop-path are the backbone's: timm ViT kwargs `init_values` and `drop_path_rate`
  (the teacher runs in eval mode, so never drops a path).

The official defaults (facebookresearch/dinov2, dinov2/configs/ssl_default_config.yaml), and where
each lives here:
- dino: head_n_prototypes 65536 (`out_dim`), head_hidden_dim 2048, head_bottleneck_dim 256,
  head_nlayers 3, loss_weight 1.0, koleo_loss_weight 0.1;
- ibot: loss_weight 1.0, separate_head false, mask_sample_probability 0.5, mask_ratio_min_max
  [0.1, 0.5] (`data.views.masks`);
- teacher: momentum_teacher 0.992 (cosine to 1), teacher_temp 0.07, warmup_teacher_temp 0.04 over
  30 of 100 epochs (`warmup_teacher_temp_fraction` 0.3); student temperature 0.1 (DINO's);
  centering "centering" (the EMA centre, momentum 0.9) or "sinkhorn_knopp";
- student: layerscale 1e-5, drop_path_rate 0.3 for ViT-L (`model.kwargs`);
- optim: AdamW, base_lr 0.004 per 1024 images (sqrt scaling), weight decay 0.04 -> 0.4, warm-up 10
  of 100 epochs, clip_grad 3.0, freeze_last_layer_epochs 1 (`freeze_last_layer_fraction` 0.01);
  its layer-wise lr decay (0.9) and patch-embedding lr factor (0.2) are not applied here;
- crops: 2 global at 224 px, scale 0.32-1; 8 local at 96 px, scale 0.05-0.32 (`data.views`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from selfsup.methods.base import Method, Params, collapse_probe, ema_update, frozen_copy, in_fp32
from selfsup.methods.dino import DINOHead, cross_entropy_pairs, teacher_schedule, updated_center
from selfsup.methods.swav import sinkhorn
from selfsup.methods.vit import MaskedViT


@in_fp32
def ibot_loss(student: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, student_temp: float) -> torch.Tensor:
    """iBOT's masked-patch loss. student (M, K): logits at the M masked patches of `mask` (B, N), in
    its row-major order; targets (M, K): the teacher's distributions there. Each image's masked
    patches are averaged, then the images, those without a mask counting 0."""
    per_patch = torch.sum(-targets.detach() * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    weight = (1 / mask.sum(1).clamp_min(1)).unsqueeze(1).expand_as(mask)[mask]
    return (per_patch * weight).sum() / mask.shape[0]


@in_fp32
def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo: -mean log(distance of each L2-normalised row of x (B, D) to its nearest other row)."""
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2)  # below any cosine: a row is not its own neighbour
        nearest = sims.argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


class DINOv2Params(Params):
    out_dim: int = Field(65536, ge=1)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    separate_ibot_head: bool = False
    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0)  # after warm-up
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_fraction: float = Field(0.3, ge=0, le=1)
    centering: Literal["ema", "sinkhorn_knopp"] = "ema"
    center_momentum: float = Field(0.9, ge=0, lt=1)
    sinkhorn_iters: int = Field(3, ge=1)
    momentum_teacher: float = Field(0.992, ge=0, le=1)  # cosine to 1 over the run
    freeze_last_layer_fraction: float = Field(0.01, ge=0, le=1)


class DINOv2(Method):
    view_kind = "multi_crop"
    masks_global_crops = True
    Params = DINOv2Params

    def __init__(self, backbone, feat_dim, params: DINOv2Params, num_samples=None):
        super().__init__(backbone, feat_dim, params, num_samples)
        p = params
        self.encoder = MaskedViT(backbone)  # the student's ViT, with iBOT's mask token
        self.head = DINOHead(feat_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim)
        self.teacher_backbone, self.teacher_head = frozen_copy(backbone), frozen_copy(self.head)
        if p.separate_ibot_head:
            self.ibot_head = DINOHead(feat_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim)
            self.teacher_ibot_head = frozen_copy(self.ibot_head)
        self.register_buffer("center", torch.zeros(1, p.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, p.out_dim))
        self.teacher_temp = p.warmup_teacher_temp
        self.momentum = p.momentum_teacher

    def before_step(self, progress):
        self.teacher_temp, self.momentum = teacher_schedule(self.params, progress)

    def _targets(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        if self.params.centering == "sinkhorn_knopp":
            return sinkhorn(logits, self.teacher_temp, self.params.sinkhorn_iters)
        return F.softmax((logits.float() - center) / self.teacher_temp, dim=-1)

    def forward(self, batch):
        p = self.params
        n = sum(k.startswith("global") for k in batch)
        crops = torch.cat([batch[f"global{i}"] for i in range(n)])
        mask = torch.cat([batch[f"mask{i}"] for i in range(n)])  # (n * B, N)
        locals_ = [v for k, v in sorted(batch.items()) if k.startswith("local")]
        vit = self.encoder.vit
        with torch.no_grad():
            self.teacher_backbone.eval()  # ViT: no batch statistics, and no drop-path in the teacher
            t_tokens = self.teacher_backbone.forward_features(crops)
            t_cls = self.teacher_head(self.teacher_backbone.forward_head(t_tokens))
            t_patch = self._heads(teacher=True)[1](t_tokens[:, self.encoder.prefix:][mask])
        s_tokens = self.encoder.all_tokens(crops, mask)
        cls = vit.forward_head(s_tokens)
        s_cls = list(self.head(cls).chunk(n))
        if locals_:
            s_cls += list(self.head(self.backbone(torch.cat(locals_))).chunk(len(locals_)))
        s_patch = self._heads()[1](s_tokens[:, self.encoder.prefix:][mask])

        cls_targets = self._targets(t_cls, self.center)
        dino = cross_entropy_pairs(s_cls, list(cls_targets.chunk(n)), p.student_temp)
        ibot = ibot_loss(s_patch, self._targets(t_patch, self.patch_center), mask, p.student_temp)
        koleo = sum(koleo_loss(c) for c in cls.chunk(n))
        loss = p.dino_weight * dino + p.ibot_weight * ibot + p.koleo_weight * koleo
        if p.centering == "ema":
            self.center.copy_(updated_center(self.center, [t_cls], p.center_momentum))
            self.patch_center.copy_(updated_center(self.patch_center, [t_patch], p.center_momentum))
        with torch.no_grad():
            entropy = -(cls_targets * cls_targets.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo": koleo.detach(),
                "masked_patches": float(mask.float().mean()), "teacher_entropy": entropy,
                "teacher_temp": self.teacher_temp, "momentum": self.momentum, **collapse_probe(cls)}

    def after_backward(self, progress):
        if progress < self.params.freeze_last_layer_fraction:
            for head in set(self._heads()):
                for p in head.last_layer.parameters():
                    p.grad = None

    def after_step(self, progress):
        ema_update(self.teacher_backbone, self.backbone, self.momentum)
        ema_update(self.teacher_head, self.head, self.momentum)
        if self.params.separate_ibot_head:
            ema_update(self.teacher_ibot_head, self.ibot_head, self.momentum)

    def _heads(self, teacher: bool = False) -> tuple[DINOHead, DINOHead]:
        """(class-token head, patch head): one module twice unless separate_ibot_head."""
        if teacher:
            return self.teacher_head, self.teacher_ibot_head if self.params.separate_ibot_head else self.teacher_head
        return self.head, self.ibot_head if self.params.separate_ibot_head else self.head

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher_")]
