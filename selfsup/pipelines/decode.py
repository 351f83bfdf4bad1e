"""A shard's bytes to samples: its tar members, each image checked before it is decoded.

torchvision 0.29's libpng decoder segfaults on some damaged PNGs, and a small file can claim a huge
image, so every image passes `check_pixels` (and a PNG `check_png`) first: a bad image is an
error that names it, never a crash or an out-of-memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where it is used: Ray Data's split coordinator imports this module with
# streaming.py and needs none of torch.
if TYPE_CHECKING:
    import torch


class CorruptShard(RuntimeError):
    pass


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# 64 MP: an 8000x8000 photo; decoded RGB, 192 MB.
DEFAULT_MAX_PIXELS = 64_000_000
_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _row_bytes(width: int, ctype: int, depth: int) -> int:
    return (width * _CHANNELS[ctype] * depth + 7) // 8


def check_png(data: bytes) -> None:
    """Raise ValueError unless a PNG's chunks, CRCs, compressed stream and the filter type of every
    scanline (of every pass, when Adam7-interlaced) are intact, and it is within max_pixels().
    torchvision 0.29's libpng decoder segfaults on some damaged PNGs (one flipped byte in the image
    data takes the process down); this check stops them first at a small fraction of the decode
    time, so a bad image is an error, not a crash."""
    pos, n, ihdr, idat = 8, len(data), None, []
    while True:
        if pos + 12 > n:
            raise ValueError("PNG ends before its IEND chunk (truncated)")
        size = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + size
        if end > n:
            raise ValueError("PNG chunk runs past the end of the data (truncated)")
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:pos + 8 + size]) != int.from_bytes(data[end - 4:end], "big"):
            raise ValueError(f"PNG chunk {kind!r} fails its CRC (corrupt)")
        if kind == b"IHDR":
            ihdr = data[pos + 8:pos + 8 + size]
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + size])
        elif kind == b"IEND":
            break
        pos = end
    if ihdr is None or len(ihdr) != 13 or not idat:
        raise ValueError("PNG lacks its IHDR or IDAT chunk")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if ctype not in _CHANNELS or depth not in (1, 2, 4, 8, 16) or not w or not h:
        raise ValueError(f"PNG header is invalid ({w}x{h}, colour type {ctype}, bit depth {depth})")
    if w * h > max_pixels():
        raise ValueError(f"image is {w}x{h}, over the cap of {max_pixels()} pixels (SELFSUP_MAX_IMAGE_PIXELS)")
    # Each pass of an Adam7-interlaced image is a small image of its own: (rows, bytes per row).
    passes = [(h, _row_bytes(w, ctype, depth))] if not interlace else [
        (-(-(h - y0) // dy), _row_bytes(-(-(w - x0) // dx), ctype, depth))
        for x0, y0, dx, dy in ADAM7 if w > x0 and h > y0]
    size = sum(rows * (1 + stride) for rows, stride in passes)
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(b"".join(idat), size + 1)
    except zlib.error as e:
        raise ValueError(f"PNG image data is corrupt ({e})") from None
    if not stream.eof or len(raw) != size:
        raise ValueError("PNG image data is truncated or longer than its header says")
    pos = 0
    for rows, stride in passes:  # every row starts with its filter type, 0-4
        if max(raw[pos:pos + rows * (1 + stride):1 + stride]) > 4:
            raise ValueError("PNG image data does not match its header (bad scanline filter)")
        pos += rows * (1 + stride)


def max_pixels() -> int:
    """The largest image (width x height) decoded anywhere: a small file can claim a huge image
    (an 875 KB PNG of 30000x30000 took 2.7 GB to decode)."""
    raw = os.environ.get("SELFSUP_MAX_IMAGE_PIXELS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_PIXELS


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, read without decoding."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError("JPEG markers are corrupt")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and pos + 9 <= n:
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        pos += 2 + length
    raise ValueError("JPEG has no frame header (truncated)")


def check_pixels(data: bytes) -> None:
    """Raise ValueError when an image's header claims more than max_pixels() (PNG and JPEG are read
    here; PNG's check is part of check_png). Other formats: PIL reads their header."""
    if data[:2] == b"\xff\xd8":
        w, h = jpeg_size(data)
    elif data[:8] == PNG_SIGNATURE:
        return check_png(data)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    if w * h > max_pixels():
        raise ValueError(f"image is {w}x{h}, over the cap of {max_pixels()} pixels (SELFSUP_MAX_IMAGE_PIXELS)")


def decode_image(data: bytes) -> torch.Tensor:
    """PNG, JPEG or WebP bytes -> uint8 (C, H, W), C = 1 for grey, 3 for colour. Damaged bytes raise, and
    so does an image over max_pixels(). 16-bit PNGs are scaled to 8 bits."""
    import torch
    from torchvision.io import ImageReadMode, decode_image as tv_decode  # 2.7x PIL's speed; pinned torchvision

    check_pixels(data)
    t = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    if t.dtype == torch.uint16:
        t = (t.to(torch.int32) >> 8).to(torch.uint8)
    if t.shape[0] == 4:  # RGBA: drop alpha
        t = t[:3]
    elif t.shape[0] == 2:  # grey + alpha
        t = t[:1]
    return t


