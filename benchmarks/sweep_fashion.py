"""A real `selfsup tune` sweep on Fashion-MNIST: time-budgeted trials with ASHA, each trial then
scored by the full kNN protocol (all 60,000 train images as memory, all 10,000 test images as
queries), beside the 15-minute settings of benchmarks/knn_budget.py trained for the same budget.

SimCLR: temperature x jitter strength x crop-scale minimum (benchmarks/spaces/simclr_fashion.yaml);
DINO: teacher temperature x local-crop scale (benchmarks/spaces/dino_fashion.yaml). Trials are
drawn at random (seeded) and ASHA compares them on the periodic kNN (10,000/2,000 images) after each
quarter of the budget. The sweep's state lives in a persistent S3 home (`--home`), so the same
command continues a killed invocation without re-running finished trials or evaluations.

    python benchmarks/sweep_fashion.py --method simclr             # 12 trials of 240 s
    python benchmarks/sweep_fashion.py --method dino               # 6 trials of 240 s
    python benchmarks/sweep_fashion.py --method simclr --quick     # 2 tiny trials, < 3 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from statistics import median

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, keep_rows, write_section  # noqa: E402
from knn_budget import COMMON, DINO, SIMCLR  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = os.path.join(HERE, "sweep_fashion_rows.json")
SETTINGS = {"simclr": SIMCLR, "dino": DINO}
TRIALS = {"simclr": 12, "dino": 6}
EVALS = 4  # periodic kNN evaluations per trial, the rungs ASHA compares trials at
PERIODIC = (5000, 1000)  # their train and test images (the full protocol scores every trial at the end)
TRAIN_IMAGES = 60_000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=list(SETTINGS), required=True)
    ap.add_argument("--trials", type=int, help="random trials (default: SimCLR 12, DINO 6)")
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per trial")
    ap.add_argument("--home", default=os.path.expanduser("~/.cache/selfsup-bench-sweeps"),
                    help="the S3 server's home, kept between invocations so the sweep can continue")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the sweep's pick and of knn_budget.py's settings")
    ap.add_argument("--score-stopped", action="store_true",
                    help="the full kNN of the trials ASHA stopped early too (about 3 minutes each on 2 cores)")
    ap.add_argument("--quick", action="store_true", help="2 trials of 10 s on 3,000 images, small kNN")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from selfsup.pipelines.seaweed import exported
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import Source, fashion_mnist
    from selfsup.pipelines.storage import join, open_store
    from selfsup.platform.config import load_config
    from selfsup.platform.evaluate import evaluate_run
    from selfsup.platform.runs import read_summary
    from selfsup.platform.sweeps import tune_sweep
    from selfsup.platform.trainer import train

    method, trials, budget = args.method, args.trials or TRIALS[args.method], args.budget
    n_full, periodic = 0, PERIODIC  # the whole splits; the periodic evaluations' subsets
    home = args.home
    if args.quick:
        trials, budget, n_full, home, args.repeats = 2, 10.0, 2000, home + "-quick", 2
        periodic = (1000, 200)
    os.makedirs(home, mode=0o700, exist_ok=True)
    t_all = time.time()
    with exported(home):
        fm = fashion_mnist()
        data = "s3://bench/fashion-mnist"
        if args.quick:
            data = "s3://bench/fm-quick"
            fm = Source(fm.name, fm.class_names, {"train": fm.splits["train"][:3000], "test": fm.splits["test"][:500]},
                        fm.mode, fm.size, fm.fingerprint + "q", fm.encode)
        write_shards(fm, data, ShardOptions(), progress=False, log=lambda *_: None)
        base = [f"data.uri={data}", "storage.root=s3://bench/sweeps", *COMMON, *SETTINGS[method],
                f"schedule.time_budget_s={budget:g}", *(["data.batch_size=64"] if args.quick else [])]
        name = f"{method}-fashion-{budget:.0f}s-{trials}" + ("-quick" if args.quick else "")
        key = {"method": method, "budget": budget, "trials": trials, "quick": args.quick}
        done = keep_rows(ROWS, key, {})

        def scored(label: str, config: str | None, overrides: list[str]) -> dict:
            """A run of the same budget outside the sweep (trained unless finished), with its full kNN."""
            run = f"{name}-{label}"
            uri = f"s3://bench/sweeps/{run}"
            cfg = load_config(config, [*overrides, f"storage.name={run}"])
            if read_summary(open_store(uri, create=True)).get("status") != "finished":
                train(cfg, log=lambda *_: None)
            s = read_summary(open_store(uri))
            full = evaluate_run(uri, "knn", n_full, n_full, log=lambda *_: None)
            print(label, f"full kNN {full['knn_top1']:.2f}%", flush=True)
            return {"trial": label, "status": s["status"], "step": s["step"], "knn_full": full["knn_top1"],
                    "img_s": s["step"] * cfg.data.batch_size / s["elapsed_s"], "commit": commit()}

        # knn_budget.py's settings first: the images/s they train at on this machine place the sweep's
        # periodic evaluations at quarters of the budget
        if "baseline-1" not in done:
            done = keep_rows(ROWS, key, {"baseline-1": scored("baseline-1", None, base)})
        every = budget * done["baseline-1"]["img_s"] / len(fm.splits["train"]) / EVALS
        sweep_set = [f"eval.every_epochs={every:.4f}", f"train.checkpoint_every_epochs={every:.4f}",  # a stopped trial is scored where it stopped
                     f"eval.train_samples={periodic[0]}", f"eval.test_samples={periodic[1]}"]
        space = os.path.join(HERE, "spaces", f"{method}_fashion.yaml")
        t0 = time.time()
        state = tune_sweep(None, [*base, *sweep_set], space=space, searcher="random", samples=trials, name=name)
        sweep_s = time.time() - t0
        for t in state["trials"]:
            # each trial's full kNN once, kept across invocations; a trial ASHA stopped early trained for a
            # fraction of the budget and is compared by its periodic kNN unless --score-stopped
            if t["trial"] not in done and (args.score_stopped or not t["stopped_early"]):
                full = evaluate_run(join(state["uri"], t["trial"]), "knn", n_full, n_full, log=lambda *_: None)
                done = keep_rows(ROWS, key, {t["trial"]: {**t, "knn_full": full["knn_top1"], "commit": commit()}})
                print(t["trial"], t["params"], f"full kNN {full['knn_top1']:.2f}%", flush=True)
        # The decisive comparison, repeated: the sweep's pick (best.yaml, as `selfsup train` takes it) and
        # knn_budget.py's settings, each trained `repeats` times for the same budget (the pick's trial is
        # one). The reruns drop the sweep's periodic kNN and frequent checkpoints, which take cores from
        # the training steps, so that pick and baseline differ in the swept keys only.
        unswept = [o for o in base if o.split("=")[0] in {s.split("=")[0] for s in sweep_set}]
        with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as best:
            best.write(open_store(state["uri"]).read("best.yaml"))
            best.flush()
            for label, config, overrides in [*((f"baseline-{i}", None, base) for i in range(2, args.repeats + 1)),
                                             *((f"best-{i}", best.name, unswept) for i in range(2, args.repeats + 1))]:
                if label not in done:
                    done = keep_rows(ROWS, key, {label: scored(label, config, overrides)})
    write_table(method, done, state, sweep_set, unswept, budget, trials, args.quick,
                f"The sweep ran from {state['started']} to {state['updated']} (UTC, across invocations); "
                f"this invocation {time.time() - t_all:.0f} s, {sweep_s:.0f} s of it in `selfsup tune`.")


def write_table(method: str, table: dict, state: dict, sweep_set: list[str], unswept: list[str], budget: float,
                trials: int, quick: bool, footer: str) -> None:
    by_id = {r["trial"]: r for r in state["trials"]}
    scored = {k: {**by_id.get(k, {}), **r} for k, r in table.items() if "params" in r}
    ranked = sorted(scored.values(), key=lambda r: -r["knn_full"])
    ranked += sorted((r for k, r in by_id.items() if k not in scored), key=lambda r: -(r["final_knn_top1"] or 0))
    labels = list(ranked[0]["params"]) if ranked else []
    lines = ["| trial | " + " | ".join(labels) + " | status | steps | periodic kNN, last | full kNN (60k/10k) | code |",
             "|---|" + "---|" * len(labels) + "---|---|---|---|---|"]
    for r in ranked:
        status = "stopped early (ASHA)" if r["stopped_early"] else r["status"]
        pick = " (the sweep's pick)" if r["trial"] == state.get("best") else ""
        lines.append(f"| {r['trial']}{pick} | " + " | ".join(f"{r['params'][k]:.3g}" for k in labels)
                     + f" | {status} | {r['step']} | {r['final_knn_top1'] or 0:.2f}% | "
                     + (f"{r['knn_full']:.2f}% | {r['commit']} |" if "knn_full" in r else "not scored | |"))

    def spread(rows: list[dict]) -> str:
        accs = sorted(r["knn_full"] for r in rows)
        return f"median {median(accs):.2f}% ({accs[0]:.2f}-{accs[-1]:.2f}, {len(accs)} runs)"

    pick = [r for r in ranked if r["trial"] == state.get("best") and "knn_full" in r]
    picks = pick + [r for k, r in table.items() if k.startswith("best-")]
    bases = [r for k, r in table.items() if k.startswith("baseline-")]
    verdict = (f"The sweep's pick (`best.yaml`, best final periodic kNN) {state.get('best')} against knn_budget.py's "
               f"settings, both trained {budget:.0f} s, full kNN: pick {spread(picks)}, knn_budget.py's settings "
               f"{spread(bases)}.") if picks and bases else ""
    name = "DINO" if method == "dino" else "SimCLR"
    if quick:  # a check of the script, not a figure
        print("\n".join(lines) + f"\n{verdict}\n{footer}")
        return
    write_section(f"Sweep on Fashion-MNIST: {name}, {trials} trials of {budget:.0f} s (issue 15)", "\n".join(lines) + f"""

{verdict}

`selfsup tune` (random search, {trials} trials, ASHA on the periodic kNN with grace period 1 and
reduction factor 2, one trial at a time on this machine's 2 cores), space
`benchmarks/spaces/{method}_fashion.yaml`, each trial {budget:.0f} s of training with knn_budget.py's
{name} settings (listed in its section) and `{' '.join(sweep_set)}` (the periodic kNN, on subsets, every quarter of the budget at the images/s
knn_budget.py's settings trained at in their first run). Full kNN: k=20, T=0.07, cosine, memory all 60,000 train images, queries all
10,000 test images, on each finished trial's last checkpoint; a trial ASHA stopped early trained for a
fraction of the budget, and is listed by its periodic kNN (`--score-stopped` adds its full kNN too,
where ASHA stopped it).
The pick's runs are its trial and reruns of its `best.yaml` with knn_budget.py's evaluation and checkpoint
settings (`{' '.join(unswept)}`: no periodic kNN); the counts are in the comparison above.
Rows are kept in `benchmarks/sweep_fashion_rows.json`.

{footer}""")


if __name__ == "__main__":
    main()
