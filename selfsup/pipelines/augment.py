"""Batched SSL augmentations on whole batches of image tensors.

Calling torchvision transforms once per image costs more than the work itself on small images.
Here each op runs once per batch, with per-sample random parameters: every crop and flip of a
batch is one affine `grid_sample`; colour jitter, grayscale, blur and solarize are vectorised.
The code is device-agnostic: on a GPU worker the same functions run there unchanged.

Images are float tensors (B, C, H, W) in [0, 1]; C is 1 (grey) or 3 (RGB). Grey images skip the
colour-only ops (saturation, hue, grayscale), which would leave them unchanged anyway.
Colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision
draws a random order per image; the fixed order keeps one vectorised pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _u(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _coin(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
               g: torch.Generator, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (x0, y0, w, h) for images of `sizes` (B, 2 as H, W).

    torchvision's rule, vectorised: up to `tries` draws per image, the first that fits wins,
    else a centre crop with the aspect ratio clamped into `ratio`.
    """
    B, dev = len(sizes), sizes.device
    H, W = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    area = H * W
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, tries, generator=g, device=dev))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(B, tries, generator=g, device=dev)
    aspect = torch.exp(logr)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1, device=dev))
    idx = first.clamp(min=0).unsqueeze(1)
    w, h = w.gather(1, idx).squeeze(1), h.gather(1, idx).squeeze(1)
    H, W = H.squeeze(1), W.squeeze(1)
    # Fallback: whole image, aspect ratio clamped into range.
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], (H * ratio[1]).round(), W))
    fh = torch.where(in_ratio < ratio[0], (W / ratio[0]).round(), H)
    miss = first < 0
    w, h = torch.where(miss, fw, w), torch.where(miss, fh, h)
    x0 = torch.floor(torch.rand(B, generator=g, device=dev) * (W - w + 1))
    y0 = torch.floor(torch.rand(B, generator=g, device=dev) * (H - h + 1))
    x0 = torch.where(miss, ((W - w) / 2).floor(), x0)
    y0 = torch.where(miss, ((H - h) / 2).floor(), y0)
    return torch.stack([x0, y0, w, h], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, out: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image of x (B, C, Hp, Wp) to its box, flip where `flip`, resize to out x out: one grid_sample."""
    B, C, Hp, Wp = x.shape
    x0, y0, w, h = boxes.unbind(1)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = (w / Wp) * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * x0 + w) / Wp - 1
    theta[:, 1, 1] = h / Hp
    theta[:, 1, 2] = (2 * y0 + h) / Hp - 1
    grid = F.affine_grid(theta, [B, C, out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations of RGB about the grey axis (SVG's hueRotate matrix): a hue shift as one linear map."""
    c, s = torch.cos(angle), torch.sin(angle)
    rows = [
        [0.213 + 0.787 * c - 0.213 * s, 0.715 - 0.715 * c - 0.715 * s, 0.072 - 0.072 * c + 0.928 * s],
        [0.213 - 0.213 * c + 0.143 * s, 0.715 + 0.285 * c + 0.140 * s, 0.072 - 0.072 * c - 0.283 * s],
        [0.213 - 0.213 * c - 0.787 * s, 0.715 - 0.715 * c + 0.715 * s, 0.072 + 0.928 * c + 0.072 * s],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def color_jitter(x: torch.Tensor, p: float, strength: float, g: torch.Generator) -> torch.Tensor:
    """SimCLR's colour distortion with strength s: brightness/contrast/saturation 0.8s, hue 0.2s, with probability p.

    Saturation and hue are linear maps of RGB, so both are one batched 3x3 matrix per image (hue as
    a rotation about the grey axis, not an HSV round trip: ten times fewer passes over the pixels)."""
    if p <= 0 or strength <= 0:
        return x
    B, dev = x.shape[0], x.device
    on = _coin(B, p, g, dev)

    def factor(amount: float) -> torch.Tensor:
        f = _u(B, max(0.0, 1 - amount), 1 + amount, g, dev)
        return torch.where(on, f, torch.ones_like(f))

    x = (x * factor(0.8 * strength).view(B, 1, 1, 1)).clamp_(0, 1)
    c = factor(0.8 * strength).view(B, 1, 1, 1)
    mean = grey(x).mean((1, 2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp_(0, 1)
    if x.shape[1] == 3:
        s = factor(0.8 * strength).view(B, 1, 1)
        w = torch.tensor(_GREY, device=dev, dtype=x.dtype).view(1, 1, 3)
        sat = s * torch.eye(3, device=dev, dtype=x.dtype) + (1 - s) * w.expand(B, 3, 3)
        shift = torch.where(on, _u(B, -0.2 * strength, 0.2 * strength, g, dev), torch.zeros(B, device=dev))
        m = _hue_rotation(2 * math.pi * shift).to(x.dtype) @ sat
        # bmm over (B, 3, H*W): einsum's route for these shapes copies x first (2x slower on a CPU)
        x = torch.bmm(m, x.reshape(B, 3, -1)).view_as(x).clamp_(0, 1)
    return x


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    if p <= 0 or x.shape[1] == 1:
        return x
    on = _coin(x.shape[0], p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(on, grey(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Blur with probability p, sigma ~ U(sigma); kernel about a tenth of the image, as SimCLR's."""
    B, C, H, W = x.shape
    on = _coin(B, p, g, x.device)
    sig = _u(B, sigma[0], sigma[1], g, x.device)
    idx = on.nonzero().squeeze(1)
    if p <= 0 or idx.numel() == 0:
        return x
    k = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r.view(1, -1) ** 2) / (2 * sig[idx].view(-1, 1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n*C, k)
    y = x[idx].reshape(1, -1, H, W)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect" if min(H, W) > k // 2 else "replicate")
    y = F.conv2d(y, kern.view(-1, 1, k, 1), groups=y.shape[1])
    y = F.conv2d(y, kern.view(-1, 1, 1, k), groups=y.shape[1])
    out = x.clone()
    out[idx] = y.view(-1, C, H, W)
    return out


def solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    if p <= 0:
        return x
    on = _coin(x.shape[0], p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(on & (x >= 0.5), 1 - x, x)
