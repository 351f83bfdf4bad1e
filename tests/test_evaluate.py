"""The judges of every method: weighted kNN and the raw-pixel baseline."""

import math

import torch
import torch.nn.functional as F

from selfsup.platform.evaluate import knn_top1, raw_pixel_features


def reference_knn(train_f, train_y, test_f, test_y, k, temperature):
    correct = 0
    for f, y in zip(test_f, test_y):
        sims = [(float(f @ t), int(c)) for t, c in zip(train_f, train_y)]
        votes = {}
        for s, c in sorted(sims, reverse=True)[:k]:
            votes[c] = votes.get(c, 0.0) + math.exp(s / temperature)
        correct += max(votes, key=votes.get) == int(y)
    return 100.0 * correct / len(test_f)


def test_knn_matches_a_direct_computation_across_chunks():
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    train_y = torch.randint(0, 4, (200,), generator=g)
    test_f = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    test_y = torch.randint(0, 4, (50,), generator=g)
    for k, t in ((20, 0.07), (5, 0.5)):
        want = reference_knn(train_f, train_y, test_f, test_y, k, t)
        assert knn_top1(train_f, train_y, test_f, test_y, k=k, temperature=t, chunk=16) == want


def test_knn_votes_are_weighted_by_similarity():
    # Two neighbours of class 0 at cosine 0.6 lose to one of class 1 at cosine 1 when T is small.
    q = torch.tensor([[1.0, 0.0]])
    train_f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([1, 0, 0])
    assert knn_top1(train_f, train_y, q, torch.tensor([1]), k=3, temperature=0.07) == 100.0
    assert knn_top1(train_f, train_y, q, torch.tensor([0]), k=3, temperature=10.0) == 100.0


def test_raw_pixels_centred_ignore_brightness():
    x = torch.randint(0, 200, (1, 4, 4), dtype=torch.uint8)
    f = raw_pixel_features([x, x + 50])
    assert torch.allclose(f[0] @ f[1], torch.tensor(1.0))
    f = raw_pixel_features([x, x + 50], centre=False)
    assert f[0] @ f[1] < 0.999


def test_the_labelled_subset_is_class_balanced_and_fixed_by_the_seed():
    from selfsup.platform.evaluate import balanced_subset

    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    a = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[a]).tolist() == [10, 5, 1]
    assert torch.equal(a, balanced_subset(labels, 0.1, seed=0)) and not torch.equal(a, balanced_subset(labels, 0.1, seed=1))
    assert torch.equal(balanced_subset(labels, 1.0, seed=3), torch.arange(160))


def test_vit_layers_get_decaying_learning_rates_and_the_head_the_full_one():
    from selfsup.methods.backbones import build_backbone
    from selfsup.platform.finetune import param_groups

    vit, dim = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3)
    head = torch.nn.Linear(dim, 10)
    groups = param_groups(vit, head, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    # depth 3: embeddings (layer 0), 3 blocks, then the final norm and the head (layer 4) at the full lr
    assert scale[id(vit.patch_embed.proj.weight)] == scale[id(vit.pos_embed)] == 0.5 ** 4
    assert [scale[id(vit.blocks[i].mlp.fc1.weight)] for i in range(3)] == [0.5 ** 3, 0.5 ** 2, 0.5]
    assert scale[id(vit.norm.weight)] == scale[id(head.weight)] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(head.bias)] == decay[id(vit.blocks[0].norm1.weight)] == decay[id(vit.pos_embed)] == 0
    assert decay[id(head.weight)] == decay[id(vit.blocks[0].mlp.fc1.weight)] == 0.05
    flat = {g["lr_scale"] for g in param_groups(vit, head, 0.05, layer_decay=1.0)}
    assert flat == {1.0}  # layer_decay 1: one lr everywhere
    assert len(scale) == len(list(vit.parameters())) + 2  # every parameter in exactly one group


def stripes(n: int = 160) -> tuple[list[torch.Tensor], torch.Tensor]:
    """16 px images; class = a horizontal or a vertical stripe at a random place, on noise of the same brightness."""
    g = torch.Generator().manual_seed(0)
    imgs, ys = [], []
    for i in range(n):
        y, at = i % 2, int(torch.randint(4, 12, (1,), generator=g))
        im = torch.randint(0, 60, (1, 16, 16), generator=g, dtype=torch.uint8)
        if y == 0:
            im[:, at] = 250
        else:
            im[:, :, at] = 250
        imgs.append(im)
        ys.append(y)
    return imgs, torch.tensor(ys)


def test_finetuning_trains_the_backbone_and_head_well_beyond_chance():
    from selfsup.methods.backbones import build_backbone
    from selfsup.platform.finetune import FinetuneParams, finetune

    imgs, ys = stripes()
    torch.manual_seed(0)
    vit, dim = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, in_chans=1)
    before = [p.clone() for p in vit.parameters()]
    p = FinetuneParams(epochs=16, batch_size=32, lr=4e-3, crop_scale=(1.0, 1.0), warmup_epochs=0.5)
    top1 = finetune(vit, dim, imgs[:120], ys[:120], imgs[120:], ys[120:], 16, [0.5], [0.25], 1, p)
    assert top1 >= 75, top1  # chance: 50
    assert any(not torch.equal(a, b) for a, b in zip(before, vit.parameters()))  # the backbone itself was trained


def test_finetuning_head_learns_features_that_share_a_large_component():
    """The head standardises the features, so their offset and scale do not decide what a short
    schedule learns, and it scores with statistics of the final features (not a running average
    that still holds the first steps'): a plain linear head, or this one scored with its running
    averages, is at chance here."""
    from selfsup.platform.finetune import FinetuneParams, finetune

    class Shared(torch.nn.Module):  # a fixed feature that tells the stripes apart, small, on a large shared value
        def __init__(self):
            super().__init__()
            # +2 on the outer columns, -1 on the middle ones (where the stripes are): a horizontal stripe
            # sums to +8 x its brightness, a vertical one to -16 x
            w = torch.full((16, 16), 2.0)
            w[:, 4:12] = -1.0
            self.register_buffer("w", w / 100)

        def forward(self, x):
            return 10.0 + 0.01 * (x[:, 0] * self.w).sum((1, 2)).unsqueeze(1)

    imgs, ys = stripes()
    torch.manual_seed(0)
    p = FinetuneParams(epochs=3, batch_size=32, crop_scale=(1.0, 1.0), warmup_epochs=0.5, layer_decay=1.0)
    top1 = finetune(Shared(), 1, imgs[:120], ys[:120], imgs[120:], ys[120:], 16, [0.5], [0.25], 1, p)
    assert top1 >= 95, top1  # chance: 50
