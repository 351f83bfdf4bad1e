"""Recovery from faults: seconds from a killed worker, and from a lost node, to the next training
step, with the platform's recovery settings and with Ray 2.60's defaults, side by side.

    python benchmarks/elastic.py [--repeats N] [--quick]

Each repeat is one run per setting of tests/elastic_run.py (a Ray cluster of a head and 2 worker
nodes on this machine, SimCLR/resnet10t on 16 px images, 2 workers elastic down to 1): after step 12
a train worker is killed with SIGKILL; once the run trains again, the node of a worker is removed
(no notice). Prints one line per fault and setting (median and range over the repeats), the steps
repeated after each fault, and whether every complete checkpoint loaded and every logged step
appears exactly once. `--quick`: one repeat; the node-loss recovery seconds of the platform's
settings are the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import run  # noqa: E402  (and SIGTERM ends this benchmark, and the harness it runs, as Ctrl-C does)

HARNESS = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "elastic_run.py")
STEPS = 60


def one(setting: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="selfsup-bench-elastic-") as d:
        out = os.path.join(d, "result.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        env["SELFSUP_HOME"] = os.path.join(d, "home")
        cmd = [sys.executable, HARNESS, "kill-worker,node-loss", out, "--steps", str(STEPS)]
        if setting == "ray-defaults":
            cmd.append("--ray-defaults")
        proc = run(cmd, env=env, timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{setting}: the harness failed:\n{proc.stderr[-2000:]}")
        with open(out) as f:
            r = json.load(f)
    r["clean"] = (r.get("summary", {}).get("status") == "finished"
                  and r["train_steps"] == list(range(2, STEPS + 1, 2))
                  and all(isinstance(v, int) for v in r["checkpoints"].values()))
    return r


def spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"median {statistics.median(xs):.1f} (range {min(xs):.1f}-{max(xs):.1f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat; node-loss seconds printed last")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    results = {s: [] for s in ("ray-defaults", "platform")}
    for i in range(repeats):
        for setting in results:  # interleaved, so machine noise falls on both alike
            r = one(setting)
            results[setting].append(r)
            print(f"# repeat {i + 1}, {setting}: " + ", ".join(
                f"{f['fault']} {f.get('recovery_s')} s" for f in r["faults"]) + f", clean={r['clean']}", flush=True)
    for fault in ("kill-worker", "node-loss"):
        for setting, runs in results.items():
            fs = [f for r in runs for f in r["faults"] if f["fault"] == fault]
            print(f"{fault:12s} {setting:13s} recovery s: {spread([f['recovery_s'] for f in fs])}; "
                  f"steps repeated: {[f['steps_repeated'] for f in fs]}; "
                  f"every step logged once, every checkpoint loads: {all(r['clean'] for r in runs)}")
    node = [f["recovery_s"] for r in results["platform"] for f in r["faults"] if f["fault"] == "node-loss"]
    print(f"node-loss recovery s (platform settings): {statistics.median(node):.1f}")


if __name__ == "__main__":
    main()
