"""What every image source gives `selfsup shard`: items in a fixed order and a way to encode each.

A source gives, per split, a list of `Item`s in a fixed order (so keys and shards are
deterministic) and a way to encode one item into image bytes. An unlabeled source has no class
names and items of label -1; its shards carry no label and its manifest says `labels: none`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from selfsup.pipelines.decode import max_pixels

# Labels are class indices: without class names, more classes than this is a mistake (a label
# of 3*10^8 built a class list that long).
MAX_CLASSES = 100_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNLABELED = -1


class SourceError(ValueError):
    """The source is missing or malformed."""


class UnreadableImage(ValueError):
    """One image could not be decoded; the sharder skips it and lists it in the manifest."""


@dataclass(frozen=True, slots=True)  # slots: a million items are 100 MB, not 250
class Item:
    ref: str  # where it came from: an array index or a file path
    label: int


@dataclass
class Source:
    name: str
    class_names: list[str]
    splits: dict[str, list[Item]]
    mode: str  # "L" or "RGB"
    size: tuple[int, int] | None  # (H, W) when every image has it
    fingerprint: str  # changes when the source's content or order changes
    encode: Callable[[Item, str, int], bytes]  # (item, fmt, jpeg quality) -> image bytes
    labeled: bool = True  # False: no class names, every label UNLABELED


def encode_array(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # small images: level 1 is as small, 3x faster
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def grey(im: Image.Image) -> bool:
    return im.mode in ("L", "LA", "1", "I", "F") or im.mode.startswith("I;16")


def encode_image(data: bytes, ref: str, mode: str, fmt: str, quality: int) -> bytes:
    """An image file's bytes as `fmt` in `mode`; JPEG bytes already in that mode pass through
    untouched (re-encoding loses quality for nothing). Raises UnreadableImage naming `ref`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels():
                raise ValueError(f"{im.width}x{im.height} is over the cap of {max_pixels()} pixels "
                                 "(SELFSUP_MAX_IMAGE_PIXELS)")
            if fmt == "jpg" and im.format == "JPEG" and im.mode == mode:
                im.load()
                return data
            arr = np.asarray(_eight_bit(im).convert(mode))
    except Exception as e:
        raise UnreadableImage(f"{ref}: {type(e).__name__}: {e}") from None
    return encode_array(arr, fmt, quality)


def sample_mode(read: Callable[[str], bytes], refs: list[str]) -> tuple[str, tuple[int, int] | None]:
    """(mode, size or None) from about 50 images spread over `refs`: RGB photos unless every
    sampled image is grey; a size when every sampled image has it."""
    modes, sizes = set(), set()
    for ref in refs[:: max(1, len(refs) // 50)]:
        try:
            with Image.open(io.BytesIO(read(ref))) as im:
                modes.add("L" if grey(im) else "RGB")
                sizes.add((im.height, im.width))
        except Exception:
            pass
    return ("L" if modes == {"L"} else "RGB"), (sizes.pop() if len(sizes) == 1 else None)


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits (PIL's convert clips it: a 16-bit image came out almost white);
    a float or 32-bit image is refused, naming its mode, since its range is unknown."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    if im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode == "I" and arr.min() >= 0 and arr.max() < 65536:  # how PIL opens some 16-bit files
            return Image.fromarray((arr >> 8).astype(np.uint8))
        raise ValueError(f"image mode {im.mode} ({'float' if im.mode == 'F' else '32-bit integer'} pixels) "
                         "has no known range: give 8- or 16-bit images")
    return im


def holdout(items: list[Item], fraction: float) -> dict[str, list[Item]]:
    """Deterministic split: an item goes to `test` by a hash of its reference, not by chance."""
    if fraction <= 0:
        return {"train": items}

    def in_test(it: Item) -> bool:
        return int(hashlib.sha256(it.ref.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    return {"train": [it for it in items if not in_test(it)], "test": [it for it in items if in_test(it)]}
