"""Sharding throughput: Fashion-MNIST (70,000 images) into the embedded S3 server.

    python benchmarks/shard_throughput.py            # writes RESULTS.md
    python benchmarks/shard_throughput.py --quick    # 10,000 images, prints the headline last
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3, write_section  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from selfsup.pipelines.shards import ShardOptions, verify, write_shards
    from selfsup.pipelines.sources import Source, fashion_mnist

    src = fashion_mnist()
    if args.quick:
        src = Source(src.name, src.class_names, {"train": src.splits["train"][:10000]}, src.mode, src.size,
                     src.fingerprint + "q", src.encode)
    n = sum(len(v) for v in src.splits.values())
    rows = []
    with private_s3():
        for workers in ((4,) if args.quick else (1, 2, 4)):
            dest = f"s3://bench/fm-w{workers}"
            t0 = time.perf_counter()
            m = write_shards(src, dest, ShardOptions(workers=workers), progress=False, log=lambda *_: None)
            dt = time.perf_counter() - t0
            mb = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"]) / 1e6
            t0 = time.perf_counter()
            _, problems = verify(dest)
            vt = time.perf_counter() - t0
            assert not problems
            rows.append((workers, n / dt, mb / dt, dt, n / vt))
            print(f"workers={workers}: {n / dt:,.0f} images/s, {mb / dt:.1f} MB/s ({dt:.1f} s); verify {n / vt:,.0f} images/s", flush=True)
    if not args.quick:
        lines = ["| --workers | images/s | MB/s (tar bytes) | wall time | `shard verify` images/s |", "|---|---|---|---|---|"]
        lines += [f"| {w} | {i:,.0f} | {mbs:.1f} | {d:.1f} s | {v:,.0f} |" for w, i, mbs, d, v in rows]
        write_section("Sharding throughput (issue 2)", "\n".join(lines) + f"\n\nFashion-MNIST, {n:,} images (PNG, 1000 per "
                      "shard, 70 shards, 164 MB of tar), into the embedded SeaweedFS on 127.0.0.1.")
    print(f"headline: {rows[-1][1]:,.0f} images/s, {rows[-1][2]:.1f} MB/s with --workers {rows[-1][0]}")


if __name__ == "__main__":
    main()
