"""Every method: its loss against a direct reference computation, its distributed statistics
against one worker on the whole batch, its update rules, and a short run on real images."""

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from selfsup.methods import METHODS
from selfsup.methods.barlowtwins import barlow_twins_loss
from selfsup.methods.base import collapse_probe
from selfsup.methods.byol import regression_loss
from selfsup.methods.clustering import spherical_kmeans
from selfsup.methods.mocov2 import info_nce, shuffled_forward
from selfsup.methods.mocov3 import contrastive
from selfsup.methods.simsiam import negative_cosine
from selfsup.methods.swav import sinkhorn, swapped_prediction
from selfsup.methods.vicreg import vicreg_loss
from selfsup.pipelines.sources import FASHION_MNIST_DIR
from selfsup.pipelines.views import make_views
from selfsup.platform.config import load_config
from selfsup.platform.step import TrainStep, build_method

G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=G)


# ---------------------------------------------------------------- reference losses, one worker

def test_info_nce_reference():
    q, k, queue = (F.normalize(rnd(*s), dim=1) for s in ((4, 6), (4, 6), (10, 6)))
    ref = 0.0
    for i in range(4):
        pos = math.exp(float(q[i] @ k[i]) / 0.2)
        neg = sum(math.exp(float(q[i] @ n) / 0.2) for n in queue)
        ref += -math.log(pos / (pos + neg)) / 4
    assert abs(float(info_nce(q, k, queue, 0.2)) - ref) < 1e-5


def test_mocov3_contrastive_reference():
    q, k = rnd(5, 4), rnd(5, 4)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    ref = 0.0
    for i in range(5):
        logits = [float(qn[i] @ kn[j]) / 0.2 for j in range(5)]
        ref += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) / 5
    assert abs(float(contrastive(q, k, 0.2)) - ref * 0.4) < 1e-5


def test_byol_and_simsiam_references():
    p, z = rnd(6, 5), rnd(6, 5)
    cos = [float(F.cosine_similarity(p[i], z[i], dim=0)) for i in range(6)]
    assert abs(float(regression_loss(p, z)) - sum(2 - 2 * c for c in cos) / 6) < 1e-5
    assert abs(float(negative_cosine(p, z)) + sum(cos) / 6) < 1e-5


@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg", "info_nce", "contrastive"])
def test_losses_stay_fp32_under_bf16_autocast(loss):
    # autocast would run the similarity / cross-correlation matmuls in bf16 (about 3 significant digits)
    torch.manual_seed(0)
    z0, z1, queue = torch.randn(64, 48), torch.randn(64, 48), F.normalize(torch.randn(128, 48), dim=1)
    fn = {"barlow_twins": lambda: barlow_twins_loss(z0, z1, 0.005),
          "vicreg": lambda: vicreg_loss(z0, z1, 25.0, 25.0, 1.0)["loss"],
          "info_nce": lambda: info_nce(F.normalize(z0, dim=1), F.normalize(z1, dim=1), queue, 0.1),
          "contrastive": lambda: contrastive(z0, z1, 0.1)}[loss]
    ref = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_barlow_twins_reference():
    z0, z1 = rnd(8, 3), rnd(8, 3)
    a = (z0 - z0.mean(0)) / z0.std(0, unbiased=False)
    b = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    ref = 0.0
    for i in range(3):
        for j in range(3):
            c = sum(float(a[n, i] * b[n, j]) for n in range(8)) / 8
            ref += (1 - c) ** 2 if i == j else 0.005 * c * c
    assert abs(float(barlow_twins_loss(z0, z1, 0.005)) - ref) < 1e-4


def test_vicreg_reference():
    z0, z1 = rnd(8, 3), rnd(8, 3)
    inv = float(((z0 - z1) ** 2).mean())

    def var_cov(z):
        z = z - z.mean(0)
        var = sum(max(0.0, 1 - math.sqrt(float(z[:, j].var()) + 1e-4)) for j in range(3)) / 3
        cov = z.T @ z / 7
        off = sum(float(cov[i, j]) ** 2 for i in range(3) for j in range(3) if i != j) / 3
        return var, off

    (v0, c0), (v1, c1) = var_cov(z0), var_cov(z1)
    out = vicreg_loss(z0, z1, 25, 25, 1)
    assert abs(float(out["loss"]) - (25 * inv + 25 * (v0 + v1) + (c0 + c1))) < 1e-3


