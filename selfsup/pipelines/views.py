"""View specs and the batches they produce: the one place where batch keys are defined.

A method declares which kind of view it consumes (`two_views`, `multi_crop` or `masked`); the
config holds that kind's parameters (every one a key a sweep can address, e.g.
`data.views.view0.jitter_strength=0.5`); the pipeline builds the views from decoded images.

Batch keys (every view a uint8 tensor (B, C, S, S), C the data's channels: 1 for grey, 3 for RGB;
`to_model_input` turns them into normalised float tensors with the model's channels):
    two_views   view0, view1
    multi_crop  global0 .. global{n-1} (S = global size), local0 .. local{m-1} (S = local size);
                with `masks` (DINOv2's iBOT): mask0 .. mask{n-1} (B, N) bool, True = masked, for the global crops
    masked      image, and with strategy random|blockwise: mask (B, N) bool, True = masked;
                with strategy multiblock: context (B, N) bool, True = visible to the context
                encoder, targets (B, K, N) bool, True = in target block k
    plain       image: the centre square of each image resized to S, no augmentation (evaluation)
    decoded     image uint8 (B, C, H, W), each image zero-padded to the batch's largest, and size
                (B, 2) its (H, W): what the pipeline streams with data.augment_on=trainer, where
                the trainer makes the views (`views_of`) on its own device
    always      label (B,) int64: for evaluation only; SSL methods never read it
                index (B,) int64: the sample's position in its split
N = (S / patch_size)^2 patches in row-major order.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfsup.pipelines import augment as A
from selfsup.pipelines.masks import blockwise_mask, multiblock_masks, random_masks, sometimes_blockwise_masks

Pair = tuple[float, float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Augment(Strict):
    """One view's augmentation. Defaults are SimCLR's at small resolution."""

    size: int = Field(32, ge=4)
    scale: Pair = (0.08, 1.0)
    ratio: Pair = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    jitter_strength: float = Field(0.5, ge=0)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: Pair = (0.1, 2.0)
    solarize_p: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        if self.scale[1] > 1:
            raise ValueError(f"scale is a fraction of the image area, at most 1, got {self.scale}")
        return self


class TwoViews(Strict):
    kind: Literal["two_views"] = "two_views"
    view0: Augment = Augment()
    view1: Augment = Augment()


class CropMasks(Strict):
    """iBOT's masks on the global crops (DINOv2's defaults): an image is masked with `probability`,
    blockwise, at a ratio uniform in `ratio`; `patch_size` is the ViT's."""

    patch_size: int = Field(16, ge=1)
    probability: float = Field(0.5, ge=0, le=1)
    ratio: Pair = (0.1, 0.5)
    min_block: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ratio(self):
        if not 0 <= self.ratio[0] <= self.ratio[1] < 1:
            raise ValueError(f"ratio must be (low, high) with 0 <= low <= high < 1, got {self.ratio}")
        return self


class MultiCrop(Strict):
    kind: Literal["multi_crop"] = "multi_crop"
    n_global: int = Field(2, ge=1)
    n_local: int = Field(6, ge=0)
    global_view: Augment = Augment(size=32, scale=(0.4, 1.0))
    local_view: Augment = Augment(size=16, scale=(0.05, 0.4))
    masks: CropMasks | None = None  # for methods that mask the global crops (dinov2)

    @model_validator(mode="after")
    def _grid(self):
        if self.masks and self.global_view.size % self.masks.patch_size:
            raise ValueError(f"global_view.size {self.global_view.size} is not a multiple of masks.patch_size "
                             f"{self.masks.patch_size}")
        return self


class Masked(Strict):
    kind: Literal["masked"] = "masked"
    view: Augment = Augment(scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)
    patch_size: int = Field(4, ge=1)
    strategy: Literal["random", "blockwise", "multiblock"] = "random"
    ratio: float = Field(0.75, gt=0, lt=1)
    min_block: int = Field(4, ge=1)  # blockwise
    n_targets: int = Field(4, ge=1)  # multiblock
    target_scale: Pair = (0.15, 0.2)
    target_aspect: Pair = (0.75, 1.5)
    context_scale: Pair = (0.85, 1.0)

    @model_validator(mode="after")
    def _grid(self):
        if self.view.size % self.patch_size:
            raise ValueError(f"view.size {self.view.size} is not a multiple of patch_size {self.patch_size}")
        return self


class Plain(Strict):
    kind: Literal["plain"] = "plain"
    size: int = Field(32, ge=4)


ViewSpec = Annotated[Union[TwoViews, MultiCrop, Masked], Field(discriminator="kind")]
VIEW_KINDS = {"two_views": TwoViews, "multi_crop": MultiCrop, "masked": Masked}


