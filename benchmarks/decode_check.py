"""What the PNG integrity check costs: images/s on one core of `decode_image` (check + torchvision's
decoder, what the pipeline runs), of torchvision's decoder alone (which segfaults on some damaged
PNGs), of the check alone and of PIL (which raises on them), over the same encoded images.
Each figure is the median of five passes, with the range.

    python benchmarks/decode_check.py      # writes RESULTS.md
"""

from __future__ import annotations

import gzip
import io
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_section  # noqa: E402

from selfsup.pipelines.sources import FASHION_MNIST_DIR, encode_array  # noqa: E402
from selfsup.pipelines.decode import check_png, decode_image  # noqa: E402


def torchvision_only(data: bytes):
    from torchvision.io import ImageReadMode, decode_image as tv_decode

    return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


def pil(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im))


def rate(fn, encoded: list[bytes], passes: int = 5) -> tuple[float, float, float]:
    out = []
    for d in encoded[:200]:  # warm-up
        fn(d)
    for _ in range(passes):
        t0 = time.perf_counter()
        for d in encoded:
            fn(d)
        out.append(len(encoded) / (time.perf_counter() - t0))
    return statistics.median(out), min(out), max(out)


def main() -> None:
    torch.set_num_threads(1)
    raw = gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").read()
    grey = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:5000]
    rng = np.random.default_rng(0)
    sets = {
        "Fashion-MNIST 28 px grey PNG (5,000)": [encode_array(a, "png", 95) for a in grey],
        "generated 96 px RGB PNG (1,000)": [encode_array(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
                                                         .cumsum(1, dtype=np.uint16).astype(np.uint8), "png", 95)
                                            for _ in range(1000)],
    }
    fns = {"decode_image (check + torchvision)": decode_image, "torchvision alone": torchvision_only,
           "check_png alone": check_png, "PIL": pil}
    lines = ["| images | " + " | ".join(fns) + " |", "|---|" + "---|" * len(fns)]
    for name, encoded in sets.items():
        cells = []
        for fname, fn in fns.items():
            med, lo, hi = rate(fn, encoded)
            cells.append(f"{med:,.0f} ({lo:,.0f}-{hi:,.0f})")
            print(f"{name}, {fname}: {med:,.0f} images/s (range {lo:,.0f}-{hi:,.0f})", flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_section("PNG integrity check (issue 18)", "\n".join(lines) + "\n\nImages/s on one core, median of five "
                  "passes (range). torchvision 0.29's decoder segfaults on some damaged PNGs (one flipped byte in the "
                  "image data); `check_png` (chunk CRCs, the zlib stream, scanline filters) stops them first.")


if __name__ == "__main__":
    main()