def test_sinkhorn_balances_prototypes_and_samples():
    scores = F.normalize(rnd(64, 16), dim=1) @ F.normalize(rnd(8, 16), dim=1).T  # cosines, as in SwAV
    q = sinkhorn(scores, eps=0.05, iters=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # each sample one unit of mass
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), atol=0.05)  # prototypes equally used


def test_swapped_prediction_reference():
    scores = [rnd(3, 4) for _ in range(3)]
    codes = [torch.softmax(rnd(3, 4), 1) for _ in range(2)]
    ref, n = 0.0, 0
    for i in range(2):
        for v in range(3):
            if v != i:
                ref += float(-(codes[i] * torch.log_softmax(scores[v] / 0.1, 1)).sum(1).mean())
                n += 1
    assert abs(float(swapped_prediction(scores, codes, 0.1)) - ref / n) < 1e-5


def test_spherical_kmeans_finds_separated_clusters():
    centers = F.normalize(torch.eye(4, 16), dim=1)
    # Its own generators: random-sample init (as DeepCluster-v2's) can put two seeds in one cluster,
    # so the outcome must not hang on which tests ran before (seed 1 fails on this data, 0 does not).
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    x = F.normalize(centers.repeat_interleave(50, 0) + 0.05 * noise, dim=1)
    c, a = spherical_kmeans(x, 4, 10, torch.Generator().manual_seed(0))
    assert len(set(a.view(4, 50).mode(1).values.tolist())) == 4  # each true cluster its own id
    assert (a.view(4, 50) == a.view(4, 50).mode(1, keepdim=True).values).float().mean() > 0.95


def test_collapse_probe():
    spread = collapse_probe(rnd(256, 32))
    collapsed = collapse_probe(torch.ones(256, 32) + 1e-6 * rnd(256, 32))
    assert spread["embed_rank"] > 20 and spread["embed_std"] > 0.1
    assert collapsed["embed_std"] < 1e-3


# ---------------------------------------------------------------- 2 workers == 1 worker

