"""Make the README's dashboard pictures (docs/dashboard/*.png) from real runs on Fashion-MNIST.

On a private S3 server and a local Ray cluster, through `selfsup` itself (each a subprocess):
- a sweep, `selfsup tune dino_vit_tiny --space dino`, of --trials trials of --trial-budget seconds
  (the Sweeps page);
- an MAE ViT-tiny/4 run of --budget seconds at 28 px (the Reconstructions page);
- a DINOv2 ViT-tiny/4 run of --budget seconds with dinov2_budget.py's settings, trained last so
  that the pages open it first (Runs, Attention, Embeddings, Views);
then each page of `selfsup dashboard` in headless Chromium (Debian's, driven by Playwright), saved
to --out once drawn. Rerun it after a change to the dashboard or the methods.

    python benchmarks/dashboard_pictures.py                          # 900 s runs, 4 trials of 180 s
    python benchmarks/dashboard_pictures.py --quick --out /tmp/shots  # 20 s runs: a check of the script
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3  # noqa: E402
from dashboard import browser_page, free_port  # noqa: E402
from dinov2_budget import SHARED  # noqa: E402

DATA = "s3://selfsup/datasets/fashion-mnist"
ROOT = "s3://pictures/runs"
# one worker with both threads (the fastest on 2 cores); evaluations every quarter epoch for the curves
COMMON = [f"data.uri={DATA}", f"storage.root={ROOT}", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
          "scaling.torch_threads=2", "data.batch_size=128", "eval.every_epochs=0.25"]
# (page, words its end shows once drawn)
PAGES = [("attention", "head 0:"), ("embeddings", "neighbours share the query's class"),
         ("reconstructions", "masked input"), ("views", "pictures per sample"), ("sweeps", "best.yaml")]


def selfsup(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "selfsup", *args], check=True)


def drawn(page, words: str) -> None:
    """Until the page shows `words`, nothing is stale and its script has stopped."""
    page.wait_for_function("""(w) => document.querySelector('[data-testid="stMain"]').innerText.includes(w)
        && !document.querySelector('[data-stale="true"], [data-testid="stStatusWidgetRunningIcon"]')""",
                           arg=words, timeout=300_000)
    page.wait_for_timeout(1000)  # pictures decode after the script ends


def screenshots(out: str) -> None:
    from playwright.sync_api import sync_playwright

    from selfsup.dashboard.server import start, stop

    proc, url, _ = start(ROOT, free_port())
    try:
        with sync_playwright() as pw:
            browser, page = browser_page(pw)
            page.goto(url)
            page.wait_for_selector('[data-testid="stVegaLiteChart"] .marks', timeout=300_000)
            drawn(page, "checkpoints of")
            page.screenshot(path=os.path.join(out, "runs.png"))
            for name, words in PAGES:
                page.click(f'[data-testid="stSidebarNav"] a[href$="/{name}"]')
                drawn(page, words)
                page.screenshot(path=os.path.join(out, f"{name}.png"))
            browser.close()
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=900.0, help="seconds of training of the DINOv2 and MAE runs")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--trial-budget", type=float, default=180.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                                                  "dashboard"))
    ap.add_argument("--quick", action="store_true", help="20 s runs and 2 trials of 20 s: a check of the script")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.trials, args.trial_budget = 20.0, 2, 20.0
    os.makedirs(args.out, exist_ok=True)
    with private_s3(), tempfile.TemporaryDirectory(prefix="selfsup-pictures-") as home:
        os.environ["SELFSUP_HOME"] = home
        from selfsup.platform.demo import ensure_fashion_mnist

        ensure_fashion_mnist(DATA)
        dino = [*SHARED, "method.out_dim=1024"]
        selfsup("tune", "dino_vit_tiny", *COMMON, *dino, f"schedule.time_budget_s={args.trial_budget}", "--space", "dino",
                "--samples", str(args.trials), "--max-concurrent", "1", "--name", "dino-sweep")
        selfsup("train", "mae_vit_tiny", *COMMON, "data.views.view.size=28", "model.kwargs.img_size=28",
                f"schedule.time_budget_s={args.budget}", "storage.name=mae-vit-tiny")
        selfsup("train", "dinov2_vit_tiny", *COMMON, *dino, f"schedule.time_budget_s={args.budget}",
                "storage.name=dinov2-vit-tiny")
        screenshots(args.out)
    print(f"pictures in {args.out}: runs.png, " + ", ".join(f"{p}.png" for p, _ in PAGES))


if __name__ == "__main__":
    main()
