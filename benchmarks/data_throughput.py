"""Views/s of the Ray Data view pipeline against a plain DataLoader with PIL transforms.

Both sides produce the same views with the same parameters from the same images, on the same
cores: ours streams WebDataset shards from the embedded S3 server through Ray Data (batched
augmentations); the baseline is what a user would write instead: a map-style Dataset over the
encoded images in memory + torch.utils.data.DataLoader(num_workers=2) + torchvision's PIL transforms.
Also the floor: image decode alone, images/s on one core.

    python benchmarks/data_throughput.py            # full run, writes RESULTS.md
    python benchmarks/data_throughput.py --quick    # < 60 s, prints the headline ratio last
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import private_s3, write_section  # noqa: E402

from selfsup.pipelines.views import Augment, MultiCrop, TwoViews  # noqa: E402


def pil_transform(aug: Augment, mean, std):
    from torchvision import transforms as T

    s = aug.jitter_strength
    ops = [T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio), T.RandomHorizontalFlip(aug.flip_p)]
    if aug.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.jitter_p))
    if aug.grayscale_p > 0:
        ops.append(T.RandomGrayscale(aug.grayscale_p))
    if aug.blur_p > 0:
        k = max(3, int(0.1 * aug.size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, aug.blur_sigma)], p=aug.blur_p))
    if aug.solarize_p > 0:
        ops.append(T.RandomSolarize(128, aug.solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class Baseline(torch.utils.data.Dataset):
    def __init__(self, encoded, transforms):
        self.encoded, self.transforms = encoded, transforms

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.open(io.BytesIO(self.encoded[i]))
        img.load()
        return [t(img) for t in self.transforms]


def spec_augs(spec) -> list[Augment]:
    if isinstance(spec, TwoViews):
        return [spec.view0, spec.view1]
    return [spec.global_view] * spec.n_global + [spec.local_view] * spec.n_local


def baseline_views_per_s(encoded, spec, mean, std, batch, seconds) -> float:
    ds = Baseline(encoded, [pil_transform(a, mean, std) for a in spec_augs(spec)])
    # spawn: a worker forked from this process (which runs Ray's threads) once hung for good on a
    # lock in PIL that a thread held at the fork
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=2, shuffle=True, drop_last=True,
                                         persistent_workers=True, multiprocessing_context="spawn")
    n_views, n, t0 = len(spec_augs(spec)), 0, None
    while True:
        for i, _ in enumerate(loader):
            if t0 is None:  # start the clock once the workers are up
                t0 = time.perf_counter()
                continue
            n += batch
            if time.perf_counter() - t0 > seconds:
                return n * n_views / (time.perf_counter() - t0)


def ours_views_per_s(uri, spec, batch, seconds) -> float:
    from selfsup.pipelines.streaming import read_split

    ds = read_split(uri, "train", spec=spec, batch_size=batch)
    n_views, n, t0 = len(spec_augs(spec)), 0, None
    while True:
        for _ in ds.iter_torch_batches(batch_size=batch, prefetch_batches=4):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += batch
            if time.perf_counter() - t0 > seconds:
                return n * n_views / (time.perf_counter() - t0)


def decode_floor(encoded, seconds=3.0) -> tuple[float, float]:
    """Images/s on one core: torchvision's decoder (ours) and PIL (the baseline's)."""
    from PIL import Image

    from selfsup.pipelines.decode import decode_image

    torch.set_num_threads(1)
    out = []
    for fn in (decode_image, lambda b: np.asarray(Image.open(io.BytesIO(b)))):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(encoded[n % len(encoded)])
            n += 1
        out.append(n / (time.perf_counter() - t0))
    torch.set_num_threads(os.cpu_count())
    return out[0], out[1]


def rgb_source(n: int, side: int = 256):
    """Generated RGB photos-like JPEGs: smooth colour fields with shapes, in 10 classes."""
    from selfsup.pipelines.sources import Item, Source, encode_array

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    arrays = []
    for i in range(n):
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(3)], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.integers(0, 40, (side, side, 3))).clip(0, 255).astype(np.uint8)
        cy, cx, r = rng.integers(40, side - 40, 2).tolist() + [int(rng.integers(15, 40))]
        img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = rng.integers(0, 255, 3)
        arrays.append(img)
    items = [Item(str(i), i % 10) for i in range(n)]
    return Source("generated-rgb", [str(c) for c in range(10)], {"train": items}, "RGB", (side, side), "gen",
                  lambda it, fmt, q: encode_array(arrays[int(it.ref)], fmt, q))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import Source, fashion_mnist

    seconds = 6 if args.quick else 25
    with private_s3():
        fm = fashion_mnist()
        n_fm = 10000 if args.quick else 60000
        fm_small = Source(fm.name, fm.class_names, {"train": fm.splits["train"][:n_fm]}, fm.mode, fm.size,
                          fm.fingerprint + str(n_fm), fm.encode)
        write_shards(fm_small, "s3://bench/fmnist", ShardOptions(samples_per_shard=1000), progress=False, log=lambda *_: None)
        fm_encoded = [fm.encode(it, "png", 95) for it in fm_small.splits["train"][:10000]]
        n_rgb = 400 if args.quick else 2000
        rgb = rgb_source(n_rgb)
        write_shards(rgb, "s3://bench/rgb", ShardOptions(samples_per_shard=100), progress=False, log=lambda *_: None)
        rgb_encoded = [rgb.encode(it, "jpg", 95) for it in rgb.splits["train"]]

        cases = [
            ("TwoViews 32 px (SimCLR), Fashion-MNIST 28 px PNG", "s3://bench/fmnist", fm_encoded,
             TwoViews(), [0.286], [0.353], 256),
            ("MultiCrop 2x32 + 6x16 (DINO), Fashion-MNIST 28 px PNG", "s3://bench/fmnist", fm_encoded,
             MultiCrop(), [0.286], [0.353], 256),
            ("MultiCrop 2x224 + 10x96, generated 256 px RGB JPEG", "s3://bench/rgb", rgb_encoded,
             MultiCrop(n_local=10, global_view=Augment(size=224, scale=(0.4, 1.0), blur_p=0.5),
                       local_view=Augment(size=96, scale=(0.05, 0.4), blur_p=0.5)),
             [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 32),
        ]
        if args.quick:
            cases = cases[:1]
        floors = {"PNG 28 px grey": decode_floor(fm_encoded), "JPEG 256 px RGB": decode_floor(rgb_encoded)}
        rows = []
        # One Ray session for all cases; it idles (no tasks) while the baseline runs.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for name, uri, encoded, spec, mean, std, batch in cases:
            base = baseline_views_per_s(encoded, spec, mean, std, batch, seconds)
            ours = ours_views_per_s(uri, spec, batch, seconds)
            rows.append((name, ours, base, ours / base))
            print(f"{name}: ours {ours:,.0f} views/s, baseline {base:,.0f} views/s, ratio {ours / base:.2f}x", flush=True)
        ray.shutdown()

    table = ["| views | selfsup (Ray Data from S3) | DataLoader(num_workers=2) + PIL transforms | ratio |",
             "|---|---|---|---|"]
    table += [f"| {n} | {o:,.0f} views/s | {b:,.0f} views/s | {r:.2f}x |" for n, o, b, r in rows]
    table += ["", "Decode floor, one core (images/s): torchvision decoder (ours) / PIL (baseline):", ""]
    table += [f"- {k}: {a:,.0f} / {b:,.0f}" for k, (a, b) in floors.items()]
    if not args.quick:
        write_section("Data pipeline throughput (issue 3)", "\n".join(table) + f"\n\nSteady state, {seconds} s per case "
                      "after the first batch; Fashion-MNIST cases over 60,000 train images, RGB over 2,000 generated "
                      "256 px JPEGs. Target: >= 2x the baseline.")
    print(f"headline: TwoViews 32 px {rows[0][3]:.2f}x the DataLoader baseline ({rows[0][1]:,.0f} vs {rows[0][2]:,.0f} views/s)")


if __name__ == "__main__":
    main()