def _grads_on_shards(rank, world, loss_name, z0, z1):
    import selfsup.methods.barlowtwins as bt
    import selfsup.methods.mocov3 as m3
    import selfsup.methods.vicreg as vr

    fns = {"barlowtwins": lambda a, b: bt.barlow_twins_loss(a, b, 0.005),
           "vicreg": lambda a, b: vr.vicreg_loss(a, b, 25, 25, 1)["loss"],
           "mocov3": lambda a, b: m3.contrastive(a, b, 0.2)}
    n = len(z0) // world
    a = z0[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = fns[loss_name](a, b)
    loss.backward()
    # DDP averages parameter gradients over workers: the inputs' gradients, likewise.
    return float(loss.detach()), a.grad / world, (b.grad / world if b.grad is not None else torch.zeros_like(b))


@pytest.mark.parametrize("name", ["barlowtwins", "vicreg", "mocov3"])
def test_two_gloo_workers_equal_one_worker_on_the_whole_batch(name):
    z0, z1 = rnd(16, 6), rnd(16, 6)
    one = _grads_on_shards(0, 1, name, z0, z1) if name != "mocov3" else None
    a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    from selfsup.methods import barlowtwins as bt, mocov3 as m3, vicreg as vr
    loss = {"barlowtwins": lambda: bt.barlow_twins_loss(a, b, 0.005), "vicreg": lambda: vr.vicreg_loss(a, b, 25, 25, 1)["loss"],
            "mocov3": lambda: m3.contrastive(a, b, 0.2)}[name]()
    loss.backward()
    two = run_distributed(_grads_on_shards, 2, name, z0, z1)
    assert abs(sum(r[0] for r in two) / 2 - float(loss.detach())) < 1e-5
    assert torch.allclose(torch.cat([r[1] for r in two]), a.grad, atol=1e-6)
    if name != "mocov3":  # MoCo v3's keys come from the momentum encoder: no gradient
        assert torch.allclose(torch.cat([r[2] for r in two]), b.grad, atol=1e-6)
    del one


def _sinkhorn_shard(rank, world, scores):
    n = len(scores) // world
    return sinkhorn(scores[rank * n:(rank + 1) * n])


def test_sinkhorn_two_workers_equal_one():
    scores = rnd(32, 10)
    two = run_distributed(_sinkhorn_shard, 2, scores)
    assert torch.allclose(torch.cat(two), sinkhorn(scores), atol=1e-5)


def _center_shard(rank, world, teacher, center):
    from selfsup.methods.dino import updated_center

    n = len(teacher[0]) // world
    return updated_center(center, [t[rank * n:(rank + 1) * n] for t in teacher], 0.9)


def test_dino_center_two_workers_equal_one():
    from selfsup.methods.dino import updated_center

    teacher, center = [rnd(8, 5), rnd(8, 5)], rnd(1, 5)
    two = run_distributed(_center_shard, 2, teacher, center)
    one = updated_center(center, teacher, 0.9)
    assert torch.allclose(two[0], one, atol=1e-6) and torch.allclose(two[1], one, atol=1e-6)


# ---------------------------------------------------------------- update rules

def _tiny(method, *extra):
    kind = METHODS[method].view_kind
    views = {"two_views": ["data.views.view0.size=16", "data.views.view1.size=16"],
             "multi_crop": ["data.views.global_view.size=16", "data.views.local_view.size=8", "data.views.n_local=2"],
             "masked": ["data.views.view.size=16", "data.views.patch_size=4",
                        {"beit": "data.views.strategy=blockwise", "maskfeat": "data.views.strategy=blockwise",
                         "ijepa": "data.views.strategy=multiblock"}.get(method, "data.views.strategy=random")]}
    model = (["model.name=vit_tiny_patch16_224", "model.cifar_stem=false",
              "model.kwargs={img_size: 16, patch_size: 4, depth: 2, dynamic_img_size: true}"]
             if kind == "masked" or method == "dinov2" else ["model.name=resnet10t", "model.cifar_stem=false"])
    own = {"dinov2": ["data.views.masks.patch_size=4"], "distill": ["method.teacher=(attached by the test)"]}
    cfg = load_config(None, [f"method.name={method}", *model, "data.batch_size=32", "schedule.steps=6",
                             "optim.warmup_fraction=0", *views[kind], *own.get(method, []), *extra])
    return cfg


def tiny_teacher() -> torch.nn.Module:
    """A frozen random ViT for distill's unit tests: 16 px, patch 4 (a 4x4 grid of patch tokens)."""
    from selfsup.methods.backbones import build_backbone

    torch.manual_seed(1)
    return build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2)[0]


def test_mocov2_queue_and_momentum_encoder():
    torch.manual_seed(0)
    m = build_method(_tiny("mocov2", "method.queue_size=40"), num_samples=1000)
    assert m.queue.shape == (40, 128)
    keys = F.normalize(rnd(16, 128), dim=1)
    m._enqueue(keys)
    m._enqueue(keys[:8])
    assert torch.equal(m.queue[:16], keys) and torch.equal(m.queue[16:24], keys[:8]) and int(m.queue_ptr) == 24
    m._enqueue(torch.cat([keys, keys]))  # wraps around
    assert int(m.queue_ptr) == (24 + 32) % 40 and torch.equal(m.queue[24:40], keys)
    # The default queue is scaled to the data: a quarter of the train split, at most 65536.
    assert build_method(_tiny("mocov2"), num_samples=60000).queue.shape[0] == 15000


def test_shuffled_forward_restores_order():
    net = torch.nn.Linear(4, 3)
    x = rnd(12, 4)
    assert torch.allclose(shuffled_forward(net, x, groups=3), net(x), atol=1e-6)


@pytest.mark.parametrize("method", ["mocov2", "mocov3", "byol"])
def test_momentum_encoders_follow_the_online_network(method):
    torch.manual_seed(0)
    cfg = _tiny(method)
    m = build_method(cfg, num_samples=100)
    target = getattr(m, {"mocov2": "key_backbone", "mocov3": "momentum_backbone", "byol": "target_backbone"}[method])
    before = [p.detach().clone() for p in target.parameters()]
    m.before_step(0.0)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    m.after_step(0.0)
    mom = m.momentum
    for b, t, o in zip(before, target.parameters(), m.backbone.parameters()):
        assert torch.allclose(t, mom * b + (1 - mom) * o, atol=1e-6)
    m.before_step(1.0)
    assert m.momentum == 1.0


