"""The random-init baseline of mim_budget.py's fine-tuning under another layer decay: is the
random init's fine-tuning held back by the decay that suits a pretrained ViT?

    python benchmarks/finetune_init.py --layer-decay 1.0     # writes RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section  # noqa: E402
from methods import fashion  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer-decay", type=float, default=1.0)
    args = ap.parse_args()
    import torch

    from selfsup.platform.config import load_config
    from selfsup.platform.evaluate import balanced_subset
    from selfsup.platform.finetune import FinetuneParams, finetune
    from selfsup.platform.step import autocast_dtype, build_method

    cfg = load_config("mae_vit_tiny", ["data.views.view.size=28", "model.kwargs.img_size=28"])  # as mim_budget.py
    (images, labels), (test_images, test_labels) = fashion("train"), fashion("test")
    ft = FinetuneParams(fraction=0.1, epochs=10, layer_decay=args.layer_decay)
    keep = balanced_subset(labels, ft.fraction, ft.seed)
    torch.manual_seed(0)
    m = build_method(cfg, num_samples=len(images))
    t0 = time.perf_counter()
    top1 = finetune(m.backbone, m.feat_dim, [images[i] for i in keep], labels[keep], test_images, test_labels, 28,
                    cfg.data.mean, cfg.data.std, cfg.model.in_chans, ft, autocast_dtype(cfg, torch.device("cpu")))
    print(f"random init, layer decay {args.layer_decay}: {top1:.2f}% ({time.perf_counter() - t0:.0f} s)")
    write_section(f"Fine-tuning the random init with layer decay {args.layer_decay} (issue 19)", f"""
Top-1 {top1:.2f}% on all 10,000 test images: the seed-0 ViT-tiny/4 at random init (mim_budget.py's), fine-tuned
under mim_budget.py's schedule (10% of the train labels, 10 epochs) but with layer decay {args.layer_decay}
instead of 0.75 (mim_budget.py's random-init column: 48.30%). One run, {time.perf_counter() - t0:.0f} s.""")


if __name__ == "__main__":
    main()
