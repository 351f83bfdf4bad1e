"""Labeled image sources that `selfsup shard` turns into WebDataset shards.

A source gives, per split, a list of `Item`s in a fixed order (so keys and shards are
deterministic) and a way to encode one item into image bytes. Three kinds:
- `fashion-mnist`: Debian's `dataset-fashion-mnist` idx files;
- an ImageFolder directory: one subfolder per class, any image PIL reads;
- an `.npz` with `images` (N,H,W[,C] uint8) and `labels` (N,).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from selfsup.pipelines.decode import max_pixels

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Labels are class indices: without class names, more classes than this is a mistake (a label
# of 3*10^8 built a class list that long).
MAX_CLASSES = 100_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class SourceError(ValueError):
    """The source is missing or malformed."""


class UnreadableImage(ValueError):
    """One image could not be decoded; the sharder skips it and lists it in the manifest."""


@dataclass(frozen=True)
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


def encode_array(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # small images: level 1 is as small, 3x faster
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Source:
    files = {s: (root / f"{p}-images-idx3-ubyte.gz", root / f"{p}-labels-idx1-ubyte.gz")
             for s, p in (("train", "train"), ("test", "t10k"))}
    for img, lab in files.values():
        for p in (img, lab):
            if not p.exists():
                raise SourceError(f"Fashion-MNIST file {p} is missing: install it with "
                                  "`sudo apt-get install dataset-fashion-mnist`")
    arrays, splits, h = {}, {}, hashlib.sha256()
    for split, (img, lab) in files.items():
        labels = _read_idx(lab, 8).astype(np.int64)
        images = _read_idx(img, 16).reshape(len(labels), 28, 28)
        arrays[split] = images
        splits[split] = [Item(f"{split}:{i}", int(y)) for i, y in enumerate(labels)]
        h.update(images.tobytes())
        h.update(labels.tobytes())

    def encode(item: Item, fmt: str, quality: int) -> bytes:
        split, i = item.ref.split(":")
        return encode_array(arrays[split][int(i)], fmt, quality)

    return Source("fashion-mnist", list(FASHION_MNIST_CLASSES), splits, "L", (28, 28), h.hexdigest()[:16], encode)


def npz(path: Path, holdout: float) -> Source:
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        images, labels = data["images"], data["labels"]
    except KeyError as e:
        raise SourceError(f"{path} lacks the array {e}: it needs `images` and `labels`") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise SourceError(f"{path} is not a readable .npz: {e or type(e).__name__}") from None
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise SourceError(f"{path}: `labels` must be integers (N,), got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if len(labels) == 0:
        raise SourceError(f"{path} holds no images")
    if labels.min() < 0:
        raise SourceError(f"{path}: labels must be >= 0 (class indices), found {int(labels.min())}")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise SourceError(f"{path}: `images` must be uint8 (N,H,W) or (N,H,W,C) matching `labels` (N,); "
                          f"got {images.dtype} {images.shape} and {labels.shape}")
    if images.ndim == 4:
        channels = images.shape[3]
        if channels not in (1, 2, 3, 4):
            raise SourceError(f"{path}: `images` has {channels} channels; give 1 (grey), 3 (RGB) or 4 (RGBA)")
        # grey or RGB, without alpha
        images = images[..., 0] if channels in (1, 2) else images[..., :3]
    if 0 in images.shape[1:3]:
        raise SourceError(f"{path}: `images` are of size {images.shape[1]}x{images.shape[2]}")
    top = int(labels.max())
    if "class_names" in data:
        names = [str(c) for c in data["class_names"]]
        if top >= len(names):
            raise SourceError(f"{path}: label {top} has no class name (`class_names` holds {len(names)})")
    elif top >= MAX_CLASSES:
        raise SourceError(f"{path}: labels reach {top}, more than {MAX_CLASSES} classes: are they class "
                          "indices? Give `class_names` for that many")
    else:
        names = [str(i) for i in range(top + 1)]
    items = [Item(str(i), int(y)) for i, y in enumerate(labels)]
    h = hashlib.sha256(images.tobytes()).hexdigest()[:16]

    def encode(item: Item, fmt: str, quality: int) -> bytes:
        return encode_array(images[int(item.ref)], fmt, quality)

    mode = "L" if images.ndim == 3 else "RGB"
    return Source(f"npz:{path}", names, _holdout(items, holdout), mode, images.shape[1:3], h, encode)


def image_folder(path: Path, holdout: float) -> Source:
    if not path.is_dir():
        raise SourceError(f"source {path} does not exist or is not a directory")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{path} has no class subfolders (expected {path}/<class>/<image>)")
    items, h = [], hashlib.sha256()
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(str(f), label))
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not items:
        raise SourceError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # Mode and size from a sample: RGB photos unless every sampled image is grey.
    modes, sizes = set(), set()
    for it in items[:: max(1, len(items) // 50)]:
        try:
            with Image.open(it.ref) as im:
                modes.add("L" if im.mode in ("L", "1", "I", "F") or im.mode.startswith("I;16") else "RGB")
                sizes.add((im.height, im.width))
        except Exception:
            pass
    mode = "L" if modes == {"L"} else "RGB"

    def encode(item: Item, fmt: str, quality: int) -> bytes:
        try:
            with Image.open(item.ref) as im:
                if im.width * im.height > max_pixels():
                    raise ValueError(f"{im.width}x{im.height} is over the cap of {max_pixels()} pixels "
                                     "(SELFSUP_MAX_IMAGE_PIXELS)")
                # Pass JPEG bytes through untouched: re-encoding loses quality for nothing.
                if fmt == "jpg" and im.format == "JPEG" and im.mode == mode:
                    im.load()
                    return Path(item.ref).read_bytes()
                arr = np.asarray(_eight_bit(im).convert(mode))
        except Exception as e:
            raise UnreadableImage(f"{item.ref}: {type(e).__name__}: {e}") from None
        return encode_array(arr, fmt, quality)

    size = sizes.pop() if len(sizes) == 1 else None
    return Source(f"imagefolder:{path}", classes, _holdout(items, holdout), mode, size, h.hexdigest()[:16], encode)


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


def _holdout(items: list[Item], fraction: float) -> dict[str, list[Item]]:
    """Deterministic split: an item goes to `test` by a hash of its reference, not by chance."""
    if fraction <= 0:
        return {"train": items}

    def in_test(it: Item) -> bool:
        return int(hashlib.sha256(it.ref.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    return {"train": [it for it in items if not in_test(it)], "test": [it for it in items if in_test(it)]}


def open_source(spec: str, holdout: float = 0.0) -> Source:
    if spec == "fashion-mnist":
        return fashion_mnist()
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        return npz(path, holdout)
    return image_folder(path, holdout)
