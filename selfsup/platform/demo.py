"""`selfsup demo` (what `make demo` runs): the main job end to end on the embedded defaults."""

from __future__ import annotations

import time

from selfsup.pipelines.shards import MANIFEST, ShardOptions, load_manifest, summary, write_shards
from selfsup.pipelines.sources import fashion_mnist
from selfsup.pipelines.endpoints import endpoint_from_env, resolve_endpoint
from selfsup.pipelines.storage import join, open_store
from selfsup.platform.config import load_config


def ensure_fashion_mnist(data: str, log=print) -> dict:
    """Shard Fashion-MNIST to `data` unless a manifest is already there."""
    store = open_store(data, create=True)
    if store.exists(MANIFEST):
        log(f"data: {data} already sharded")
        return load_manifest(data, store=store)
    t0 = time.perf_counter()
    manifest = write_shards(fashion_mnist(), data, ShardOptions())
    log(f"data: sharded Fashion-MNIST to {data} in {time.perf_counter() - t0:.1f}s")
    return manifest


def run_demo(args) -> int:
    from selfsup.platform.trainer import train

    t0 = time.perf_counter()
    ep = resolve_endpoint()
    where = "embedded SeaweedFS" if endpoint_from_env() is None else "your AWS_* endpoint"
    print(f"storage: {ep.describe()} ({where})")
    print(summary(ensure_fashion_mnist(args.data)))
    cfg = load_config("demo", [f"data.uri={args.data}", *args.overrides])
    print(f"training: {cfg.method.name} on {cfg.model.name}, {cfg.scaling.num_workers} Ray workers, "
          f"{cfg.schedule.time_budget_s or cfg.schedule.steps or cfg.schedule.epochs} "
          f"{'s' if cfg.schedule.time_budget_s else 'steps' if cfg.schedule.steps else 'epochs'}")
    s = train(cfg, show_progress=True)
    run = join(cfg.storage.root, s["name"])
    print(f"""
kNN top-1 ({cfg.eval.train_samples or 'all'} train / {cfg.eval.test_samples or 'all'} test images, k={cfg.eval.k}):
  before training (random init): {s.get('knn_first', float('nan')):.2f}%
  after {s['step']} steps ({s['epoch']:.2f} epochs):      {s.get('knn_last', float('nan')):.2f}%
run: {run}  (config.yaml, metrics.jsonl, summary.json, checkpoint-*)
demo wall time: {time.perf_counter() - t0:.0f}s

Next:
  selfsup runs show {s['name']}
  selfsup eval knn {s['name']}          # full protocol: all 60k train / 10k test
  selfsup eval linear {s['name']}
  selfsup dashboard                          # runs, curves, embeddings, views in the browser
  # the same job on a Ray cluster (a local head here), submitted with the job CLI:
  eval "$(selfsup storage env)"; export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token
  ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m selfsup train demo
  # Ray's dashboard (jobs, workers, logs): http://127.0.0.1:8265""")
    return 0
