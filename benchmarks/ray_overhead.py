"""Ray Train's cost per step: the same TrainStep on the same batches, bare PyTorch vs inside a Ray
Train worker (TorchTrainer, 1 worker, same threads), in one run. Steps/s are timed after warm-up
steps, inside the loop on both sides, so start-up is excluded; the Ray side includes its
per-step `ray.train.report` calls like a real run.

    python benchmarks/ray_overhead.py            # writes RESULTS.md
    python benchmarks/ray_overhead.py --quick    # < 60 s, prints the ratio last
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section  # noqa: E402

OVERRIDES = ["data.batch_size=64", "model.name=resnet18", "model.cifar_stem=true", "schedule.steps=1000"]


def make_batches(cfg, n: int):
    from selfsup.pipelines.views import make_views

    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g) for _ in range(cfg.data.batch_size)]
    return [make_views(imgs, cfg.data.views, g) for _ in range(n)]


def timed_steps(cfg, batches, warmup: int, report=None) -> float:
    from selfsup.platform.step import TrainStep, build_method

    torch.manual_seed(0)
    step = TrainStep(build_method(cfg), cfg, torch.device("cpu"))
    for i, b in enumerate(batches[:warmup]):
        step(b, i / len(batches))
    t0 = time.perf_counter()
    for i, b in enumerate(batches[warmup:]):
        m = step(b, (warmup + i) / len(batches))
        if report and (i + 1) % 10 == 0:  # as often as the platform's default train.log_every_steps
            report({"loss": m["loss"]})
    return (len(batches) - warmup) / (time.perf_counter() - t0)


def ray_func(config):
    import ray.train

    torch.set_num_threads(config["threads"])
    rate = timed_steps(config["cfg"], config["batches"], config["warmup"], report=ray.train.report)
    (open(config["out"], "w")).write(str(rate))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfsup.platform.config import load_config
    from selfsup.platform.process_group import LocalStoreTorchConfig

    steps, warmup = (8, 2) if args.quick else (args.steps, 5)
    threads = os.cpu_count()
    results = {}
    for method in ("simclr", "dino"):
        cfg = load_config(None, [f"method.name={method}", *OVERRIDES])
        batches = make_batches(cfg, steps)
        torch.set_num_threads(threads)
        bare = timed_steps(cfg, batches, warmup)
        ray.init(address="local", num_cpus=threads, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rate")
            TorchTrainer(ray_func, train_loop_config={"cfg": cfg, "batches": batches, "warmup": warmup,
                                                      "threads": threads, "out": out},
                         torch_config=LocalStoreTorchConfig(),  # as selfsup train sets up its workers
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                         run_config=RunConfig(storage_path=os.path.join(tmp, "runs"), name="overhead")).fit()
            in_ray = float(open(out).read())
        ray.shutdown()
        results[method] = (bare, in_ray)
        print(f"{method}: bare {bare:.3f} steps/s, Ray Train {in_ray:.3f} steps/s, ratio {in_ray / bare:.3f}", flush=True)
        if args.quick:
            break

    if not args.quick:
        rows = ["| method (ResNet-18 CIFAR stem, batch 64, 28 px data) | bare PyTorch | in a Ray Train worker | ratio |",
                "|---|---|---|---|"]
        rows += [f"| {m} | {b:.3f} steps/s | {r:.3f} steps/s | {r / b:.3f} |" for m, (b, r) in results.items()]
        write_section("Ray Train overhead (issue 4a)", "\n".join(rows) + f"\n\n{steps - warmup} timed steps after "
                      f"{warmup} warm-up steps, {threads} threads on both sides, a `ray.train.report` every 10 steps on the "
                      "Ray side (the platform's default). Target: ratio >= 0.95.")
    m = next(iter(results))
    print(f"headline: Ray Train / bare step rate = {results[m][1] / results[m][0]:.3f} ({m})")


if __name__ == "__main__":
    main()
