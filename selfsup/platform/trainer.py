"""The driver of a training run: storage, Ray Data stream, TorchTrainer, run summary.

Rerunning with the same `storage.name` resumes that run from its latest good checkpoint.
Works on a local Ray cluster (started here when none is given) and under `ray job submit`.
The run's status always says how it ended (see runs.py): the driver writes `finished`, `failed`
with the cause, `interrupted` (Ctrl-C) or `terminated` (SIGTERM), and a heartbeat while it lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone

import ray.train

from selfsup.methods import METHODS
from selfsup.pipelines.shards import load_manifest
from selfsup.pipelines.endpoints import Endpoint, environ, resolve_endpoint
from selfsup.pipelines.storage import Store, fs_and_path, is_s3, join, open_store
from selfsup.platform.checkpoints import prune, write_manifest
from selfsup.platform.config import Config, ConfigError, to_yaml, validate
from selfsup.platform.elastic import NODE_HEALTH, fast_coordinator, lean_trainer, train_env
from selfsup.platform.runs import (CONFIG, HEARTBEAT_S, METRICS, SUMMARY, RunError, RunFailed, merge_row, now, one_line_cause,
                                   read_metrics, read_summary, summarise, write_heartbeat)
from selfsup.platform.teacher import check_teacher
from selfsup.platform.tokenizer import fit_tokenizer
from selfsup.platform.trackers import TrackerLog, Trackers, close_trackers, open_trackers

log_ = logging.getLogger("selfsup.train")


class Terminated(BaseException):
    """SIGTERM reached the driver (`ray job stop`, a scheduler): the run ends as `terminated`."""


def unrecoverable(errors: dict[int, BaseException], previous: str | None) -> str | None:
    """The cause to end the run with, when restarting the worker group cannot fix this failure:
    a divergence or (with data.strict) a corrupt shard, or the same exception raised by the
    training code twice in a row with no report in between (`previous` is the last failure's
    cause, None after progress). A worker or node that died is always retried."""
    from ray.exceptions import NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError, WorkerCrashedError

    from selfsup.pipelines.decode import CorruptShard
    from selfsup.platform.train_loop import Diverged

    died = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError)
    if any(isinstance(e, died) for e in errors.values()):
        return None  # a process died (killed, out of memory, node lost): a restart may well succeed
    for rank in sorted(errors):
        if isinstance(errors[rank], (Diverged, CorruptShard)):
            return one_line_cause(errors[rank])
    cause = one_line_cause(errors[min(errors)])
    return cause if cause == previous else None


class StopStreams(ray.train.UserCallback):
    """Runs on the Ray Train controller: when a worker group fails, its epoch streams stop at once.
    They belong to the run's stream owner (train_loop.EpochStreams), so they would go on decoding
    for workers that are gone, on CPUs the next group needs: one decode task on the node a killed
    worker freed held the new group's placement back ~7 s (a diagnostic run of tests/elastic_run.py on
    2 cores; benchmarks/RESULTS.md)."""

    def __init__(self, owner: str):
        self.owner = owner

    def after_exception(self, run_context, worker_exceptions):
        with contextlib.suppress(Exception):  # not waited for: the restart goes on meanwhile
            ray.get_actor(self.owner).stop.remote()


class MetricsLog(ray.train.UserCallback):
    """Runs on the Ray Train controller: keeps metrics.jsonl and summary.json of the run, and
    ends the run on a failure that a restart cannot fix (instead of train.max_failures restarts
    into the same error)."""

    def __init__(self, run_uri: str, ep: Endpoint | None, summary: dict, keep: int | None, trackers: Trackers | None):
        self.run_uri, self.ep, self.base, self.keep, self.trackers = run_uri, ep, summary, keep, trackers
        self._store: Store | None = None
        self._tracker_log: TrackerLog | None = None
        self.rows: list[dict] | None = None
        self.failure: str | None = None  # the last failure's cause, until the next report
        self.restarts = 0  # worker-group restarts after a failure

    def after_exception(self, run_context, worker_exceptions):
        cause = unrecoverable(worker_exceptions, self.failure)
        self.failure = one_line_cause(worker_exceptions[min(worker_exceptions)])
        if cause:
            # A ControllerError is never retried: the controller ends the run with it, quietly.
            raise ray.train.ControllerError(RunFailed(cause))
        # in the summary from the next report on: the console says "recovered" once it has (one
        # line per error: a failure the run does not recover from is the run's error line)
        self.restarts += 1
        self.base = {**self.base, "restarts": self.restarts, "last_failure": self.failure}

    def _load(self) -> Store:
        if self._store is None:
            self._store = open_store(self.run_uri, self.ep)
            self.rows = read_metrics(self._store)
        return self._store

    def after_report(self, run_context, metrics, checkpoint):
        self.failure = None
        store = self._load()
        row = dict(metrics[0])  # rank 0 reports the run's metrics; the others report the same step
        if "kind" not in row:
            return
        files = row.pop("checkpoint_files", None)
        if checkpoint is not None and files:
            write_manifest(store, row["checkpoint"], files)  # Ray has committed the upload: now it counts
            try:
                prune(store, self.keep)
            except Exception as e:  # a checkpoint too many is no reason to stop training
                log_.warning("could not delete old checkpoints of %s: %s", self.run_uri, one_line_cause(e))
        self.rows = merge_row(self.rows, row)
        store.write(METRICS, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        if self.trackers is not None:
            self._tracker_log = self._tracker_log or TrackerLog(self.trackers, store)
            self._tracker_log.log(row)
        # A report still in flight when the driver ended the run must not turn its status back.
        if _stored_status(store) in (None, "running"):
            store.write(SUMMARY, json.dumps(summarise(self.rows, {**self.base, "status": "running"}), indent=1).encode())


def _stored_status(store: Store) -> str | None:
    try:
        return json.loads(store.read(SUMMARY)).get("status")
    except Exception:
        return None


def run_name(cfg: Config) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method.name}-{cfg.model.name}-{stamp}"


def _check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer fails here in seconds, instead of ray.init retrying."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"RAY_ADDRESS {address!r} is not host:port (or ray://host:port, auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RunError(f"the Ray cluster at RAY_ADDRESS={address} does not answer ({e.strerror or e}); "
                       "unset RAY_ADDRESS to train on a local cluster") from None


# Workers' and actors' output stays in Ray's log files (`ray logs`, the Ray dashboard), not on the
# console: a line per report, Ray Data's plans, internal warnings. What matters reaches the user
# otherwise: the progress line and each recovered failure (console.py, from MetricsLog), and the
# error that ends a run, raised here as an exception. The driver's own Ray logger: errors only.
QUIET = {"log_to_driver": False, "logging_level": logging.ERROR}


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster RAY_ADDRESS names (ray job submit sets it), else start a local one on
    127.0.0.1. True when the cluster is local to this process (its resources are all there is)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # An explicit level on the loggers that talk while the driver starts: the "ray" logger's own
    # level was seen back at INFO by then ("Started a local Ray instance" with two `selfsup train`
    # starting at once), and a child's own level holds whatever its parent's is.
    for name in ("ray._private.worker", "ray._private.authentication"):
        logging.getLogger(name).setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return not address
    if address:
        _check_ray_address(address)
        try:
            ray.init(address=address, **QUIET)
        except ConnectionError as e:
            raise RunError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {str(e).splitlines()[0]}") from None
        return False
    # With the dashboard: Ray Train's placement-group cleaner polls the state API it serves and
    # logs a warning every second without it. It also lets users watch the run at :8265.
    # address="local": with no address, ray.init joins the cluster named in Ray's temp dir
    # (ray_current_cluster), which a cluster that died without `ray stop` leaves behind.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _system_config=NODE_HEALTH, **QUIET)
    return True


def join_cluster() -> bool:
    """Join the Ray cluster RAY_ADDRESS names (`ray job submit` sets it) and say so; False without
    one: `shard` and `shard index` then run in a thread pool here (a local Ray would only add its start)."""
    if not os.environ.get("RAY_ADDRESS"):
        return False
    ensure_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its start and end of every dataset, at INFO
    return True


def worker_resources(cfg: Config) -> dict[str, float]:
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {}),
            **{k: v for k, v in s.extra_resources_per_worker.items() if v}}


def check_resources(cfg: Config, fixed: bool) -> None:
    """Fail at once when the cluster can never place the run's minimum of workers (on a fixed-size
    cluster; one with an autoscaler may still grow, so there it is a warning)."""
    import ray

    s = cfg.scaling
    need = worker_resources(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fit = sum(int(min(r.get(k, 0.0) / v for k, v in need.items()) + 1e-9) for r in nodes)
    minimum = s.min_workers or s.num_workers
    if fit >= minimum:
        return
    have = ", ".join(f"{k} {sum(r.get(k, 0.0) for r in nodes):g} (at most {max((r.get(k, 0.0) for r in nodes), default=0):g} "
                     f"on one node)" for k in need)
    msg = (f"the run needs {minimum} worker(s) of {', '.join(f'{k} {v:g}' for k, v in need.items())} "
           f"(scaling.cpus_per_worker, gpus_per_worker, extra_resources_per_worker) but the Ray cluster has {have} across "
           f"{len(nodes)} node(s): room for {fit}")
    if fixed:
        raise ConfigError(msg)
    log_.warning("%s; waiting for the cluster to grow", msg)


def preflight(cfg: Config, manifest: dict, ep: Endpoint | None, log=print) -> tuple[Config, int]:
    """Everything checkable before Ray starts; returns the config to run (the kNN off on an
    unlabeled set without eval.data_uri) and the train split's size."""
    splits = manifest["splits"]
    if cfg.data.train_split not in splits:
        raise ConfigError(f"data.train_split {cfg.data.train_split!r} is not a split of {cfg.data.uri} "
                          f"(it has {', '.join(splits)})")
    if cfg.eval.knn:
        labeled = manifest if cfg.eval_uri() == cfg.data.uri else load_manifest(cfg.eval_uri(), ep)
        if labeled.get("labels") == "none":
            if cfg.eval.data_uri:
                raise ConfigError(f"eval.data_uri {cfg.eval.data_uri} has no labels: the kNN needs a labeled set")
            log(f"warning: {cfg.data.uri} has no labels, so the kNN is off: give a labeled set as eval.data_uri to "
                "score the run")
            cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"knn": False})})
        else:
            for key, split in {"eval.train_split": cfg.eval.train_split, "eval.test_split": cfg.eval.test_split}.items():
                if split not in labeled["splits"]:
                    raise ConfigError(f"{key} {split!r} is not a split of {cfg.eval_uri()} "
                                      f"(it has {', '.join(labeled['splits'])})")
    if "teacher" in METHODS[cfg.method.name].Params.model_fields:  # distill
        check_teacher(cfg, ep)
    n_train = splits[cfg.data.train_split]["num_samples"]
    if n_train < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is larger than split {cfg.data.train_split!r} "
                          f"of {cfg.data.uri} ({n_train} samples)")
    return cfg, n_train


