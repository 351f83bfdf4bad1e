"""Losses against direct reference computations, and their distributed versions against one worker."""

import math

import torch
import torch.nn.functional as F

from dist_utils import run_distributed

from selfsup.methods.dino import DINOHead, dino_loss, updated_center
from selfsup.methods.simclr import nt_xent


def nt_xent_reference(z0, z1, t):
    """SimCLR's loss written out literally: for every anchor, -log(exp(s_pos/t) / sum_{k != anchor} exp(s_k/t))."""
    z = F.normalize(torch.cat([z0, z1]).double(), dim=1)
    n = len(z0)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_nt_xent_matches_reference():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5):
        assert abs(float(nt_xent(z0, z1, t)) - nt_xent_reference(z0, z1, t)) < 1e-5


def dino_loss_reference(student, teacher, center, ts, tt):
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            for b in range(len(t)):
                q = torch.softmax((t[b].double() - center[0].double()) / tt, 0)
                logp = torch.log_softmax(s[b].double() / ts, 0)
                total += float(-(q * logp).sum()) / len(t)
            n += 1
    return total / n


def test_dino_loss_and_center_match_reference():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 7, generator=g) for _ in range(2)]
    student = [torch.randn(4, 7, generator=g) for _ in range(5)]
    center = torch.randn(1, 7, generator=g)
    got = float(dino_loss(student, teacher, center, 0.1, 0.04))
    assert abs(got - dino_loss_reference(student, teacher, center, 0.1, 0.04)) < 1e-5
    new = updated_center(center, teacher, 0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True), atol=1e-6)


def test_dino_head_last_layer_has_unit_norm_rows():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_bn_spreads_features_that_share_a_large_common_part():
    # Pooled ReLU features of a young backbone are mostly one shared positive vector: a plain fresh
    # head maps every sample to nearly the same logits (a uniform teacher after centring); BN does not.
    x = 1 + 0.1 * torch.rand(64, 16, generator=torch.Generator().manual_seed(0))
    spread = {}
    for bn in (False, True):
        torch.manual_seed(1)
        spread[bn] = float(DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, use_bn=bn)(x).std(0).mean())
    assert spread[False] < 0.02 and spread[True] > 0.2, spread


def _worker(rank, world, z0, z1):
    n = len(z0) // world
    a = z0[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(a, b, 0.2)
    loss.backward()
    # DDP would average parameter gradients over workers: do the same to the inputs' gradients.
    return rank, float(loss.detach()), a.grad / world, b.grad / world


def test_nt_xent_two_gloo_workers_equal_one_worker_on_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    whole = nt_xent(a, b, 0.2)
    whole.backward()

    results = run_distributed(_worker, 2, z0, z1)
    mean_loss = sum(r[1] for r in results) / 2
    assert abs(mean_loss - float(whole.detach())) < 1e-5
    grad0 = torch.cat([r[2] for r in results])
    grad1 = torch.cat([r[3] for r in results])
    assert torch.allclose(grad0, a.grad, atol=1e-6) and torch.allclose(grad1, b.grad, atol=1e-6)


def test_nt_xent_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    ref = nt_xent(z0, z1, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the similarity matmul in bf16
        got = nt_xent(z0, z1, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
