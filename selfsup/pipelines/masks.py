"""Patch masks for masked image modeling, on a grid of (h, w) patches; True means masked.

- random (MAE, SimMIM): exactly round(ratio * N) patches per image.
- blockwise (BEiT): rectangles of at least `min_block` patches until the target count, topped up
  with single patches so that the count is exact.
- multiblock (I-JEPA): `n_targets` target blocks and one context block with every target removed.
- sometimes blockwise (iBOT, DINOv2's global crops): each image masked with a probability, at a ratio
  drawn per image from a range; the others have no mask.
"""

from __future__ import annotations

import math

import torch


def random_masks(B: int, h: int, w: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    n = h * w
    k = round(ratio * n)
    order = torch.rand(B, n, generator=g).argsort(1)
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _block(h: int, w: int, area: float, aspect: tuple[float, float], g: torch.Generator) -> tuple[int, int]:
    logr = math.log(aspect[0]) + _rand(g) * (math.log(aspect[1]) - math.log(aspect[0]))
    bh = max(1, min(h, round(math.sqrt(area * math.exp(logr)))))
    bw = max(1, min(w, round(math.sqrt(area / math.exp(logr)))))
    return bh, bw


def blockwise_mask(h: int, w: int, ratio: float, g: torch.Generator, min_block: int = 4,
                   aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    n_target = round(ratio * h * w)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(100):
        left = n_target - int(mask.sum())
        if left < min_block:
            break
        area = min_block + _rand(g) * (left - min_block)
        bh, bw = _block(h, w, area, aspect, g)
        top, lft = int(_rand(g) * (h - bh + 1)), int(_rand(g) * (w - bw + 1))
        new = mask.clone()
        new[top:top + bh, lft:lft + bw] = True
        if int(new.sum()) <= n_target:
            mask = new
    flat = mask.flatten()
    left = n_target - int(flat.sum())
    if left > 0:  # top up to the exact count with single patches
        free = (~flat).nonzero().squeeze(1)
        flat[free[torch.randperm(len(free), generator=g)[:left]]] = True
    return flat


def sometimes_blockwise_masks(B: int, h: int, w: int, probability: float, ratio: tuple[float, float],
                              g: torch.Generator, min_block: int = 4) -> torch.Tensor:
    """(B, h * w): image b blockwise-masked with `probability`, at a ratio uniform in `ratio`."""
    out = torch.zeros(B, h * w, dtype=torch.bool)
    for b in range(B):
        if _rand(g) < probability:
            out[b] = blockwise_mask(h, w, ratio[0] + _rand(g) * (ratio[1] - ratio[0]), g, min_block)
    return out


def multiblock_masks(h: int, w: int, g: torch.Generator, n_targets: int = 4,
                     target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                     context_scale: tuple[float, float] = (0.85, 1.0), min_context: int = 4,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (N,), targets (n_targets, N)): I-JEPA's masks; context never overlaps a target."""
    n = h * w
    for _ in range(20):
        targets = torch.zeros(n_targets, h, w, dtype=torch.bool)
        for t in range(n_targets):
            area = (target_scale[0] + _rand(g) * (target_scale[1] - target_scale[0])) * n
            bh, bw = _block(h, w, area, target_aspect, g)
            top, lft = int(_rand(g) * (h - bh + 1)), int(_rand(g) * (w - bw + 1))
            targets[t, top:top + bh, lft:lft + bw] = True
        area = (context_scale[0] + _rand(g) * (context_scale[1] - context_scale[0])) * n
        bh, bw = _block(h, w, area, (1.0, 1.0), g)
        top, lft = int(_rand(g) * (h - bh + 1)), int(_rand(g) * (w - bw + 1))
        context = torch.zeros(h, w, dtype=torch.bool)
        context[top:top + bh, lft:lft + bw] = True
        context &= ~targets.any(0)
        if int(context.sum()) >= min_context:
            break
    else:
        # Rare on tiny grids: keep every non-target patch as context.
        context = ~targets.any(0)
    return context.flatten(), targets.flatten(1)
