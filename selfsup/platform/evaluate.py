"""What a run learned: weighted kNN (DINO's protocol) and a linear probe on frozen backbone features."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import open_store
from selfsup.pipelines.decode import CorruptShard, Schema, shard_samples
from selfsup.pipelines.views import Plain, make_views, to_model_input
from selfsup.pipelines.shards import load_manifest
from selfsup.platform.checkpoints import read_checkpoint
from selfsup.platform.runs import RunError

log = logging.getLogger("selfsup.eval")


class NoLabels(RunError):
    """Evaluation was asked of a data set without labels."""


def load_labeled(uri: str, split: str, limit: int = 0, seed: int = 0, ep: Endpoint | None = None, strict: bool = True,
                 labeled: bool = True):
    """(images: list of uint8 (C,H,W), labels (N,)) of a split, or of a fixed random subset of
    `limit` samples (the same subset for every evaluation of every run with this seed). With
    `labeled`, only the samples that have a label, and NoLabels when the set has none; else label -1
    marks a sample without one. A corrupt or missing shard raises CorruptShard naming it; with
    `strict=False` it is skipped with a warning."""
    store = open_store(uri, ep)
    m = load_manifest(uri, store=store)
    if split not in m["splits"]:
        raise RunError(f"split {split!r} is not in {uri} (it has {', '.join(m['splits'])})")
    if labeled and m.get("labels") == "none":
        raise NoLabels(f"{uri} has no labels (indexed with --labels none): evaluation needs a labeled set; give one "
                       "as eval.data_uri (training) or --data URI (selfsup eval)")
    shards, schema = m["splits"][split]["shards"], Schema.of(m)
    starts = list(itertools.accumulate((s["num_samples"] for s in shards), initial=0))[:-1]

    def read(s, start):
        try:
            try:
                data = store.read(s["path"])
            except FileNotFoundError:
                raise CorruptShard(f"{store.url(s['path'])}: missing") from None
            return shard_samples(data, s["sha256"], store.url(s["path"]), schema, start)
        except CorruptShard as e:
            if strict:
                raise
            log.warning("skipping shard %s", e)
            return [], [], []

    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(read, shards, starts))
    images = [im for _, ims, _ in parts for im in ims]
    if not images:
        raise CorruptShard(f"split {split!r} of {uri} has no readable shard")
    labels = torch.tensor([y for _, _, ys in parts for y in ys])
    if labeled and (labels < 0).any():  # samples without a label (`shard index` counted them)
        keep = (labels >= 0).nonzero().squeeze(1)
        if not len(keep):
            raise NoLabels(f"split {split!r} of {uri} has no labeled sample: give a labeled set as eval.data_uri "
                           "(training) or --data URI (selfsup eval)")
        images, labels = [images[i] for i in keep], labels[keep]
    if limit and limit < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        images, labels = [images[i] for i in keep], labels[keep]
    return images, labels


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: list[torch.Tensor], size: int, mean, std, in_chans: int = 3,
                     device=torch.device("cpu"), dtype: torch.dtype | None = None, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised features of the centre square of each image resized to `size`, eval-mode BN."""
    was_training = backbone.training
    backbone.eval()
    feats = [batch_features(backbone, images[i:i + batch_size], size, mean, std, in_chans, device, dtype)
             for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return F.normalize(torch.cat(feats), dim=1).cpu()


@torch.no_grad()
def batch_features(backbone: torch.nn.Module, images: list[torch.Tensor], size: int, mean, std, in_chans: int = 3,
                   device=torch.device("cpu"), dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 features of a batch of uint8 (C, H, W) images: each one's centre square resized to `size`
    and normalised, through `backbone` as it is (eval mode is the caller's), autocast to `dtype`."""
    x = to_model_input(make_views(images, Plain(size=size), torch.Generator()), mean, std, in_chans, device)["image"]
    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        return backbone(x).float()


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN (Wu et al. 2018, as in DINO): the k most cosine-similar training features vote
    with weight exp(sim / T). Features must be L2-normalised. Returns top-1 accuracy in %."""
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_cls).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return 100.0 * correct / len(test_f)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of `fraction` of each class's samples (at least one), fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]])
    return torch.cat(keep).sort().values


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 fraction: float = 1.0, seed: int = 0, weight_decay: float = 1e-4, iters: int = 200) -> float:
    """Multinomial logistic regression on frozen, standardised features (full-batch L-BFGS), trained
    on `fraction` of the labels (a class-balanced subset), scored on the test set. Top-1 in %."""
    if fraction < 1.0:
        keep = balanced_subset(train_y, fraction, seed)
        train_f, train_y = train_f[keep], train_y[keep]
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xs, xt = (train_f - mu) / sd, (test_f - mu) / sd
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    layer = torch.nn.Linear(xs.shape[1], n_cls)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(xs), train_y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float((layer(xt).argmax(1) == test_y).float().mean())


def raw_pixel_features(images: list[torch.Tensor], size: int | None = None, centre: bool = True) -> torch.Tensor:
    """The baseline every method must beat: raw pixels, each image centred (its mean pixel
    subtracted, so cosine similarity is their correlation), L2-normalised. Centring makes the
    stronger baseline (Fashion-MNIST: 85.18% against 84.59% with `centre=False`)."""
    x = torch.stack(images).float() if size is None else make_views(images, Plain(size=size), torch.Generator())["image"].float()
    x = x.flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True) if centre else x, dim=1)


def run_config(run_uri: str, ep: Endpoint | None = None):
    """The validated config a run was started with (RunError when there is no readable one)."""
    import yaml

    from selfsup.platform.config import load_yaml, validate
    from selfsup.platform.runs import CONFIG

    store = open_store(run_uri, ep)
    try:
        return validate(load_yaml(store.read_text(CONFIG)))
    except FileNotFoundError:
        raise RunError(f"no run at {run_uri} ({CONFIG} not found)") from None
    except (yaml.YAMLError, UnicodeDecodeError, TypeError) as e:
        raise RunError(f"{store.url(CONFIG)} is not a readable run config ({type(e).__name__})") from None


def load_run(run_uri: str, ep: Endpoint | None = None, checkpoint: str | None = None, random_init: bool = False):
    """(config, method with the weights of the run's newest good checkpoint (or of `checkpoint`, or
    of its random init), the checkpoint's name): what `eval` and the dashboard look at."""
    from selfsup.platform.step import build_method

    cfg = run_config(run_uri, ep)
    torch.manual_seed(cfg.data.seed)
    splits = load_manifest(cfg.data.uri, ep)["splits"]
    if cfg.data.train_split not in splits:
        raise RunError(f"data.train_split {cfg.data.train_split!r} of run {run_uri} is not in {cfg.data.uri}")
    method = build_method(cfg, splits[cfg.data.train_split]["num_samples"], ep)
    used = "random init"
    if not random_init:
        state, used = read_checkpoint(run_uri, ep, checkpoint)
        if state is None:
            raise RunError(f"run {run_uri} has no checkpoint yet (try --random-init for the baseline)")
        method.load_state_dict(state["model"])
    return cfg, method.eval(), used


def evaluate_run(run_uri: str, kind: str, train_samples: int = 0, test_samples: int = 0, checkpoint: str | None = None,
                 random_init: bool = False, teacher: bool = False, ep: Endpoint | None = None, log=print,
                 data: str | None = None) -> dict:
    """kNN or linear-probe accuracy of a run's backbone (newest good checkpoint, or random init), on
    the labeled set `data` (default: the run's eval.data_uri, else its data.uri)."""
    from selfsup.platform.step import autocast_dtype

    cfg, method, used = load_run(run_uri, ep, checkpoint, random_init)
    if teacher and not hasattr(method, "teacher_backbone"):
        raise RunError(f"method {cfg.method.name!r} has no teacher (--teacher is for DINO-style runs)")
    backbone = method.teacher_backbone if teacher else method.backbone
    t0 = time.perf_counter()
    strict, uri = cfg.data.strict, data or cfg.eval_uri()
    train_imgs, train_y = load_labeled(uri, cfg.eval.train_split, train_samples, cfg.data.seed, ep, strict)
    test_imgs, test_y = load_labeled(uri, cfg.eval.test_split, test_samples, cfg.data.seed + 1, ep, strict)
    size = cfg.eval.image_size or cfg.view_size()
    dtype = autocast_dtype(cfg, torch.device("cpu"))
    feats = [extract_features(backbone, imgs, size, cfg.data.mean, cfg.data.std, cfg.model.in_chans, dtype=dtype)
             for imgs in (train_imgs, test_imgs)]
    out = {"run": run_uri, "data": uri, "checkpoint": used, "backbone": "teacher" if teacher else "student",
           "train_samples": len(train_y), "test_samples": len(test_y)}
    if kind == "knn":
        out["knn_top1"] = knn_top1(feats[0], train_y, feats[1], test_y, cfg.eval.k, cfg.eval.temperature)
    else:
        for frac in (1.0, 0.1, 0.01):
            out[f"linear_top1_{frac:g}"] = linear_probe(feats[0], train_y, feats[1], test_y, frac, cfg.data.seed)
    out["time_s"] = round(time.perf_counter() - t0, 1)
    return out
