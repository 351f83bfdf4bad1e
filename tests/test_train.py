"""End to end: `selfsup train` on 2 Ray workers from the test S3 server, checkpoints and metrics in
S3, resume at the exact step, a damaged checkpoint, and the run/eval commands that read the result."""

import io
import json
import logging
import time

import pytest
import ray
import torch

from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import load_config
from selfsup.platform.runs import read_metrics, read_summary
from selfsup.platform.checkpoints import read_checkpoint
from selfsup.platform.trainer import train

ROOT = "s3://test-runs/runs"


def _cfg(data, name, *extra):
    return load_config(None, [
        f"data.uri={data}", "data.batch_size=8", "data.views.view0.size=16", "data.views.view1.size=16",
        "model.name=resnet10t", "model.cifar_stem=false", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=5", f"storage.root={ROOT}", f"storage.name={name}",
        # fp32: on CPUs with native bf16, this torch's bf16 backward through resnet10t's 1x1 maps of
        # 16 px views now and then gives non-finite gradients, and the step skips that update
        "train.log_every_steps=1", "train.precision=fp32", *extra])


@pytest.fixture(scope="module")
def finished_run(ray_local, tiny_labeled):
    data, manifest = tiny_labeled
    steps_per_epoch = manifest["splits"]["train"]["num_samples"] // 8
    # Views made by the train workers (every other Ray test has the pipeline make them); the
    # resume below switches back to the pipeline's
    started = time.time()
    summary = train(_cfg(data, "e2e", "schedule.epochs=2", "data.augment_on=trainer"), log=lambda *_: None)
    actors = [a for a in ray._private.state.actors().values() if a["StartTime"] >= started * 1000]
    return data, summary, steps_per_epoch, actors


def test_two_epochs_on_two_workers_leave_checkpoints_and_complete_metrics(finished_run):
    data, summary, spe, _ = finished_run
    assert summary["status"] == "finished" and summary["step"] == 2 * spe and summary["epoch"] == 2.0
    store = open_store(f"{ROOT}/e2e")
    keys = store.list()
    for step in (spe, 2 * spe):
        for f in ("state.pt", "meta.json", "manifest.json"):  # the manifest: complete, written by the controller
            assert f"checkpoint-{step:08d}/{f}" in keys
    assert {"config.yaml", "summary.json", "metrics.jsonl"} <= set(keys)
    rows = read_metrics(store)
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 2 * spe + 1))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, spe, 2 * spe] and all(0 <= r["knn_top1"] <= 100 for r in evals)
    row = next(r for r in rows if r["kind"] == "train")
    assert {"loss", "lr", "images_per_s", "workers", "epoch", "step", "bad_shards"} <= set(row)
    assert row["workers"] == 2
    state = torch.load(io.BytesIO(store.read(f"checkpoint-{2 * spe:08d}/state.pt")), weights_only=True)
    assert state["step"] == 2 * spe and {"model", "optimizer", "torch_rng", "elapsed"} <= set(state)


def test_the_run_plans_its_streams_in_one_owner_and_starts_no_dataset_manager(finished_run):
    actors = {a["ActorClassName"].rpartition(".")[2]: a for a in finished_run[3]}
    # one stream owner for the run, ended with it; none of Ray Train's per-group DatasetManager actors
    assert actors["StreamOwner"]["State"] == "DEAD" and "SplitCoordinator" in actors
    assert "DatasetManager" not in actors and "RayTrainWorker" in actors


def test_rerun_resumes_at_the_exact_step_without_duplicated_metrics(finished_run):
    data, summary, spe, _ = finished_run
    s2 = train(_cfg(data, "e2e", "schedule.epochs=3"), log=lambda *_: None)
    assert s2["step"] == 3 * spe and s2["knn_first"] == summary["knn_first"]
    rows = read_metrics(open_store(f"{ROOT}/e2e"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 3 * spe + 1))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, spe, 2 * spe, 3 * spe]


def test_a_damaged_checkpoint_falls_back_to_the_one_before(finished_run, caplog):
    data, summary, spe, _ = finished_run
    store = open_store(f"{ROOT}/e2e")
    newest = sorted({k.split("/")[0] for k in store.list() if k.startswith("checkpoint-")})[-1]
    store.write(f"{newest}/state.pt", b"not a checkpoint")
    with caplog.at_level(logging.ERROR, logger="selfsup.train"):
        state, name = read_checkpoint(f"{ROOT}/e2e", None)
    assert name < newest and state["step"] < int(newest.split("-")[1])
    assert f"{ROOT}/e2e/{newest} failed to load" in caplog.text
    # The run continues from that earlier step; the replayed steps replace their old rows.
    s3 = train(_cfg(data, "e2e", f"schedule.steps={4 * spe}"), log=lambda *_: None)
    assert s3["step"] == 4 * spe
    rows = read_metrics(store)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 4 * spe + 1))


