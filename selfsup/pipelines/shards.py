"""WebDataset shards in a bucket or directory, and the manifest that describes them.

Layout under DEST:
    manifest.json              written last; readers trust only what it lists
    _progress.json             while sharding: shards finished so far (for resume); removed at the end
    train/shard-000000.tar     members {key}.png|.jpg and {key}.cls (the label as ASCII digits)
    test/shard-000000.tar

Manifest (format version 1):
    {"format": "selfsup-webdataset", "version": 1, "plan": ..., "source": ..., "created": ...,
     "class_names": [...], "image": {"mode": "L"|"RGB", "format": "png"|"jpg", "size": [H, W] | null},
     "splits": {"train": {"num_samples": N, "shards": [{"path", "num_samples", "sha256", "bytes"}]}},
     "skipped": [{"ref", "error"}]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial

from selfsup.pipelines.decode import CorruptShard, Schema, group_samples, sample_image, shard_samples
from selfsup.pipelines.images import Item, Source, SourceError, UnreadableImage
from selfsup.pipelines.endpoints import Endpoint, StorageError
from selfsup.pipelines.locks import Lock, locked
from selfsup.pipelines.storage import Store, check_key, open_store

FORMAT = "selfsup-webdataset"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "_progress.json"


class ManifestError(StorageError):
    """No manifest, or one this version cannot read."""


@dataclass
class ShardOptions:
    samples_per_shard: int = 1000
    fmt: str | None = None  # png | jpg; default png for grey images, jpg for RGB photos
    quality: int = 95
    workers: int = 4
    overwrite: bool = False


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar: fixed mtime/owner so identical input gives identical bytes (and sha256)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_shard(source: Source, store: Store, fmt: str, quality: int, job: tuple) -> dict:
    """Encode and upload one shard: (path, split, first index, items) -> its manifest entry and the
    items skipped as unreadable. A pure function of its arguments: the same bytes wherever it runs."""
    path, split, start, items = job
    members, skipped = [], []
    for i, it in enumerate(items):
        key = f"{split}_{start + i:08d}"
        try:
            img = source.encode(it, fmt, quality)
        except UnreadableImage as e:
            skipped.append({"ref": it.ref, "error": str(e)})
            continue
        members.append((f"{key}.{fmt}", img))
        if source.labeled:
            members.append((f"{key}.cls", str(it.label).encode()))
    data = _tar_bytes(members)
    sha = hashlib.sha256(data).hexdigest()
    store.upload(path, io.BytesIO(data), metadata={"sha256": sha})
    return {"path": path, "num_samples": len(items) - len(skipped), "sha256": sha, "bytes": len(data), "skipped": skipped}


def _plan_id(source: Source, fmt: str, opts: ShardOptions) -> str:
    desc = json.dumps([VERSION, source.fingerprint, fmt, opts.quality, opts.samples_per_shard,
                       {s: len(v) for s, v in source.splits.items()}])
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def load_manifest(dest: str, ep: Endpoint | None = None, store: Store | None = None) -> dict:
    store = store or open_store(dest, ep)
    try:
        m = json.loads(store.read(MANIFEST))
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {store.url(MANIFEST)}: shard a data set there with `selfsup shard`") from None
    except ValueError as e:
        raise ManifestError(f"manifest at {store.url(MANIFEST)} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        m = m if isinstance(m, dict) else {}
        raise ManifestError(f"manifest at {store.url(MANIFEST)} has format {m.get('format')!r} version "
                            f"{m.get('version')!r}; this selfsup reads {FORMAT!r} version {VERSION}")
    _shard_entries(m, store.url(MANIFEST))
    return m


def _shard_entries(m: dict, where: str) -> list[dict]:
    """Every shard a manifest (or a sharding progress file) lists, each path checked to be a
    relative name inside DEST: a crafted `../../x` or `/etc/x` never reaches a read or a delete."""
    try:
        shards = [s for split in m.get("splits", {}).values() for s in split["shards"]] + list(m.get("done", []))
        for s in shards:
            check_key(s["path"], "shard path")
            if not isinstance(s.get("num_samples", 0), int) or not isinstance(s.get("sha256", ""), str):
                raise ValueError(f"shard {s['path']!r} has a malformed entry")
    except StorageError as e:
        raise ManifestError(f"{where}: {e}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where} is malformed ({type(e).__name__}: {e})") from None
    return shards


def write_shards(source: Source, dest: str, opts: ShardOptions, ep: Endpoint | None = None,
                 progress: bool = True, log=print, on_ray: bool = False) -> dict:
    """Shard `source` into `dest`; resumes a previous run of the same plan. Returns the manifest.
    One writer at a time: a second one fails naming the first (locks.py). `on_ray`: the shards are
    built as Ray Data tasks across the cluster (the same bytes; the source must be readable there)."""
    store = open_store(dest, ep, create=True)
    fmt = opts.fmt or ("png" if source.mode == "L" else "jpg")
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image format {fmt!r} is not one of png, jpg")
    if opts.samples_per_shard < 1:
        raise ValueError(f"samples per shard must be >= 1, got {opts.samples_per_shard}")
    with locked(store, "selfsup shard") as lock:
        return _write(source, store, fmt, opts, lock, progress, log, on_ray)


def _write(source: Source, store: Store, fmt: str, opts: ShardOptions, lock: Lock, progress: bool, log,
           on_ray: bool) -> dict:
    from tqdm import tqdm

    plan = _plan_id(source, fmt, opts)

    done: dict[str, dict] = {}
    for name in (MANIFEST, PROGRESS):
        if not store.exists(name):
            continue
        try:
            old = json.loads(store.read(name))
        except ValueError as e:
            raise ManifestError(f"{store.url(name)} is not valid JSON ({e}); remove it to shard here") from None
        if not isinstance(old, dict):
            raise ManifestError(f"{store.url(name)} is not a selfsup manifest; remove it to shard here")
        old_shards = _shard_entries(old, store.url(name))
        if old.get("plan") == plan:
            done.update({s["path"]: s for s in old_shards})
        elif not opts.overwrite:
            raise StorageError(f"{store.url(name)} describes a different data set (source {old.get('source')!r}); "
                               "pass --overwrite to replace it")
        else:
            # Drop the old manifest first, so nothing ever points at a shard being rewritten.
            store.delete(name)
            for s in old_shards:
                store.delete(s["path"])

    jobs = []  # (path, split, first index, items)
    for split, items in source.splits.items():
        for n, start in enumerate(range(0, len(items), opts.samples_per_shard)):
            jobs.append((f"{split}/shard-{n:06d}.tar", split, start, items[start:start + opts.samples_per_shard]))

    results: dict[str, dict] = {}
    todo = []
    for job in jobs:
        prev = done.get(job[0])
        if prev and store.sha256(job[0]) == prev["sha256"]:
            results[job[0]] = prev
        else:
            todo.append(job)
    if results:
        log(f"resuming: {len(results)} of {len(jobs)} shards already present with matching sha256")

    bar = tqdm(total=sum(len(j[3]) for j in todo), unit="img", disable=not progress, desc=f"sharding to {store.uri}")
    last_save = 0.0

    def save_progress(force: bool = False) -> None:
        nonlocal last_save
        if force or time.monotonic() - last_save > 2.0:
            store.write(PROGRESS, json.dumps({"plan": plan, "source": source.name, "done": list(results.values())}).encode())
            last_save = time.monotonic()

    def record(r: dict) -> None:
        if r["path"] not in results:
            results[r["path"]] = r
            bar.update(r["num_samples"] + len(r["skipped"]))
            save_progress()

    try:
        if on_ray:
            _on_ray(source, store, fmt, opts.quality, todo, record, log)
        else:
            _local(source, store, fmt, opts, todo, record)
    finally:
        bar.close()
        save_progress(force=True)  # interrupted or not: a re-run resumes from every shard recorded

    splits = {}
    for split in source.splits:
        shards = [{k: v for k, v in results[j[0]].items() if k != "skipped"} for j in jobs if j[1] == split]
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
        if not splits[split]["num_samples"]:  # no manifest: an empty data set is not a data set
            skipped = [s for j in jobs if j[1] == split for s in results[j[0]]["skipped"]]
            first = f"; first: {skipped[0]['error']}" if skipped else ""
            raise SourceError(f"split {split!r} of {source.name} has no readable image ({len(skipped)} skipped{first})")
    manifest = {
        "format": FORMAT, "version": VERSION, "plan": plan, "source": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({} if source.labeled else {"labels": "none"}),
        "class_names": source.class_names,
        "image": {"mode": source.mode, "format": fmt, "size": list(source.size) if source.size else None},
        "splits": splits,
        "skipped": [s for r in results.values() for s in r.get("skipped", [])],
    }
    lock.check()
    for split in splits.values():  # what the manifest says is what DEST holds
        for shard in split["shards"]:
            if store.sha256(shard["path"]) != shard["sha256"]:
                raise StorageError(f"{store.url(shard['path'])} does not match the shard written (another writer?): "
                                   "the manifest is not written; shard again")
    store.write(MANIFEST, json.dumps(manifest, indent=1).encode())
    store.delete(PROGRESS)
    return manifest


def _local(source: Source, store: Store, fmt: str, opts: ShardOptions, todo: list, record) -> None:
    """Shards built by a thread pool here, each `record`ed as it finishes (a few in flight)."""
    n = max(1, opts.workers)
    pool, submitted, pending = ThreadPoolExecutor(n), [], set()
    build = partial(build_shard, source, store, fmt, opts.quality)
    try:
        for job in todo:
            submitted.append(pool.submit(build, job))
            pending.add(submitted[-1])
            if len(pending) >= 2 * n:  # bounded in flight: memory stays at a few shards
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    if f.exception() is None:
                        record(f.result())
                for f in finished:
                    f.result()  # a failure surfaces once every success beside it is recorded
        for f in pending:
            record(f.result())
    finally:
        # interrupted: the shards that finished meanwhile count too
        pool.shutdown(wait=True, cancel_futures=True)
        for f in submitted:
            if f.done() and not f.cancelled() and f.exception() is None:
                record(f.result())


def _on_ray(source: Source, store: Store, fmt: str, quality: int, todo: list, record, log) -> None:
    """The same shards built as Ray Data tasks, one per shard, on every node of the cluster: each
    task encodes its images (reading them where it runs) and uploads its shard to DEST."""
    import ray
    import ray.data

    if not todo:
        return
    dest, ep = store.uri, getattr(store, "ep", None)
    source = dataclasses.replace(source, splits={})  # every task gets the source: its items travel in the rows
    rows = [{"path": p, "split": sp, "start": st, "refs": [it.ref for it in items], "labels": [it.label for it in items]}
            for p, sp, st, items in todo]

    def build(row: dict) -> dict:
        items = [Item(r, int(y)) for r, y in zip(row["refs"], row["labels"])]
        out = build_shard(source, open_store(dest, ep), fmt, quality, (row["path"], row["split"], int(row["start"]), items))
        return {"result": json.dumps(out), "node": ray.get_runtime_context().get_node_id()}

    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = set()
    for row in ray.data.from_items(rows, override_num_blocks=len(rows)).map(build).iter_rows():
        nodes.add(row["node"])
        record(json.loads(row["result"]))
    log(f"sharded on Ray: {len(todo)} tasks on {len(nodes)} node(s)")


def count_samples(data: bytes) -> int:
    """Samples with an image in a shard's bytes; raises tarfile.TarError when the tar is damaged."""
    return sum(sample_image(parts) is not None for parts in group_samples(data).values())