def test_swav_freezes_and_normalises_prototypes():
    m = build_method(_tiny("swav", "method.freeze_prototypes_fraction=0.5", "method.n_prototypes=20"))
    with torch.no_grad():
        m.prototypes.weight.mul_(3)
    m.before_step(0.1)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(20), atol=1e-5)
    m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
    m.after_backward(0.1)
    assert m.prototypes.weight.grad is None


# ---------------------------------------------------------------- short runs on real images

def _fashion_sample(n=32):
    with gzip.open(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return [torch.from_numpy(im.copy()).unsqueeze(0) for im in images]


def test_deepclusterv2_clusters_once_the_bank_is_big_enough_not_at_step_recluster_every():
    torch.manual_seed(0)
    cfg = _tiny("deepclusterv2", "method.n_prototypes=[4,8]", "method.recluster_every_steps=100")
    m = build_method(cfg, num_samples=64)
    step = TrainStep(m, cfg, torch.device("cpu"))
    images = _fashion_sample(64)
    losses = []
    for i in range(3):  # 16 samples a step; the first k-means needs 4 x 8 = 32 in the bank
        batch = make_views(images[16 * i:16 * (i + 1)], cfg.data.views, torch.Generator().manual_seed(i))
        batch["index"] = torch.arange(16 * i, 16 * (i + 1))
        losses.append(step(batch, i / 100)["loss"])
        assert bool(m.clustered) == (i >= 1)
    assert losses[:2] == [0.0, 0.0] and losses[2] > 0
    assert (m.assignments[:, :32] >= 0).all() and (m.assignments[:, 32:] == -1).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_short_run_on_real_images_has_no_nan_and_no_collapse(method):
    torch.manual_seed(0)
    extra = {"swav": ["method.n_prototypes=64", "method.queue_length=64", "method.queue_start_fraction=0.3"],
             "deepclusterv2": ["method.n_prototypes=[8,12]", "method.recluster_every_steps=2"],
             "dino": ["method.out_dim=256", "method.use_bn_in_head=true"], "mocov2": ["method.queue_size=64"],
             "dinov2": ["method.out_dim=256", "method.hidden_dim=128"], "distill": ["method.queue_size=64"],
             "beit": ["method.vocab_size=16"],
             "mae": ["method.decoder_dim=32", "method.decoder_depth=1"], "ijepa": ["method.pred_dim=24", "method.pred_depth=1"]
             }.get(method, [])
    cfg = _tiny(method, *extra)
    m = build_method(cfg, num_samples=32)
    images = _fashion_sample(32)
    if method == "beit":
        import io

        from selfsup.methods.beit import fit_codebook
        from selfsup.pipelines.views import Plain, to_model_input

        x = to_model_input(make_views(images, Plain(size=16), G), cfg.data.mean, cfg.data.std)["image"]
        buf = io.BytesIO()
        torch.save(fit_codebook(x, 4, 16), buf)
        m.load_tokenizer(buf.getvalue())
    if method == "distill":
        m.set_teacher(tiny_teacher(), (3, 16, 16))
    step = TrainStep(m, cfg, torch.device("cpu"))
    m.start_epoch(0)
    outs = []
    for i in range(6):
        batch = make_views(images, cfg.data.views, torch.Generator().manual_seed(i))
        batch["index"] = torch.arange(32)
        batch["label"] = torch.full((32,), -1)  # as an unlabeled set streams: no method reads labels
        outs.append(step(batch, i / 6))
    assert all(math.isfinite(o["loss"]) for o in outs)
    assert outs[-1]["embed_std"] > 0.01 and outs[-1]["embed_rank"] > 2, outs[-1]
    if method == "deepclusterv2":
        assert bool(m.clustered) and (m.assignments[0] >= 0).all() and outs[-1]["loss"] > 0