def test_runs_and_eval_commands_read_the_run(finished_run, capsys):
    assert main(["runs", "list", "--root", ROOT]) == 0
    assert "e2e" in capsys.readouterr().out
    assert main(["runs", "show", "e2e", "--root", ROOT, "--tail", "2"]) == 0
    out = capsys.readouterr().out
    assert '"status": "finished"' in out
    assert main(["eval", "knn", "e2e", "--root", ROOT]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["knn_top1"] <= 100 and res["checkpoint"].startswith("checkpoint-")
    assert main(["eval", "linear", "e2e", "--root", ROOT, "--random-init"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint"] == "random init" and {"linear_top1_1", "linear_top1_0.1", "linear_top1_0.01"} <= set(res)


def test_finetune_starts_from_the_checkpoint_and_sees_a_balanced_fraction_of_the_labels(finished_run, capsys):
    from selfsup.platform.evaluate import load_labeled, load_run
    from selfsup.platform.finetune import weights_sha256

    data, _, _, _ = finished_run
    assert main(["eval", "finetune", "e2e", "--root", ROOT, "--fraction", "0.5", "--epochs", "1", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    res = json.loads(open_store(f"{ROOT}/e2e").read("eval/finetune-0.5-1ep.json"))
    from_ckpt, from_init = res["rows"]
    _, trained, used = load_run(f"{ROOT}/e2e", None)
    _, init, _ = load_run(f"{ROOT}/e2e", None, random_init=True)
    assert from_ckpt["start"] == used and from_ckpt["backbone_sha256"] == weights_sha256(trained.backbone)
    assert from_init["start"] == "random init" and from_init["backbone_sha256"] == weights_sha256(init.backbone)
    assert from_ckpt["backbone_sha256"] != from_init["backbone_sha256"]
    _, labels = load_labeled(data, "train")
    want = [max(1, round(0.5 * int(n))) for n in torch.bincount(labels)]
    assert res["per_class"] == want and res["train_images"] == sum(want)
    assert res["test_images"] == len(load_labeled(data, "test")[1]) and all(0 <= r["top1"] <= 100 for r in res["rows"])
    assert f"from {used}" in out and "from random init" in out and "eval/finetune-0.5-1ep.json" in out


def test_dino_trains_end_to_end(ray_local, tiny_labeled):
    data, _ = tiny_labeled
    cfg = load_config(None, [
        "method.name=dino", f"data.uri={data}", "data.batch_size=8", "data.views.global_view.size=16",
        "data.views.local_view.size=8", "data.views.n_local=2", "model.name=resnet10t", "model.cifar_stem=false",
        "method.out_dim=128", "method.hidden_dim=64", "method.bottleneck_dim=32", "schedule.steps=4",
        "train.checkpoint_every_steps=2", "train.checkpoint_every_epochs=100",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=5", f"storage.root={ROOT}", "storage.name=dino"])
    s = train(cfg, log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 4
    store = open_store(f"{ROOT}/dino")
    assert {k.split("/")[0] for k in store.list() if k.endswith("/manifest.json")} == {"checkpoint-00000002",
                                                                                        "checkpoint-00000004"}
    rows = read_metrics(store)
    last_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert "knn_top1_teacher" in last_eval
    assert all(r["teacher_temp"] > 0 for r in rows if r["kind"] == "train")


def test_storage_unreachable_at_start_is_one_line_exit_2(tiny_labeled, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(["train", "simclr_resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "selfsup: error: cannot reach S3 endpoint http://127.0.0.1:9: connection failed (reading s3://selfsup/datasets/fashion-mnist/manifest.json)" or "cannot reach S3 endpoint http://127.0.0.1:9" in err


def test_non_finite_updates_roll_back_to_the_last_checkpoint_then_finish(finished_run, monkeypatch):
    data, _, spe, _ = finished_run
    monkeypatch.setenv("SELFSUP_TEST_NAN", "5:1")  # the loss is NaN from step 5 on, until the first rollback
    s = train(_cfg(data, "rollback", "schedule.steps=8", "train.checkpoint_every_steps=2",
                   "train.rollback_after_skipped=2"), log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 8
    rows = [r for r in read_metrics(open_store(f"{ROOT}/rollback")) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 5-6 replayed once, each row once
    assert [r["rollbacks"] for r in rows] == [0] * 4 + [1] * 4
    assert all(r["skipped_update"] == 0 for r in rows)


def test_updates_that_stay_non_finite_fail_the_run_after_max_rollbacks(finished_run, monkeypatch):
    data, _, _, _ = finished_run
    monkeypatch.setenv("SELFSUP_TEST_NAN", "3:99")  # poison that never stops
    with pytest.raises(Exception):
        train(_cfg(data, "diverges", "schedule.steps=8", "train.checkpoint_every_steps=2",
                   "train.rollback_after_skipped=2", "train.max_rollbacks=1"), log=lambda *_: None)
    s = read_summary(open_store(f"{ROOT}/diverges"))
    assert s["status"] == "failed" and s["error"].startswith("Diverged: 2 updates in a row were skipped")
    assert "after 1 rollbacks (train.max_rollbacks=1): the run diverges" in s["error"]
