import json

import numpy as np
import pytest

from selfsup.pipelines.endpoints import resolve_endpoint
from selfsup.pipelines.shards import ShardOptions, write_shards
from selfsup.pipelines.sources import open_source
from selfsup.pipelines.storage import open_store
from selfsup.pipelines.decode import CorruptShard, shard_samples, tar_members
from selfsup.pipelines.streaming import data_health_actor, read_split, stream_owner_actor
from selfsup.pipelines.views import Augment, MultiCrop, TwoViews


def test_fast_tar_reader_matches_tarfile(tiny_shards):
    import io
    import tarfile

    data = open_store(tiny_shards).read("train/shard-000000.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar]
    assert list(tar_members(data)) == expected
    for cut in (len(data) // 2, 3 * 1024, 2048):
        with pytest.raises(CorruptShard, match="myshard"):
            shard_samples(data[:cut], name="myshard")


def test_decoded_split_matches_the_source(ray_local, tiny_shards, tiny_npz):
    rows = read_split(tiny_shards, "train", seed=None).take_all()
    src = np.load(tiny_npz)
    assert sorted(r["index"] for r in rows) == list(range(40))
    for r in rows[:5]:
        assert np.array_equal(r["image"][0], src["images"][r["index"]]) and r["label"] == src["labels"][r["index"]]


def test_file_order_is_seeded(ray_local, tiny_shards):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        order = lambda seed: [int(b) for b in read_split(tiny_shards, "train", seed=seed).to_pandas()["index"]]  # noqa: E731
        assert order(3) == order(3)
        assert order(3) != order(4)
        assert sorted(order(3)) == list(range(40))
    finally:
        ctx.execution_options.preserve_order = old


def test_view_stream_batches(ray_local, tiny_shards):
    spec = MultiCrop(n_local=2, global_view=Augment(size=16), local_view=Augment(size=8, scale=(0.1, 0.4)))
    ds = read_split(tiny_shards, "train", spec=spec, batch_size=8)
    batches = list(ds.iter_torch_batches(batch_size=8))
    b = batches[0]
    assert sorted(b) == ["global0", "global1", "index", "label", "local0", "local1"]
    assert b["global0"].shape == (8, 1, 16, 16) and b["local1"].shape == (8, 1, 8, 8)
    assert sum(len(b["label"]) for b in batches) == 40


def test_a_stream_outlives_the_process_that_planned_it_and_the_next_group_resumes(ray_local, tiny_shards):
    """The run's stream owner plans each epoch's stream (train_loop.EpochStreams): the rank 0 that
    asked for it can die and its stream still delivers; the next group's stream, planned from the
    data position, holds exactly the samples not yet seen."""
    ray = ray_local
    owner = stream_owner_actor("test-streams")
    # the endpoint resolved here, as the trainer does: the actor's environment is the cluster's
    read = {"manifest_uri": tiny_shards, "split": "train", "ep": resolve_endpoint(), "seed": 0, "batch_size": 8}

    @ray.remote(num_cpus=0, max_calls=1)  # its process exits after planning, as a failed group's rank 0 does
    def plan(group: str, seen=None):
        return ray.get(ray.get_actor("test-streams").split.remote(group, 1, {**read, "seen": seen}))

    def indices(splits):
        return sorted(int(i) for b in splits[0].iter_batches(batch_size=None) for i in b["index"])

    try:
        assert indices(ray.get(plan.remote("group-a"))) == list(range(40))
        seen = np.zeros(40, bool)
        seen[:16] = True  # two shards and a half
        seen[30] = True
        assert indices(ray.get(plan.remote("group-b", seen))) == [i for i in range(40) if not seen[i]]
        ray.get(owner.stop.remote())
    finally:
        ray.kill(owner)


def test_corrupt_shard_is_skipped_counted_or_raised(ray_local, s3, tiny_npz, s3_uri):
    write_shards(open_source(str(tiny_npz)), s3_uri, ShardOptions(samples_per_shard=8), progress=False, log=lambda *_: None)
    store = open_store(s3_uri)
    store.write("train/shard-000001.tar", store.read("train/shard-000001.tar")[:3000])
    store.delete("train/shard-000003.tar")
    health = data_health_actor("test-health")
    rows = read_split(s3_uri, "train", health="test-health").take_all()
    assert len(rows) == 24  # 5 shards of 8, two of them lost
    bad = ray_local.get(health.bad_shards.remote())
    assert sorted(p.rsplit("/", 1)[1] for p in bad) == ["shard-000001.tar", "shard-000003.tar"]
    with pytest.raises(Exception, match="shard-000001.tar: sha256 does not match"):
        store.write("train/shard-000003.tar", b"")  # only the corrupt one left to trip on
        read_split(s3_uri, "train", strict=True, seed=None).take_all()
    store.delete("train/shard-000003.tar")
    with pytest.raises(CorruptShard, match="shard-000003.tar: missing"):
        read_split(s3_uri, "train", strict=True)


def test_unknown_manifest_version_names_the_uri(s3, s3_uri):
    from selfsup.pipelines.shards import ManifestError

    store = open_store(s3_uri, create=True)
    store.write("manifest.json", json.dumps({"format": "selfsup-webdataset", "version": 99}).encode())
    with pytest.raises(ManifestError, match=f"{s3_uri}/manifest.json has format .* version 99"):
        read_split(s3_uri, "train")
    with pytest.raises(ManifestError, match="no manifest at s3://"):
        read_split(s3_uri + "/elsewhere", "train")


def test_two_train_workers_see_disjoint_samples_covering_the_split(ray_local, tiny_shards, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "seen"
    out.mkdir()

    def loop(cfg):
        shard = ray.train.get_dataset_shard("train")
        seen = []
        for b in shard.iter_torch_batches(batch_size=4):
            assert b["view0"].shape[1:] == (1, 16, 16)
            seen += b["index"].tolist()
        rank = ray.train.get_context().get_world_rank()
        (out / f"{rank}.json").write_text(json.dumps(seen))

    ds = read_split(tiny_shards, "train", spec=TwoViews(view0=Augment(size=16), view1=Augment(size=16)), batch_size=8)
    TorchTrainer(loop, datasets={"train": ds},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="split")).fit()
    a, b = (json.loads((out / f"{r}.json").read_text()) for r in (0, 1))
    assert set(a).isdisjoint(b) and len(a) == len(b) == 20
    assert sorted(a + b) == list(range(40))