def verify(dest: str, ep: Endpoint | None = None, workers: int = 8, decode: bool = False) -> tuple[dict, list[str]]:
    """Re-read every shard the manifest lists; return (manifest, one line per bad shard). With
    `decode`, also decode every image (a sha256 taken after the damage cannot see it)."""

    store = open_store(dest, ep)
    manifest = load_manifest(dest, store=store)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]

    def check(s: dict) -> str | None:
        try:
            data = store.read(s["path"])
        except FileNotFoundError:
            return f"{store.url(s['path'])}: missing"
        sha = hashlib.sha256(data).hexdigest()
        if sha != s["sha256"]:
            return f"{store.url(s['path'])}: sha256 {sha[:12]}… does not match the manifest's {s['sha256'][:12]}…"
        try:
            n = count_samples(data)
        except (tarfile.TarError, OSError, EOFError) as e:
            return f"{store.url(s['path'])}: unreadable tar ({e})"
        if n != s["num_samples"]:
            return f"{store.url(s['path'])}: {n} samples, manifest says {s['num_samples']}"
        if decode:
            try:
                shard_samples(data, name=store.url(s["path"]), schema=Schema.of(manifest))
            except CorruptShard as e:
                return str(e)
        return None

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(check, shards) if p]
    return manifest, problems


def summary(manifest: dict) -> str:
    img = manifest["image"]
    size = "x".join(map(str, img["size"])) if img["size"] else "mixed sizes"
    labels = "unlabeled" if manifest.get("labels") == "none" else f"{len(manifest['class_names'])} classes"
    lines = [f"source {manifest['source']}: {labels}, {img['mode']} {size}, {img['format']}"]
    for name, split in manifest["splits"].items():
        total = sum(s["bytes"] for s in split["shards"])
        lines.append(f"  {name}: {split['num_samples']} samples in {len(split['shards'])} shards, {total / 1e6:.1f} MB")
    if manifest["skipped"]:
        lines.append(f"  skipped {len(manifest['skipped'])} unreadable images or shards (listed in manifest.json)")
    return "\n".join(lines)

