"""Bring your own data: shards other tools wrote, indexed in place; images under an S3 prefix;
Parquet; unlabeled sets that train, with evaluation on a separate labeled set; bad input."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import load_config
from selfsup.platform.runs import read_metrics
from selfsup.platform.trainer import train

ROOT = "s3://test-runs/byod"
CLASSES = ["cat", "dog", "fish"]
HERE = os.path.dirname(__file__)


def _jpeg(i: int, size=(24, 32)) -> bytes:
    """An RGB image whose class (i % 3) shows: a bright band at a class-dependent row."""
    arr = np.random.default_rng(i).integers(0, 60, (*size, 3), np.uint8)
    arr[4 + 6 * (i % 3): 8 + 6 * (i % 3)] = 230
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _upload(folder, uri: str) -> dict[str, str]:
    """Every file of `folder` to `uri`; returns {name: sha256} of what went up."""
    store = open_store(uri, create=True)
    out = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        store.write(name, data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _cfg(data: str, name: str, *extra: str):
    return load_config(None, [
        f"data.uri={data}", "data.batch_size=8", "data.views.view0.size=16", "data.views.view1.size=16",
        "model.name=resnet10t", "model.cifar_stem=false", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=3", "eval.at_start=false", f"storage.root={ROOT}",
        f"storage.name={name}", "schedule.steps=2", "train.precision=fp32", "scaling.num_workers=1", *extra])


@pytest.fixture(scope="module")
def wds_shards(s3, tmp_path_factory):
    """Shards written by webdataset.ShardWriter: .jpg + .json {"label": class name}; sample 7 has no
    label, sample 9 a member of another type, on the test S3 server."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("wds")
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(48):
            sample = {"__key__": f"s{i:05d}", "jpg": _jpeg(i), "json": {"label": CLASSES[i % 3]} if i != 7 else {}}
            if i == 9:
                sample["seg.png"] = b"not looked at"
            sink.write(sample)
    sha = _upload(folder, "s3://byod/wds")
    return "s3://byod/wds/shard-{000000..000001}.tar", sha


@pytest.fixture(scope="module")
def indexed(wds_shards):
    pattern, sha = wds_shards
    assert main(["shard", "index", pattern, "--labels", "json:label", "--test", "s3://byod/wds/shard-000002.tar",
                 "--quiet"]) == 0
    return json.loads(open_store("s3://byod/wds").read("manifest.json")), sha


def test_shardwriter_shards_are_indexed_in_place(indexed):
    m, sha = indexed
    assert m["labels"] == "json:label" and m["class_names"] == CLASSES
    assert m["image"] == {"mode": "RGB", "format": "jpg", "size": [24, 32]}
    shards = {s["path"]: s for split in m["splits"].values() for s in split["shards"]}
    assert {p: s["sha256"] for p, s in shards.items()} == sha  # not a byte rewritten
    assert [s["path"] for s in m["splits"]["test"]["shards"]] == ["shard-000002.tar"]
    assert m["splits"]["train"]["num_samples"] == 32 and m["splits"]["test"]["num_samples"] == 16
    assert m["unlabeled"] == {"count": 1, "keys": ["shard-000000.tar:s00007"]}
    assert m["ignored_members"] == {"seg.png": 1}


def test_indexed_shards_read_with_their_labels_and_verify(indexed):
    from selfsup.platform.evaluate import load_labeled

    images, labels = load_labeled("s3://byod/wds", "train")
    assert len(images) == 31 and images[0].shape == (3, 24, 32)  # the unlabeled sample left out
    assert labels.tolist() == [i % 3 for i in range(32) if i != 7]
    images, labels = load_labeled("s3://byod/wds", "train", labeled=False)
    assert len(images) == 32 and labels[7] == -1
    assert main(["shard", "verify", "s3://byod/wds", "--decode"]) == 0


