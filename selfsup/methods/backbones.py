"""timm backbones, headless: `build_backbone` returns (module, feature dimension)."""

from __future__ import annotations

from torch import nn


def build_backbone(name: str, cifar_stem: bool = False, in_chans: int = 3, **kwargs) -> tuple[nn.Module, int]:
    """A timm model without its classifier (num_classes=0): it returns pooled features.

    cifar_stem: for ResNets on small images, a 3x3 stride-1 first conv and no max-pool (the usual
    CIFAR variant); ImageNet's 7x7/2 + pool leaves 1x1 maps at 32 px.
    kwargs go to timm, e.g. img_size=32, patch_size=4 for a ViT on small images.
    """
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"model.name {name!r}: {e}") from None
    except TypeError as e:
        raise ValueError(f"model.kwargs for {name!r}: {e}") from None
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ValueError(f"model.cifar_stem applies to ResNet-style models; {name!r} has no conv1/maxpool")
        # a deep stem (resnet10t, resnet*d) is a Sequential of convolutions: its width is the last one's
        out = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        model.conv1 = nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, model.num_features


def mlp(dims: list[int], bn: bool = True, last_bn: bool = False, bias_last: bool = True) -> nn.Sequential:
    """Linear layers of sizes dims[0] -> ... -> dims[-1], with BN + ReLU between them: the
    projector/predictor shape shared by SimCLR, BYOL, SimSiam, Barlow Twins, VICReg and others."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias_last if last else not bn))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)
