"""Fine-tuning evaluation (`selfsup eval finetune`), the protocol masked-image methods are judged by
(MAE, He et al. 2022, sec. 4; BEiT, Bao et al. 2022): the whole backbone plus a linear head trained
on a class-balanced fraction of the train labels, scored on the whole test split, beside the same
schedule from the backbone's random init. AdamW, linear warm-up then cosine, and for ViTs layer-wise
learning-rate decay (each block's lr is `layer_decay` times the one above it), so early layers keep
what pretraining put there. The head standardises the pooled features first (BatchNorm without
affine; its statistics are taken again from the labelled images once training ends).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import open_store
from selfsup.pipelines.views import Augment, Plain, augment, make_views, stack_padded, to_model_input
from selfsup.platform.evaluate import balanced_subset, load_labeled, load_run
from selfsup.platform.runs import RunError, finetune_key
from selfsup.platform.step import autocast_dtype, fp32_convs_on_tiny_maps


@dataclass(frozen=True)
class FinetuneParams:
    fraction: float = 0.1  # of the train labels, the same number from each class
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # per 256 images (MAE's base lr)
    layer_decay: float = 0.75  # ViTs (MAE, BEiT: 0.65-0.75); 1.0: one lr for every layer
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # at most a quarter of the run
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crops and flips of the labelled images
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be >= 1")
        if not 0 < self.layer_decay <= 1 or self.lr <= 0:
            raise ValueError("--layer-decay must be in (0, 1] and --lr > 0")


def param_groups(backbone: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with an `lr_scale`, as in MAE's fine-tuning code: for a ViT of depth L, the
    embeddings (patches, positions, class token) are layer 0, block i is layer i + 1, the final norm
    is layer L + 1, and layer l's lr is scaled by `layer_decay ** (L + 1 - l)`; the head gets the full
    lr. No weight decay on biases, norms, positions and tokens. Other backbones: one lr."""
    depth = len(backbone.blocks) if hasattr(backbone, "blocks") else 0

    def layer(name: str) -> int:
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1

    groups: dict[tuple[float, float], list] = {}
    named = [(n, p, layer(n)) for n, p in backbone.named_parameters()] + [(n, p, depth + 1) for n, p in head.named_parameters()]
    for name, p, lid in named:
        if not p.requires_grad:
            continue
        scale = layer_decay ** (depth + 1 - lid) if depth else 1.0
        wd = 0.0 if p.ndim == 1 or name in ("cls_token", "reg_token", "pos_embed") else weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]


