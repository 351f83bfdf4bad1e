"""DINOv2 against DINO on the same ViT-tiny/4 after a fixed CPU budget, with ablation rows (without
iBOT, without KoLeo, Sinkhorn-Knopp instead of the EMA centre), each judged by mim_budget.py's three
protocols beside the same seed's random init: kNN, linear probe, fine-tuning with 10% of the labels.
And `--speed`: one training step's images/s of each, alternated, the median of 3 rounds.

Training is methods.py's Ray-free TrainStep on the shipped `dino_vit_tiny` / `dinov2_vit_tiny`
configs with the same CPU-budget overrides (SHARED: 28 px global crops, 2 local crops at 12 px,
batch 128, 1024 prototypes, teacher momentum 0.98), each row in its own process.

    python benchmarks/dinov2_budget.py                       # every row, 900 s each; writes RESULTS.md
    python benchmarks/dinov2_budget.py --only dinov2 --set method.koleo_weight=0.05 --label 'a probe'
    python benchmarks/dinov2_budget.py --speed               # images/s of one step, dino vs dinov2
    python benchmarks/dinov2_budget.py --quick               # every row on tiny sets: a check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, keep_rows, machine, run_child, write_section  # noqa: E402
from methods import fashion, train_method  # noqa: E402
from mim_budget import evaluate_row, protocol_args, protocol_table  # noqa: E402

SHARED = ["data.views.global_view.size=28", "model.kwargs.img_size=28", "data.views.global_view.scale=[0.32, 1.0]",
          "data.views.n_local=2", "data.views.local_view.size=12", "data.views.local_view.scale=[0.05, 0.32]",
          "method.out_dim=1024", "method.momentum_teacher=0.98", "method.freeze_last_layer_fraction=0.02"]
# row: (method, shipped config, its own overrides)
ROWS = {
    "dino": ("dino", "dino_vit_tiny", []),
    "dinov2": ("dinov2", "dinov2_vit_tiny", []),
    "dinov2 without iBOT": ("dinov2", "dinov2_vit_tiny", ["method.ibot_weight=0", "data.views.masks.probability=0"]),
    "dinov2 without KoLeo": ("dinov2", "dinov2_vit_tiny", ["method.koleo_weight=0"]),
    "dinov2, Sinkhorn-Knopp centring": ("dinov2", "dinov2_vit_tiny", ["method.centering=sinkhorn_knopp"]),
}
KEPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dinov2_budget_rows.json")


def child(args) -> dict:
    method, config, own = ROWS[args.child]
    m, cfg, _, res, images, labels, init_hash = train_method(
        method, args.budget, 2 if args.quick else None, 32 if args.quick else args.batch, [*SHARED, *own, *args.set],
        config=config)
    return {**evaluate_row(m, cfg, res, images, labels, init_hash, args), "row": args.child}


def speed(args) -> None:
    """images/s of one training step (views made beforehand), dino and dinov2 alternated, 3 rounds."""
    import torch

    from selfsup.pipelines.views import make_views
    from selfsup.platform.config import load_config
    from selfsup.platform.step import TrainStep, build_method

    images, _ = fashion("train")
    steps, rates = {}, {"dino": [], "dinov2": []}
    for name in rates:
        method, config, own = ROWS[name]
        cfg = load_config(config, [*SHARED, *own, f"data.batch_size={args.batch}", "schedule.steps=1000", *args.set])
        torch.manual_seed(0)
        steps[name] = (TrainStep(build_method(cfg, num_samples=len(images)), cfg, torch.device("cpu")), cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for name, (step, cfg) in steps.items():
            batches = [make_views(images[i * args.batch:(i + 1) * args.batch], cfg.data.views, g) for i in range(8)]
            for b in batches[:3]:  # warm-up
                step(b, 0.1)
            t0 = time.perf_counter()
            for b in batches[3:]:
                step(b, 0.1)
            rates[name].append(5 * args.batch / (time.perf_counter() - t0))
    lines = ["| method | images/s (median of 3) | spread (min-max) |", "|---|---|---|"]
    lines += [f"| {n} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} |" for n, r in rates.items()]
    ratio = [b / a for a, b in zip(rates["dino"], rates["dinov2"])]
    body = "\n".join(lines) + f"""

dinov2 / dino: {statistics.median(ratio):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratio)}). One training step
of batch {args.batch} (TrainStep: forward, backward, optimizer, EMA; the views made beforehand), 5 timed steps after 3
warm-up ones per round, the methods alternated, 3 rounds; the rows' settings (`SHARED` in the script). Code {commit()}."""
    print(body)
    if not args.quick:
        write_section("DINOv2 vs DINO: one step's images/s on the same ViT-tiny/4 (issue 37)", body)


def write_table(rows: list[dict], args) -> None:
    key = {"label": args.label, "budget": args.budget, "batch": args.batch, "set": args.set, "shared": SHARED,
           "ft": [args.ft_fraction, args.ft_epochs]}
    table = keep_rows(KEPT, key, {r["row"]: {**r, "commit": commit()} for r in rows})
    lines = protocol_table(table, ROWS, "row", args.ft_fraction)
    extra = f"\nExtra overrides: `{' '.join(args.set)}`." if args.set else ""
    write_section("DINOv2 vs DINO under a fixed CPU budget, with ablations (issue 37)" + (f", {args.label}" if args.label else ""),
                  "\n".join(lines) + extra + f"""

{args.budget:.0f} s of training per row (methods.py's Ray-free TrainStep, this machine's 2 cores), batch {args.batch},
the shipped `dino_vit_tiny` / `dinov2_vit_tiny` configs (ViT-tiny, patch 4; DINOv2's with LayerScale 1e-5 and
drop-path 0.1) with `{' '.join(SHARED)}`; the ablation rows' own overrides are in `ROWS` of the script. Features:
the class token at 28 px. Each cell: the trained ViT, then in brackets the same seed's ViT at random init under
the same protocol and the gain (mim_budget.py's protocols: kNN k=20, T=0.07, cosine on all 60,000 / 10,000 images;
L-BFGS linear probe on all labels; fine-tuning {args.ft_fraction:.0%} of the labels, {args.ft_epochs} epochs).
Rows are kept in `benchmarks/dinov2_budget_rows.json`; "code" is the commit each row was measured with.""")


def main():
    ap = argparse.ArgumentParser()
    protocol_args(ap, "dinov2_budget_init.json")
    ap.add_argument("--speed", action="store_true", help="one step's images/s of dino and dinov2 instead")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="a subset of the rows")
    args = ap.parse_args()
    if args.speed:
        return speed(args)
    if args.quick and not args.child:  # a check of the script: its numbers are kept nowhere
        args.ft_fraction, args.ft_epochs = 0.05, 1
        args.cache = os.path.join(tempfile.mkdtemp(prefix="dinov2-quick-"), "init.json")
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for name in args.only or ROWS:
        cmd = [sys.executable, __file__, "--child", name, "--budget", str(args.budget), "--batch", str(args.batch),
               "--cache", args.cache, "--ft-fraction", str(args.ft_fraction), "--ft-epochs", str(args.ft_epochs),
               "--set", *args.set]
        res = run_child(cmd + (["--quick"] if args.quick else []), name)
        if res:
            rows.append(res)
    if rows and not args.quick:
        write_table(rows, args)
    print(f"{len(rows)}/{len(args.only or ROWS)} rows ok on {machine()}")


if __name__ == "__main__":
    main()
