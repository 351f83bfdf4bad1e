import pytest
import torch

from selfsup.pipelines import augment as A
from selfsup.pipelines.masks import blockwise_mask, multiblock_masks, random_masks
from selfsup.pipelines.streaming import collate_decoded
from selfsup.pipelines.views import Augment, Masked, MultiCrop, Plain, TwoViews, make_views, to_model_input, views_of


def _imgs(n=6, c=1, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]


@pytest.mark.parametrize("c", [1, 3])
def test_keys_shapes_dtypes_of_each_spec(c):
    g = torch.Generator().manual_seed(0)
    out = make_views(_imgs(c=c), TwoViews(view1=Augment(size=24, blur_p=1, solarize_p=1)), g)
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
        "view0": ((6, c, 32, 32), torch.uint8), "view1": ((6, c, 24, 24), torch.uint8)}
    out = make_views(_imgs(c=c), MultiCrop(n_global=2, n_local=3), g)
    assert sorted(out) == ["global0", "global1", "local0", "local1", "local2"]
    assert out["global1"].shape == (6, c, 32, 32) and out["local2"].shape == (6, c, 16, 16)
    out = make_views(_imgs(c=c), Masked(patch_size=4), g)
    assert out["image"].shape == (6, c, 32, 32) and out["mask"].shape == (6, 64) and out["mask"].dtype == torch.bool
    out = make_views(_imgs(c=c), Masked(patch_size=8, strategy="multiblock"), g)
    assert out["context"].shape == (6, 16) and out["targets"].shape == (6, 4, 16)
    out = make_views(_imgs(c=c), Plain(size=32), g)
    assert out["image"].shape == (6, c, 32, 32)


def test_views_of_mixed_size_images():
    imgs = _imgs(2, c=3, h=40, w=60) + _imgs(2, c=3, h=50, w=30)
    out = make_views(imgs, TwoViews(), torch.Generator().manual_seed(1))
    assert out["view0"].shape == (4, 3, 32, 32)
    plain = make_views(imgs, Plain(size=30), torch.Generator())["image"]
    # The centre square, not the zero padding: no black border.
    assert plain.float().mean() > 100


@pytest.mark.parametrize("spec", [TwoViews(view0=Augment(blur_p=1, solarize_p=0.5)), MultiCrop(n_local=2),
                                  Masked(patch_size=4), Masked(patch_size=8, strategy="multiblock"), Plain(size=24)])
def test_the_trainer_makes_the_pipelines_views_from_a_decoded_batch(spec):
    """data.augment_on=trainer: the stream carries decoded images (padded, with their sizes) and the
    trainer makes the views; under one generator they are the pipeline's views, bit for bit."""
    import numpy as np

    imgs = _imgs(3, c=3, h=40, w=60) + _imgs(2, c=3, h=50, w=30, seed=1)
    col = np.empty(len(imgs), dtype=object)  # a ragged column, as Ray Data hands mixed sizes over
    col[:] = [im.numpy() for im in imgs]
    batch = collate_decoded({"image": col, "index": np.arange(5), "label": np.arange(5) % 2})
    assert batch["image"].shape == (5, 3, 50, 60) and batch["size"].tolist() == [[40, 60]] * 3 + [[50, 30]] * 2
    assert batch["image"][3, :, :, 30:].eq(0).all()  # the padding, which no crop reaches
    ours = views_of(batch["image"].float() / 255, batch["size"], spec, torch.Generator().manual_seed(3))
    theirs = make_views(imgs, spec, torch.Generator().manual_seed(3))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    same = collate_decoded({"image": np.stack([im.numpy() for im in imgs[:3]]), "index": np.arange(3)})
    assert same["size"].tolist() == [[40, 60]] * 3 and torch.equal(same["image"], batch["image"][:3, :, :40])


