"""Bring your own data (issue 35): `shard` on a thread pool vs on Ray Data (1 and 2 CPUs), `shard
index`, and the driver's memory while listing a million keys.

    python benchmarks/byod_throughput.py              # 3 repeats each, writes RESULTS.md
    python benchmarks/byod_throughput.py --quick      # 1 repeat, smaller sets, prints only

Each measurement runs in its own process (a fresh Ray cluster of that many CPUs, its own memory);
the rows are medians of the repeats with their range. Images go into the embedded S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3, run_child, write_section  # noqa: E402


def jpeg_folder(folder: str, n: int) -> None:
    """n 256x256 RGB JPEGs (smooth noise, ~20 KB each) in 10 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3), np.uint8)
    for i in range(n):
        os.makedirs(f"{folder}/c{i % 10}", exist_ok=True)
        img = Image.fromarray(np.roll(base, i, axis=0)).resize((256, 256), Image.BILINEAR)
        img.save(f"{folder}/c{i % 10}/{i:06d}.jpg", quality=90)


def child_shard(args) -> dict:
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import Source, open_source

    src = open_source(args.source)
    if args.limit:
        src = Source(src.name, src.class_names, {"train": src.splits["train"][:args.limit]}, src.mode, src.size,
                     src.fingerprint + f"-{args.limit}", src.encode, src.labeled)
    n = sum(len(v) for v in src.splits.values())
    on_ray = args.how != "local"
    if on_ray:
        import ray

        ray.init(address="local", num_cpus=int(args.how[len("ray"):]), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        # the cluster's start is a one-off, and so is each worker's (Python, Ray Data, PIL, selfsup):
        # the rate is taken with the workers up, as in a long sharding job
        import ray.data

        def warm(row):
            import selfsup.pipelines.shards  # noqa: F401
            return row

        ray.data.range(8, override_num_blocks=8).map(warm).take_all()
    t0 = time.perf_counter()
    write_shards(src, args.dest, ShardOptions(samples_per_shard=args.per_shard, workers=4), progress=False,
                 log=lambda *_: None, on_ray=on_ray)
    return {"images": n, "seconds": time.perf_counter() - t0}


def child_index(args) -> dict:
    from selfsup.pipelines.index import IndexOptions, index

    t0 = time.perf_counter()
    m = index(args.source, IndexOptions(overwrite=True), progress=False, log=lambda *_: None)
    return {"images": sum(s["num_samples"] for s in m["splits"].values()), "seconds": time.perf_counter() - t0}


def child_listing(args) -> dict:
    """Peak RSS of a folder source over args.limit empty files named like photos (listing + items)."""
    from selfsup.pipelines.folders import folder

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    src = folder(args.source, 0.0)
    n = len(src.splits["train"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"keys": n, "seconds": time.perf_counter() - t0, "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024}


def many_files(folder: str, n: int) -> None:
    for c in range(100):
        os.makedirs(f"{folder}/class-{c:03d}", exist_ok=True)
    for i in range(n):
        open(f"{folder}/class-{i % 100:03d}/photo-{i:09d}.jpg", "wb").close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=["shard", "index", "listing"])
    ap.add_argument("--how", default="local")
    ap.add_argument("--source")
    ap.add_argument("--dest")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"shard": child_shard, "index": child_index, "listing": child_listing}[args.child](args)))
        return
    repeats = 1 if args.quick else 3
    me = [sys.executable, os.path.abspath(__file__)]
    fm_n, jpg_n, keys_n = (5000, 500, 100_000) if args.quick else (20_000, 3000, 1_000_000)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="selfsup-byod-") as tmp, private_s3():
        jpeg_folder(f"{tmp}/jpg", jpg_n)
        for data, source, limit, per_shard in (("Fashion-MNIST", "fashion-mnist", fm_n, 1000),
                                               ("256 px JPEG", f"{tmp}/jpg", 0, 250)):
            for how in ("local", "ray1", "ray2"):
                rates = []
                for r in range(repeats):
                    dest = f"s3://bench/{data.split()[0].lower()}-{how}-{r}"
                    res = run_child([*me, "--child", "shard", "--how", how, "--source", source, "--dest", dest,
                                     "--limit", str(limit), "--per-shard", str(per_shard)], f"shard {data} {how}")
                    if res:
                        rates.append(res["images"] / res["seconds"])
                rows[(data, how)] = rates
            rates = []
            for r in range(repeats):
                shards = f"s3://bench/{data.split()[0].lower()}-local-{r}/train/*.tar"
                res = run_child([*me, "--child", "index", "--source", shards], f"index {data}")
                if res:
                    rates.append(res["images"] / res["seconds"])
            rows[(data, "index")] = rates
        many_files(f"{tmp}/keys", keys_n)
        listing = run_child([*me, "--child", "listing", "--source", f"{tmp}/keys"], "listing")

    def cell(rates):
        if not rates:
            return "failed"
        return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"

    names = {"local": "`shard`, thread pool (4 threads)", "ray1": "`shard` on Ray Data, 1 CPU",
             "ray2": "`shard` on Ray Data, 2 CPUs", "index": "`shard index` (every image decoded), 4 threads"}
    lines = ["| step | Fashion-MNIST images/s | 256 px JPEG images/s |", "|---|---|---|"]
    for how, name in names.items():
        lines.append(f"| {name} | {cell(rows[('Fashion-MNIST', how)])} | {cell(rows[('256 px JPEG', how)])} |")
    ratio = {}  # images/s per core against the thread pool's per core (it has all the machine's cores)
    cores = os.cpu_count()
    for data in ("Fashion-MNIST", "256 px JPEG"):
        local = rows[(data, "local")]
        for how, n in (("ray1", 1), ("ray2", 2)):
            if local and rows[(data, how)]:
                ratio[f"{data}, {n} CPU"] = (statistics.median(rows[(data, how)]) / n) / (statistics.median(local) / cores)
    body = "\n".join(lines) + (
        f"\n\nMedian of {repeats} runs (range). Fashion-MNIST: the first {fm_n:,} training images, PNG; 256 px JPEG: "
        f"{jpg_n:,} photos in 10 class folders, passed through. Into the embedded SeaweedFS, 1000 "
        "Fashion-MNIST or 250 JPEGs per shard; each run a fresh process and Ray cluster (the cluster's and its "
        "workers' start not counted: a one-off in a long job).\n\n"
        + f"Ray Data per CPU against the thread pool per core ({cores} cores): "
        + ", ".join(f"{d} {r:.2f}x" for d, r in ratio.items()) + " (target >= 0.8x). The S3 server, the driver "
        "and Ray's own processes share the same cores: with 1 Ray CPU they have a core to themselves; with as many "
        "Ray CPUs as the machine has cores they compete with the tasks, so per-core scaling needs a machine with "
        "more cores than Ray CPUs.\n")
    if listing:
        per_key = (listing["rss_peak_mb"] - listing["rss_before_mb"]) * 1e6 / listing["keys"]
        body += (f"\nListing {listing['keys']:,} keys (a folder source; empty files named like photos, 100 class "
                 f"folders): driver peak RSS {listing['rss_peak_mb']:.0f} MB, {listing['rss_before_mb']:.0f} MB before "
                 f"the listing: {per_key:.0f} bytes per key, so 10 million keys need about "
                 f"{per_key * 1e7 / 1e9:.1f} GB of driver memory ({listing['seconds']:.1f} s to list).\n")
    print(body)
    if not args.quick:
        write_section("Bring your own data: sharding on Ray Data, indexing, listing (issue 35)", body)


if __name__ == "__main__":
    main()
