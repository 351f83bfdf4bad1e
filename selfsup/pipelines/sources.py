"""The image sources that `selfsup shard` turns into WebDataset shards (see images.py for what a source is):
- `fashion-mnist`: Debian's `dataset-fashion-mnist` idx files;
- an `.npz` with `images` (N,H,W[,C] uint8) and `labels` (N,);
- a folder or S3 prefix of images: one subfolder per class, or flat and unlabeled (folders.py);
- Parquet files with an image-bytes column (parquet.py).
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from pathlib import Path

import numpy as np

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.folders import folder
from selfsup.pipelines.images import MAX_CLASSES, Item, Source, SourceError, encode_array, holdout as _holdout
from selfsup.pipelines.parquet import parquet
from selfsup.pipelines.storage import is_s3

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


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


def open_source(spec: str, holdout: float = 0.0, image_column: str | None = None, label_column: str | None = None,
                ep: Endpoint | None = None) -> Source:
    """`fashion-mnist`, an .npz, Parquet (a .parquet file, or a folder or S3 prefix of them when a
    column is named), or a folder or S3 prefix of images."""
    if spec == "fashion-mnist":
        return fashion_mnist()
    if spec.endswith(".parquet") or image_column or label_column:
        return parquet(spec, image_column or "image", label_column, holdout, ep)
    if is_s3(spec):
        return folder(spec, holdout, ep)
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        return npz(path, holdout)
    return folder(str(path), holdout)
