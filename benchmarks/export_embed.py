"""Model out (issue 36): `selfsup export` time and size per format for ResNet-18 and ViT-S/16 at
224 px, and `selfsup embed` images/s on Fashion-MNIST with 1 and 2 CPU workers beside the kNN
evaluator's feature pass over the same images (the same work, as `selfsup eval` does it today).

    python benchmarks/export_embed.py              # 3 repeats each, writes RESULTS.md
    python benchmarks/export_embed.py --quick      # 1 repeat, the test split's first shards, prints only

Each embed or feature pass runs in its own process with its own local Ray cluster; the cluster's
start is not counted, the actors' start is (a part of every embed). Rows: median (range).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3, run_child, write_section  # noqa: E402

DATA = "s3://bench/fashion-mnist"
ROOT = "s3://bench/runs"
# one training step each: the export figures need a run with a checkpoint, not a trained one
RUNS = {
    "resnet18": ["model.name=resnet18", "model.cifar_stem=false", "data.views.view0.size=224",
                 "data.views.view1.size=224"],
    "vit_small": ["model.name=vit_small_patch16_224", "model.cifar_stem=false", "model.kwargs={}",
                  "data.views.view0.size=224", "data.views.view1.size=224"],
    # what embed is measured with: the shipped SimCLR ResNet-18 on Fashion-MNIST, as it trains there
    "fm": [],
}
FORMATS = ("timm", "safetensors", "torchscript", "onnx")


def child_train(args) -> dict:
    from selfsup.platform.config import load_config
    from selfsup.platform.trainer import train

    cfg = load_config("simclr_resnet18", [f"data.uri={DATA}", "schedule.steps=1", "data.batch_size=8", "eval.knn=false",
                                          "scaling.num_workers=1", f"storage.root={ROOT}", f"storage.name={args.run}",
                                          *RUNS[args.run]])
    train(cfg, log=lambda *_: None)
    return {"run": args.run}


def child_export(args) -> dict:
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.export import export

    t0 = time.perf_counter()
    export(f"{ROOT}/{args.run}", args.format, args.out, overwrite=True)
    seconds = time.perf_counter() - t0
    store = open_store(args.out)
    size = sum(len(store.read(k)) for k in store.list() if k != "selfsup.json")
    return {"seconds": seconds, "mb": size / 1e6}


def child_embed(args) -> dict:
    import ray

    from selfsup.platform.embed import embed

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.perf_counter()
    out = embed(f"{ROOT}/fm", DATA, args.out, splits=["test"], workers=args.workers, overwrite=True)
    return {"images": out["rows"]["test"], "seconds": time.perf_counter() - t0}


def child_features(args) -> dict:
    """The evaluator's pass: read the split (4 threads), then its features in batches of 512."""
    import torch

    from selfsup.platform.evaluate import extract_features, load_labeled, load_run
    from selfsup.platform.step import autocast_dtype

    cfg, method, _ = load_run(f"{ROOT}/fm")
    t0 = time.perf_counter()
    images, _ = load_labeled(DATA, "test", labeled=False)
    extract_features(method.backbone, images, cfg.eval.image_size or cfg.view_size(), cfg.data.mean, cfg.data.std,
                     cfg.model.in_chans, dtype=autocast_dtype(cfg, torch.device("cpu")))
    return {"images": len(images), "seconds": time.perf_counter() - t0}


def cell(values: list[float], fmt: str = ",.0f") -> str:
    if not values:
        return "failed"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=["train", "export", "embed", "features"])
    ap.add_argument("--run")
    ap.add_argument("--format")
    ap.add_argument("--out")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        fn = {"train": child_train, "export": child_export, "embed": child_embed, "features": child_features}
        print(json.dumps(fn[args.child](args)))
        return
    repeats = 1 if args.quick else 3
    me = [sys.executable, os.path.abspath(__file__)]
    with tempfile.TemporaryDirectory(prefix="selfsup-model-out-") as tmp, private_s3():
        from selfsup.pipelines.shards import ShardOptions, write_shards
        from selfsup.pipelines.sources import open_source

        write_shards(open_source("fashion-mnist"), DATA, ShardOptions(), progress=False, log=lambda *_: None)
        for run in RUNS:
            if not run_child([*me, "--child", "train", "--run", run], f"train {run}"):
                sys.exit(1)
        export_rows = {}
        for run in ("resnet18", "vit_small"):
            for fmt in FORMATS:
                res = [run_child([*me, "--child", "export", "--run", run, "--format", fmt, "--out", f"{tmp}/{run}-{fmt}"],
                                 f"export {run} {fmt}") for _ in range(repeats)]
                export_rows[(run, fmt)] = [r for r in res if r]
        embed_rows = {}
        # 2 actors of 1 CPU each and Ray Data's read/decode tasks beside them: a cluster of 3 logical CPUs
        for name, workers, cpus in (("embed, 1 worker", 1, 2), ("embed, 2 workers", 2, 3)):
            res = [run_child([*me, "--child", "embed", "--workers", str(workers), "--cpus", str(cpus),
                              "--out", f"{tmp}/emb-{workers}"], name) for _ in range(repeats)]
            embed_rows[name] = [r["images"] / r["seconds"] for r in res if r]
        res = [run_child([*me, "--child", "features"], "evaluator") for _ in range(repeats)]
        embed_rows["the kNN evaluator's feature pass (`selfsup eval`)"] = [r["images"] / r["seconds"] for r in res if r]

    lines = ["| backbone | format | export time, s | size, MB |", "|---|---|---|---|"]
    for (run, fmt), rows in export_rows.items():
        lines.append(f"| {'ResNet-18' if run == 'resnet18' else 'ViT-S/16'} | {fmt} | "
                     f"{cell([r['seconds'] for r in rows], '.1f')} | {cell([r['mb'] for r in rows], '.1f')} |")
    lines += ["", "| Fashion-MNIST test split (10,000 images), SimCLR ResNet-18 | images/s |", "|---|---|"]
    lines += [f"| {name} | {cell(rates)} |" for name, rates in embed_rows.items()]
    body = "\n".join(lines) + (
        f"\n\nMedian of {repeats} runs (range), each a fresh process. Export: 224 px input, from a run's checkpoint in "
        "the embedded SeaweedFS to a local folder, the time of `export()` (loading the checkpoint, writing, and for "
        "ONNX torch's exporter and the onnxruntime check); size without selfsup.json. Embed: `embed()` of the test "
        "split to local Parquet, the actors' start included, Ray's not; each actor has 1 CPU (1 torch thread), and "
        "with 2 workers the local cluster has 3 logical CPUs so that Ray Data's read tasks get a slot beside them "
        "(the machine has 2 cores). The evaluator reads with 4 threads and computes in the driver with every core.\n")
    print(body)
    if not args.quick:
        write_section("Model out: export time and size, embed images/s (issue 36)", body)


if __name__ == "__main__":
    main()
