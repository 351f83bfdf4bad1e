"""Folders of image files as sources, local or under an S3 prefix (listed a page at a time).

- ImageFolder layout, `ROOT/<class>/<image>` (images deeper in a class folder count too): labeled,
  classes in sorted order.
- A flat folder, `ROOT/<image>` with no class folders: unlabeled.

Images are any file PIL reads with an image suffix; JPEG bytes pass through untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.images import (IMAGE_SUFFIXES, UNLABELED, Item, Source, SourceError, encode_image, holdout,
                                      sample_mode)
from selfsup.pipelines.storage import is_s3, open_store


_stores: dict = {}


def folder(uri: str, holdout_fraction: float, ep: Endpoint | None = None) -> Source:
    """A local directory or an `s3://bucket/prefix` of images, labeled by class folder or flat."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise SourceError(f"source {uri} does not exist or is not a directory")
        uri = str(path)
    store = open_store(uri, ep)
    h, keys = hashlib.sha256(), []
    for key, size, tag in store.walk():
        name = PurePosixPath(key)
        if name.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in name.parts):
            keys.append(key)
            h.update(f"{key}:{size}:{tag}\n".encode())
    if not keys:
        raise SourceError(f"{uri} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    keys.sort()
    nested = [k for k in keys if "/" in k]
    if nested:
        if len(nested) < len(keys):
            raise SourceError(f"{uri} has images both in class folders and at its top ({keys[0]!r}): "
                              "give one layout, ROOT/<class>/<image> (labeled) or ROOT/<image> (unlabeled)")
        classes = sorted({k.split("/", 1)[0] for k in keys})
        label = {c: i for i, c in enumerate(classes)}
        items = [Item(k, label[k.split("/", 1)[0]]) for k in keys]
    else:
        classes, items = [], [Item(k, UNLABELED) for k in keys]
    del keys, nested
    mode, size = sample_mode(store.read, [it.ref for it in items])

    def encode(item: Item, fmt: str, quality: int) -> bytes:
        # the store opened where this runs: a Ray task gets the URI, not the driver's client
        s = _stores.get((uri, ep)) or _stores.setdefault((uri, ep), open_store(uri, ep))
        return encode_image(s.read(item.ref), s.url(item.ref), mode, fmt, quality)

    kind = "imagefolder" if classes else "images"
    return Source(f"{kind}:{uri}", classes, holdout(items, holdout_fraction), mode, size, h.hexdigest()[:16], encode,
                  labeled=bool(classes))
