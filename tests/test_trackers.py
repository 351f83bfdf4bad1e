"""train.loggers: MLflow and TensorBoard hold the rows of metrics.jsonl (read back with MlflowClient and
TensorBoard's own event reader); an MLflow that cannot be reached is one warning and a finished run."""

import socket

import pytest

from selfsup.pipelines.storage import open_store
from selfsup.platform.config import load_config
from selfsup.platform.runs import read_metrics
from selfsup.platform.trainer import train

COMMON = ["data.batch_size=8", "schedule.steps=4", "train.log_every_steps=1", "scaling.num_workers=1",
          "model.name=resnet10t", "model.cifar_stem=false", "data.views.view0.size=16", "data.views.view1.size=16",
          "method.proj_hidden_dim=32", "method.proj_dim=16", "eval.every_epochs=null", "eval.k=5"]


def _train(tmp_path, data, name, *extra):
    lines = []
    summary = train(load_config(None, [f"data.uri={data}", *COMMON, f"storage.root={tmp_path}", f"storage.name={name}",
                                       *extra]), log=lines.append)
    return summary, [line for line in lines if line.startswith("warning")], read_metrics(open_store(tmp_path / name))


def test_mlflow_and_tensorboard_hold_the_runs_metrics_and_config(ray_local, tiny_labeled, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary, warnings, rows = _train(tmp_path, tiny_labeled[0], "tracked", "train.loggers=[mlflow, tensorboard]")
    assert summary["status"] == "finished" and not warnings
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # MLflow: the run's local store, one run with the config as params and every row's numbers
    client = MlflowClient(f"sqlite:///{tmp_path / 'tracked' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("selfsup").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "simclr" and run.data.params["data.batch_size"] == "8"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert losses == [(r["step"], r["loss"]) for r in train_rows]
    knn = [r["knn_top1"] for r in rows if r["kind"] == "eval"]
    assert knn and [m.value for m in client.get_metric_history(run.info.run_id, "knn_top1")] == knn
    # TensorBoard: event files in the run's folder in storage
    events = EventAccumulator(str(tmp_path / "tracked" / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
        [(r["step"], r["loss"]) for r in train_rows]
    assert [e.value for e in events.Scalars("eval/knn_top1")] == pytest.approx(knn)
    # a rerun that resumes the run continues its MLflow run
    summary, warnings, _ = _train(tmp_path, tiny_labeled[0], "tracked", "train.loggers=[mlflow, tensorboard]",
                                  "schedule.steps=6")
    assert summary["step"] == 6 and not warnings
    (again,) = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]


def test_an_mlflow_that_cannot_be_reached_is_one_warning_and_the_run_finishes(ray_local, tiny_labeled, tmp_path,
                                                                             monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    summary, warnings, rows = _train(tmp_path, tiny_labeled[0], "untracked", "train.loggers=[mlflow]")
    assert summary["status"] == "finished" and summary["step"] == 4
    assert len(warnings) == 1 and f"MLflow at http://127.0.0.1:{port} is not usable" in warnings[0], warnings
    assert "the run goes on without it" in warnings[0]
