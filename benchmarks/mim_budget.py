"""The masked-image methods (MAE, SimMIM, BEiT, MaskFeat, I-JEPA) after a fixed CPU budget, each
judged by three protocols beside the same ViT at random init under the same protocol:

- kNN: frozen features, k=20, T=0.07, cosine, memory all 60,000 train images, queries all 10,000
  test images (the platform's protocol);
- linear probe: logistic regression on frozen, standardised features with all 60,000 labels;
- fine-tuning with 10% of the labels: `selfsup eval finetune`'s protocol (platform/finetune.py:
  the whole ViT with layer-wise lr decay plus a linear head, a class-balanced fixed subset of the
  train labels, scored on all 10,000 test images).

Training is methods.py's Ray-free TrainStep on the shipped `<method>_vit_tiny` config at 28 px
(patch 4), each method in its own process. Every method starts from the same seed-0 ViT, so the
random-init row is computed once per initial-weights hash and protocol settings and kept.

    python benchmarks/mim_budget.py                                   # 900 s per method; writes RESULTS.md
    python benchmarks/mim_budget.py --only mae --budget 120 --set KEY=VALUE --label 'a probe'
    python benchmarks/mim_budget.py --quick                           # every method and protocol on tiny sets: a check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, keep_rows, run_child, write_section  # noqa: E402
from methods import fashion, train_method  # noqa: E402

MASKED = ["mae", "simmim", "beit", "maskfeat", "ijepa"]
ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mim_budget_rows.json")


def protocols(backbone, dim: int, cfg, train, test, ft, quick: bool) -> dict:
    """kNN, linear probe and fine-tuning accuracy of `backbone` (fine-tuning changes it: last)."""
    from selfsup.platform.evaluate import balanced_subset, extract_features, knn_top1, linear_probe
    from selfsup.platform.finetune import finetune
    from selfsup.platform.step import autocast_dtype

    import torch

    (images, labels), (test_images, test_labels) = train, test
    size = cfg.eval.image_size or cfg.view_size()
    dtype = autocast_dtype(cfg, torch.device("cpu"))
    f = [extract_features(backbone, x, size, cfg.data.mean, cfg.data.std, cfg.model.in_chans, dtype=dtype)
         for x in (images, test_images)]
    out = {"knn": knn_top1(f[0], labels, f[1], test_labels), "linear": linear_probe(f[0], labels, f[1], test_labels, iters=50 if quick else 200)}
    keep = balanced_subset(labels, ft.fraction, ft.seed)
    t0 = time.perf_counter()
    out["finetune"] = finetune(backbone, dim, [images[i] for i in keep], labels[keep], test_images, test_labels, size,
                               cfg.data.mean, cfg.data.std, cfg.model.in_chans, ft, dtype)
    out["finetune_s"] = time.perf_counter() - t0
    return out


def child(args) -> dict:
    m, cfg, step, res, images, labels, init_hash = train_method(args.child, args.budget, 2 if args.quick else None,
                                                                 32 if args.quick else 256, args.set)
    return evaluate_row(m, cfg, res, images, labels, init_hash, args)


def evaluate_row(m, cfg, res: dict, images, labels, init_hash: str, args) -> dict:
    """`res` with the three protocols on the trained backbone and on the same seed's random init
    (computed once per initial weights, pooling and protocol settings, and kept in args.cache)."""
    import torch

    from selfsup.platform.finetune import FinetuneParams
    from selfsup.platform.step import build_method

    ft = FinetuneParams(fraction=args.ft_fraction, epochs=args.ft_epochs)
    test = fashion("test")
    train = (images, labels)
    if args.quick:  # a check of the script: small evaluation sets
        train, test = (images[:2000], labels[:2000]), (test[0][:500], test[1][:500])
    res.update(protocols(m.backbone, m.feat_dim, cfg, train, test, ft, args.quick))
    known = json.load(open(args.cache)) if os.path.exists(args.cache) else {}
    pooling = cfg.model.kwargs.get("global_pool", "token")  # the same weights pooled otherwise are another baseline
    # " bn-head": fine-tuning's head standardises the features (platform/finetune.py); keys without it: a plain head
    init_key = (f"{init_hash}@{cfg.eval.image_size or cfg.view_size()}px pool={pooling} ft={ft.fraction}x{ft.epochs} bn-head"
                + (" quick" if args.quick else ""))
    if init_key not in known:
        torch.manual_seed(0)
        rand = build_method(cfg, num_samples=len(images))
        known[init_key] = protocols(rand.backbone, rand.feat_dim, cfg, train, test, ft, args.quick)
        json.dump(known, open(args.cache, "w"), indent=1)
    res["random_init"] = known[init_key]
    res["backbone"] = f"{cfg.model.name} {init_hash[:8]}"
    return res


def write_table(rows: list[dict], args) -> None:
    key = {"label": args.label, "budget": args.budget, "set": args.set, "ft": [args.ft_fraction, args.ft_epochs]}
    table = keep_rows(ROWS, key, {r["method"]: {**r, "commit": commit()} for r in rows})
    lines = protocol_table(table, MASKED, "method", args.ft_fraction)
    extra = f"\nExtra overrides: `{' '.join(args.set)}`." if args.set else ""
    title = "Masked-image methods under a fixed CPU budget, three protocols (issue 19)" + (f", {args.label}" if args.label else "")
    write_section(title, "\n".join(lines) + extra + f"""

