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