def tar_members(data: bytes):
    """(name, bytes) of each regular file in a tar. Python's tarfile parses headers ten times
    slower than decoding a small PNG takes; this reads plain ustar headers directly and hands
    anything else (pax, GNU long names) to tarfile."""
    pos, n = 0, len(data)
    while pos + 512 <= n:
        hdr = data[pos:pos + 512]
        if hdr.count(0) == 512:  # end-of-archive block
            return
        kind = hdr[156:157]
        if kind not in (b"0", b"\0", b"5"):
            yield from _tarfile_members(data)
            return
        stored = int(hdr[148:156].split(b"\0")[0].strip() or b"0", 8)
        if stored != sum(hdr) - sum(hdr[148:156]) + 256:
            raise tarfile.TarError(f"bad header checksum at byte {pos}")
        size = int(hdr[124:136].split(b"\0")[0].strip() or b"0", 8)
        name = hdr[0:100].split(b"\0")[0].decode()
        prefix = hdr[345:500].split(b"\0")[0].decode() if hdr[257:262] == b"ustar" else ""
        start = pos + 512
        if start + size > n:
            raise tarfile.TarError(f"member {name!r} is truncated")
        if kind != b"5":
            yield (f"{prefix}/{name}" if prefix else name), data[start:start + size]
        pos = start + (size + 511) // 512 * 512
    raise tarfile.TarError("unexpected end of data: no end-of-archive marker (truncated?)")


def _tarfile_members(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, tar.extractfile(m).read()


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members a sample's image may be, in this order


def split_member(name: str) -> tuple[str, str]:
    """(key, type) of a tar member by the WebDataset convention: the key ends at the first dot of
    the member's base name (`a/b.seg.png` is key `a/b`, type `seg.png`); the type is lower-cased."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def group_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """{key: {type: bytes}} of a shard, in the order the keys first appear (raises on a damaged tar)."""
    samples: dict[str, dict[str, bytes]] = {}
    for member, content in tar_members(data):
        key, ext = split_member(member)
        samples.setdefault(key, {})[ext] = content
    return samples


def sample_image(parts: dict[str, bytes]) -> bytes | None:
    return next((parts[e] for e in IMAGE_EXTS if e in parts), None)


@dataclass(frozen=True)
class Schema:
    """How a data set's samples read: where the label is, the class names its values map to, and how
    many channels every image is decoded to. selfsup's own shards: `.cls`, as stored."""
    labels: str = "cls"  # "cls", "json:FIELD" or "none"
    classes: tuple[str, ...] = ()
    channels: int | None = None  # 1 or 3; None: as stored
    required: bool = True  # a sample without its label is a damaged shard (selfsup's own shards)

    @classmethod
    def of(cls, manifest: dict) -> Schema:
        return cls(manifest.get("labels", "cls"), tuple(manifest.get("class_names") or ()),
                   {"L": 1, "RGB": 3}.get(manifest.get("image", {}).get("mode")), "labels" not in manifest)

    def label_value(self, parts: dict[str, bytes]):
        """The raw label of a sample (an int or a class name), or None when it has none."""
        if self.labels == "none":
            return None
        if self.labels == "cls":
            raw = parts.get("cls")
            if raw is None:
                return None
            text = raw.decode().strip()
            return int(text) if text.lstrip("-").isdigit() else text
        raw = parts.get("json")
        if raw is None:
            return None
        doc = json.loads(raw)
        value = doc.get(self.labels[len("json:"):]) if isinstance(doc, dict) else None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
            return None
        return value

    def label(self, parts: dict[str, bytes]) -> int:
        """A sample's class index; -1 for a sample without a label (it trains, and evaluation leaves it out)."""
        value = self.label_value(parts)
        if value is None:
            return -1
        if isinstance(value, str):
            try:
                return self.classes.index(value)
            except ValueError:
                raise ValueError(f"label {value!r} is not a class of the manifest") from None
        return value


def to_channels(t: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels == 3 and t.shape[0] == 1:
        return t.expand(3, -1, -1).contiguous()
    if channels == 1 and t.shape[0] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        import torch

        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1)
        return ((t.to(torch.int32) * w).sum(0, keepdim=True) // 1000).to(torch.uint8)
    return t


def shard_samples(data: bytes, expected_sha256: str | None = None, name: str = "shard", schema: Schema = Schema(),
                  start: int = 0, keys: list[str] | None = None):
    """(indices, images, labels) of one shard's bytes; raises CorruptShard naming the shard. A
    sample's index is `start` (its shard's first, from the manifest) plus its place in the shard.
    Members of other types are ignored, and so is a sample without an image (`shard index` names them).
    `keys`: a list that gets each returned sample's WebDataset key (what `embed` writes)."""
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CorruptShard(f"{name}: sha256 does not match the manifest (corrupt or replaced)")
    try:
        idx, images, labels = [], [], []
        for key, parts in group_samples(data).items():
            img = sample_image(parts)
            if img is None:
                continue
            if schema.required and "cls" not in parts:
                raise CorruptShard(f"{name}: sample {key!r} lacks a label")
            idx.append(start + len(idx))
            images.append(to_channels(decode_image(img), schema.channels))
            labels.append(schema.label(parts))
            if keys is not None:
                keys.append(key)
    except CorruptShard:
        raise
    except Exception as e:  # tar, decode and label failures alike
        raise CorruptShard(f"{name}: {type(e).__name__}: {e}") from None
    return idx, images, labels
