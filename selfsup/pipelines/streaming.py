"""Ray Data: shards in object storage -> decoded images -> SSL views, streamed to Ray Train workers.

    read_binary_files (one epoch: shard order a function of (seed, epoch); one shard per row)
      -> decode_shards: check sha256 against the manifest, untar, decode to uint8 (C, H, W),
         leave out the samples a resumed epoch has already trained on
      -> with a view spec: its augmentations, batched (see views.py for the batch keys)

The trainer builds one such dataset per epoch, so a restarted run reads exactly the shards and
samples the interrupted epoch had left (see platform/train_loop.py's DataPosition). A run-long
`StreamOwner` actor plans and owns those streams, so that a restart reuses what the stream it
replaces had started (see stream_owner_actor).

A corrupt, truncated or missing shard is skipped with a warning naming it and recorded in the
`DataHealth` actor (the platform reports its count in the run's metrics); `strict=True` raises
instead, naming the shard.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

from selfsup.pipelines.decode import CorruptShard, Schema, shard_samples
from selfsup.pipelines.shards import load_manifest
from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import fs_and_path, is_s3

# torch is imported where it is used: Ray Data's split coordinator (an actor per epoch's stream)
# unpickles decode_shards, so imports this module, and needs none of torch (2.7 s on a busy core).
if TYPE_CHECKING:
    import torch

log = logging.getLogger("selfsup.data")
# Ray Data retries a task whose worker died forever by default; a process that crashes on some
# input must fail the read after a few tries instead of hanging the run.
DATA_TASK_RETRIES = 3


def _to_column(images: list[torch.Tensor]):
    if len({tuple(im.shape) for im in images}) <= 1:
        return np.stack([im.numpy() for im in images]) if images else np.zeros((0, 1, 1, 1), np.uint8)
    col = np.empty(len(images), dtype=object)  # ragged: Ray keeps a variable-shaped tensor column
    col[:] = [im.numpy() for im in images]
    return col


def collate_decoded(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch of decoded samples (one image size, or several) as the `decoded` batch of views.py:
    uint8 images zero-padded to the batch's largest, and each one's (H, W)."""
    import torch

    images = batch["image"]
    out = {k: torch.from_numpy(np.asarray(batch[k])) for k in ("index", "label") if k in batch}
    if images.dtype != object:  # one size: already a (B, C, H, W) array
        x = torch.from_numpy(np.ascontiguousarray(images))
        out.update(image=x, size=torch.tensor([x.shape[-2:]]).expand(len(x), 2).contiguous())
        return out
    sizes = torch.tensor([im.shape[-2:] for im in images])
    H, W = sizes.max(0).values.tolist()
    x = torch.zeros(len(images), images[0].shape[0], H, W, dtype=torch.uint8)
    for i, im in enumerate(images):
        x[i, :, : im.shape[1], : im.shape[2]] = torch.from_numpy(im)
    out.update(image=x, size=sizes)
    return out