def test_indexed_shards_train_and_score(ray_local, indexed):
    s = train(_cfg("s3://byod/wds", "wds"), log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 2
    evals = [r for r in read_metrics(open_store(f"{ROOT}/wds")) if r["kind"] == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["knn_top1"] <= 100


@pytest.fixture(scope="module")
def img2dataset_shards(s3):
    """img2dataset's layout: {key}.jpg, {key}.txt (a caption), {key}.json (metadata, no class)."""
    store = open_store("s3://byod/i2d", create=True)
    for n in range(2):
        members = []
        for i in range(n * 12, n * 12 + 12):
            key = f"{n:05d}{i:04d}"
            members += [(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", b"a photo"),
                        (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "width": 32}).encode())]
        store.write(f"{n:05d}.tar", _tar(members))
    assert main(["shard", "index", "s3://byod/i2d/{00000..00001}.tar", "--labels", "none", "--quiet"]) == 0
    return "s3://byod/i2d"


@pytest.fixture(scope="module")
def unlabeled_run(ray_local, img2dataset_shards):
    lines = []
    s = train(_cfg(img2dataset_shards, "unlabeled"), log=lines.append)
    return s, lines


def test_an_unlabeled_set_trains_with_the_knn_off_and_eval_needs_data(unlabeled_run, indexed, capsys):
    s, lines = unlabeled_run
    assert s["status"] == "finished" and s["step"] == 2
    assert [x for x in lines if "warning" in x] == [
        "warning: s3://byod/i2d has no labels, so the kNN is off: give a labeled set as eval.data_uri to score the run"]
    assert not [r for r in read_metrics(open_store(f"{ROOT}/unlabeled")) if r["kind"] == "eval"]
    capsys.readouterr()
    assert main(["eval", "knn", "unlabeled", "--root", ROOT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels" in err[0] and "--data URI" in err[0]
    assert main(["eval", "knn", "unlabeled", "--root", ROOT, "--data", "s3://byod/wds"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "s3://byod/wds" and out["train_samples"] == 31 and 0 <= out["knn_top1"] <= 100


def test_selfsups_shards_read_in_webdataset_and_ray_data(ray_local, tiny_npz, tmp_path):
    """Both ways: what selfsup writes, webdataset.WebDataset and ray.data.read_webdataset read alike."""
    import ray.data
    import webdataset as wds

    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    m = write_shards(open_source(str(tiny_npz)), str(tmp_path), ShardOptions(samples_per_shard=16), progress=False,
                     log=lambda *_: None)
    paths = [str(tmp_path / s["path"]) for s in m["splits"]["train"]["shards"]]
    expected = np.load(tiny_npz)["labels"].tolist()
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(paths, shardshuffle=False).decode("l")
           .to_tuple("__key__", "cls", "png").map(lambda t: {"__key__": t[0], "cls": t[1]})]
    assert [y for _, y in got] == expected and len(got) == m["splits"]["train"]["num_samples"]
    rows = ray.data.read_webdataset(paths).take_all()
    assert sorted((r["__key__"], int(r["cls"])) for r in rows) == sorted(got)
    assert rows[0]["png"].shape == (16, 16)


def test_an_s3_prefix_of_class_folders_shards_and_trains_scored_on_another_set(ray_local, indexed):
    store = open_store("s3://byod/raw", create=True)
    for i in range(30):
        store.write(f"{CLASSES[i % 3]}/img{i:03d}.jpg", _jpeg(i))
    store.write("dog/notes.txt", b"not an image")
    assert main(["shard", "s3://byod/raw", "s3://byod/raw-shards", "--holdout", "0.3", "--samples-per-shard", "8",
                 "--quiet"]) == 0
    m = json.loads(open_store("s3://byod/raw-shards").read("manifest.json"))
    assert m["class_names"] == CLASSES and m["source"] == "imagefolder:s3://byod/raw"
    assert sum(s["num_samples"] for s in m["splits"].values()) == 30
    shard = open_store("s3://byod/raw-shards").read(m["splits"]["train"]["shards"][0]["path"])
    first = tarfile.open(fileobj=io.BytesIO(shard)).extractfile("train_00000000.jpg").read()
    assert first == _jpeg(0)  # JPEG bytes pass through untouched
    s = train(_cfg("s3://byod/raw-shards", "raw", "eval.data_uri=s3://byod/wds"), log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 2
    evals = [r for r in read_metrics(open_store(f"{ROOT}/raw")) if r["kind"] == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["knn_top1"] <= 100  # the kNN read the other set


def _parquet(path, n: int, labels=True, hf_struct=True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": _jpeg(i), "path": f"{i}.jpg"} if hf_struct else _jpeg(i) for i in range(n)]
    cols = {"img": images}
    if labels:
        cols["label"] = [i % 3 for i in range(n)]
    meta = {"huggingface": json.dumps({"info": {"features": {"label": {"_type": "ClassLabel", "names": CLASSES}}}})}
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), path, row_group_size=7)


def test_parquet_files_shard_and_train(ray_local, s3, tmp_path):
    _parquet(tmp_path / "part-0.parquet", 20)
    _parquet(tmp_path / "part-1.parquet", 12)
    _upload(tmp_path, "s3://byod/parquet")
    assert main(["shard", "s3://byod/parquet", "s3://byod/parquet-shards", "--image-column", "img", "--label-column",
                 "label", "--holdout", "0.25", "--samples-per-shard", "8", "--quiet"]) == 0
    m = json.loads(open_store("s3://byod/parquet-shards").read("manifest.json"))
    assert m["class_names"] == CLASSES and sum(s["num_samples"] for s in m["splits"].values()) == 32
    from selfsup.platform.evaluate import load_labeled

    imgs, ys = load_labeled("s3://byod/parquet-shards", "train", labeled=False)
    assert set(ys.tolist()) == {0, 1, 2} and imgs[0].shape == (3, 24, 32)
    s = train(_cfg("s3://byod/parquet-shards", "parquet", "eval.knn=false"), log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 2


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_one_line_each(s3, tmp_path, capsys):
    store = open_store("s3://byod/bad", create=True)
    # a pattern that matches nothing
    assert main(["shard", "index", "s3://byod/bad/none-{000..003}.tar"]) == 2
    assert _err(capsys) == ["selfsup: error: no shard matches s3://byod/bad/none-{000..003}.tar"]
    # Parquet without the column: exit 2 listing the columns it has
    _parquet(tmp_path / "p.parquet", 4, labels=False, hf_struct=False)
    assert main(["shard", str(tmp_path / "p.parquet"), str(tmp_path / "out"), "--image-column", "image"]) == 2
    assert _err(capsys) == [f"selfsup: error: {tmp_path / 'p.parquet'} has no column 'image'; its columns: img"]
    # a sample with no image, a damaged image, a label missing: one shard each
    good = [(f"k{i}.png" if i % 2 else f"k{i}.jpg", _jpeg(i)) for i in range(4)]
    store.write("a.tar", _tar([*good[:2], ("k0.cls", b"0"), ("k1.cls", b"1"), ("orphan.cls", b"2")]))
    damaged = bytearray(_jpeg(5))
    damaged[len(damaged) // 2:] = b"\0" * (len(damaged) - len(damaged) // 2)
    store.write("b.tar", _tar([("d.jpg", bytes(damaged[:200])), ("d.cls", b"0")]))
    store.write("c.tar", _tar([*good[2:], ("k2.cls", b"2"), ("k2.npy", b"?")]))
    assert main(["shard", "index", "s3://byod/bad/*.tar", "--quiet"]) == 0
    err = _err(capsys)
    assert err[0].startswith("bad shard: b.tar: sample 'd': damaged image")
    assert err[1:] == ["warning: 1 samples lack the label (cls) (first: 'c.tar:k3'): they train, and evaluation "
                       "leaves them out",
                       "warning: 1 samples have no image (first: 'a.tar:orphan'): skipped",
                       "ignored members of other types: 1 .npy"]
    m = json.loads(store.read("manifest.json"))
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == ["a.tar", "c.tar"]
    assert m["splits"]["train"]["num_samples"] == 4 and m["skipped"][0]["ref"] == "b.tar"
    # --out outside the shards' folder: the manifest's paths would reach outside it
    assert main(["shard", "index", "s3://byod/bad/*.tar", "--out", "s3://byod/elsewhere", "--overwrite"]) == 2
    assert "must be in a folder that holds the shards" in _err(capsys)[0]
    # a brace range with a shard missing: indexed, the missing one named
    assert main(["shard", "index", "s3://byod/bad/{a,c,e}.tar", "--overwrite", "--quiet"]) == 0
    assert _err(capsys)[0] == ("warning: 1 shards that s3://byod/bad/{a,c,e}.tar names do not exist (first: "
                               "'s3://byod/bad/e.tar')")
    assert main(["shard", "index", "s3://byod/bad/*.tar", "--labels", "yaml"]) == 2
    assert _err(capsys) == ["selfsup: error: --labels 'yaml': give cls, json:FIELD or none"]


def test_sharding_on_a_two_node_cluster_equals_the_local_path(tmp_path):
    """Ray Data tasks on both nodes of a ray.cluster_utils.Cluster write the same shards (sha256)
    and manifest as the thread pool; `shard index` on the cluster gives the same manifest too."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "cluster_shard_run.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shard_nodes"] == 2 and out["index_nodes"] == 2
    local, ray_m = out["local"], out["ray"]
    for m in (local, ray_m):
        m.pop("created")
    assert ray_m == local and len(local["splits"]["train"]["shards"]) >= 4
    assert out["index_local"] == out["index_ray"]


def test_the_dashboard_maps_an_unlabeled_run_without_classes(unlabeled_run, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from selfsup import dashboard
    from selfsup.dashboard import data

    app = str(Path(data.__file__).with_name("app.py"))
    monkeypatch.setenv(dashboard.ROOT_ENV, ROOT)
    monkeypatch.setenv(dashboard.TOKEN_ENV, "t")
    at = AppTest.from_file(app, default_timeout=120)
    at.query_params["token"] = "t"
    at.run()
    at.switch_page(str(Path(app).with_name("sections") / "embeddings.py")).run()
    at.selectbox[0].set_value("unlabeled").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("has no labels" in c.value for c in at.caption)
    chart = (at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart"))[0].proto.spec
    assert '"color"' not in chart  # no class colours
    pics = [im for el in at.get("image") for im in el.proto.imgs]
    assert pics[0].caption == "query: unlabeled" and len(pics) == 1 + 8
    assert not any("share the query's class" in c.value for c in at.caption)
