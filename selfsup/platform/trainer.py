"""The driver of a training run: storage, Ray Data stream, TorchTrainer, run summary.

Rerunning with the same `storage.name` resumes that run from its latest good checkpoint.
Works on a local Ray cluster (started here when none is given) and under `ray job submit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone

from selfsup.pipelines.shards import load_manifest
from selfsup.pipelines.storage import Endpoint, fs_and_path, is_s3, join, open_store, resolve_endpoint
from selfsup.methods import METHODS
from selfsup.platform.config import Config, to_yaml, validate
from selfsup.platform.tokenizer import fit_tokenizer
from selfsup.platform.runs import CONFIG, SUMMARY, MetricsLog, now, read_metrics, read_summary, summarise


def run_name(cfg: Config) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method.name}-{cfg.model.name}-{stamp}"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster RAY_ADDRESS names (ray job submit sets it), else start a local one on 127.0.0.1."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # With the dashboard: Ray Train's placement-group cleaner polls the state API it serves and
        # logs a warning every second without it. It also lets users watch the run at :8265.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def train(cfg: Config, log=print) -> dict:
    """Run (or resume) training; returns the run's summary."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfsup.pipelines.streaming import data_health_actor, read_split
    from selfsup.platform.process_group import LocalStoreTorchConfig
    from selfsup.platform.train_loop import train_func

    needs_s3 = is_s3(cfg.data.uri) or is_s3(cfg.storage.root)
    ep: Endpoint | None = resolve_endpoint() if needs_s3 else None
    manifest = load_manifest(cfg.data.uri, ep)  # fails early, naming the URI, before Ray starts
    if cfg.data.train_split not in manifest["splits"]:
        raise KeyError(f"data.train_split {cfg.data.train_split!r} is not in {cfg.data.uri}")
    n_train = manifest["splits"][cfg.data.train_split]["num_samples"]
    name = run_name(cfg)
    run_uri = join(cfg.storage.root, name)
    store = open_store(run_uri, ep, create=True)
    if "tokenizer" in METHODS[cfg.method.name].Params.model_fields and not cfg.method_params().get("tokenizer"):
        # BEiT without a tokenizer: the run's own, fitted once and kept beside the run
        if not store.exists("tokenizer.pt"):
            fit_tokenizer(cfg, join(run_uri, "tokenizer.pt"), ep, log)
        cfg = validate({**cfg.model_dump(mode="json"), "method": {**cfg.method.model_dump(), "tokenizer": join(run_uri, "tokenizer.pt")}})
    previous = read_summary(store)
    store.write(CONFIG, to_yaml(cfg).encode())
    started = time.time()
    base = {"name": name, "method": cfg.method.name, "backbone": cfg.model.name, "data": cfg.data.uri,
            "workers": cfg.scaling.num_workers, "started": previous.get("started", now()),
            "wall_time_s_before": previous.get("wall_time_s", 0.0)}
    store.write(SUMMARY, json.dumps({**previous, **base, "status": "running"}, indent=1).encode())
    log(f"run {name}: {run_uri}" + (" (resuming)" if previous else ""))

    ensure_ray()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # travels with the dataset to Train's workers
    health_name = f"selfsup-data-health-{name}"
    health = data_health_actor(health_name)
    local_bs = cfg.data.batch_size // cfg.scaling.num_workers
    ds = read_split(cfg.data.uri, cfg.data.train_split, ep, seed=cfg.data.seed, strict=cfg.data.strict,
                    health=health_name, spec=cfg.data.views, batch_size=local_bs)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
    workers = (s.min_workers, s.num_workers) if s.min_workers and s.min_workers < s.num_workers else s.num_workers
    fs, root_path = fs_and_path(cfg.storage.root, ep)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "ep": dataclasses.asdict(ep) if ep else None,
                           "run_uri": run_uri, "health": health_name, "n_train": n_train},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(s.gpus_per_worker), resources_per_worker=resources),
        torch_config=LocalStoreTorchConfig(),  # DDP's rendezvous store on the node's address, not the wildcard
        datasets={"train": ds},
        run_config=RunConfig(
            name=name, storage_path=root_path, storage_filesystem=fs,
            callbacks=[MetricsLog(run_uri, ep, base)],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    status, error = "finished", None
    try:
        trainer.fit()
    except Exception as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        import ray

        try:
            ray.kill(health)
        except Exception:
            pass
        summary = summarise(read_metrics(store), {**base, "status": status})
        summary["wall_time_s"] = round(base["wall_time_s_before"] + time.time() - started, 1)
        summary.pop("wall_time_s_before")
        if error:
            summary["error"] = error[:2000]
        store.write(SUMMARY, json.dumps(summary, indent=1).encode())
    return summary