def decoded_collate():
    """collate_decoded as Ray Data's collate class for iter_torch_batches (which then pins and moves
    the tensors to the trainer's device as with its own collation)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class DecodedCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate_decoded(batch)

    return DecodedCollate()


def _report_bad(health: str | None, path: str, error: str) -> None:
    log.warning("skipping shard %s", error)
    if health:
        import ray

        try:
            # Waited for (a failure path only): counted before the epoch can end.
            ray.get(ray.get_actor(health).report.remote(path, error), timeout=30)
        except ValueError:
            pass  # no health actor in this job: the warning is all we can do


def decode_shards(batch: dict, sha: dict[str, str], strict: bool, health: str | None, spec=None,
                  batch_size: int = 256, seen: bytes | None = None, starts: dict[str, int] | None = None,
                  schema: Schema = Schema(), keys: bool = False):
    """Shards -> decoded samples (index, image, label), or -> views when `spec` is given.

    One function for both so that Ray runs each shard in its own task and streams its output in
    blocks of `batch_size`: as two fused map stages, Ray bundles every shard into one task.
    `spec`: the view spec's fields (`model_dump()`), not the model: the split coordinator unpickles
    these arguments too, and the model's module would import torch there (~2.5 s of a busy core
    in every new stream). `seen`: a bitmap (np.packbits) of sample indices to leave out. `starts`:
    each shard's first sample index; `schema`: how its samples read (decode.Schema); `keys`: a `key`
    column of WebDataset keys (decoded samples only)."""
    done = np.unpackbits(np.frombuffer(seen, np.uint8)).astype(bool) if seen else None
    if spec is not None:
        from selfsup.pipelines.views import VIEW_KINDS, Plain

        spec = {**VIEW_KINDS, "plain": Plain}[spec["kind"]].model_validate(spec)
    for data, path in zip(batch["bytes"], batch["path"]):
        names = [] if keys else None
        try:
            idx, images, labels = shard_samples(data, sha.get(path), path, schema, (starts or {}).get(path, 0), names)
        except CorruptShard as e:
            if strict:
                raise
            _report_bad(health, path, str(e))
            continue
        if done is not None:
            keep = [i for i, k in enumerate(idx) if k >= len(done) or not done[k]]
            idx, images, labels = [idx[i] for i in keep], [images[i] for i in keep], [labels[i] for i in keep]
            names = names and [names[i] for i in keep]
        for i in range(0, len(idx), batch_size):
            out = {"index": np.asarray(idx[i:i + batch_size], np.int64), "label": np.asarray(labels[i:i + batch_size], np.int64)}
            if names:
                out["key"] = np.asarray(names[i:i + batch_size], dtype=object)
            if spec is None:
                out["image"] = _to_column(images[i:i + batch_size])
            else:
                # A fresh seed per batch: every epoch sees new augmentations (make_views itself
                # is deterministic given its generator; tests rely on that).
                import torch

                from selfsup.pipelines.views import make_views

                g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
                out.update({k: v.numpy() for k, v in make_views(images[i:i + batch_size], spec, g).items()})
            yield out


def shard_paths(manifest_uri: str, split: str, ep: Endpoint | None = None):
    """(pyarrow filesystem, shard paths, {path: sha256}, manifest) of one split."""
    m = load_manifest(manifest_uri, ep)
    if split not in m["splits"]:
        raise KeyError(f"split {split!r} is not in {manifest_uri} (it has {', '.join(m['splits'])})")
    fs, root = fs_and_path(manifest_uri, ep if is_s3(manifest_uri) else None)
    shards = m["splits"][split]["shards"]
    paths = [f"{root}/{s['path']}" for s in shards]
    return fs, paths, {p: s["sha256"] for p, s in zip(paths, shards)}, m


def epoch_order(paths: list[str], seed: int | None, epoch: int) -> list[str]:
    """The order an epoch reads its shards in: a function of (seed, epoch) alone (None: as listed)."""
    if seed is None:
        return list(paths)
    return [paths[i] for i in np.random.default_rng([seed, epoch]).permutation(len(paths))]


def shard_ranges(paths: list[str], manifest: dict, split: str) -> dict[str, tuple[int, int]]:
    """{shard path: (first sample index, end)}: shards hold consecutive indices, in manifest order."""
    out, start = {}, 0
    for p, s in zip(paths, manifest["splits"][split]["shards"]):
        out[p] = (start, start + s["num_samples"])
        start += s["num_samples"]
    return out


def read_split(manifest_uri: str, split: str, ep: Endpoint | None = None, seed: int | None = 0,
               strict: bool = False, health: str | None = None, spec=None, batch_size: int = 256,
               epoch: int = 0, seen: np.ndarray | None = None, keys: bool = False):
    """One epoch of a split as a Ray Dataset: decoded samples (index, image uint8 C,H,W, label), or
    with `spec` the training stream of views (batch keys as views.py documents them). Shards come
    in `epoch_order(seed, epoch)`; `seen` (bool per sample index) leaves out samples already
    trained on, and shards with none left are not read at all (None when no shard is left). `keys`:
    decoded samples also carry their WebDataset `key`."""
    import ray.data
    from pyarrow.fs import FileType

    fs, paths, sha, manifest = shard_paths(manifest_uri, split, ep)
    ranges = shard_ranges(paths, manifest, split)
    for info in fs.get_file_info(paths):
        if info.type != FileType.File:
            if strict:
                raise CorruptShard(f"{info.path}: missing")
            _report_bad(health, info.path, f"{info.path}: missing")
            paths.remove(info.path)
    if not paths:
        raise CorruptShard(f"every shard of split {split!r} of {manifest_uri} is missing")
    paths = epoch_order(paths, seed, epoch)
    packed = None
    if seen is not None and seen.any():
        paths = [p for p in paths if not seen[ranges[p][0]:ranges[p][1]].all()]
        packed = np.packbits(seen).tobytes()
    if not paths:
        return None
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, override_num_blocks=len(paths))
    with warnings.catch_warnings():  # max_retries has no named parameter yet in Ray 2.60
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(decode_shards, batch_size=1, batch_format="numpy", max_retries=DATA_TASK_RETRIES,
                              fn_kwargs={"sha": sha, "strict": strict, "health": health,
                                         "spec": None if spec is None else spec.model_dump(),
                                         "batch_size": batch_size, "seen": packed, "schema": Schema.of(manifest),
                                         "starts": {p: r[0] for p, r in ranges.items()}, "keys": keys})


def data_health_actor(name: str):
    """A named actor that collects the shards skipped as corrupt, for the run's metrics."""
    import ray

    @ray.remote(num_cpus=0)
    class DataHealth:
        def __init__(self):
            self.bad: dict[str, str] = {}

        def report(self, path: str, error: str) -> None:
            self.bad[path] = error

        def bad_shards(self) -> dict[str, str]:
            return dict(self.bad)

    return DataHealth.options(name=name, get_if_exists=True).remote()


