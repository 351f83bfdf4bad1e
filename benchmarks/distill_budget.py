"""Distillation under a fixed CPU budget: a small student (resnet10t with a CIFAR stem) distilled
from a 15-minute teacher, against the same student trained by SimCLR for as long; each judged by
mim_budget.py's three protocols (kNN, linear probe, fine-tuning with 10% of the labels) beside the
same seed's random init.

The teacher is SimCLR's half-width ResNet-18 on 20 px views (the best 15-minute kNN in RESULTS.md,
benchmarks/knn_budget.py's settings), trained here first for the same budget; its backbone goes to
the student runs as a file. Training is methods.py's Ray-free TrainStep, each row in its own process.

    python benchmarks/distill_budget.py                    # teacher, distilled student, SimCLR student; RESULTS.md
    python benchmarks/distill_budget.py --only distill --set method.loss=mse --label 'MSE'
    python benchmarks/distill_budget.py --quick            # every row on tiny sets: a check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, keep_rows, machine, run_child, write_section  # noqa: E402
from methods import HALF_WIDTH, VIEWS, train_method  # noqa: E402
from mim_budget import evaluate_row, protocol_args, protocol_table  # noqa: E402

STUDENT = ["model.name=resnet10t", "model.cifar_stem=true", "model.kwargs={}"]
# row: (method, shipped config, overrides); VIEWS' two views (20 px) for every row
ROWS = {
    "teacher: SimCLR, half-width ResNet-18": ("simclr", "simclr_resnet18", [HALF_WIDTH, "method.temperature=0.1"]),
    "student: distilled, resnet10t": ("distill", "distill_resnet18", STUDENT),
    "student: SimCLR, resnet10t": ("simclr", "simclr_resnet18", [*STUDENT, "method.temperature=0.1"]),
}
NAMES = {"teacher": "teacher: SimCLR, half-width ResNet-18", "distill": "student: distilled, resnet10t",
         "simclr": "student: SimCLR, resnet10t"}
KEPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_budget_rows.json")


def teacher_module(path: str):
    from safetensors.torch import load_file

    from selfsup.methods.backbones import build_backbone
    from selfsup.platform.config import load_config

    cfg = load_config(ROWS[NAMES["teacher"]][1], ROWS[NAMES["teacher"]][2])
    model, _ = build_backbone(cfg.model.name, cfg.model.cifar_stem, cfg.model.in_chans, **cfg.model.kwargs)
    model.load_state_dict(load_file(path))
    return model


def child(args) -> dict:
    from safetensors.torch import save_file

    method, config, own = ROWS[NAMES[args.child]]
    teacher = teacher_module(args.teacher) if method == "distill" else None
    m, cfg, _, res, images, labels, init_hash = train_method(
        method, args.budget, 2 if args.quick else None, 32 if args.quick else 256,
        [*VIEWS["two_views"], *own, *(["method.teacher=(this script's teacher)"] if method == "distill" else []), *args.set],
        config=config, teacher=teacher)
    if args.child == "teacher":
        save_file({k: v.contiguous() for k, v in m.backbone.state_dict().items()}, args.teacher)
    return {**evaluate_row(m, cfg, res, images, labels, init_hash, args), "row": NAMES[args.child]}


def write_table(rows: list[dict], args) -> None:
    key = {"label": args.label, "budget": args.budget, "set": args.set, "ft": [args.ft_fraction, args.ft_epochs]}
    table = keep_rows(KEPT, key, {r["row"]: {**r, "commit": commit()} for r in rows})
    lines = protocol_table(table, ROWS, "row", args.ft_fraction)
    extra = f"\nExtra overrides: `{' '.join(args.set)}`." if args.set else ""
    write_section("Distillation into a small student under a fixed CPU budget (issue 37)" + (f", {args.label}" if args.label else ""),
                  "\n".join(lines) + extra + f"""

{args.budget:.0f} s of training per row (methods.py's Ray-free TrainStep, this machine's 2 cores), batch 256, views
`{' '.join(VIEWS['two_views'])}`, each row's overrides in `ROWS` of the script; the student is distilled from the
teacher row's backbone (`distill_resnet18`'s method settings). Each cell: the trained backbone, then in brackets the
same seed's random init under the same protocol and the gain (mim_budget.py's protocols at 20 px: kNN k=20, T=0.07,
cosine on all 60,000 / 10,000 images; L-BFGS linear probe on all labels; fine-tuning {args.ft_fraction:.0%} of the
labels, {args.ft_epochs} epochs). Rows are kept in `benchmarks/distill_budget_rows.json`; "code" is the commit each
row was measured with.""")


def main():
    ap = argparse.ArgumentParser()
    protocol_args(ap, "distill_budget_init.json")
    ap.add_argument("--only", nargs="*", choices=list(NAMES), help="a subset of the rows (distill without the teacher "
                    "row needs --teacher)")
    ap.add_argument("--teacher", help="where the teacher row writes its backbone and the distill row reads it "
                    "(default: a new temporary folder)")
    args = ap.parse_args()
    if args.quick and not args.child:  # a check of the script: its numbers are kept nowhere
        args.ft_fraction, args.ft_epochs = 0.05, 1
        args.cache = os.path.join(tempfile.mkdtemp(prefix="distill-quick-"), "init.json")
    if args.child:
        print(json.dumps(child(args)))
        return
    if not args.teacher:
        if "distill" in (args.only or NAMES) and "teacher" not in (args.only or NAMES):
            ap.error("--only distill without the teacher row needs --teacher FILE (an earlier run's)")
        args.teacher = os.path.join(tempfile.mkdtemp(prefix="distill-teacher-"), "teacher.safetensors")
    rows = []
    for name in args.only or NAMES:
        cmd = [sys.executable, __file__, "--child", name, "--budget", str(args.budget), "--cache", args.cache,
               "--teacher", args.teacher, "--ft-fraction", str(args.ft_fraction), "--ft-epochs", str(args.ft_epochs),
               "--set", *args.set]
        res = run_child(cmd + (["--quick"] if args.quick else []), name)
        if res:
            rows.append(res)
        elif name == "teacher":
            break  # nothing to distill from
    if rows and not args.quick:
        write_table(rows, args)
    print(f"{len(rows)}/{len(args.only or NAMES)} rows ok on {machine()}")


if __name__ == "__main__":
    main()
