"""The random-init baseline of mim_budget.py's fine-tuning under another schedule: is the random
init's fine-tuning held back by the layer decay that suits a pretrained ViT, or by too few steps
or too low a learning rate (460 steps at 5e-4)?

    python benchmarks/finetune_init.py --layer-decay 1.0     # writes RESULTS.md
    python benchmarks/finetune_init.py --lr 4e-3 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section  # noqa: E402
from methods import fashion  # noqa: E402

from selfsup.platform.finetune import FinetuneParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer-decay", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=FinetuneParams.lr, help="per 256 images")
    ap.add_argument("--epochs", type=int, default=FinetuneParams.epochs)
    args = ap.parse_args()
    import torch

    from selfsup.platform.config import load_config
    from selfsup.platform.evaluate import balanced_subset
    from selfsup.platform.finetune import finetune
    from selfsup.platform.step import autocast_dtype, build_method

    cfg = load_config("mae_vit_tiny", ["data.views.view.size=28", "model.kwargs.img_size=28"])  # as mim_budget.py
    (images, labels), (test_images, test_labels) = fashion("train"), fashion("test")
    ft = FinetuneParams(fraction=0.1, epochs=args.epochs, lr=args.lr, layer_decay=args.layer_decay)
    keep = balanced_subset(labels, ft.fraction, ft.seed)
    torch.manual_seed(0)
    m = build_method(cfg, num_samples=len(images))
    t0 = time.perf_counter()
    top1 = finetune(m.backbone, m.feat_dim, [images[i] for i in keep], labels[keep], test_images, test_labels, 28,
                    cfg.data.mean, cfg.data.std, cfg.model.in_chans, ft, autocast_dtype(cfg, torch.device("cpu")))
    what = f"layer decay {args.layer_decay}" + (f", lr {args.lr:g}" if args.lr != FinetuneParams.lr else "") + (
        f", {args.epochs} epochs" if args.epochs != FinetuneParams.epochs else "")
    print(f"random init, {what}: {top1:.2f}% ({time.perf_counter() - t0:.0f} s)")
    write_section(f"Fine-tuning the random init with {what} (issue 19)", f"""
Top-1 {top1:.2f}% on all 10,000 test images: the seed-0 ViT-tiny/4 at random init (mim_budget.py's), fine-tuned
under mim_budget.py's schedule (10% of the train labels, {FinetuneParams.epochs} epochs, lr {FinetuneParams.lr:g} per 256
images, layer decay 0.75) but with {what}. One run, {time.perf_counter() - t0:.0f} s, command
`python benchmarks/finetune_init.py {' '.join(sys.argv[1:])}`.""")


if __name__ == "__main__":
    main()