{args.budget:.0f} s of training per method (methods.py's Ray-free TrainStep, this machine's 2 cores), the shipped
`<method>_vit_tiny` config at 28 px (ViT-tiny, patch 4; features: the mean of the patch tokens), batch 256. Each cell: the trained ViT, then in
brackets the same seed-0 ViT at random init under the same protocol and the gain. kNN: k=20, T=0.07,
cosine on all 60,000 / 10,000 images; linear probe: L-BFGS logistic regression on standardised frozen
features, all 60,000 labels; fine-tuning: {args.ft_fraction:.0%} of the train labels (class-balanced,
seed 0), {args.ft_epochs} epochs, AdamW lr 1e-3 per 256, layer decay 0.75, warm-up 1 epoch, crops of
50-100% and flips, a linear head on batch-normalised features (rows measured before that head: a plain
linear head), scored on all 10,000 test images (platform/finetune.py). Rows are kept in
`benchmarks/mim_budget_rows.json`: a run with `--only` refreshes its methods' rows and keeps the others;
"code" is the commit each row was measured with.""")


def protocol_table(table: dict, order, first: str, ft_fraction: float) -> list[str]:
    """Markdown rows of the three protocols beside the random init, for the rows of `table` in `order`."""
    lines = [f"| {first} | kNN (random init) | linear probe (random init) | fine-tuning, "
             f"{ft_fraction:.0%} labels (random init) | steps | images/s | code |", "|---|---|---|---|---|---|---|"]
    for name in order:
        if name in table:
            r, ri = table[name], table[name]["random_init"]
            cells = [f"{r[k]:.2f}% ({ri[k]:.2f}%, {r[k] - ri[k]:+.2f})" for k in ("knn", "linear", "finetune")]
            lines.append(f"| {name} | {' | '.join(cells)} | {r['steps']} | {r['images_per_s']:.1f} | {r['commit']} |")
    return lines


def protocol_args(ap: argparse.ArgumentParser, cache: str) -> None:
    """The options every three-protocol benchmark takes; `cache`: its random-init file's name."""
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds of training per row")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every row")
    ap.add_argument("--label", default="", help="names this variant in RESULTS.md")
    ap.add_argument("--ft-fraction", type=float, default=0.1)
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), cache), help=argparse.SUPPRESS)


def main():
    ap = argparse.ArgumentParser()
    protocol_args(ap, "mim_budget_init.json")
    ap.add_argument("--only", nargs="*", choices=MASKED, help="a subset of the methods")
    args = ap.parse_args()
    if args.quick and not args.child:  # a check of the script: its numbers are kept nowhere
        args.ft_fraction, args.ft_epochs = 0.05, 1
        args.cache = os.path.join(tempfile.mkdtemp(prefix="mim-quick-"), "init.json")
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for name in args.only or MASKED:
        cmd = [sys.executable, __file__, "--child", name, "--budget", str(args.budget), "--cache", args.cache,
               "--ft-fraction", str(args.ft_fraction), "--ft-epochs", str(args.ft_epochs), "--set", *args.set]
        res = run_child(cmd + (["--quick"] if args.quick else []), name)
        if res:
            rows.append(res)
    if rows and not args.quick:
        write_table(rows, args)
    print(f"{len(rows)}/{len(args.only or MASKED)} methods ok" + (", e.g. " + ", ".join(
        f"{r['method']} fine-tuning {r['finetune']:.1f}% (random init {r['random_init']['finetune']:.1f}%)" for r in rows[:1])
        if rows else ""))


if __name__ == "__main__":
    main()
