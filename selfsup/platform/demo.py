"""`selfsup demo` (what `make demo` runs): the main job end to end on the embedded defaults."""

from __future__ import annotations

import time

from selfsup.pipelines.shards import MANIFEST, ShardOptions, load_manifest, summary, write_shards
from selfsup.pipelines.sources import fashion_mnist
from selfsup.pipelines.storage import endpoint_from_env, open_store, resolve_endpoint


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
    ep = resolve_endpoint()
    where = "embedded SeaweedFS" if endpoint_from_env() is None else "your AWS_* endpoint"
    print(f"storage: {ep.describe()} ({where})")
    manifest = ensure_fashion_mnist(args.data)
    print(summary(manifest))
    return 0