def stream_owner_actor(name: str):
    """A named actor that plans a run's epoch streams (read_split, split in equal parts) and owns them.

    Ray ends an actor with the process that owns it, and the workers its tasks leased with it. A
    stream planned in a train worker dies with that worker: the restarted group's stream then starts
    from nothing, a new split coordinator whose decode tasks wait for new worker processes to import
    Ray Data, torch and torchvision (~7 s of a core, in a restart's critical path on 2 busy cores).
    Owned here, for the whole run, a replaced stream is stopped instead: its decode workers go back
    to Ray's pool, warm, and the new stream's tasks run in them. Pinned to the caller's node (the
    driver's), so a lost worker node takes no stream with it. Its streams run with the caller's Ray
    Data settings (`DataContext`), as Ray Train's own datasets do."""
    import ray
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class StreamOwner:
        def __init__(self, context: DataContext):
            DataContext._set_current(context)
            # the view spec's module (torch), which each split() unpickles: imported while the run's
            # workers start, not on the way to the first batch
            import selfsup.pipelines.views  # noqa: F401
            self.streams: list[tuple[str, list]] = []  # (group, splits), oldest first
            self.stopping: list[tuple[list, ray.ObjectRef]] = []  # kept until their executor has stopped

        def split(self, group: str, world: int, read: dict) -> list | None:
            """A new stream of `read_split(**read)` in `world` equal parts for worker group `group`.
            Streams of other groups are stopped, and of this group all but the one it trains on
            now (a group plans the next epoch's stream during the current one)."""
            mine = [s for g, s in self.streams if g == group]
            self._stop([s for g, s in self.streams if g != group] + mine[:-1])
            self.streams = [(group, s) for s in mine[-1:]]
            ds = read_split(**read)
            splits = None if ds is None else ds.streaming_split(world, equal=True)
            if splits is not None:
                self.streams.append((group, splits))
            return splits

        def stop(self) -> None:
            """Stop every stream: their worker group has failed (a new one plans anew)."""
            self._stop([s for _, s in self.streams])
            self.streams = []

        def _stop(self, streams: list[list]) -> None:
            # Stop each coordinator's executor before its last handle goes: its running tasks are
            # cancelled and their workers go back to the pool, not down with their owner. Not
            # waited for: a coordinator may still be starting, and the new stream comes first.
            # (The coordinator is a private attribute of Ray Data's split iterator; Ray is pinned.)
            self.stopping += [(s, s[0]._coord_actor.shutdown_executor.remote()) for s in streams]
            done, _ = ray.wait([ref for _, ref in self.stopping], num_returns=len(self.stopping), timeout=0)
            self.stopping = [(s, ref) for s, ref in self.stopping if ref not in done]

    return StreamOwner.options(
        name=name, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(DataContext.get_current())
