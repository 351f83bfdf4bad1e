"""Where the views should be made on a CPU machine: `selfsup train` (a local Ray cluster, data
streamed from the embedded S3 server) with data.augment_on=pipeline (Ray Data's tasks decode and
augment) against data.augment_on=trainer (the tasks only decode; the train workers augment), on
Fashion-MNIST with benchmarks/knn_budget.py's SimCLR and DINO settings. The figure is the
training rows' images/s, wall clock between reports (waits for data included), after the first
report; the modes alternate run by run, and each is run `--repeats` times.

    python benchmarks/augment_on.py             # writes RESULTS.md
    python benchmarks/augment_on.py --quick     # 1 run per mode, SimCLR only, fewer steps
"""

from __future__ import annotations

import argparse
import os
import sys
from statistics import median

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3, write_section  # noqa: E402
from knn_budget import COMMON, DINO, SIMCLR  # noqa: E402

SETTINGS = {"SimCLR": (SIMCLR, 40), "DINO": (DINO, 60)}  # (overrides, steps: about 2 minutes each here)
MODES = ("pipeline", "trainer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import fashion_mnist
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.config import load_config
    from selfsup.platform.runs import read_metrics
    from selfsup.platform.trainer import train

    settings = {"SimCLR": (SIMCLR, 12)} if args.quick else SETTINGS
    repeats = 1 if args.quick else args.repeats
    rates: dict[tuple[str, str], list[float]] = {}
    with private_s3():
        data = "s3://bench/fashion-mnist"
        write_shards(fashion_mnist(), data, ShardOptions(), progress=False, log=lambda *_: None)
        for name, (overrides, steps) in settings.items():
            for r in range(repeats):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    run = f"{name.lower()}-{mode}-{r}"
                    cfg = load_config(None, [f"data.uri={data}", "storage.root=s3://bench/runs", f"storage.name={run}",
                                             *COMMON, *overrides, f"schedule.steps={steps}", "train.log_every_steps=4",
                                             "train.checkpoint_every_epochs=1", f"data.augment_on={mode}"])
                    train(cfg, log=lambda *_: None)
                    rows = [x for x in read_metrics(open_store(f"s3://bench/runs/{run}")) if x["kind"] == "train"]
                    rate = median(x["images_per_s"] for x in rows[1:])
                    rates.setdefault((name, mode), []).append(rate)
                    print(f"{run}: {rate:.1f} images/s", flush=True)
    lines = ["| setting | augment_on=pipeline | augment_on=trainer | trainer / pipeline |", "|---|---|---|---|"]
    for name in settings:
        p, t = rates[(name, "pipeline")], rates[(name, "trainer")]
        span = lambda v: f"{median(v):.1f} ({min(v):.1f}-{max(v):.1f})"  # noqa: E731
        lines.append(f"| {name} | {span(p)} | {span(t)} | {median(t) / median(p):.2f}x |")
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("Where the views are made, on the CPU (issue 20)",
                      f"{body}\n\nImages/s of `selfsup train` (median of {repeats} runs, low-high; each run's "
                      "figure the median of its training rows after the first), knn_budget.py's settings for "
                      f"{', '.join(f'{n} ({s} steps)' for n, (_, s) in settings.items())}, Fashion-MNIST from the "
                      "embedded S3 server, a local Ray cluster on this machine's 2 cores.")


if __name__ == "__main__":
    main()
