"""Sweeps: search spaces checked against the config, and a real `selfsup tune` on tiny data whose
driver is killed mid-sweep and rerun: ASHA stops the worse trial, every trial is a run, the best
config trains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import load_config, shipped_configs
from selfsup.platform.runs import read_metrics, read_summary
from selfsup.platform.sweeps import Space, SpaceError, read_space

ROOT = "s3://test-runs/sweeps"


def test_every_shipped_config_fits_its_familys_shipped_space():
    for name in shipped_configs():
        cfg = load_config(name)
        space, tree = read_space(None, cfg.method.name)
        sp = Space(space, tree, cfg)
        params = {label: e["args"][0] for label, e in sp.entries.items()}
        trial = sp.config(params, "s3://b/sweep", "t1")
        assert trial.storage.name == "t1" and trial != cfg, name
    dino = load_config("dino_vit_tiny")
    sp = Space("dino", read_space("dino", "dino")[1], dino)
    c = sp.config({"teacher_temp": 0.05, "crop_boundary": 0.3})
    # one entry sets several keys; a list element is addressed by its index
    assert c.method_params()["teacher_temp"] == c.method_params()["warmup_teacher_temp"] == 0.05
    assert c.data.views.local_view.scale == (0.05, 0.3) and c.data.views.global_view.scale == (0.3, 1.0)


@pytest.mark.parametrize("entry,message", [
    ({"method.temprature": {"uniform": [0.1, 0.2]}}, "method.temprature is not a parameter of method 'simclr'"),
    ({"data.views.view0.jitter": {"uniform": [0.1, 0.2]}}, "data.views.view0.jitter is not a config key"),
    ({"data.views.view0.scale.2": {"uniform": [0.1, 0.2]}}, "index it with 0..1"),
    ({"method.temperature": {"normal": [0.1, 0.2]}}, "normal is not a distribution"),
    ({"method.temperature": {"uniform": [0.3, 0.2]}}, "uniform takes [low, high] with low < high"),
    ({"method.temperature": {"uniform": [-1.0, 0.2]}}, "space entry 'method.temperature' = -1.0: method.temperature"),
    ({"blur": {"keys": ["data.views.view0.blur_p"], "uniform": [0.5, 1.5]}}, "space entry 'blur' = 1.5"),
    ({"j": {"keys": ["data.views.view0.jitter_strength"], "choice": []}}, "choice takes a non-empty list"),
])
def test_a_bad_space_is_exit_2_naming_the_entry(tmp_path, capsys, entry, message):
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entry))
    code = main(["tune", "simclr_resnet18", "--space", str(path), "storage.root=/nonexistent/never-written"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists("/nonexistent/never-written")


def test_grid_entries_go_with_the_grid_searcher_only(tmp_path):
    cfg = load_config("simclr_resnet18")
    sp = Space("s", {"method.temperature": {"uniform": [0.1, 0.2]}, "optim.lr": {"grid": [0.1, 0.2]}}, cfg)
    with pytest.raises(SpaceError, match="--searcher grid takes grid entries only"):
        sp.param_space("grid")
    with pytest.raises(SpaceError, match="grid does not go with --searcher optuna"):
        sp.param_space("optuna")


def _sweep_cmd(data):
    # kNN over every train sample: at eval.temperature 1000 every neighbour votes alike, a majority vote
    # at chance level, so the second trial is certainly the worse and ASHA must stop it. A whole CPU per
    # worker leaves exactly one for Ray Data's read tasks: a trial driver that took any CPU starved them.
    return [sys.executable, "-m", "selfsup", "tune", "simclr_resnet18", "--space", "SPACE", "--max-concurrent", "1",
            "--name", "sw", f"data.uri={data}", "data.batch_size=8", "data.views.view0.size=16",
            "data.views.view1.size=16", "model.name=resnet10t", "model.cifar_stem=false", "method.proj_hidden_dim=64",
            "method.proj_dim=32", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "eval.train_samples=0", "eval.test_samples=0", "eval.k=1000",
            "eval.every_epochs=1", "eval.at_start=false", "schedule.epochs=2", f"storage.root={ROOT}",
            "train.loggers=[mlflow]"]


def _statuses(store):
    out = {}
    for k in store.list():
        if k.count("/") == 1 and k.endswith("/summary.json"):
            out[k.split("/")[0]] = read_summary(store, k.split("/")[0]).get("status")
    return out


@pytest.fixture
def no_other_ray():
    """No Ray cluster of this process while the sweep's runs: with two clusters on one machine,
    Ray's state API cannot tell which one to ask, so Ray Train's placement-group cleaner dies and
    the placement group of a trial ASHA stopped is never freed (the next trial waits forever).
    The in-process tests after this one get a fresh local cluster from `ensure_ray`."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_a_sweep_killed_mid_way_continues_on_rerun_and_asha_stops_the_worse_trial(no_other_ray, s3, tiny_labeled,
                                                                                   tmp_path):
    data, _ = tiny_labeled
    space = tmp_path / "space.yaml"
    space.write_text("eval.temperature: {grid: [0.07, 1000.0]}\n")
    cmd = [str(space) if a == "SPACE" else a for a in _sweep_cmd(data)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               SELFSUP_HOME=str(tmp_path / "home"))
    store = open_store(f"{ROOT}/sw", create=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if "finished" in _statuses(store).values():
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = {t for t, s in _statuses(store).items() if s == "finished"}
    before = {t: store.read(f"{t}/metrics.jsonl") for t in first}

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads(store.read("sweep.json"))
    trials = {t["trial"]: t for t in sweep["trials"]}
    assert len(trials) == 2 and sweep["status"] == "finished"
    # finished trials were not run again
    assert all(store.read(f"{t}/metrics.jsonl") == before[t] for t in first)
    worse = [t for t in trials.values() if t["params"]["eval.temperature"] == 1000.0]
    assert len(worse) == 1 and worse[0]["status"] == "stopped" and worse[0]["stopped_early"]
    assert all(t["status"] == "finished" for t in trials.values() if t is not worse[0])
    # every trial is a run: summary, config, metrics, a checkpoint
    for name, t in trials.items():
        assert read_summary(store, name)["status"] == t["status"]
        run = open_store(f"{ROOT}/sw/{name}")
        assert run.exists("config.yaml") and any(k.endswith("/manifest.json") for k in run.list())
        assert [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert sweep["best"] in trials and trials[sweep["best"]]["params"]["eval.temperature"] == 0.07
    csv_lines = store.read("trials.csv").decode().splitlines()
    assert csv_lines[0].startswith("trial,status,stopped_early,step,final_knn_top1,best_knn_top1,eval.temperature")
    assert len(csv_lines) == 3
    assert "stopped" in r.stdout and sweep["best"] in r.stdout
    # the console is ours: none of Tune's experiment table, result paths or TensorBoard hints
    assert not any(s in r.stdout + r.stderr for s in ("Configuration for experiment", "View detailed results", "tensorboard"))

    # MLflow (train.loggers): the sweep is a parent run and each trial a finished or killed run under it,
    # in the store under SELFSUP_HOME (the runs are in object storage)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("selfsup").experiment_id])
    parent = [x for x in runs if x.info.run_name == "sw"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(children) == set(trials)
    for name, x in children.items():
        assert x.data.params["eval.temperature"] == str(trials[name]["params"]["eval.temperature"])
        assert x.data.metrics["knn_top1"] == [r for r in read_metrics(open_store(f"{ROOT}/sw/{name}"))
                                              if r["kind"] == "eval"][-1]["knn_top1"]

    # the best config trains as it is, straight from storage, as `sweeps show` says (a new run under
    # the base config's root)
    best = f"{ROOT}/sw/best.yaml"
    assert load_config(best).eval.temperature == 0.07
    assert f"its config: {best}" in r.stdout
    assert main(["train", best, "schedule.steps=1", "storage.name=from-best"]) == 0
    assert read_summary(open_store(f"{ROOT}/from-best"))["status"] == "finished"
    # trials read like any run, and the sweep reads back
    assert main(["runs", "show", f"sw/{sweep['best']}", "--root", ROOT]) == 0
    assert main(["sweeps", "list", "--root", ROOT]) == 0
    assert main(["sweeps", "show", "sw", "--root", ROOT]) == 0
    # the dashboard's Sweeps page reads it: trials, a chart per parameter and the parallel plot, best.yaml
    from streamlit.testing.v1 import AppTest

    from selfsup import dashboard
    from selfsup.dashboard import data

    os.environ.update({dashboard.ROOT_ENV: ROOT, dashboard.TOKEN_ENV: "t"})
    at = AppTest.from_file(str(Path(data.__file__).with_name("app.py")), default_timeout=60)
    at.query_params["token"] = "t"
    at.run()
    at.switch_page(str(Path(data.__file__).parent / "sections" / "sweeps.py")).run()
    assert not at.exception and set(at.dataframe[0].value["trial"]) == set(trials)
    assert len(at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart")) == 2
    assert "best.yaml" in at.get("download_button")[0].proto.label