def test_determinism_under_a_seed():
    spec = MultiCrop(local_view=Augment(size=16, scale=(0.05, 0.4), blur_p=0.5, solarize_p=0.5))
    a = make_views(_imgs(c=3), spec, torch.Generator().manual_seed(7))
    b = make_views(_imgs(c=3), spec, torch.Generator().manual_seed(7))
    c = make_views(_imgs(c=3), spec, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global0"], c["global0"])


def test_crop_boxes_respect_bounds_and_scale():
    sizes = torch.tensor([[28, 28]] * 500 + [[40, 90]] * 500)
    boxes = A.crop_boxes(sizes, (0.2, 0.5), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    H, W = sizes[:, 0].float(), sizes[:, 1].float()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= W).all() and (y0 + h <= H).all()
    frac = w * h / (H * W)
    assert frac.min() > 0.15 and frac.max() < 0.56  # rounding to whole pixels widens the range a little


def test_identity_crop_and_flip_are_exact():
    x = torch.rand(2, 3, 8, 8)
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    out = A.resized_crop(x, box, 8, torch.tensor([False, True]))
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert torch.allclose(out[1], x[1].flip(-1), atol=1e-5)


def test_colour_ops():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((4, 3, 8, 8), 0.3)
    # Saturation and hue leave grey pixels grey; brightness/contrast keep [0, 1].
    out = A.color_jitter(grey, 1.0, 1.0, g)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    x = torch.rand(16, 3, 8, 8, generator=g)
    j = A.color_jitter(x, 1.0, 1.0, g)
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)
    assert torch.equal(A.color_jitter(x, 0.0, 1.0, g), x)
    gs = A.random_grayscale(x, 1.0, g)
    assert torch.allclose(gs[:, 0], gs[:, 2])
    assert torch.allclose(A.solarize(x, 1.0, g), torch.where(x >= 0.5, 1 - x, x))
    const = torch.full((3, 1, 16, 16), 0.7)
    assert torch.allclose(A.gaussian_blur(const, 1.0, (0.1, 2.0), g), const, atol=1e-5)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1
    blurred = A.gaussian_blur(spike, 1.0, (1.0, 1.0), g)
    assert blurred[0, 0, 8, 8] < 0.5 and abs(blurred.sum() - 1) < 1e-4


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75])
def test_masks_have_the_exact_ratio(ratio):
    g = torch.Generator().manual_seed(0)
    m = random_masks(32, 8, 8, ratio, g)
    assert (m.sum(1) == round(ratio * 64)).all()
    for _ in range(20):
        b = blockwise_mask(14, 14, ratio, g, min_block=16)
        assert int(b.sum()) == round(ratio * 196)


def test_blockwise_masks_are_blocky():
    g = torch.Generator().manual_seed(0)
    b = blockwise_mask(14, 14, 0.4, g, min_block=16).view(14, 14).float()
    # Masked patches mostly have masked neighbours, unlike a random mask of the same ratio.
    neigh = (b[1:, :] * b[:-1, :]).sum() + (b[:, 1:] * b[:, :-1]).sum()
    r = random_masks(1, 14, 14, 0.4, g).view(14, 14).float()
    assert neigh > 1.5 * ((r[1:, :] * r[:-1, :]).sum() + (r[:, 1:] * r[:, :-1]).sum())


def test_ijepa_targets_never_inside_the_context():
    g = torch.Generator().manual_seed(0)
    for side in (8, 14):
        for _ in range(50):
            ctx, tgt = multiblock_masks(side, side, g)
            assert tgt.shape == (4, side * side)
            assert not (ctx & tgt.any(0)).any()
            assert ctx.sum() >= 4
            frac = tgt.float().mean(1)
            assert (frac > 0.05).all() and (frac < 0.35).all()


def test_to_model_input_normalises_and_expands_grey():
    batch = {"view0": torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), "mask": torch.ones(2, 4, dtype=torch.bool),
             "label": torch.tensor([1, 2])}
    out = to_model_input(batch, mean=[0.5], std=[0.25], channels=3)
    assert out["view0"].shape == (2, 3, 4, 4) and torch.allclose(out["view0"], torch.full((2, 3, 4, 4), 2.0))
    assert out["mask"].dtype == torch.bool and torch.equal(out["label"], batch["label"])


def test_bad_view_config_is_rejected_with_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="scale"):
        Augment(scale=(0.5, 0.2))
    with pytest.raises(ValidationError, match="not a multiple of patch_size"):
        Masked(view=Augment(size=30), patch_size=4)
    with pytest.raises(ValidationError, match="jitter_strenght"):
        Augment(jitter_strenght=0.5)
