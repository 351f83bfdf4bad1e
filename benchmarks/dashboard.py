"""Time to first render of the dashboard's Runs page for a run with 10,000 metric rows, and of its
Attention page for a ViT-S/16 at 224 px, in headless Chromium (Debian's, driven by Playwright).

Each repetition starts `selfsup dashboard` afresh (cold caches), opens the page and waits until
it has drawn: the Runs page's first chart's marks, the Attention page's every picture (input, mean,
overlay, 6 heads, 6 masks). The clock starts at navigation; the server's own start is reported
apart. The runs are in the platform's layout on a private S3 server: a run whose metrics.jsonl
holds 10,000 rows (9,000 train, 1,000 eval), and a ViT-S/16 run at 224 px with one real
checkpoint (random init) over 32 generated 224 px colour images.

    python benchmarks/dashboard.py             # 5 repetitions each, writes RESULTS.md
    python benchmarks/dashboard.py --quick     # 1 repetition, prints the Runs page's time last
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, private_s3, write_section  # noqa: E402

ROOT = "s3://bench-dash/runs"


def make_runs(tmp: str) -> None:
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source
    from selfsup.pipelines.storage import join, open_store
    from selfsup.platform.checkpoints import save_checkpoint, write_manifest
    from selfsup.platform.config import load_config, to_yaml
    from selfsup.platform.runs import CONFIG, METRICS, SUMMARY, checkpoint_name
    from selfsup.platform.step import build_method

    # 32 colour images of 224 px: smooth random blobs, 4 classes
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, size=(32, 14, 14, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(small, 16, axis=1), 16, axis=2)
    npz = os.path.join(tmp, "rgb224.npz")
    np.savez(npz, images=images, labels=np.arange(32) % 4, class_names=np.array(list("abcd")))
    data = "s3://bench-dash/data/rgb224"
    write_shards(open_source(npz, holdout=0.25), data, ShardOptions(samples_per_shard=8), progress=False,
                 log=lambda *_: None)

    # the ViT-S/16 run at 224 px, one complete checkpoint
    cfg = load_config("dino_vit_tiny", [f"data.uri={data}", "model.name=vit_small_patch16_224",
                                        "model.kwargs={img_size: 224, patch_size: 16, dynamic_img_size: true}",
                                        "data.views.global_view.size=224", "data.views.local_view.size=96",
                                        "data.mean=[0.5]", "data.std=[0.25]", "storage.name=vit-s16-224"])
    run = open_store(join(ROOT, "vit-s16-224"), create=True)
    run.write(CONFIG, to_yaml(cfg).encode())
    method = build_method(cfg, 24)
    name = checkpoint_name(1)
    with tempfile.TemporaryDirectory() as d:
        files = save_checkpoint({"model": method.state_dict(), "step": 1, "epoch": 0}, {"step": 1, "epoch": 0}, d)
        for f in files:
            run.write(f"{name}/{f}", open(os.path.join(d, f), "rb").read())
    write_manifest(run, name, files)
    summary = {"name": "vit-s16-224", "method": "dino", "backbone": cfg.model.name, "status": "finished", "step": 1,
               "epoch": 0.0, "started": "2026-12-01T00:00:00Z"}
    run.write(SUMMARY, json.dumps(summary).encode())

    # the run with 10,000 metric rows
    long = open_store(join(ROOT, "long-run"), create=True)
    long.write(CONFIG, to_yaml(load_config("simclr_resnet18", ["storage.name=long-run"])).encode())
    rows = []
    for i in range(1, 9001):
        rows.append({"kind": "train", "step": i * 10, "epoch": i / 100, "loss": 6 * 0.9997 ** i, "lr": 0.001,
                     "images_per_s": 800 + 50 * np.sin(i / 50), "workers": 2 if i % 3000 < 2000 else 1,
                     "global_batch": 256, "skipped_update": 0.0, "bad_shards": 0})
        if i % 9 == 0:
            rows.append({"kind": "eval", "step": i * 10, "epoch": i / 100, "knn_top1": 60 + 25 * (1 - 0.999 ** i)})
    rows = rows[:10000]
    long.write(METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())
    long.write(SUMMARY, json.dumps({"name": "long-run", "method": "simclr", "backbone": "resnet18", "status": "finished",
                                    "step": rows[-1]["step"], "epoch": rows[-1]["epoch"], "started": "2026-12-01T01:00:00Z",
                                    "knn_best": 85.0}).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_page(pw):
    """(browser, page): Debian's headless Chromium with nothing that calls out, a 1400x1500 page."""
    browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 1500})


def time_page(page_name: str, ready, home: str) -> tuple[float, float]:
    """(seconds from navigation to drawn, seconds the server took to answer) for one cold start."""
    from playwright.sync_api import sync_playwright

    from selfsup.dashboard.server import start, stop

    os.environ["SELFSUP_HOME"] = home
    t0 = time.perf_counter()
    proc, url, _ = start(ROOT, free_port())
    up = time.perf_counter() - t0
    try:
        with sync_playwright() as pw:
            browser, page = browser_page(pw)
            base, query = url.split("?")
            t0 = time.perf_counter()
            page.goto(f"{base}{page_name}?{query}")
            ready(page)
            took = time.perf_counter() - t0
            browser.close()
    finally:
        stop(proc)
    return took, up


def runs_ready(page):
    page.wait_for_selector('[data-testid="stDataFrame"]', timeout=120_000)
    page.wait_for_selector('[data-testid="stVegaLiteChart"] .marks', timeout=120_000)


def attention_ready(page):
    page.wait_for_function('document.querySelectorAll(\'[data-testid="stImageContainer"] img\').length >= 15', timeout=120_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = 1 if args.quick else args.repeats
    with private_s3(), tempfile.TemporaryDirectory(prefix="selfsup-bench-dash-") as tmp:
        make_runs(tmp)
        results = {}
        for label, page, ready in [("Attention page, ViT-S/16 at 224 px", "attention", attention_ready),
                                   ("Runs page, a run with 10,000 metric rows", "", runs_ready)]:
            times = [time_page(page, ready, os.path.join(tmp, "home")) for _ in range(n)]
            results[label] = times
            print(f"{label}: " + ", ".join(f"{t:.2f} s" for t, _ in times), flush=True)
    if args.quick:
        print(f"Runs page first render: {results['Runs page, a run with 10,000 metric rows'][0][0]:.2f} s")
        return
    lines = ["| page | first render, median (min-max) | runs | server start, median |", "|---|---|---|---|"]
    for label, times in results.items():
        render, up = [t for t, _ in times], [u for _, u in times]
        lines.append(f"| {label} | {statistics.median(render):.2f} s ({min(render):.2f}-{max(render):.2f}) | "
                     f"{len(render)} | {statistics.median(up):.2f} s |")
    write_section("Dashboard: time to first render", f"""
Code: {commit()}. Headless Chromium (Debian's) driven by Playwright; each run starts `selfsup dashboard`
afresh (cold caches) and times from navigation until the page has drawn (Runs: the table and the first
chart's marks; Attention: all 15 pictures of a 6-head ViT-S/16: input, mean, overlay, per-head maps and
masks, model loaded from its checkpoint in S3). Every run of each is listed below the table's median.

{chr(10).join(lines)}

Each run: {'; '.join(f"{k}: " + ', '.join(f'{t:.2f}' for t, _ in v) for k, v in results.items())}.
""")


if __name__ == "__main__":
    main()