def stack_padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (C, H, W) images of any sizes -> float (B, C, Hmax, Wmax) in [0, 1] and sizes (B, 2)."""
    sizes = torch.tensor([im.shape[-2:] for im in images])
    if len(set(map(tuple, sizes.tolist()))) == 1:
        return torch.stack(images).float().div_(255), sizes
    C, (H, W) = images[0].shape[0], sizes.max(0).values.tolist()
    out = torch.zeros(len(images), C, H, W)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im.float().div_(255)
    return out, sizes


def augment(x: torch.Tensor, sizes: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """One augmented view of every image: float (B, C, H, W) in [0, 1] -> uint8 (B, C, size, size)."""
    boxes = A.crop_boxes(sizes.to(x.device), aug.scale, aug.ratio, g)
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < aug.flip_p
    v = A.resized_crop(x, boxes, aug.size, flip).clamp_(0, 1)
    v = A.color_jitter(v, aug.jitter_p, aug.jitter_strength, g)
    v = A.random_grayscale(v, aug.grayscale_p, g)
    v = A.gaussian_blur(v, aug.blur_p, aug.blur_sigma, g)
    v = A.solarize(v, aug.solarize_p, g)
    return v.mul_(255).round_().to(torch.uint8)


def make_views(images: list[torch.Tensor], spec: TwoViews | MultiCrop | Masked | Plain,
               g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every view the spec asks for, for a batch of uint8 (C, H, W) images. Deterministic given `g`."""
    x, sizes = stack_padded(images)
    return views_of(x, sizes, spec, g)


def views_of(x: torch.Tensor, sizes: torch.Tensor, spec: TwoViews | MultiCrop | Masked | Plain,
             g: torch.Generator) -> dict[str, torch.Tensor]:
    """make_views on a padded batch: float x (B, C, H, W) in [0, 1], image i in its top-left
    sizes[i] = (h, w) corner. Runs where x and `g` are (the trainer's GPU with data.augment_on=trainer);
    masks are drawn on the CPU, from `g` itself or from a CPU generator it seeds."""
    if isinstance(spec, Plain):
        side = sizes.min(1).values
        boxes = torch.stack([(sizes[:, 1] - side) // 2, (sizes[:, 0] - side) // 2, side, side], 1).float()
        v = A.resized_crop(x, boxes.to(x), spec.size, torch.zeros(len(x), dtype=torch.bool, device=x.device))
        return {"image": v.clamp_(0, 1).mul_(255).round_().to(torch.uint8)}
    if isinstance(spec, TwoViews):
        return {"view0": augment(x, sizes, spec.view0, g), "view1": augment(x, sizes, spec.view1, g)}
    if isinstance(spec, MultiCrop):
        out = {f"global{i}": augment(x, sizes, spec.global_view, g) for i in range(spec.n_global)}
        out.update({f"local{i}": augment(x, sizes, spec.local_view, g) for i in range(spec.n_local)})
        if spec.masks:
            m, side, cpu = spec.masks, spec.global_view.size // spec.masks.patch_size, _cpu_generator(g)
            out.update({f"mask{i}": sometimes_blockwise_masks(len(x), side, side, m.probability, m.ratio, cpu, m.min_block)
                        for i in range(spec.n_global)})
        return out
    out = {"image": augment(x, sizes, spec.view, g)}
    side = spec.view.size // spec.patch_size
    B = len(x)
    g = _cpu_generator(g)
    if spec.strategy == "random":
        out["mask"] = random_masks(B, side, side, spec.ratio, g)
    elif spec.strategy == "blockwise":
        out["mask"] = torch.stack([blockwise_mask(side, side, spec.ratio, g, spec.min_block) for _ in range(B)])
    else:
        ctx, tgt = zip(*(multiblock_masks(side, side, g, spec.n_targets, spec.target_scale, spec.target_aspect,
                                          spec.context_scale) for _ in range(B)))
        out["context"], out["targets"] = torch.stack(ctx), torch.stack(tgt)
    return out


def _cpu_generator(g: torch.Generator) -> torch.Generator:
    """Masks are drawn on the CPU: from `g` itself, or from a CPU generator it seeds."""
    if g.device.type == "cpu":
        return g
    return torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g, device=g.device)))


def to_model_input(batch: dict[str, torch.Tensor], mean: list[float], std: list[float], channels: int = 3,
                   device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """uint8 views -> normalised float on `device`, grey expanded to the model's channels; masks as they are.

    Runs on the training worker: shipping uint8 through the object store is 4x less than float,
    and this is cheap there (and on a GPU, nearly free)."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True) if device is not None else v
        if v.dtype == torch.uint8 and v.dim() == 4:
            c = v.shape[1]
            m = torch.tensor(mean[:c] if len(mean) >= c else mean * c, device=v.device, dtype=dtype).view(1, c, 1, 1)
            s = torch.tensor(std[:c] if len(std) >= c else std * c, device=v.device, dtype=dtype).view(1, c, 1, 1)
            v = (v.to(dtype) / 255 - m) / s
            if c == 1 and channels == 3:
                v = v.expand(-1, 3, -1, -1)
        out[k] = v
    return out
