"""Images/s and peak memory of the Ray-free training step (the one a Ray Train worker runs), on a
GPU at ImageNet sizes, or on the CPU at the shipped Fashion-MNIST sizes. No Ray here: Ray's
wheel does not fit the GPU machine's 64 MiB transfer, and the step is what the GPU does.

Settings (GPU): DINO ViT-S/16 multi-crop (2x224 + 10x96), MAE ViT-B/16 (75% masking), SimCLR
ResNet-50 (2x224); (CPU): the shipped dino_vit_tiny, mae_vit_tiny and simclr_resnet18 configs.
Inputs:
  synthetic   finished views already on the device: the step alone
  jpeg        generated 256-320 px RGB JPEGs decoded by the pipeline's decoder; the views made by
              the step on the device (data.augment_on=trainer), each step from the decoded batch
Each with and without torch.compile (train.compile). Besides, the CPU side's cost per core of
each setting's views: decode only (what augment_on=trainer leaves to the CPUs) and decode +
augment (augment_on=pipeline), and so how many cores keep the step fed either way.

    python benchmarks/gpu_step.py                 # every setting, writes RESULTS.md
    python benchmarks/gpu_step.py --quick         # < 3 min on a GPU: synthetic eager, DINO last
    python benchmarks/gpu_step.py --device cpu    # the CPU sizes (the default without a GPU)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the repo itself: a GPU machine runs this without installing it
from common import write_section  # noqa: E402

RGB = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
GPU = {
    "DINO ViT-S/16, 2x224 + 10x96": ["method.name=dino", "model.name=vit_small_patch16_224", "model.cifar_stem=false",
                                     "model.kwargs={img_size: 224, patch_size: 16, dynamic_img_size: true}",
                                     "data.views.n_global=2", "data.views.n_local=10",
                                     "data.views.global_view.size=224", "data.views.global_view.scale=[0.25,1.0]",
                                     "data.views.local_view.size=96", "data.views.local_view.scale=[0.05,0.25]",
                                     "data.views.global_view.blur_p=0.5", "data.views.local_view.blur_p=0.5",
                                     "data.batch_size=128", "optim.name=adamw", *RGB],
    "MAE ViT-B/16, 224, 75% masked": ["method.name=mae", "model.name=vit_base_patch16_224", "model.cifar_stem=false",
                                      "model.kwargs={img_size: 224, patch_size: 16}", "data.views.view.size=224",
                                      "data.views.patch_size=16", "data.views.ratio=0.75", "method.decoder_dim=512",
                                      "method.decoder_depth=8", "method.decoder_heads=16", "data.batch_size=256",
                                      "optim.name=adamw", *RGB],
    "SimCLR ResNet-50, 2x224": ["method.name=simclr", "model.name=resnet50", "model.cifar_stem=false",
                                "data.views.view0.size=224", "data.views.view1.size=224",
                                "data.views.view0.blur_p=0.5", "data.views.view1.blur_p=0.5", "data.batch_size=256", *RGB],
}
CPU = {
    "DINO ViT-tiny/4, 2x32 + 6x16": ("dino_vit_tiny", ["data.batch_size=64", *RGB]),
    "MAE ViT-tiny/4, 32, 75% masked": ("mae_vit_tiny", ["data.batch_size=64", *RGB]),
    "SimCLR ResNet-18, 2x32": ("simclr_resnet18", ["data.batch_size=64", *RGB]),
}


def config(name: str, device: torch.device):
    from selfsup.platform.config import load_config

    if device.type == "cuda":
        return load_config(None, ["schedule.steps=1000", "optim.warmup_fraction=0", *GPU[name]])
    shipped, extra = CPU[name]
    from importlib import resources

    path = resources.files("selfsup") / "configs" / f"{shipped}.yaml"
    return load_config(str(path), ["schedule.steps=1000", "optim.warmup_fraction=0", *extra])


def jpeg_images(n: int, seed: int = 0) -> list[bytes]:
    """Generated RGB photo-like JPEGs of 256-320 px sides, encoded (`decoded_batch` decodes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(256, 321, 2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + 4 * yy * rng.uniform(0, 1) + rng.uniform(0, 6))
                         for _ in range(3)], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decoded_batch(encoded: list[bytes], batch: int) -> dict[str, torch.Tensor]:
    """A `decoded` batch (views.py), as the pipeline streams it with data.augment_on=trainer."""
    from selfsup.pipelines.decode import decode_image
    from selfsup.pipelines.streaming import collate_decoded

    images = np.empty(batch, dtype=object)
    images[:] = [decode_image(encoded[i % len(encoded)]).numpy() for i in range(batch)]
    return collate_decoded({"image": images, "index": np.arange(batch), "label": np.zeros(batch, np.int64)})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, device: torch.device, source: str, compiled: bool, encoded: list[bytes], steps: int,
            repeats: int) -> dict:
    """images/s over `repeats` windows of `steps` steps each, after the warm-up (and the compile)."""
    from selfsup.pipelines.views import make_views
    from selfsup.platform.step import TrainStep, build_method

    cfg = config(name, device)
    cfg.train.compile = compiled
    cfg.data.augment_on = "trainer" if source == "jpeg" else "pipeline"
    torch.manual_seed(0)
    torch._dynamo.reset()
    B = cfg.data.batch_size
    step = TrainStep(build_method(cfg).to(device), cfg, device)
    batch = decoded_batch(encoded, B)
    if source == "synthetic":  # the same views, made once, already on the device
        images = [batch["image"][i, :, : s[0], : s[1]] for i, s in enumerate(batch["size"].tolist())]
        batch = {k: v.to(device) for k, v in make_views(images, cfg.data.views, torch.Generator().manual_seed(0)).items()}
    elif device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(2):  # the first step compiles (when asked), the second settles the allocator
        out = step(batch, 0.5)
        sync(device)
        if i == 0:
            first_step_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step(batch, 0.5)
        sync(device)
        rates.append(steps * B / (time.perf_counter() - t0))
    assert np.isfinite(out["loss"]), f"{name}: non-finite loss {out['loss']}"
    return {"setting": name, "input": source, "compile": compiled, "batch": B, "dtype": str(step.dtype or "fp32"),
            "images_per_s": statistics.median(rates), "low": min(rates), "high": max(rates),
            "first_step_s": first_step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def cpu_feed(name: str, device: torch.device, encoded: list[bytes], seconds: float = 4.0) -> dict:
    """Images/s one CPU core gives each side: decode only, and decode + this setting's views."""
    from selfsup.pipelines.decode import decode_image
    from selfsup.pipelines.views import make_views

    spec = config(name, device).data.views
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    g = torch.Generator().manual_seed(0)
    for what in ("decode", "decode+views"):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            images = [decode_image(encoded[(n + i) % len(encoded)]) for i in range(16)]
            if what == "decode+views":
                make_views(images, spec, g)
            n += 16
        rates[what] = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"setting": name, "decode_per_core": rates["decode"], "views_per_core": rates["decode+views"]}


