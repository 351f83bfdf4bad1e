"""Experiment trackers beside metrics.jsonl: `train.loggers: [mlflow, tensorboard]` (off by default).

They get the rows of metrics.jsonl as the Ray Train controller writes them (trainer.MetricsLog),
and the resolved config as parameters.
- mlflow: to MLFLOW_TRACKING_URI, else to an SQLite store, `<run>/mlflow.db` for a run in a local
  folder and `$SELFSUP_HOME/mlflow.db` for one in object storage (`mlflow ui --backend-store-uri
  sqlite:///...`). The driver opens the MLflow run (experiment "selfsup") before training starts and
  ends it with the run's status; a rerun that resumes the run continues its MLflow run (the id is
  kept in the run's trackers.json). A sweep's trials are MLflow runs under the sweep's parent run.
- tensorboard: torch.utils.tensorboard event files, uploaded to `<run>/tensorboard/` after each
  report (`tensorboard --logdir` reads s3:// with its S3 support, or a local copy).
A tracker that cannot be reached is one warning: the run goes on without it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from selfsup.pipelines.storage import Store, is_s3

LOGGERS = ("mlflow", "tensorboard")
EXPERIMENT = "selfsup"
STATE = "trackers.json"
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "terminated": "KILLED"}
log = logging.getLogger("selfsup.trackers")


@dataclass(frozen=True)
class Trackers:
    """What the controller needs to log to the trackers a run has open (plain data: it is pickled)."""

    tensorboard: bool = False
    mlflow_uri: str | None = None
    mlflow_run: str | None = None


def _quiet() -> None:
    # MLflow (which sets its logger to INFO when imported) and its database migrations log at INFO
    # on first use; an unreachable server is retried for minutes by default: one retry, a short
    # timeout, then it is a warning.
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def mlflow_uri(run_uri: str) -> str:
    """MLFLOW_TRACKING_URI, else the local SQLite store of a run (see the module's docstring)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_s3(run_uri):
        from selfsup.pipelines.seaweed import selfsup_home

        folder = selfsup_home()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        folder = Path(run_uri).expanduser().absolute()
    return f"sqlite:///{folder / 'mlflow.db'}"


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A config's sections as MLflow params: `section.key` -> its value as text."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v))[:6000]  # MLflow's limit
    return out


def numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


def _mlflow_run(client, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    from mlflow.entities import Param

    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def open_trackers(loggers: list[str], store: Store, run_uri: str, name: str, config: dict,
                  parent: Trackers | None, warn) -> Trackers | None:
    """On the driver, before training: open (or reopen, on a resume) the run's MLflow run, in the
    store of `parent` and under its run when given (a sweep's). A tracker that cannot be reached is
    `warn`ed about once and left out."""
    if not loggers:
        return None
    uri = run_id = None
    if "mlflow" in loggers:
        try:
            _quiet()
            from mlflow import MlflowClient

            uri = parent.mlflow_uri if parent and parent.mlflow_run else mlflow_uri(run_uri)
            client = MlflowClient(uri)
            state = json.loads(store.read(STATE)) if store.exists(STATE) else {}
            run_id = state.get("mlflow_run") if state.get("mlflow_uri") == uri else None
            if run_id:
                client.update_run(run_id, status="RUNNING")
            else:
                tags = {"selfsup.run": run_uri, **({"mlflow.parentRunId": parent.mlflow_run} if parent else {})}
                run_id = _mlflow_run(client, name, flat_params(config), tags)
                store.write(STATE, json.dumps({"mlflow_uri": uri, "mlflow_run": run_id}, indent=1).encode())
        except Exception as e:
            warn(f"train.loggers: MLflow at {uri or 'MLFLOW_TRACKING_URI'} is not usable ({_cause(e)}): "
                 "the run goes on without it")
            uri = run_id = None
    return Trackers("tensorboard" in loggers, uri, run_id)


def close_trackers(t: Trackers | None, status: str, warn) -> None:
    """On the driver, after training: the MLflow run ends with the run's status."""
    if t is None or not t.mlflow_run:
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(t.mlflow_uri).set_terminated(t.mlflow_run, MLFLOW_STATUS.get(status, "FAILED"))
    except Exception as e:
        warn(f"train.loggers: could not end the MLflow run {t.mlflow_run} ({_cause(e)})")


def _cause(e: Exception) -> str:
    # MLflow's HTTP errors carry urllib3's whole retry story after " with exception "
    text = " ".join(str(e).split()).partition(" with exception ")[0]
    return f"{type(e).__name__}: {text[:200]}"


class TrackerLog:
    """On the Ray Train controller: each metrics row to the open trackers. One that fails is
    logged once and dropped."""

    def __init__(self, t: Trackers, store: Store):
        self.t, self.store = t, store
        self.mlflow = self.writer = None
        self.dir: str | None = None

    def _open(self) -> None:
        if self.t.mlflow_run and self.mlflow is None:
            _quiet()
            from mlflow import MlflowClient

            self.mlflow = MlflowClient(self.t.mlflow_uri)
        if self.t.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.dir = tempfile.mkdtemp(prefix="selfsup-tensorboard-")
            atexit.register(shutil.rmtree, self.dir, True)
            self.writer = SummaryWriter(self.dir)

    def log(self, row: dict) -> None:
        values, step = numbers(row), int(row.get("step", 0))
        if not values:
            return
        try:
            self._open()
        except Exception as e:
            log.warning("train.loggers: %s; the run goes on without them", _cause(e))
            self.t = Trackers()
            return
        if self.mlflow is not None:
            from mlflow.entities import Metric

            try:
                ms = int(time.time() * 1000)
                self.mlflow.log_batch(self.t.mlflow_run, metrics=[Metric(k, v, ms, step) for k, v in values.items()])
            except Exception as e:
                log.warning("train.loggers: MLflow stopped answering (%s): the run goes on without it", _cause(e))
                self.mlflow, self.t = None, Trackers(self.t.tensorboard)
        if self.writer is not None:
            try:
                for k, v in values.items():
                    self.writer.add_scalar(f"{row.get('kind', 'train')}/{k}", v, step)
                self.writer.flush()
                for f in sorted(Path(self.dir).iterdir()):
                    self.store.write(f"tensorboard/{f.name}", f.read_bytes())
            except Exception as e:
                log.warning("train.loggers: TensorBoard events could not be written (%s): the run goes on without "
                            "them", _cause(e))
                self.writer, self.t = None, Trackers(False, self.t.mlflow_uri, self.t.mlflow_run)