def weights_sha256(module: nn.Module) -> str:
    """A short fingerprint of a module's weights: which weights a fine-tuning started from."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def finetune(backbone: nn.Module, dim: int, train_imgs: list[torch.Tensor], train_y: torch.Tensor,
             test_imgs: list[torch.Tensor], test_y: torch.Tensor, size: int, mean, std, in_chans: int,
             p: FinetuneParams, dtype: torch.dtype | None = None, log=lambda *_: None) -> float:
    """Fine-tune `backbone` (in place) with a new linear head on the given labelled images; top-1 %
    on the test images (centre crops at `size`, as kNN sees them)."""
    torch.manual_seed(p.seed)
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    # A BatchNorm without affine before the head, as in MAE's linear probe: the head then sees every
    # feature at one scale and offset. A plain head fine-tuned the random-init ViT-tiny to 48.30% and
    # this one to 61.82% under the same schedule (benchmarks/RESULTS.md, issue 19).
    linear = nn.Linear(dim, n_cls)
    nn.init.trunc_normal_(linear.weight, std=2e-5)  # MAE: a near-zero head does not disturb the features at first
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    groups = param_groups(backbone, head, p.weight_decay, p.layer_decay)
    lr = p.lr * p.batch_size / 256
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    # Whole batches only (BatchNorm cannot train on a last batch of one); all the images when fewer
    steps_per_epoch = max(1, len(train_imgs) // p.batch_size)
    total, warmup = p.epochs * steps_per_epoch, min(p.warmup_epochs, p.epochs / 4) * steps_per_epoch
    aug = Augment(size=size, scale=p.crop_scale, jitter_p=0.0, grayscale_p=0.0)
    g = torch.Generator().manual_seed(p.seed)
    if dtype:
        fp32_convs_on_tiny_maps(backbone)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else torch.enable_grad
    backbone.train()
    head.train()
    step = 0
    for epoch in range(p.epochs):
        order = torch.randperm(len(train_imgs), generator=g)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * p.batch_size:(b + 1) * p.batch_size]
            x, sizes = stack_padded([train_imgs[j] for j in idx])
            x = to_model_input({"x": augment(x, sizes, aug, g)}, mean, std, in_chans)["x"]
            scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * scale * group["lr_scale"]
            with ctx():
                loss = F.cross_entropy(head(backbone(x)).float(), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        log(f"epoch {epoch + 1}/{p.epochs}: loss {sum(losses) / len(losses):.4f}")
    backbone.eval()

    def features(imgs: list[torch.Tensor]):
        for i in range(0, len(imgs), 512):
            v = make_views(imgs[i:i + 512], Plain(size=size), torch.Generator())
            with ctx():
                yield i, backbone(to_model_input(v, mean, std, in_chans)["image"])

    # The head's statistics afresh from the labelled images as the test sees them (centre crops, the
    # final weights): a short schedule's running averages still hold the early steps' features.
    head.eval()
    with torch.no_grad():
        seen = torch.cat([f.float() for _, f in features(train_imgs)])
        head[0].running_mean.copy_(seen.mean(0))
        head[0].running_var.copy_(seen.var(0))  # training's BatchNorm already needs 2+ images
        correct = sum(int((head(f).argmax(1) == test_y[i:i + len(f)]).sum()) for i, f in features(test_imgs))
    return 100.0 * correct / len(test_imgs)


def finetune_run(run_uri: str, p: FinetuneParams, checkpoint: str | None = None, teacher: bool = False,
                 train_samples: int = 0, test_samples: int = 0, ep: Endpoint | None = None, log=print,
                 data: str | None = None) -> dict:
    """Fine-tune a run's backbone (newest good checkpoint, or `checkpoint`) and the same backbone at
    random init under one schedule, on the labeled set `data` (default: the run's eval.data_uri, else
    its data.uri); the table is written to the run's folder and returned."""
    t0 = time.perf_counter()
    cfg, method, used = load_run(run_uri, ep, checkpoint)
    if teacher and not hasattr(method, "teacher_backbone"):
        raise RunError(f"method {cfg.method.name!r} has no teacher (--teacher is for DINO-style runs)")
    _, init, _ = load_run(run_uri, ep, random_init=True)
    uri = data or cfg.eval_uri()
    train_imgs, train_y = load_labeled(uri, cfg.eval.train_split, train_samples, cfg.data.seed, ep, cfg.data.strict)
    test_imgs, test_y = load_labeled(uri, cfg.eval.test_split, test_samples, cfg.data.seed + 1, ep, cfg.data.strict)
    keep = balanced_subset(train_y, p.fraction, p.seed)
    train_imgs, train_y = [train_imgs[i] for i in keep], train_y[keep]
    size = cfg.eval.image_size or cfg.view_size()
    dtype = autocast_dtype(cfg, torch.device("cpu"))
    rows = []
    for start, m in ((used, method), ("random init", init)):
        backbone = m.teacher_backbone if teacher else m.backbone
        sha = weights_sha256(backbone)
        t1 = time.perf_counter()
        top1 = finetune(backbone, m.feat_dim, train_imgs, train_y, test_imgs, test_y, size, cfg.data.mean, cfg.data.std,
                        cfg.model.in_chans, p, dtype, log=lambda s, start=start: log(f"fine-tuning from {start}: {s}"))
        rows.append({"start": start, "backbone_sha256": sha, "top1": top1, "time_s": round(time.perf_counter() - t1, 1)})
    out = {"run": run_uri, "backbone": "teacher" if teacher else "student", "params": asdict(p),
           "train_images": len(train_y), "per_class": torch.bincount(train_y).tolist(), "test_images": len(test_y),
           "image_size": size, "rows": rows, "time_s": round(time.perf_counter() - t0, 1)}
    store = open_store(run_uri, ep)
    key = finetune_key(p.fraction, p.epochs)
    store.write(key, json.dumps(out, indent=1).encode())
    out["written"] = store.url(key)
    return out


def report(out: dict) -> str:
    """The console's table of a `finetune_run` result."""
    p = out["params"]
    head = (f"fine-tuning of {out['run']} ({out['backbone']}): {p['fraction']:.0%} of the train labels "
            f"({out['train_images']} images, {min(out['per_class'])}-{max(out['per_class'])} per class), "
            f"{p['epochs']} epochs, scored on {out['test_images']} test images at {out['image_size']} px")
    rows = [f"  from {r['start']:<20} top-1 {r['top1']:6.2f}%   ({r['time_s']:.0f} s)" for r in out["rows"]]
    return "\n".join([head, *rows, f"written to {out['written']}"])
