"""Parquet files as a source: one file, or every `*.parquet` under a folder or an S3 prefix.

The image column holds encoded image bytes: a binary column, or Hugging Face datasets' image struct
`{bytes, path}`. The optional label column holds class indices (named by the file's Hugging Face
`ClassLabel` metadata when it has it) or class names. Only the footers and the label column are
read up front; images are read a row group at a time, in the task that encodes them.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.images import (MAX_CLASSES, UNLABELED, Item, Source, SourceError, UnreadableImage, encode_image,
                                      holdout, sample_mode)
from selfsup.pipelines.storage import fs_and_path, is_s3, open_store


def _files(uri: str, ep: Endpoint | None) -> list[str]:
    """The parquet files `uri` names: itself when it ends in .parquet, else every *.parquet under it."""
    if uri.endswith(".parquet"):
        return [uri]
    store = open_store(uri, ep)
    files = sorted(f"{store.uri}/{k}" for k, _, _ in store.walk() if k.endswith(".parquet"))
    if not files:
        raise SourceError(f"no .parquet file under {uri}")
    return files


def _hf_names(schema, column: str) -> list[str] | None:
    """Class names from Hugging Face datasets' metadata (a ClassLabel feature), if the file has them."""
    try:
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        feature = features[column]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except Exception:
        return None


@functools.lru_cache(maxsize=4)  # a shard's rows are consecutive: one or two groups at a time
def _row_group(file: str, g: int, column: str, ep: Endpoint | None) -> list:
    """One row group's column, read where the encoding runs (a Ray task opens its own filesystem)."""
    import pyarrow.parquet as pq

    fs, path = fs_and_path(file, ep if is_s3(file) else None)
    return pq.ParquetFile(path, filesystem=fs).read_row_group(g, columns=[column]).column(0).to_pylist()


def parquet(uri: str, image_column: str = "image", label_column: str | None = None, holdout_fraction: float = 0.0,
            ep: Endpoint | None = None) -> Source:
    import pyarrow.parquet as pq

    files = _files(uri, ep)
    fs, _ = fs_and_path(uri, ep if is_s3(uri) else None)
    path_of = {f: fs_and_path(f, ep if is_s3(f) else None)[1] for f in files}
    h, items, raw_labels, groups = hashlib.sha256(), [], [], []
    hf_names = None
    for n, f in enumerate(files):
        try:
            meta = pq.ParquetFile(path_of[f], filesystem=fs).metadata
        except Exception as e:
            raise SourceError(f"{f} is not a readable parquet file ({type(e).__name__}: {e})") from None
        schema = meta.schema.to_arrow_schema()
        for col in (image_column, label_column):
            if col is not None and col not in schema.names:
                raise SourceError(f"{f} has no column {col!r}; its columns: {', '.join(schema.names)}")
        # (first row, rows) of each row group: a row's group without reading any
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        groups.append(starts)
        h.update(f"{f}:{meta.num_rows}:{meta.serialized_size}:{[meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]}\n".encode())
        if label_column is not None:
            hf_names = hf_names or _hf_names(schema, label_column)
            col = pq.read_table(path_of[f], columns=[label_column], filesystem=fs).column(0).to_pylist()
            raw_labels += col
        items += [Item(f"{n}:{r}", UNLABELED) for r in range(meta.num_rows)]
    if not items:
        raise SourceError(f"{uri} holds no rows")
    classes: list[str] = []
    if label_column is not None:
        classes, labels = _labels(raw_labels, hf_names, uri, label_column)
        items = [Item(it.ref, y) for it, y in zip(items, labels)]
        h.update(hashlib.sha256(repr(labels).encode()).digest())

    def read(ref: str) -> bytes:
        n, r = map(int, ref.split(":"))
        g = bisect.bisect_right(groups[n], r) - 1
        value = _row_group(files[n], g, image_column, ep)[r - groups[n][g]]
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, bytes):
            raise UnreadableImage(f"{files[n]} row {r}: column {image_column!r} holds no image bytes")
        return data

    mode, size = sample_mode(read, [it.ref for it in items[:1000]])

    def encode(item: Item, fmt: str, quality: int) -> bytes:
        n, r = item.ref.split(":")
        return encode_image(read(item.ref), f"{files[int(n)]} row {r}", mode, fmt, quality)

    return Source(f"parquet:{uri}", classes, holdout(items, holdout_fraction), mode, size, h.hexdigest()[:16], encode,
                  labeled=label_column is not None)


def _labels(values: list, hf_names: list[str] | None, uri: str, column: str) -> tuple[list[str], list[int]]:
    """(class names, a class index per row; UNLABELED for a null)."""
    present = [v for v in values if v is not None]
    if not present:
        raise SourceError(f"{uri}: column {column!r} holds no label")
    if all(isinstance(v, str) for v in present):
        names = sorted(set(present))
        index = {c: i for i, c in enumerate(names)}
        return names, [UNLABELED if v is None else index[v] for v in values]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        raise SourceError(f"{uri}: column {column!r} must hold integers or class names, found {type(present[0]).__name__}")
    if min(present) < 0:
        raise SourceError(f"{uri}: column {column!r} holds {min(present)}: labels are class indices >= 0")
    top = max(present)
    if hf_names and top < len(hf_names):
        return hf_names, [UNLABELED if v is None else v for v in values]
    if top >= MAX_CLASSES:
        raise SourceError(f"{uri}: column {column!r} reaches {top}, more than {MAX_CLASSES} classes")
    return [str(i) for i in range(top + 1)], [UNLABELED if v is None else v for v in values]