def table(rows: list[dict], feeds: list[dict], device: torch.device) -> str:
    mem = device.type == "cuda"
    lines = ["| setting | input | compile | batch | images/s (median, low-high) | first step s |"
             + (" peak GiB |" if mem else ""),
             "|---|---|---|---|---|---|" + ("---|" if mem else "")]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['input']} | {'yes' if r['compile'] else 'no'} | {r['batch']} | "
                     f"{r['images_per_s']:,.1f} ({r['low']:,.1f}-{r['high']:,.1f}) | {r['first_step_s']:.1f} |"
                     + (f" {r['peak_gib']:.1f} |" if mem else ""))
    lines += ["", "CPU side per core (images/s), and the cores that feed the fastest step at that rate:", "",
              "| setting | decode only (augment_on=trainer) | decode + views (augment_on=pipeline) | cores: trainer / pipeline |",
              "|---|---|---|---|"]
    for f in feeds:
        best = max((r["images_per_s"] for r in rows if r["setting"] == f["setting"]), default=float("nan"))
        lines.append(f"| {f['setting']} | {f['decode_per_core']:,.0f} | {f['views_per_core']:,.0f} | "
                     f"{best / f['decode_per_core']:.1f} / {best / f['views_per_core']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed window (default: 10 GPU, 3 CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows per setting; the median is reported")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    names = list(GPU if device.type == "cuda" else CPU)
    names = names[1:] + names[:1]  # DINO last: --quick prints its figure last
    steps = args.steps or (10 if device.type == "cuda" else 3)
    encoded = jpeg_images(64)
    plan = [(n, "synthetic", False) for n in names] if args.quick else \
        [(n, src, c) for n in names for src in ("synthetic", "jpeg") for c in (False, True)]
    rows = []
    for name, source, compiled in plan:
        try:
            rows.append(measure(name, device, source, compiled, encoded, steps if not args.quick else max(3, steps // 2),
                                1 if args.quick else args.repeats))
        except Exception as e:  # one setting that fails (out of memory, a compile error) is named, the rest go on
            print(f"{name} / {source} / compile={compiled}: FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        print(json.dumps(rows[-1]), flush=True)
    feeds = [cpu_feed(n, device, encoded, 2.0 if args.quick else 4.0) for n in names]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "feeds": feeds}, f, indent=1)
    body = table(rows, feeds, device)
    print(body)
    if not args.quick:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        write_section(f"Training step on {'the GPU' if device.type == 'cuda' else 'the CPU'} (issue 20)",
                      f"{body}\n\nDevice: {where}; torch {torch.__version__}. images/s: the median of "
                      f"{args.repeats} windows of {steps} steps after two warm-up steps; 'first step' includes "
                      "torch.compile's compile (a model's second compiled row reuses inductor's cache). JPEG inputs: the step makes the views on the device from a "
                      "decoded batch (data.augment_on=trainer).")
    dino = [r for r in rows if r["setting"].startswith("DINO")]
    if dino:
        print(f"DINO images/s: {dino[0]['images_per_s']:,.1f}")


if __name__ == "__main__":
    main()
