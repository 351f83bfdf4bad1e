import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from selfsup.pipelines import sources
from selfsup.pipelines.shards import MANIFEST, PROGRESS, ShardOptions, load_manifest, verify, write_shards
from selfsup.pipelines.sources import SourceError, open_source
from selfsup.pipelines.endpoints import StorageError
from selfsup.pipelines.storage import open_store


def _shard(src, dest, spp=8, workers=2, log=lambda *_: None, **kw):
    return write_shards(src, dest, ShardOptions(samples_per_shard=spp, workers=workers, **kw), progress=False, log=log)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_shard_then_verify_round_trip(where, tiny_npz, s3, s3_uri, tmp_path):
    dest = s3_uri if where == "s3" else str(tmp_path / "shards")
    m = _shard(open_source(str(tiny_npz), holdout=0.25), dest)
    assert m["class_names"] == ["a", "b", "c", "d"]
    assert m["image"] == {"mode": "L", "format": "png", "size": [16, 16]}
    n_train, n_test = m["splits"]["train"]["num_samples"], m["splits"]["test"]["num_samples"]
    assert n_train + n_test == 40 and n_test > 0
    assert [s["path"] for s in m["splits"]["train"]["shards"]][:2] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert load_manifest(dest) == m
    _, problems = verify(dest)
    assert problems == []
    # Members decode back to the source's images and labels, keys in order.
    import tarfile
    store = open_store(dest)
    data = np.load(tiny_npz)
    with tarfile.open(fileobj=io.BytesIO(store.read("train/shard-000000.tar"))) as tar:
        names = tar.getnames()
        assert names[0].endswith(".png") and names[1].endswith(".cls")
        first = np.asarray(Image.open(tar.extractfile(names[0])))
        label = int(tar.extractfile(names[1]).read())
    train_items = open_source(str(tiny_npz), holdout=0.25).splits["train"]
    assert np.array_equal(first, data["images"][int(train_items[0].ref)]) and label == train_items[0].label


def test_rerun_is_deterministic_and_resumes(tiny_npz, s3, s3_uri):
    src = open_source(str(tiny_npz))
    calls = {"n": 0}
    real = src.encode

    def flaky(item, fmt, q):
        calls["n"] += 1
        if calls["n"] == 20:  # dies inside the third shard
            raise KeyboardInterrupt
        return real(item, fmt, q)

    src.encode = flaky
    with pytest.raises(KeyboardInterrupt):
        _shard(src, s3_uri, workers=1)
    store = open_store(s3_uri)
    assert not store.exists(MANIFEST)  # never a manifest pointing at a partial shard
    progress = json.loads(store.read(PROGRESS))
    done = sorted(d["path"] for d in progress["done"])
    # The shards before the failure are recorded (and any queued after it that finished); never the failed one.
    assert done[:2] == ["train/shard-000000.tar", "train/shard-000001.tar"] and "train/shard-000002.tar" not in done

    src.encode = real
    logs, calls["n"] = [], 0
    m = _shard(src, s3_uri, workers=1, log=logs.append)
    assert logs == [f"resuming: {len(done)} of 5 shards already present with matching sha256"]
    assert not store.exists(PROGRESS)
    assert verify(s3_uri)[1] == []
    # A finished data set re-run skips everything and writes identical shards.
    m2 = _shard(src, s3_uri, log=logs.append)
    assert logs[-1] == "resuming: 5 of 5 shards already present with matching sha256"
    assert m2["splits"] == m["splits"]


def test_resume_redoes_a_shard_whose_bytes_changed(tiny_npz, tmp_path):
    dest = str(tmp_path / "d")
    src = open_source(str(tiny_npz))
    _shard(src, dest)
    (tmp_path / "d" / "train" / "shard-000001.tar").write_bytes(b"garbage")
    logs = []
    _shard(src, dest, log=logs.append)
    assert logs == ["resuming: 4 of 5 shards already present with matching sha256"]
    assert verify(dest)[1] == []


def test_corrupt_and_missing_shards_are_named_by_verify(tiny_npz, s3, s3_uri):
    _shard(open_source(str(tiny_npz)), s3_uri)
    store = open_store(s3_uri)
    good = store.read("train/shard-000002.tar")
    store.write("train/shard-000002.tar", good[: len(good) // 2])
    store.delete("train/shard-000004.tar")
    _, problems = verify(s3_uri)
    assert len(problems) == 2
    assert problems[0].startswith(f"{s3_uri}/train/shard-000002.tar: sha256")
    assert problems[1] == f"{s3_uri}/train/shard-000004.tar: missing"
    r = subprocess.run([sys.executable, "-m", "selfsup", "shard", "verify", s3_uri], capture_output=True, text=True)
    assert r.returncode == 1
    assert "3/5 shards ok, 2 bad" in r.stdout and "shard-000002.tar" in r.stdout


def test_unreadable_image_is_skipped_and_listed(tmp_path):
    root = tmp_path / "folder"
    for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 24), colour).save(root / c / f"{i}.jpg")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    m = _shard(open_source(str(root)), str(tmp_path / "out"))
    assert m["image"] == {"mode": "RGB", "format": "jpg", "size": [24, 20]}
    assert m["splits"]["train"]["num_samples"] == 6
    assert len(m["skipped"]) == 1 and m["skipped"][0]["ref"].endswith("broken.png")
    assert verify(str(tmp_path / "out"))[1] == []


def test_holdout_split_is_deterministic(tmp_path):
    root = tmp_path / "f"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(50):
            Image.new("L", (8, 8), i).save(root / c / f"{i}.png")
    s1, s2 = open_source(str(root), holdout=0.2), open_source(str(root), holdout=0.2)
    assert s1.splits == s2.splits
    assert 5 <= len(s1.splits["test"]) <= 40 and len(s1.splits["train"]) + len(s1.splits["test"]) == 100


def test_a_different_dataset_is_refused_without_overwrite(tiny_npz, tmp_path):
    dest = str(tmp_path / "d")
    _shard(open_source(str(tiny_npz)), dest)
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(StorageError, match="describes a different data set.*--overwrite"):
        _shard(open_source(str(other)), dest)
    m = _shard(open_source(str(other)), dest, overwrite=True)
    assert m["splits"]["train"]["num_samples"] == 4
    assert open_store(dest).list("train") == ["train/shard-000000.tar"]


def test_missing_sources_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match=str(tmp_path / "nope")):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="nope.npz does not exist"):
        open_source(str(tmp_path / "nope.npz"))
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist(tmp_path)


@pytest.mark.slow
def test_fashion_mnist_shards_completely(s3, s3_uri):
    m = _shard(open_source("fashion-mnist"), s3_uri, spp=5000, workers=4)
    assert m["splits"]["train"]["num_samples"] == 60000
    assert m["splits"]["test"]["num_samples"] == 10000
    assert len(m["class_names"]) == 10
    assert verify(s3_uri)[1] == []
