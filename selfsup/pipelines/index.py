"""`selfsup shard index`: a manifest for WebDataset shards that other tools wrote, without rewriting a byte.

The shards (`webdataset.ShardWriter`, img2dataset, `tar` by hand) are named by a pattern with
brace ranges (`s3://b/photos/shard-{000000..000999}.tar`) or a glob in the file name
(`s3://b/photos/*.tar`). Each is read once: its sha256, its samples (WebDataset keys: a key ends
at the first dot of a member's base name), every image checked and decoded, the labels read.
The manifest goes to the shards' common folder (or `--out`, a folder above them): its shard paths
are relative to it, so the data set reads exactly as one selfsup wrote. Training, evaluation and
the dashboard then need nothing else.

Per sample: the image is the first of `.jpg`, `.jpeg`, `.png`, `.webp`; the label comes from
`.cls` (an integer or a class name), a field of `.json` (`json:FIELD`), or nowhere (`none`: an
unlabeled set). Samples without an image are skipped and named; members of other types are
ignored and counted; a shard with a damaged image or tar is left out and named, as `shard verify`
would; samples without the label are named and count as unlabeled (evaluation leaves them out).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import itertools
import json
import posixpath
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from selfsup.pipelines.decode import IMAGE_EXTS, Schema, decode_image, group_samples, sample_image
from selfsup.pipelines.endpoints import Endpoint, StorageError
from selfsup.pipelines.locks import locked
from selfsup.pipelines.shards import FORMAT, MANIFEST, VERSION
from selfsup.pipelines.images import MAX_CLASSES, SourceError, grey
from selfsup.pipelines.storage import check_key, is_s3, open_store, split_s3

# Members that are sample metadata, not images: not counted as ignored (img2dataset writes .txt captions).
METADATA = ("cls", "json", "txt")
MAX_NAMED = 5  # samples named per problem in the summary (the manifest lists them all, up to MAX_LISTED)
MAX_LISTED = 1000
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclass
class IndexOptions:
    test: str | None = None  # a pattern of test shards
    holdout: float = 0.0  # or: this fraction of the shards (by a hash of the name) as `test`
    labels: str = "cls"  # cls | json:FIELD | none
    out: str | None = None  # the manifest's folder: the shards' common folder, or one above it
    workers: int = 4
    overwrite: bool = False


@dataclass
class ShardReport:
    """What reading one shard found."""
    path: str
    num_samples: int = 0
    sha256: str = ""
    bytes: int = 0
    error: str | None = None  # the shard is unreadable or holds a damaged image
    modes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)  # label values
    unlabeled: int = 0  # samples without the label
    unlabeled_keys: list = field(default_factory=list)  # the first MAX_LISTED of them
    no_image: list = field(default_factory=list)  # keys without an image
    other: Counter = field(default_factory=Counter)  # ignored member types


def check_labels(spec: str) -> str:
    if spec in ("cls", "none") or (spec.startswith("json:") and spec[5:]):
        return spec
    raise SourceError(f"--labels {spec!r}: give cls, json:FIELD or none")


def expand(pattern: str) -> list[str]:
    """Brace expansion as WebDataset does it: `{000..012}` (zero-padded ranges) and `{a,b}`."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    body, out = m.group(1), []
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo or hi - lo >= 10_000_000:
            raise SourceError(f"{pattern}: range {{{body}}} is empty or over 10 million shards")
        options = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    for o in options:
        out += expand(pattern[:m.start()] + o + pattern[m.end():])
    return out


def match(pattern: str, ep: Endpoint | None = None, log=print) -> list[str]:
    """The shard URIs a pattern names that exist, sorted (a glob only in file names: `*.tar`, not
    `*/x.tar`); one line names those of a brace range that do not. Exit 2 (SourceError) when none does."""
    if not pattern.endswith(".tar") and not pattern.endswith("*"):
        raise SourceError(f"{pattern}: a shard pattern names .tar files (shard-{{000000..000099}}.tar or *.tar)")
    found, missing = [], []
    # one listing per folder: the keys are few next to the samples, and an existence check each is slower
    names = expand(pattern)
    for folder, group in itertools.groupby(sorted(names), key=posixpath.dirname):
        wanted = [posixpath.basename(n) for n in group]
        store = open_store(folder, ep)
        try:
            present = {k for k in store.list() if "/" not in k}
        except FileNotFoundError:
            present = set()
        for w in wanted:
            if any(c in w for c in "*?["):
                found += [f"{folder}/{k}" for k in sorted(present) if fnmatch.fnmatchcase(k, w)]
            else:
                (found if w in present else missing).append(f"{folder}/{w}")
    if not found:
        raise SourceError(f"no shard matches {pattern}")
    if missing:
        log(f"warning: {_named(len(missing), missing, f'shards that {pattern} names do not exist')}")
    return sorted(set(found))


