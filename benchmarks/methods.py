"""Every registered method on Fashion-MNIST under one fixed CPU budget each: kNN top-1 (k=20,
T=0.07, cosine, memory = all 60,000 train images, queries = all 10,000 test images), images/s,
peak memory, the final collapse probe; beside the same backbone at random init and raw pixels.

Each method trains in its own process with the Ray-free TrainStep (the platform's own step;
benchmarks/ray_overhead.py measures what Ray Train adds) on its shipped `<method>_resnet18`
config (`<method>_vit_tiny` for the masked-image methods), views built by the pipeline's batched
augmentations from the decoded images. The ResNet-18 runs at half width (channels 32-64-128-256)
on 20 px views (two views: crop scale 0.9-1, colour jitter strength 1.0; multi-crop: 2 local crops
at 10 px), the settings benchmarks/knn_budget.py chose for short runs on 2 CPU cores; the ViT sees
28 px. kNN features are taken at the training view size, as the platform does. The random-init
kNN is computed once per distinct initial backbone (a hash of its weights) and evaluation size:
every ResNet method starts from the same seed-0 backbone, every ViT method from the same ViT.

    python benchmarks/methods.py --budget 300        # seconds of training per method; writes RESULTS.md
    python benchmarks/methods.py --steps 400 --only simclr --set KEY=VALUE ...  # settings compared by steps
    python benchmarks/methods.py --quick             # one step of every method, `N/M methods ok` last
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, keep_rows, run_child, write_section  # noqa: E402

# Short-run views (chosen for SimCLR and DINO, benchmarks/RESULTS.md): two views are nearly whole
# images, since Fashion-MNIST's items are centred and kNN sees whole images.
VIEWS = {"two_views": ["data.views.view0.size=20", "data.views.view1.size=20", "data.views.view0.scale=[0.9, 1.0]",
                       "data.views.view1.scale=[0.9, 1.0]", "data.views.view0.jitter_strength=1.0",
                       "data.views.view1.jitter_strength=1.0"],
         "multi_crop": ["data.views.global_view.size=20", "data.views.local_view.size=10", "data.views.n_local=2"],
         "masked": ["data.views.view.size=28", "model.kwargs.img_size=28"]}
HALF_WIDTH = "model.kwargs={channels: [32, 64, 128, 256]}"


def config_name(method: str) -> str:
    """The shipped ResNet-18 config, or ViT-tiny for the masked-image methods (they need a ViT)."""
    from selfsup.platform.config import shipped_configs

    return f"{method}_resnet18" if f"{method}_resnet18" in shipped_configs() else f"{method}_vit_tiny"


def fashion(split: str):
    import gzip

    import numpy as np
    import torch

    from selfsup.pipelines.sources import FASHION_MNIST_DIR

    p = "train" if split == "train" else "t10k"
    with gzip.open(FASHION_MNIST_DIR / f"{p}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / f"{p}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return list(torch.from_numpy(x.copy())), torch.from_numpy(y.astype("int64"))


def weights_hash(module) -> str:
    from selfsup.platform.finetune import weights_sha256

    return weights_sha256(module)


def train_method(method: str, budget: float, steps: int | None, batch: int, extra: list[str], config: str | None = None,
                 teacher=None):
    """Train `method` Ray-free for `budget` seconds (or `steps`) on the Fashion-MNIST train images,
    each epoch every image once in a seeded order: (method, config, step, result row, images,
    labels, hash of the initial backbone). `config`: another shipped config than config_name's;
    `teacher`: distill's frozen teacher, a module."""
    import torch

    from selfsup.methods import METHODS
    from selfsup.pipelines.views import make_views
    from selfsup.platform.config import load_config
    from selfsup.platform.step import Progress, TrainStep, build_method

    torch.manual_seed(0)
    kind = METHODS[method].view_kind
    length = f"schedule.steps={steps}" if steps else f"schedule.time_budget_s={budget}"
    name = config or config_name(method)
    cfg = load_config(name, [length, f"data.batch_size={batch}", *VIEWS[kind], *([HALF_WIDTH] if "resnet" in name else []), *extra])
    images, labels = fashion("train")
    m = build_method(cfg, num_samples=len(images))
    init_hash = weights_hash(m.backbone)
    if hasattr(m, "load_tokenizer"):  # BEiT: visual words fitted on the train images, as the platform does
        import io

        from selfsup.methods.beit import fit_codebook
        from selfsup.pipelines.views import Plain, to_model_input

        x = to_model_input(make_views(images[:5000], Plain(size=28), torch.Generator()), cfg.data.mean, cfg.data.std)
        buf = io.BytesIO()
        torch.save(fit_codebook(x["image"], m.patch, cfg.method_params()["vocab_size"]), buf)
        m.load_tokenizer(buf.getvalue())
    if teacher is not None:
        size = cfg.view_size()
        m.set_teacher(teacher, (cfg.model.in_chans, size, size))
    step = TrainStep(m, cfg, torch.device("cpu"))
    per_epoch = len(images) // batch
    progress = Progress(cfg, steps_per_epoch=per_epoch)
    g = torch.Generator().manual_seed(0)
    n, elapsed, out = 0, 0.0, {}
    m.start_epoch(0)
    while not progress.done(n, elapsed):
        if n % per_epoch == 0:
            order = torch.randperm(len(images), generator=g)
        idx = order[n % per_epoch * batch:(n % per_epoch + 1) * batch]
        t0 = time.perf_counter()
        views = make_views([images[i] for i in idx], cfg.data.views, g)
        views["index"] = idx
        out = step(views, progress(n, elapsed))
        elapsed += time.perf_counter() - t0
        n += 1
        if n % per_epoch == 0:
            m.start_epoch(n // per_epoch)
    res = {"method": method, "steps": n, "images_per_s": n * batch / elapsed, "loss": out["loss"],
           "embed_std": out["embed_std"], "embed_rank": out["embed_rank"]}
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # training's peak
    return m, cfg, step, res, images, labels, init_hash


def run_one(method: str, budget: float, steps: int | None, batch: int, cache: str | None, extra: list[str],
            evaluate: bool = True) -> dict:
    """In a subprocess: train `method` (train_method), then evaluate. `cache`: a JSON file of
    random-init kNN by initial-backbone hash, shared by the methods of one table."""
    import torch

    from selfsup.platform.evaluate import extract_features, knn_top1
    from selfsup.platform.step import build_method

    m, cfg, step, res, images, labels, init_hash = train_method(method, budget, steps, batch, extra)
    if not evaluate:  # --quick: training only
        return res
    test, test_y = fashion("test")
    size = cfg.eval.image_size or cfg.view_size()  # as the platform evaluates: at the training view size
    f = [extract_features(m.backbone, imgs, size, cfg.data.mean, cfg.data.std, dtype=step.dtype) for imgs in (images, test)]
    res["knn_top1"] = knn_top1(f[0], labels, f[1], test_y)
    known = json.load(open(cache)) if cache and os.path.exists(cache) else {}
    init_key = f"{init_hash}@{size}px"
    if init_key not in known:
        torch.manual_seed(0)
        rand = build_method(cfg, num_samples=len(images)).backbone
        assert weights_hash(rand) == init_hash, "the random-init backbone must be the one training started from"
        f = [extract_features(rand, imgs, size, cfg.data.mean, cfg.data.std, dtype=step.dtype) for imgs in (images, test)]
        known[init_key] = knn_top1(f[0], labels, f[1], test_y)
        if cache:
            json.dump(known, open(cache, "w"))
    res["knn_random_init"] = known[init_key]
    res["backbone"] = f"{cfg.model.name} {init_hash[:8]}"
    return res


ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods_rows.json")


def write_table(rows: list[dict], args) -> None:
    """Merge this run's rows into methods_rows.json (rows of the same label, budget, batch and
    overrides; `--only` refreshes some methods) and write the whole table to RESULTS.md."""
    from selfsup.methods import METHODS
    from selfsup.platform.evaluate import knn_top1, raw_pixel_features

    key = {"label": args.label, "budget": args.budget, "batch": args.batch, "set": args.set, "views": VIEWS}
    if args.steps:  # absent from time-budgeted keys, so the rows kept before this option still match
        key = {**key, "budget": None, "steps": args.steps}
    table = keep_rows(ROWS, key, {r["method"]: {**r, "commit": commit()} for r in rows})
    rows = [table[m] for m in METHODS if m in table]
    tr, ty = fashion("train")
    te, tey = fashion("test")
    raw = knn_top1(raw_pixel_features(tr), ty, raw_pixel_features(te), tey)
    lines = ["| method | kNN top-1 | random init (same backbone, seed) | gain | images/s | steps | peak RSS | embed std "
             "| eff. rank | code |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['knn_top1']:.2f}% | {r['knn_random_init']:.2f}% ({r['backbone']}) | "
              f"{r['knn_top1'] - r['knn_random_init']:+.2f} | {r['images_per_s']:.1f} | {r['steps']} | "
              f"{r['peak_rss_gb']:.1f} GB | {r['embed_std']:.3f} | {r['embed_rank']:.1f} | {r['commit']} |" for r in rows]
    lines.append(f"| raw pixels | {raw:.2f}% | | | | | | | | |")
    extra = f"\nExtra overrides: `{' '.join(args.set)}`." if args.set else ""
    title = "Methods under a fixed CPU budget (issue 5)" + (f", {args.label}" if args.label else "")
    write_section(title, "\n".join(lines) + extra + f"""

{f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s"} of training per method (Ray-free TrainStep, 2 threads, bf16
autocast + channels_last), batch {args.batch}, the shipped `<method>_resnet18` config (ResNet-18 with a CIFAR stem at half width,
channels 32-64-128-256) or `<method>_vit_tiny` (patch 4) for MAE, SimMIM, BEiT, MaskFeat, I-JEPA;
views {"; ".join(f"{kind} `{' '.join(v)}`" for kind, v in VIEWS.items())}; kNN k=20, T=0.07, cosine,
eval-mode BN, at the training view size, on all 60,000 / 10,000 images.
Peak RSS: the training process's, before evaluation. Rows are kept in `benchmarks/methods_rows.json`:
a run with `--only` refreshes its methods' rows; "code" is the commit each row was measured with.""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of training per method")
    ap.add_argument("--steps", type=int, help="train each method for this many steps instead of --budget seconds: "
                    "comparisons that this machine's varying CPU speed cannot move")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--only", nargs="*", help="a subset of methods")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every method")
    ap.add_argument("--label", default="", help="names this variant in RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.budget, 1 if args.quick else args.steps,
                                 32 if args.quick else args.batch, args.cache, args.set, evaluate=not args.quick)))
        return

    from selfsup.methods import METHODS

    names = args.only or list(METHODS)
    rows = []
    cache = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    os.unlink(cache)
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--budget", str(args.budget), "--batch", str(args.batch),
               "--cache", cache, "--set", *args.set] + (["--steps", str(args.steps)] if args.steps else [])
        res = run_child(cmd + (["--quick"] if args.quick else []), name)
        if res:
            rows.append(res)
    if os.path.exists(cache):
        os.unlink(cache)
    if not args.quick and rows:
        write_table(rows, args)
    print(f"{len(rows)}/{len(names)} methods ok")


if __name__ == "__main__":
    main()
