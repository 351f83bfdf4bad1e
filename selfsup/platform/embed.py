"""`selfsup embed`: a run's backbone over a whole data set, written as Parquet (Ray Data batch inference).

    read_split (one per split: decoded samples with their WebDataset keys)
      -> map_batches(Embedder, an actor pool of N): actors that each load the backbone once
      -> write_parquet(OUT/<split>/): key, label (null without one), split, embedding (float32 list)

The features are the evaluator's (`selfsup eval knn` gets the same from the same checkpoint): each
image's centre square at the run's eval size, normalised as in training. They are not L2-normalised:
normalise them for cosine similarity, as the kNN does.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings

import numpy as np

from selfsup.pipelines.endpoints import Endpoint, resolve_endpoint
from selfsup.pipelines.shards import load_manifest
from selfsup.pipelines.storage import fs_and_path, is_s3, open_store
from selfsup.pipelines.streaming import read_split
from selfsup.platform.evaluate import load_run
from selfsup.platform.runs import RunError

POLL_S = 1.0


class Embedder:
    """The backbone of a run's checkpoint, loaded once per actor; a batch of decoded samples in,
    a pyarrow table of the output's columns out."""

    def __init__(self, run_uri: str, checkpoint: str | None, teacher: bool, split: str, counter, ep: Endpoint | None):
        import ray
        import torch

        from selfsup.platform.step import autocast_dtype

        cfg, method, _ = load_run(run_uri, ep, checkpoint)
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        # Ray gives a fractional CPU one thread; a whole number of CPUs as many
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.backbone = (method.teacher_backbone if teacher else method.backbone).to(self.device).eval()
        self.args = (cfg.eval.image_size or cfg.view_size(), cfg.data.mean, cfg.data.std, cfg.model.in_chans,
                     self.device, autocast_dtype(cfg, self.device))
        self.split, self.counter = split, counter

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        from selfsup.platform.evaluate import batch_features

        images = [torch.from_numpy(np.ascontiguousarray(im)) for im in batch["image"]]
        f = batch_features(self.backbone, images, *self.args).cpu().numpy()
        labels = np.asarray(batch["label"], np.int64)
        self.counter.add.remote(len(f))
        return pa.table({
            "key": pa.array([str(k) for k in batch["key"]], pa.string()),
            "label": pa.array(labels, pa.int64(), mask=labels < 0),
            "split": pa.array([self.split] * len(f), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1), pa.float32()), f.shape[1]),
        })


def _counter():
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def count(self) -> int:
            return self.n

    return Counter.remote()


def _show_progress(counter, total: int, split: str, stop: threading.Event, stream) -> None:
    """One line on stderr, rewritten in place on a terminal, else every 30 s."""
    import ray

    t0, plain_at = time.monotonic(), 0.0
    while not stop.wait(POLL_S):
        n, wall = ray.get(counter.count.remote()), time.monotonic() - t0
        line = f"embed {split}: {n:,}/{total:,} images · {n / wall:,.0f} img/s · {wall:.0f} s"
        if stream.isatty():
            stream.write("\r\033[K" + line)
        elif wall - plain_at >= 30:
            stream.write(line + "\n")
            plain_at = wall
        stream.flush()
    if stream.isatty():
        stream.write("\r\033[K")


def embed(run_uri: str, data_uri: str, out: str, splits: list[str] | None = None, batch_size: int = 256,
          workers: int = 1, gpus_per_worker: float = 0, cpus_per_worker: float = 1, checkpoint: str | None = None,
          teacher: bool = False, overwrite: bool = False, progress: bool = False, ep: Endpoint | None = None) -> dict:
    """Embed `splits` (default: every split) of the shards at `data_uri` with the backbone of a run's
    newest good checkpoint (or `checkpoint`; the EMA teacher's with `teacher`); Parquet under
    `out/<split>/`. `workers` actors hold the model, each with `cpus_per_worker` CPUs (its torch
    threads) and `gpus_per_worker` GPUs; the shards are read and decoded by Ray Data tasks beside
    them, which need a CPU of their own. Returns {split: rows} and where they went. RunError (one
    line) for bad input."""
    import pyarrow.dataset as pads
    import ray
    import ray.data

    from selfsup.platform.trainer import ensure_ray

    if batch_size < 1 or workers < 1 or gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise RunError(f"--batch-size and --workers must be at least 1, --gpus-per-worker at least 0 and "
                       f"--cpus-per-worker more than 0, got {batch_size}, {workers}, {gpus_per_worker:g}, "
                       f"{cpus_per_worker:g}")
    if ep is None and any(map(is_s3, (run_uri, data_uri, out))):
        ep = resolve_endpoint()
    manifest = load_manifest(data_uri, ep)
    splits = splits or list(manifest["splits"])
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:
        raise RunError(f"split {missing[0]!r} is not in {data_uri} (it has {', '.join(manifest['splits'])})")
    store = open_store(out, ep, create=True)
    if store.list() and not overwrite:
        raise RunError(f"{out} already holds files: pass --overwrite to replace them")
    cfg, method, _ = load_run(run_uri, ep, checkpoint)  # fails here, in one line, before any actor starts
    if teacher and not hasattr(method, "teacher_backbone"):
        raise RunError(f"method {cfg.method.name!r} has no teacher (--teacher is for DINO-style runs)")
    dim = (method.teacher_backbone if teacher else method.backbone).num_features
    del method  # the actors load their own
    for key in store.list():
        store.delete(key)
    ensure_ray()
    # Ray Data's start and end of every dataset (INFO) and "progress bars disabled" (WARNING): the
    # console has our progress line; a failure comes back raised
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    fs, root = fs_and_path(out, ep)
    rows = {}
    t0 = time.perf_counter()
    for split in splits:
        counter = _counter()
        ds = read_split(data_uri, split, ep, seed=None, strict=cfg.data.strict, keys=True)
        with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(Embedder, batch_size=batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                # Ray Data hands its actors their arguments by reference, and the driver's
                                # core worker prints an error line for each such actor that may restart. An
                                # actor that dies fails the embed instead (nothing is lost: rerun it).
                                max_restarts=0,
                                fn_constructor_kwargs={"run_uri": run_uri, "checkpoint": checkpoint, "teacher": teacher,
                                                       "split": split, "counter": counter, "ep": ep})
        stop = threading.Event()
        shower = threading.Thread(target=_show_progress, daemon=True,
                                  args=(counter, manifest["splits"][split]["num_samples"], split, stop, sys.stderr))
        if progress:
            shower.start()
        try:
            with warnings.catch_warnings():  # a split of fewer shards than --workers: fewer actors have work
                warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
                ds.write_parquet(f"{root}/{split}", filesystem=fs)
        finally:
            stop.set()
            if progress:
                shower.join()
        ray.kill(counter)
        # From the files' footers: the counter would count a batch twice were its task retried
        rows[split] = pads.dataset(f"{root}/{split}", filesystem=fs, format="parquet").count_rows()
    return {"run": run_uri, "data": data_uri, "out": out, "rows": rows, "dim": dim,
            "backbone": "teacher" if teacher else "student", "time_s": round(time.perf_counter() - t0, 1)}