def common_root(uris: list[str], out: str | None) -> tuple[str, list[str]]:
    """(root, shard keys under it): the shards' common folder, or `out` when it holds them all."""
    root = posixpath.commonpath([posixpath.dirname(u) for u in uris]) if not is_s3(uris[0]) else \
        "s3://" + posixpath.commonpath([posixpath.dirname(u[len("s3://"):]) for u in uris])
    if out is not None:
        out = out.rstrip("/")
        if not all(u.startswith(out + "/") for u in uris):
            raise SourceError(f"--out {out}: the manifest must be in a folder that holds the shards (its paths are "
                              f"relative to it, and never reach outside it); the shards are under {root}")
        root = out
    if is_s3(root):
        split_s3(root)  # names a bucket
    keys = [check_key(u[len(root) + 1:], "shard path") for u in uris]
    return root, keys


def index_shard(data: bytes, path: str, labels: str) -> ShardReport:
    """Read one shard's bytes: never raises for bad data (the report says what is wrong)."""
    from PIL import Image

    r = ShardReport(path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    schema = Schema(labels)
    try:
        samples = group_samples(data)
    except Exception as e:
        r.error = f"{path}: unreadable tar ({type(e).__name__}: {e})"
        return r
    for key, parts in samples.items():
        img = sample_image(parts)
        r.other.update(t for t in parts if t not in IMAGE_EXTS and t not in METADATA)
        if img is None:
            r.no_image.append(key)
            continue
        try:
            decode_image(img)
            with Image.open(io.BytesIO(img)) as im:
                r.modes["L" if grey(im) else "RGB"] += 1
                if len(r.sizes) < 2 or (im.height, im.width) in r.sizes:  # one size or several is all that counts
                    r.sizes[(im.height, im.width)] += 1
                r.formats[{"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format, str(im.format).lower())] += 1
        except Exception as e:
            r.error = f"{path}: sample {key!r}: damaged image ({type(e).__name__}: {e})"
            return r
        try:
            value = schema.label_value(parts)
        except (ValueError, UnicodeDecodeError) as e:
            r.error = f"{path}: sample {key!r}: unreadable label ({type(e).__name__}: {e})"
            return r
        if value is None and labels != "none":
            r.unlabeled += 1
            if len(r.unlabeled_keys) < MAX_LISTED:
                r.unlabeled_keys.append(key)
        elif value is not None:
            r.values[value] += 1
        r.num_samples += 1
    if not r.num_samples:
        r.error = f"{path}: no sample with an image ({', '.join(IMAGE_EXTS)})"
    return r


def _class_names(values: Counter, labels: str) -> list[str]:
    if labels == "none":
        return []
    ints = [v for v in values if isinstance(v, int)]
    names = [v for v in values if isinstance(v, str)]
    if ints and names:
        raise SourceError(f"labels ({labels}) mix integers ({ints[0]}) and class names ({names[0]!r}): give one kind")
    if names:
        return sorted(names)
    if ints and min(ints) < 0:
        raise SourceError(f"labels ({labels}) must be >= 0 (class indices), found {min(ints)}")
    top = max(ints, default=-1)
    if top >= MAX_CLASSES:
        raise SourceError(f"labels ({labels}) reach {top}, more than {MAX_CLASSES} classes: are they class indices?")
    return [str(i) for i in range(top + 1)]


def _named(count: int, keys: list[str], what: str) -> str:
    first = ", ".join(repr(k) for k in keys[:MAX_NAMED])
    return f"{count} {what} (first: {first})"


def _read_local(root: str, keys: list[str], labels: str, workers: int, ep, progress: bool):
    from tqdm import tqdm

    store = open_store(root, ep)

    def one(key):
        try:
            data = store.read(key)
        except FileNotFoundError:
            return ShardReport(key, error=f"{store.url(key)}: missing")
        return index_shard(data, key, labels)

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(keys), unit="shard", disable=not progress,
                                                          desc=f"indexing {root}") as bar:
        for r in pool.map(one, keys):
            bar.update(1)
            yield r


def _read_ray(root: str, keys: list[str], labels: str, ep, progress: bool):
    """The same on the Ray cluster: Ray Data reads the shards (read_binary_files), one task each."""
    import ray.data
    from tqdm import tqdm

    from selfsup.pipelines.storage import fs_and_path

    fs, base = fs_and_path(root, ep)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_binary_files([f"{base}/{k}" for k in keys], filesystem=fs, include_paths=True,
                                    override_num_blocks=len(keys))
    strip = len(base) + 1

    def one(row: dict) -> dict:
        r = index_shard(row["bytes"], row["path"][strip:], labels)
        return {"report": json.dumps(_report_json(r)), "node": ray.get_runtime_context().get_node_id()}

    with tqdm(total=len(keys), unit="shard", disable=not progress, desc=f"indexing {root} on Ray") as bar:
        for row in ds.map(one).iter_rows():
            bar.update(1)
            yield _report_from_json(json.loads(row["report"])), row["node"]


def _report_json(r: ShardReport) -> dict:
    d = dict(r.__dict__)
    for k in ("modes", "formats", "other"):
        d[k] = dict(d[k])
    d["sizes"] = [[list(s), n] for s, n in r.sizes.items()]
    d["values"] = [[v, n] for v, n in r.values.items()]
    return d


def _report_from_json(d: dict) -> ShardReport:
    return ShardReport(**{**d, "modes": Counter(d["modes"]), "formats": Counter(d["formats"]), "other": Counter(d["other"]),
                          "sizes": Counter({tuple(s): n for s, n in d["sizes"]}),
                          "values": Counter({v: n for v, n in d["values"]})})


def _in_test(key: str, fraction: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def index(pattern: str, opts: IndexOptions, ep: Endpoint | None = None, progress: bool = True, log=print,
          on_ray: bool = False) -> dict:
    """Index the shards `pattern` (and `opts.test`) names; write and return the manifest. `on_ray`:
    read them as Ray Data tasks on the cluster (the manifest is the same)."""
    labels = check_labels(opts.labels)
    if not 0 <= opts.holdout < 1:
        raise SourceError(f"--holdout must be in [0, 1), got {opts.holdout}")
    if opts.test and opts.holdout:
        raise SourceError("give --test or --holdout, not both")
    train = match(pattern, ep, log)
    test = match(opts.test, ep, log) if opts.test else []
    if set(train) & set(test):
        raise SourceError(f"--test {opts.test} names shards that {pattern} names too")
    root, keys = common_root(train + test, opts.out)
    split_of = {k: "test" if u in test else "train" for u, k in zip(train + test, keys)}
    if opts.holdout:
        for k in keys:
            split_of[k] = "test" if _in_test(k, opts.holdout) else "train"
    store = open_store(root, ep)
    with locked(store, "selfsup shard index"):
        if store.exists(MANIFEST) and not opts.overwrite:
            try:
                old = json.loads(store.read(MANIFEST))
            except ValueError:
                old = {}
            if not isinstance(old, dict) or old.get("source") != pattern:
                raise StorageError(f"{store.url(MANIFEST)} describes another data set (source "
                                   f"{old.get('source') if isinstance(old, dict) else None!r}); pass --overwrite to "
                                   "replace the manifest (no shard is touched)")
        nodes = Counter()
        if on_ray:
            reports = {}
            for r, node in _read_ray(root, keys, labels, ep, progress):
                reports[r.path] = r
                nodes[node] += 1
        else:
            reports = {r.path: r for r in _read_local(root, keys, labels, opts.workers, ep, progress)}
        manifest = _manifest(pattern, root, keys, split_of, reports, labels, log)
        if on_ray:
            log(f"indexed on Ray: {len(keys)} tasks on {len(nodes)} node(s)")
        store.write(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _manifest(pattern: str, root: str, keys: list[str], split_of: dict, reports: dict, labels: str, log) -> dict:
    good = [reports[k] for k in keys if not reports[k].error]
    bad = [reports[k] for k in keys if reports[k].error]
    for r in bad:
        log(f"bad shard: {r.error}")
    if not good:
        raise SourceError(f"no readable shard matches {pattern} ({len(bad)} bad; first: {bad[0].error})")
    total = lambda what: sum((getattr(r, what) for r in good), Counter())  # noqa: E731
    values, modes, sizes, formats, other = (total(w) for w in ("values", "modes", "sizes", "formats", "other"))
    class_names = _class_names(values, labels)
    unlabeled = [f"{r.path}:{k}" for r in good for k in r.unlabeled_keys][:MAX_LISTED]
    n_unlabeled = sum(r.unlabeled for r in good)
    no_image = [f"{r.path}:{k}" for r in reports.values() for k in r.no_image]
    if n_unlabeled:
        log(f"warning: {_named(n_unlabeled, unlabeled, f'samples lack the label ({labels})')}: they train, and "
            "evaluation leaves them out")
    if no_image:
        log(f"warning: {_named(len(no_image), no_image, 'samples have no image')}: skipped")
    if other:
        log("ignored members of other types: " + ", ".join(f"{n} .{t}" for t, n in other.most_common()))
    splits = {}
    for split in ("train", "test"):
        shards = [{"path": r.path, "num_samples": r.num_samples, "sha256": r.sha256, "bytes": r.bytes}
                  for r in good if split_of[r.path] == split]
        if shards:
            splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    if "train" not in splits:
        raise SourceError(f"{pattern}: every readable shard went to the test split; lower --holdout")
    plan = hashlib.sha256(json.dumps([pattern, labels, [(s["path"], s["sha256"]) for sp in splits.values()
                                                         for s in sp["shards"]]]).encode()).hexdigest()[:16]
    return {
        "format": FORMAT, "version": VERSION, "plan": plan, "source": pattern,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "labels": labels, "class_names": class_names,
        "image": {"mode": "RGB" if modes.get("RGB") else "L", "format": formats.most_common(1)[0][0],
                  "size": list(next(iter(sizes))) if len(sizes) == 1 else None},
        "splits": splits,
        "skipped": ([{"ref": r.path, "error": r.error} for r in bad]
                    + [{"ref": k, "error": "no image"} for k in no_image[:MAX_LISTED]]),
        "unlabeled": {"count": n_unlabeled, "keys": unlabeled},
        "ignored_members": dict(other),
    }
