"""`selfsup embed` (Ray Data batch inference to Parquet, whose kNN is `selfsup eval knn`'s) and the
Python API (`selfsup.train` -> `export` -> `load_backbone`; errors as the CLI's lines)."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import selfsup
from selfsup.pipelines.shards import load_manifest
from selfsup.platform.cli import main
from selfsup.platform.config import ConfigError
from selfsup.platform.evaluate import evaluate_run, knn_top1, load_labeled, load_run


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_embed_writes_every_sample_and_its_knn_is_eval_knns(model_runs, tmp_path):
    run, data = model_runs["resnet"], model_runs["data"]
    out = tmp_path / "emb"
    splits = load_manifest(data)["splits"]
    # as a user runs it: its own process and local Ray cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "selfsup", "embed", run, data, str(out), "--batch-size", "7",
                        "--workers", "2", "--cpus-per-worker", "0.5"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"embedded train {splits['train']['num_samples']}, test {splits['test']['num_samples']} "
                               "samples (512 features, student backbone)")
    # the console is ours: no line from Ray, Ray Data or their actors (a progress line every 30 s at most)
    assert not [line for line in r.stderr.splitlines() if not line.startswith("embed ")], r.stderr
    table = pq.read_table(out)
    assert table.schema.names == ["key", "label", "split", "embedding"]
    _, method, _ = load_run(run)
    for split in ("train", "test"):
        rows = table.filter(pc.equal(table["split"], split))
        assert rows.num_rows == splits[split]["num_samples"]
        assert len(set(rows["key"].to_pylist())) == rows.num_rows
        emb = rows["embedding"]
        assert emb.type.list_size == method.backbone.num_features and emb.type.value_type == pa.float32()
    # the same samples and labels as the evaluator reads, in key order
    feats, labels = {}, {}
    for split in ("train", "test"):
        rows = table.filter(pc.equal(table["split"], split)).sort_by("key")
        feats[split] = F.normalize(torch.tensor(rows["embedding"].to_pylist()), dim=1)
        labels[split] = torch.tensor(rows["label"].to_pylist())
        assert labels[split].tolist() == load_labeled(data, split)[1].tolist()
    expected = evaluate_run(run, "knn")["knn_top1"]
    assert knn_top1(feats["train"], labels["train"], feats["test"], labels["test"]) == expected
    # one split, into S3, replacing what is there only when asked
    uri = "s3://test-runs/embedded/resnet"
    assert selfsup.embed(run, data, uri, splits=["test"])["rows"] == {"test": splits["test"]["num_samples"]}
    with pytest.raises(Exception, match="already holds files: pass --overwrite"):
        selfsup.embed(run, data, uri, splits=["test"])


def test_unlabeled_samples_get_a_null_label(model_runs, tmp_path):
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    flat = tmp_path / "flat"
    flat.mkdir()
    g = torch.Generator().manual_seed(0)
    from torchvision.io import encode_png

    for i in range(5):
        (flat / f"img{i}.png").write_bytes(bytes(encode_png(torch.randint(0, 255, (3, 20, 24), generator=g,
                                                                           dtype=torch.uint8)).tolist()))
    write_shards(open_source(str(flat)), str(tmp_path / "shards"), ShardOptions(), progress=False, log=lambda *_: None)
    assert main(["embed", model_runs["resnet"], str(tmp_path / "shards"), str(tmp_path / "emb")]) == 0
    table = pq.read_table(tmp_path / "emb")
    assert table.num_rows == 5 and table["label"].null_count == 5


def test_bad_embed_requests_are_one_line_exit_2(model_runs, tmp_path, capsys):
    run, data = model_runs["resnet"], model_runs["data"]
    assert main(["embed", run, data, str(tmp_path / "a"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in _one_line(capsys)
    assert main(["embed", run, data, str(tmp_path / "a"), "--split", "val"]) == 2
    assert "split 'val' is not in" in _one_line(capsys)
    assert main(["embed", run, data, str(tmp_path / "a"), "--teacher"]) == 2
    assert "has no teacher" in _one_line(capsys)
    assert main(["embed", run, "s3://test-runs/no-data-here", str(tmp_path / "a")]) == 2
    assert "no-data-here" in _one_line(capsys)


def test_train_export_load_backbone_round_trip(model_runs, tmp_path):
    run = model_runs["resnet"]
    meta = selfsup.export(run, format="timm", out=str(tmp_path / "timm"))
    assert meta["step"] == 2 and meta["format"] == "timm"
    from_run, from_export = selfsup.load_backbone(run), selfsup.load_backbone(str(tmp_path / "timm"))
    assert not from_run.training and not from_export.training
    assert from_export.input_size == (3, 16, 16) and from_export.mean == from_run.mean
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)  # grey, another size: preprocess fits them
    x = from_export.preprocess(images)
    assert x.shape == (4, 3, 16, 16)
    with torch.no_grad():
        assert (from_export(x) - from_run(x)).abs().max() <= 1e-5
    # the evaluator's features are the backbone's on that input
    from selfsup.platform.evaluate import batch_features

    cfg, method, _ = load_run(run)
    with torch.no_grad():
        expected = batch_features(method.backbone, list(images), 16, cfg.data.mean, cfg.data.std)
        assert (from_run(x) - expected).abs().max() <= 1e-5
    dino = selfsup.load_backbone(model_runs["dino"], teacher=True)
    with pytest.raises(Exception, match="exported without --teacher"):
        selfsup.load_backbone(str(tmp_path / "timm"), teacher=True)
    assert dino.input_size == (3, 16, 16)


def test_api_errors_carry_the_clis_line(capsys, tmp_path):
    with pytest.raises(ConfigError) as e:
        selfsup.train("demo", **{"data.batch_sise": 8})
    assert main(["train", "demo", "data.batch_sise=8"]) == 2
    assert _one_line(capsys) == f"selfsup: error: {' '.join(str(e.value).split())}"
    with pytest.raises(ConfigError, match="schedule.epochs"):
        selfsup.train(schedule__epochs=-1)
    assert "load_backbone" in selfsup.__doc__ and set(selfsup.API) <= set(dir(selfsup))
