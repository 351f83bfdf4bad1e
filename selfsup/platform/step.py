"""The training step, without Ray: forward, loss, backward, clipping, optimizer, schedules.

The Ray Train worker (train_loop.py) wraps it; benchmarks and GPU checks drive it directly.
Every schedule is a function of `progress` in [0, 1]: the fraction of the planned steps (or of the
time budget) done, so a short or budgeted run still warms up, anneals and unfreezes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time

import torch
from torch import nn

from selfsup.methods import METHODS, Method
from selfsup.methods.backbones import build_backbone
from selfsup.pipelines.views import to_model_input, views_of
from selfsup.platform.config import Config


def build_method(cfg: Config, num_samples: int | None = None, ep=None) -> Method:
    """The configured method around its timm backbone; `num_samples` (the train split's size)
    sizes queues and memory banks; a method with a tokenizer file (BEiT) gets it loaded."""
    backbone, dim = build_backbone(cfg.model.name, cfg.model.cifar_stem, cfg.model.in_chans, **cfg.model.kwargs)
    cls = METHODS[cfg.method.name]
    method = cls(backbone, dim, cls.Params(**cfg.method_params()), num_samples=num_samples)
    tokenizer = cfg.method_params().get("tokenizer")
    if tokenizer and hasattr(method, "load_tokenizer"):
        from selfsup.platform.tokenizer import read_uri

        method.load_tokenizer(read_uri(tokenizer, ep), name=tokenizer)
    return method


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def fp32_convs_on_tiny_maps(model: nn.Module) -> None:
    """Under CPU bf16 autocast, run each convolution whose input map is smaller than its kernel in fp32.

    oneDNN's bf16 weight gradient of a strided 3x3 convolution on a 1x1 map comes out NaN or ~1e37
    once that layer has also seen another input size (multi-crop views, a ResNet's last stage at
    16-32 px): torch 2.14.1 with two threads on an AMD EPYC with AVX512-BF16, most such steps
    (tests/test_step.py). Maps that small cost nothing in fp32."""
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and max(conv.kernel_size) > 1:
            conv.forward = functools.partial(_conv_fp32_when_tiny, conv, type(conv).forward)


def _conv_fp32_when_tiny(conv: nn.Conv2d, forward, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2] < conv.kernel_size[0] or x.shape[-1] < conv.kernel_size[1]:
        with torch.autocast(x.device.type, enabled=False):
            return forward(conv, x.float())
    return forward(conv, x)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017); parameters in a
    group with `lars=False` (biases, norms) get plain SGD, as in SimCLR/BYOL/Barlow Twins."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["lars"]:
                    pn, dn = torch.norm(p), torch.norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                    d.mul_(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(method: Method, cfg: Config) -> torch.optim.Optimizer:
    """Weight decay on weights only: biases and norm parameters (1-d) are excluded, as usual."""
    decay, no_decay = [], []
    for p in method.student_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay, "base_wd": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "base_wd": 0.0, "lars": False}]
    lr = base_lr(cfg)
    if o.name == "adamw":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas)
    if o.name == "sgd":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    return LARS(groups, lr=lr, momentum=o.momentum, eta=o.lars_eta)


def base_lr(cfg: Config, batch: int | None = None) -> float:
    """optim.lr for the global batch (data.batch_size unless given), by optim.lr_scaling."""
    scale = (batch or cfg.data.batch_size) / 256
    return cfg.optim.lr * {"linear": scale, "sqrt": math.sqrt(scale), "none": 1.0}[cfg.optim.lr_scaling]


def lr_at(cfg: Config, progress: float, batch: int | None = None) -> float:
    """Linear warm-up, then cosine to lr * min_lr_ratio."""
    peak, o = base_lr(cfg, batch), cfg.optim
    if progress < o.warmup_fraction:
        return peak * progress / o.warmup_fraction
    p = (progress - o.warmup_fraction) / (1 - o.warmup_fraction)
    low = peak * o.min_lr_ratio
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def wd_at(cfg: Config, progress: float) -> float:
    o = cfg.optim
    if o.weight_decay_end is None:
        return o.weight_decay
    return o.weight_decay_end + (o.weight_decay - o.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Progress:
    """How far the run is: by steps (epochs become steps) or by training time for a budget."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        s = cfg.schedule
        self.budget = s.time_budget_s
        self.total_steps = s.steps if s.steps else (round(s.epochs * steps_per_epoch) if s.epochs else None)

    def __call__(self, step: int, elapsed: float) -> float:
        if self.budget:
            return min(1.0, elapsed / self.budget)
        return min(1.0, step / self.total_steps)

    def done(self, step: int, elapsed: float) -> bool:
        return self(step, elapsed) >= 1.0


class TrainStep:
    """One optimizer step on one batch. Holds the (possibly DDP-wrapped) method and its optimizer.

    `global_batch` sets the learning rate (by optim.lr_scaling); with `accum` > 1 the batch is cut
    into that many micro-batches whose gradients add up before the one update (losses over the
    batch, such as contrastive negatives, then see one micro-batch at a time)."""

    def __init__(self, method: Method, cfg: Config, device: torch.device, global_batch: int | None = None,
                 accum: int = 1):
        self.method = method
        self.global_batch, self.accum = global_batch, accum
        self.cfg = cfg
        self.device = device
        self.model = method  # the train loop puts a DDP wrapper here when distributed
        # Views made here from `decoded` batches (data.augment_on=trainer): fresh ones every run, as
        # the pipeline's; the generator lives on the device so no random numbers cross to it.
        self.view_gen = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.optimizer = build_optimizer(method, cfg)
        self.dtype = autocast_dtype(cfg, device)
        if self.dtype and device.type == "cpu":
            fp32_convs_on_tiny_maps(method)
        cl = cfg.train.channels_last
        self.channels_last = (self.dtype is not None and "vit" not in cfg.model.name) if cl == "auto" else cl
        if self.channels_last:
            method.to(memory_format=torch.channels_last)

    @property
    def model(self) -> nn.Module:
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        # Compiled around the DDP wrapper when there is one, so DDP's hooks see the compiled graph
        self._model = model
        self._forward = model
        if self.cfg.train.compile:
            if "TORCH_LOGS" not in os.environ:  # graph-break notes (MAE's data-dependent mask size) are not the user's news
                torch._logging.set_logs(dynamo=logging.ERROR)
            self._forward = torch.compile(model)

    def views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The views of a `decoded` batch, made on this step's device (an augmented batch as it is)."""
        if "size" not in batch:
            return batch
        x = batch["image"].to(self.device, non_blocking=True).float().div_(255)
        out = views_of(x, batch["size"].to(self.device, non_blocking=True), self.cfg.data.views, self.view_gen)
        return {**out, **{k: batch[k] for k in ("index", "label") if k in batch}}

    def set_schedules(self, progress: float) -> float:
        lr, wd = lr_at(self.cfg, progress, self.global_batch), wd_at(self.cfg, progress)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if g["base_wd"]:
                g["weight_decay"] = wd
        self.method.before_step(progress)
        return lr

    def __call__(self, batch: dict[str, torch.Tensor], progress: float) -> dict[str, float]:
        t0 = time.perf_counter()
        lr = self.set_schedules(progress)
        d = self.cfg.data
        x = to_model_input(self.views(batch), d.mean, d.std, self.cfg.model.in_chans, self.device)
        if self.channels_last:
            x = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in x.items()}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = next(iter(x.values())).shape[0]
        m = min(self.accum, n)
        cuts = [(i * n // m, (i + 1) * n // m) for i in range(m)]
        sums: dict[str, float] = {}
        for i, (a, b) in enumerate(cuts):
            part = x if m == 1 else {k: v[a:b] for k, v in x.items()}
            last = i == m - 1
            # DDP all-reduces gradients on the last micro-batch only
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
            with sync:
                with ctx:
                    out = self._forward(part)
                # even when non-finite: DDP's gradient all-reduce must run on every worker
                (out["loss"] / m).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (float(v.detach()) if torch.is_tensor(v) else float(v)) / m
        self.method.after_backward(progress)
        # A non-finite loss, or a bf16 backward pass that overflowed though the loss is finite,
        # gives non-finite gradients: skip that update (as AMP's grad scaler does) rather than
        # write NaN into every weight. DDP has already averaged the gradients, so every worker
        # takes the same decision; the train loop rolls back after too many in a row.
        norm = nn.utils.clip_grad_norm_(self.method.student_parameters(), self.cfg.optim.clip_grad or float("inf"))
        skipped = not torch.isfinite(norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.method.after_step(progress)
        metrics = {"grad_norm": float(norm), "skipped_update": float(skipped), **sums}
        metrics["lr"] = lr
        metrics["step_time_s"] = time.perf_counter() - t0
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