@contextlib.contextmanager
def _heartbeat(store: Store):
    """Rewrite the run's heartbeat every HEARTBEAT_S while the block runs (readers tell a live run
    from a driver killed outright by it)."""
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            with contextlib.suppress(Exception):  # storage down for a while: the next beat tries again
                write_heartbeat(store)
            stop.wait(HEARTBEAT_S)

    t = threading.Thread(target=beat, name="selfsup-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


@contextlib.contextmanager
def _sigterm_ends_run():
    def handler(signum, frame):
        raise Terminated()

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, handler) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def _fit(trainer) -> None:
    """trainer.fit() in a helper thread: Ray Train then installs no SIGINT handler of its own (it
    would abort the run and let fit() return as if finished), so Ctrl-C and SIGTERM reach this
    thread as exceptions; the run's controller and workers belong to this driver and end with it."""
    box: dict = {}

    def run():
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread as is
            box["error"] = e

    t = threading.Thread(target=run, name="selfsup-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in box:
        raise box["error"]


def _make_trainer(cfg: Config, ep: Endpoint | None, run_uri: str, base: dict, n_train: int, data_actors: dict,
                  callbacks: list, trackers: Trackers | None = None):
    """The TorchTrainer of the run: workers (elastic between scaling.min_workers and num_workers),
    storage, metrics callback. The data stream is planned per epoch (train_loop.py) by the run's
    stream owner; `data_actors`: the names of it ("streams") and of the data-health actor ("health")."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from selfsup.platform.process_group import LocalStoreTorchConfig
    from selfsup.platform.train_loop import train_func

    s = cfg.scaling
    resources = worker_resources(cfg)
    workers = (s.min_workers, s.num_workers) if s.min_workers and s.min_workers < s.num_workers else s.num_workers
    fs, root_path = fs_and_path(cfg.storage.root, ep)
    return lean_trainer(
        train_loop_per_worker=train_func,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "ep": dataclasses.asdict(ep) if ep else None,
                           "run_uri": run_uri, "n_train": n_train, **data_actors,
                           # test-only: "STEP:N" makes the loss NaN from STEP on, for the first N rollbacks
                           "test_nan": os.environ.get("SELFSUP_TEST_NAN")},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(s.gpus_per_worker),
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=s.resize_check_s),
        torch_config=LocalStoreTorchConfig(),  # DDP's rendezvous store on the node's address, not the wildcard
        run_config=RunConfig(
            name=base["name"], storage_path=root_path, storage_filesystem=fs,
            callbacks=[MetricsLog(run_uri, ep, base, cfg.train.keep_checkpoints, trackers),
                       StopStreams(data_actors["streams"]),
                       *callbacks],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # MetricsLog keeps the newest train.keep_checkpoints *complete* ones (checkpoints.prune)
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per report on the console
        ),
    )


def train(cfg: Config, log=print, callbacks: list = (), show_progress: bool = False,
          tracker_parent: Trackers | None = None) -> dict:
    """Run (or resume) training; returns the run's summary. `callbacks`: more Ray Train
    UserCallbacks (a sweep's trial reports its evaluations to Tune with one); `show_progress`:
    the console's progress line on stderr (`selfsup train`, the demo); `tracker_parent`: the
    MLflow run this one belongs under (a sweep's)."""
    from selfsup.platform.console import progress
    from ray.data import DataContext

    from selfsup.pipelines.streaming import data_health_actor, stream_owner_actor

    ep: Endpoint | None = resolve_endpoint() if is_s3(cfg.data.uri) or is_s3(cfg.eval_uri()) else None
    manifest = load_manifest(cfg.data.uri, ep)  # fails early, naming the URI, before Ray starts
    cfg, n_train = preflight(cfg, manifest, ep, log)
    if ep is None and is_s3(cfg.storage.root):
        ep = resolve_endpoint()
    if ep is not None:  # from here on an endpoint away for a while is waited for
        ep = dataclasses.replace(ep, retry_s=cfg.storage.retry_s)
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
    write_heartbeat(store)
    store.write(SUMMARY, json.dumps({**previous, **base, "status": "running"}, indent=1).encode())
    log(f"run {name}: {run_uri}" + (" (resuming)" if previous else ""))
    trackers = open_trackers(cfg.train.loggers, store, run_uri, name, cfg.model_dump(mode="json"), tracker_parent,
                             lambda line: log(f"warning: {line}"))

    status, error, actors = "failed", None, []
    try:
        with _heartbeat(store):
            fixed = ensure_ray()
            with _sigterm_ends_run():  # after ray.init: its local node sets a SIGTERM handler of its own
                check_resources(cfg, fixed)
                DataContext.get_current().enable_progress_bars = False  # the console has one progress line
                names = {"health": f"selfsup-data-health-{name}", "streams": f"selfsup-data-streams-{name}"}
                actors = [data_health_actor(names["health"]), stream_owner_actor(names["streams"])]
                fast_coordinator()
                with environ(train_env(cfg)), progress(store) if show_progress else contextlib.nullcontext():
                    _fit(_make_trainer(cfg, ep, run_uri, base, n_train, names, list(callbacks), trackers))
        status = "finished"
    except KeyboardInterrupt:
        status, error = "interrupted", "stopped by Ctrl-C"
        _stop_training()
        raise
    except Terminated:
        status, error = "terminated", "stopped by SIGTERM"
        _stop_training()
        raise
    except BaseException as e:
        error = one_line_cause(e)
        raise
    finally:
        # After Ctrl-C or SIGTERM Ray is already shut down (the actor went with it): touching it
        # then can end the process from Ray's C++ side ("core worker has already been shutdown", exit 1).
        if ray.is_initialized():
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        summary = summarise(_rows_or_none(store), {**base, "status": status})
        summary["wall_time_s"] = round(base["wall_time_s_before"] + time.time() - started, 1)
        summary.pop("wall_time_s_before")
        if error:
            summary["error"] = error[:2000]
        with contextlib.suppress(Exception):  # storage gone: the error in flight matters more
            store.write(SUMMARY, json.dumps(summary, indent=1).encode())
        close_trackers(trackers, status, lambda line: log(f"warning: {line}"))
    return summary


def _stop_training() -> None:
    """End the run's controller and workers now: they belong to this driver, and leaving Ray ends
    them (and the cluster, when this process started it), so no report lands after the status."""
    with contextlib.suppress(Exception):
        ray.shutdown()


def _rows_or_none(store: Store) -> list[dict]:
    try:
        return read_metrics(store)
    except Exception:
        return []
