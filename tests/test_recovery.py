"""The units of recovery, without Ray: the data position, gradient accumulation, the batch policy,
pruning checkpoints, and retries while object storage is away."""

import pickle
import time

import pytest
import torch

from selfsup.pipelines.endpoints import Endpoint, StorageError, pyarrow_fs, retrying
from selfsup.pipelines.storage import open_store
from selfsup.pipelines.streaming import epoch_order
from selfsup.pipelines.views import make_views
from selfsup.platform.checkpoints import MANIFEST, save_checkpoint, write_manifest
from selfsup.platform.config import load_config
from selfsup.platform.step import TrainStep, build_method
from selfsup.platform.train_loop import DataPosition
from selfsup.platform.runs import checkpoint_name


def test_the_data_position_counts_what_an_epoch_trained_on_and_any_repeat():
    p = DataPosition(10)
    p.mark(torch.tensor([0, 1, 2]))
    p.mark(torch.tensor([3, 4]))
    p.sync(world=1)
    assert p.seen.sum() == 5 and p.repeated == 0
    restored = DataPosition.from_state(10, p.state())
    restored.mark(torch.tensor([4, 5]))  # 4 was trained on before the checkpoint
    restored.sync(world=1)
    assert restored.repeated == 1 and restored.seen.sum() == 6 and restored.epoch == 0
    restored.next_epoch(world=1)
    assert restored.epoch == 1 and not restored.seen.any()
    # a split that changed size: the bitmap means nothing, the epoch starts over
    assert not DataPosition.from_state(12, p.state()).seen.any()


def test_an_epochs_shard_order_depends_on_seed_and_epoch_only():
    paths = [f"s{i}" for i in range(20)]
    assert epoch_order(paths, 0, 3) == epoch_order(list(paths), 0, 3)
    assert epoch_order(paths, 0, 3) != epoch_order(paths, 0, 4) != epoch_order(paths, 1, 3)
    assert sorted(epoch_order(paths, 0, 3)) == sorted(paths) and epoch_order(paths, None, 3) == paths


def test_the_batch_policy_on_fewer_workers():
    base = ["scaling.num_workers=4", "scaling.min_workers=1", "data.batch_size=256"]
    cfg = load_config(None, base)
    assert cfg.batch_at(4) == (64, 256, 1) and cfg.batch_at(3) == (85, 255, 1)
    assert load_config(None, base + ["scaling.max_worker_batch=64"]).batch_at(1) == (256, 256, 4)
    assert load_config(None, base + ["scaling.batch_policy=per_worker"]).batch_at(2) == (64, 128, 1)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch():
    cfg = load_config(None, ["method.name=mae", "model.name=vit_tiny_patch16_224", "model.cifar_stem=false",
                             "model.kwargs={img_size: 16, patch_size: 4, depth: 2}", "data.views.view.size=16",
                             "data.views.patch_size=4", "method.decoder_dim=32", "method.decoder_depth=1",
                             "data.batch_size=8", "schedule.steps=4", "optim.clip_grad=null", "train.precision=fp32"])
    images = [torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8) for _ in range(8)]
    batch = make_views(images, cfg.data.views, torch.Generator().manual_seed(0))
    grads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        method = build_method(cfg)
        step = TrainStep(method, cfg, torch.device("cpu"), accum=accum)
        step.optimizer.step = lambda: None  # keep the gradients to compare
        torch.manual_seed(1)  # the same masks both times
        step(batch, 0.5)
        grads.append(torch.cat([p.grad.flatten() for p in method.student_parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _write(store, tmp_path, step, manifest):
    d = tmp_path / f"tmp{step}"
    d.mkdir()
    files = save_checkpoint({"step": step}, {"step": step}, str(d))
    for f in files:
        store.write(f"{checkpoint_name(step)}/{f}", (d / f).read_bytes())
    if manifest:
        write_manifest(store, checkpoint_name(step), files)


def test_prune_keeps_the_newest_complete_checkpoints_and_drops_dead_incomplete_ones(tmp_path):
    from selfsup.platform.checkpoints import prune

    store = open_store(str(tmp_path / "run"))
    for step, complete in ((10, True), (20, False), (30, True), (40, True), (50, False)):
        _write(store, tmp_path, step, manifest=complete)
    assert prune(store, keep=2) == ["checkpoint-00000010", "checkpoint-00000020"]
    names = {k.split("/")[0] for k in store.list()}
    assert names == {"checkpoint-00000030", "checkpoint-00000040", "checkpoint-00000050"}  # 50 may still upload
    assert store.exists(f"checkpoint-00000040/{MANIFEST}")


def test_retries_wait_for_a_transient_failure_and_not_for_a_refusal():
    from botocore.exceptions import ClientError, EndpointConnectionError

    ep = Endpoint("http://127.0.0.1:1", "a", "b", retry_s=10)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url=ep.url)
        return "ok"
    assert retrying(ep, flaky) == "ok" and len(calls) == 3

    def denied():
        calls.append(1)
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")
    calls.clear()
    with pytest.raises(ClientError):
        retrying(ep, denied)
    assert len(calls) == 1


def test_an_unreachable_endpoint_fails_after_its_retry_window_naming_it():
    t = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1:1"):
        open_store("s3://bucket/x", Endpoint("http://127.0.0.1:1", "a", "b", retry_s=2))
    assert 2 <= time.monotonic() - t < 30


def test_the_pyarrow_filesystem_keeps_its_retries_when_pickled_to_a_ray_worker():
    fs = pickle.loads(pickle.dumps(pyarrow_fs(Endpoint("http://127.0.0.1:1", "a", "b", retry_s=2))))
    t = time.monotonic()
    with pytest.raises(OSError):
        fs.open_input_stream("bucket/key").read()
    assert time.monotonic() - t >= 2  # pyarrow's own pickling drops the strategy: 3 attempts in ~0.2 s


def test_only_failures_a_restart_can_fix_are_retried():
    from ray.exceptions import ActorDiedError

    from selfsup.pipelines.decode import CorruptShard
    from selfsup.platform.train_loop import Diverged
    from selfsup.platform.trainer import unrecoverable

    bug = {0: ValueError("model.kwargs for 'resnet10t' ..."), 1: ValueError("model.kwargs for 'resnet10t' ...")}
    assert unrecoverable(bug, None) is None  # the first time: it may be a passing fault
    assert unrecoverable(bug, "ValueError: model.kwargs for 'resnet10t' ...") == "ValueError: model.kwargs for 'resnet10t' ..."
    assert unrecoverable(bug, "ValueError: something else") is None
    assert unrecoverable({0: Diverged("20 updates in a row were skipped")}, None) == \
        "Diverged: 20 updates in a row were skipped"
    assert unrecoverable({1: CorruptShard("shard-00001.tar: bad")}, None) == "CorruptShard: shard-00001.tar: bad"
    # a dead worker takes the others' collectives down with it: retried however often it happens
    died = {0: RuntimeError("Connection closed by peer"), 1: ActorDiedError()}
    assert unrecoverable(died, None) is None and unrecoverable(died, "RuntimeError: Connection closed by peer") is None
