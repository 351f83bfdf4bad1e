"""Regression tests of the hardening issue: paths stay inside their roots, a damaged image is an
error and never a crash, data.strict means what it says, a run's status tells the truth, and every
bad input is one line with a meaningful exit code."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from selfsup.pipelines.shards import MANIFEST, ManifestError, ShardOptions, load_manifest, verify, write_shards
from selfsup.pipelines.sources import open_source
from selfsup.pipelines.endpoints import StorageError
from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import ConfigError, load_config
from selfsup.platform.runs import (HEARTBEAT, SUMMARY, RunError, check_name, list_runs, read_summary, resolve_run)

ROOT = "s3://test-runs/hardening"


def _shard(src, dest, spp=8):
    return write_shards(src, dest, ShardOptions(samples_per_shard=spp, workers=2), progress=False, log=lambda *_: None)


# ------------------------------------------------------------------------------ paths and names
def test_a_crafted_manifest_never_reaches_outside_dest(tiny_npz, tmp_path, s3, s3_uri):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dest = tmp_path / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    for bad in ("../../../victim.txt", str(victim), "train/../../../../victim.txt"):
        (dest / MANIFEST).write_text(json.dumps({
            "format": "selfsup-webdataset", "version": 1, "plan": "other", "source": "crafted",
            "splits": {"train": {"num_samples": 1, "shards": [{"path": bad, "num_samples": 1, "sha256": "x"}]}}}))
        with pytest.raises(ManifestError, match="not a relative path inside its root"):
            load_manifest(str(dest))
        with pytest.raises(ManifestError, match="not a relative path inside its root"):  # shard --overwrite
            write_shards(open_source(str(tiny_npz)), str(dest), ShardOptions(overwrite=True), progress=False,
                         log=lambda *_: None)
        assert victim.read_text() == "keep me"
    # The stores refuse such keys themselves, whatever hands them one.
    for store in (open_store(str(dest)), open_store(s3_uri, create=True)):
        for key in ("../victim.txt", "/etc/passwd", "a/../../b", ""):
            with pytest.raises(StorageError, match="not a relative path"):
                store.read(key)
            with pytest.raises(StorageError, match="not a relative path"):
                store.delete(key)


def test_one_name_rule_for_runs_and_checkpoints(tmp_path):
    for bad in ("../../x", "a/b", "/abs", ".hidden", "", "x" * 129, "a b"):
        with pytest.raises(RunError):
            check_name(bad)
        with pytest.raises(ConfigError, match="storage.name"):
            load_config(None, [f"storage.name={bad!r}" if bad else "storage.name=''"])
    assert check_name("simclr-resnet18-20261130.1_a") == "simclr-resnet18-20261130.1_a"
    with pytest.raises(RunError, match="checkpoints are named"):
        check_name("state.pt", "checkpoint")
    assert resolve_run("my-run", "s3://b/runs") == "s3://b/runs/my-run"
    assert resolve_run("./local/run", "s3://b/runs") == "./local/run"
    with pytest.raises(RunError, match="'a/b' is not valid"):
        resolve_run("a/b", str(tmp_path))


def test_runs_list_skips_nested_and_names_corrupt_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    for name, summary in (("good", {"status": "finished", "method": "simclr", "step": 3}),
                          ("a/b", {"status": "finished"}), ("bad", None)):
        (root / name).mkdir(parents=True)
        (root / name / SUMMARY).write_text(json.dumps(summary) if summary else "{not json")
    runs, bad = list_runs(str(root))
    assert [r["name"] for r in runs] == ["good"]
    assert len(bad) == 1 and f"{root}/bad/{SUMMARY}" in bad[0]
    assert main(["runs", "list", "--root", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "good" in out and err.strip().count("\n") == 0 and "bad/summary.json" in err
    # `runs show a/b --root R` is an invalid name, not a path that ignores R
    assert main(["runs", "show", "a/b", "--root", str(root)]) == 2
    assert "'a/b' is not valid" in capsys.readouterr().err


# ------------------------------------------------------------------------------ damaged images
def _png_member_flip(shard: bytes) -> bytes:
    """The shard with one byte flipped inside the compressed data of its first PNG."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(shard)) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        flipped = False
        for m in src:
            data = src.extractfile(m).read()
            if not flipped and m.name.endswith(".png"):
                b = bytearray(data)
                b[data.index(b"IDAT") + 8] ^= 0xFF
                data, flipped = bytes(b), True
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out.getvalue()


def test_a_flipped_png_byte_is_an_error_not_a_crash(tiny_npz):
    """torchvision 0.29's decoder segfaults on these bytes; the check before it raises instead.
    In a child process, so that a crash fails this test rather than the whole run."""
    code = r"""
import io, random, sys, zlib
import numpy as np
from PIL import Image
from selfsup.pipelines.decode import decode_image
rng, random_ = np.random.default_rng(0), random.Random(0)
outcome = {"raised": 0, "decoded": 0}
for trial in range(300):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert(random_.choice("L RGB RGBA P".split())).save(
        buf, format="PNG", compress_level=1)
    b = bytearray(buf.getvalue())
    if trial == 0:
        b[b.index(b"IDAT") + 8] ^= 0xFF  # the byte that crashed torchvision
    else:
        for _ in range(random_.randint(1, 3)):
            b[random_.randrange(8, len(b))] ^= random_.randint(1, 255)
    try:
        decode_image(bytes(b))
        outcome["decoded"] += 1
    except (ValueError, RuntimeError) as e:
        outcome["raised"] += 1
        if trial == 0:
            print("first:", e)
print(outcome)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "first: PNG chunk b'IDAT' fails its CRC" in r.stdout
    assert "'raised': " in r.stdout


@pytest.fixture(scope="module")
def flipped_shards(s3, tiny_npz):
    """tiny npz (with a test split) whose first train shard holds a byte-flipped PNG under a
    sha256 that matches: the manifest cannot see the damage."""
    uri = "s3://test-data/flipped"
    m = _shard(open_source(str(tiny_npz), holdout=0.25), uri)
    store = open_store(uri)
    entry = m["splits"]["train"]["shards"][0]
    data = _png_member_flip(store.read(entry["path"]))
    sha = hashlib.sha256(data).hexdigest()
    store.write(entry["path"], data, metadata={"sha256": sha})
    entry.update(sha256=sha, bytes=len(data))
    store.write(MANIFEST, json.dumps(m).encode())
    return uri, entry["path"]


def test_verify_decode_finds_the_damaged_image(flipped_shards, capsys):
    uri, path = flipped_shards
    assert verify(uri)[1] == []  # sha256 and tar structure are intact
    _, problems = verify(uri, decode=True)
    assert len(problems) == 1 and path in problems[0] and "fails its CRC" in problems[0]
    assert main(["shard", "verify", uri, "--decode"]) == 1
    assert f"BAD {uri}/{path}" in capsys.readouterr().out


def _tiny_train(data, name, *extra):
    return load_config(None, [
        f"data.uri={data}", "data.batch_size=8", "data.views.view0.size=16", "data.views.view1.size=16",
        "model.name=resnet10t", "model.cifar_stem=false", "method.proj_hidden_dim=32", "method.proj_dim=16",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=5", f"storage.root={ROOT}", f"storage.name={name}",
        "train.log_every_steps=1", "scaling.num_workers=1", *extra])


def test_a_damaged_image_is_a_bad_shard_skipped_or_fatal_as_data_strict_says(ray_local, flipped_shards):
    from selfsup.platform.runs import read_metrics
    from selfsup.platform.trainer import train

    uri, path = flipped_shards
    # strict=false: the stream and the rank-0 kNN evaluator (which reads the train split too) skip it
    s = train(_tiny_train(uri, "lenient", "schedule.steps=3", "train.checkpoint_every_s=0.01"), log=lambda *_: None)
    assert s["status"] == "finished" and s["step"] == 3
    store = open_store(f"{ROOT}/lenient")
    # (and checkpoints by seconds: every step here takes longer than 0.01 s)
    assert {k.split("/")[0] for k in store.list() if k.endswith("/manifest.json")} == {
        f"checkpoint-{i:08d}" for i in (1, 2, 3)}
    rows = read_metrics(store)
    assert max(r.get("bad_shards", 0) for r in rows) == 1
    # strict=true: fails naming the shard
    with pytest.raises(Exception) as e:
        train(_tiny_train(uri, "strict", "schedule.steps=3", "data.strict=true"), log=lambda *_: None)
    assert path in str(e.value)
    s = read_summary(open_store(f"{ROOT}/strict"))
    assert s["status"] == "failed" and path in s["error"] and "fails its CRC" in s["error"]


# ------------------------------------------------------------------------------ status and failures
def test_a_run_whose_driver_vanished_reads_as_lost(tmp_path):
    store = open_store(str(tmp_path / "r"))
    store.write(SUMMARY, json.dumps({"status": "running", "step": 4}).encode())
    store.write(HEARTBEAT, json.dumps({"time": time.time() - 3600}).encode())
    s = read_summary(store)
    assert s["status"] == "lost" and "no heartbeat since" in s["error"]
    store.write(HEARTBEAT, json.dumps({"time": time.time()}).encode())
    assert read_summary(store)["status"] == "running"


def test_a_request_the_cluster_can_never_meet_fails_at_once(ray_local, tiny_labeled, capsys):
    data, _ = tiny_labeled
    t0 = time.monotonic()
    code = main(["train", "simclr_resnet18", f"data.uri={data}", f"storage.root={ROOT}", "storage.name=too-big",
                 "scaling.cpus_per_worker=64", "data.batch_size=8", "scaling.num_workers=1"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 60
    assert "needs 1 worker(s) of CPU 64" in err and "the Ray cluster has CPU 2" in err and len(err.strip().splitlines()) == 1
    assert read_summary(open_store(f"{ROOT}/too-big"))["status"] == "failed"


def test_a_failure_inside_a_ray_worker_is_one_line(ray_local, tiny_labeled, capsys):
    data, _ = tiny_labeled
    code = main(["train", "simclr_resnet18", f"data.uri={data}", f"storage.root={ROOT}", "storage.name=worker-fails",
                 "data.batch_size=8", "scaling.num_workers=1", "schedule.steps=2", "model.name=resnet10t",
                 "model.kwargs={no_such_argument: 1}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("selfsup: error: ValueError: model.kwargs for 'resnet10t'") and "no_such_argument" in err
    s = read_summary(open_store(f"{ROOT}/worker-fails"))
    assert s["status"] == "failed" and s["error"].startswith("ValueError: model.kwargs") and "no_such_argument" in s["error"]


def _cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", **extra)
    return env


def test_a_ray_address_that_does_not_answer_fails_in_seconds(s3, tiny_labeled):
    import socket

    data, _ = tiny_labeled
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "selfsup", "train", "simclr_resnet18", f"data.uri={data}",
                        f"storage.root={ROOT}", "storage.name=no-cluster", "data.batch_size=8"],
                       env=_cli_env(RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"selfsup: error: the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} does not answer")
    s = read_summary(open_store(f"{ROOT}/no-cluster"))
    assert s["status"] == "failed" and "does not answer" in s["error"]


def test_ctrl_c_and_sigterm_end_the_run_with_their_status(s3, tiny_labeled):
    """Two real `selfsup train` processes side by side, one stopped by SIGINT, one by SIGTERM."""
    data, _ = tiny_labeled
    cases = {"interrupted": (signal.SIGINT, 130), "terminated": (signal.SIGTERM, 143)}
    procs = {}
    for status in cases:
        procs[status] = subprocess.Popen(
            [sys.executable, "-m", "selfsup", "train", "simclr_resnet18", f"data.uri={data}", f"storage.root={ROOT}",
             f"storage.name=stopped-{status}", "data.batch_size=8", "model.name=resnet10t", "model.cifar_stem=false",
             "data.views.view0.size=16", "data.views.view1.size=16", "schedule.steps=100000", "scaling.num_workers=1",
             "scaling.cpus_per_worker=0.25", "eval.at_start=false", "train.log_every_steps=1"],
            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        store, deadline, stopped = open_store(ROOT, create=True), time.monotonic() + 240, {}
        while len(stopped) < len(procs) and time.monotonic() < deadline:
            for status, proc in procs.items():
                if status in stopped:  # signalled: it may have ended already, while the other one starts
                    continue
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                if store.exists(f"stopped-{status}/metrics.jsonl"):
                    proc.send_signal(cases[status][0])  # training has reported a step: mid-run
                    stopped[status] = time.monotonic()
            time.sleep(0.5)
        assert len(stopped) == len(procs), "training never reported a step"
        for status, proc in procs.items():
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == cases[status][1] and time.monotonic() - stopped[status] < 90, err[-3000:]
            # the console: progress lines and our own last line, nothing from Ray's processes going down
            assert f"selfsup: {status}" in err.splitlines()
            noise = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("step ", f"selfsup: {status}"))]
            assert not noise, noise[:5]
            s = read_summary(open_store(f"{ROOT}/stopped-{status}"))
            assert s["status"] == status and s["step"] > 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------ one-line errors
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_npz):
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.yaml").write_bytes("method:\n  name: sim\xe9clr\n".encode("latin-1"))
    (d / "empty.npz").write_bytes(b"")
    np.savez(d / "none.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    np.savez(d / "negative.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, -1, 2]))
    (d / "folder" / "cls").mkdir(parents=True)
    (d / "folder" / "cls" / "broken.png").write_bytes(b"not an image")
    shards = d / "shards"
    _shard(open_source(str(tiny_npz), holdout=0.25), str(shards))
    run = d / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {{uri: {shards}}}\n")
    (run / SUMMARY).write_text('{"status": "finished"}')
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n')
    home_file = d / "home-is-a-file"
    home_file.write_text("")
    creds = d / "creds-home" / "storage"
    creds.mkdir(parents=True)
    (creds / "credentials.json").write_text("garbage")
    return d


BAD_INPUTS = [
    # (argv, extra env, expected exit code, words the one line must hold)
    (["config", "show", "simclr_resnet18", "optim.lr=[1"], {}, 2, "override optim.lr: value '[1' is not valid YAML"),
    (["config", "show", "simclr_resnet18", "method=5"], {}, 2, "method is a section of keys"),
    (["config", "show", "{d}"], {}, 2, "is not a file"),
    (["config", "show", "{d}/latin1.yaml"], {}, 2, "is not UTF-8"),
    (["config", "show", "simclr_resnet18", "optim.lr=.inf"], {}, 2, "optim.lr: Input should be a finite number"),
    (["config", "show", "simclr_resnet18", "schedule.time_budget_s=.inf"], {}, 2, "finite number"),
    (["config", "show", "simclr_resnet18", "data.std=[0]"], {}, 2, "data.std must be > 0"),
    (["config", "show", "simclr_resnet18", "data.mean=[]"], {}, 2, "data.mean is empty"),
    (["config", "show", "simclr_resnet18", "storage.name=../../x"], {}, 2, "run name '../../x' is not valid"),
    (["shard", "{d}/empty.npz", "{d}/out1"], {}, 2, "is not a readable .npz"),
    (["shard", "{d}/none.npz", "{d}/out2"], {}, 2, "holds no images"),
    (["shard", "{d}/negative.npz", "{d}/out3"], {}, 2, "labels must be >= 0"),
    (["shard", "{d}/folder", "{d}/out4", "--quiet"], {}, 2, "has no readable image"),
    (["shard", "{npz}", "{d}/out5", "--samples-per-shard", "0"], {}, 2, "--samples-per-shard must be >= 1"),
    (["eval", "knn", "nope", "--root", "{d}/runs"], {}, 2, "no run at"),
    (["eval", "knn", "r1", "--root", "{d}/runs", "--checkpoint", "checkpoint-00000099"], {}, 2, "has no checkpoint"),
    (["eval", "knn", "r1", "--root", "{d}/runs", "--checkpoint", "../../x"], {}, 2, "checkpoint name '../../x' is not valid"),
    (["eval", "finetune", "r1", "--root", "{d}/runs", "--fraction", "0"], {}, 2, "--fraction must be in (0, 1], got 0.0"),
    (["eval", "knn", "r1", "--root", "{d}/runs", "--epochs", "3"], {}, 2, "--epochs is for `eval finetune`"),
    (["eval", "finetune", "r1", "--root", "{d}/runs", "--random-init"], {}, 2, "fine-tuning always scores the random init"),
    (["train", "simclr_resnet18", "data.uri={d}/shards", "storage.root={d}/runs", "data.train_split=nope"], {}, 2,
     "data.train_split 'nope' is not a split"),
    (["train", "simclr_resnet18", "data.uri={d}/shards", "storage.root={d}/runs", "eval.test_split=val"], {}, 2,
     "eval.test_split 'val' is not a split"),
    (["runs", "show", "r1", "--root", "{d}/runs"], {}, 2, "metrics.jsonl line 2 is not a metrics row"),
    (["shard", "verify", "s3://b/p"], {"AWS_ENDPOINT_URL": "not-a-url"}, 2, "is not an http(s) URL"),
    (["storage", "up"], {"SELFSUP_HOME": "{d}/home-is-a-file"}, 2, "cannot hold the embedded S3 server's files"),
    (["storage", "up"], {"SELFSUP_HOME": "relative/home"}, 2, "SELFSUP_HOME must be an absolute path"),
    (["storage", "up"], {"SELFSUP_HOME": "{d}/creds-home"}, 2, "credentials file"),
    (["data", "preview", "simclr_resnet18", "--out", "{d}/no/such/folder/v.png"], {}, 2, "does not exist"),
]


@pytest.mark.parametrize("argv, env, code, words", BAD_INPUTS, ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_every_bad_input_is_one_line_and_an_exit_code(bad_inputs, tiny_npz, monkeypatch, capsys, argv, env, code, words):
    d = str(bad_inputs)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(d=d))
    assert main([a.format(d=d, npz=tiny_npz) for a in argv]) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-1500:]
    assert lines[0].startswith("selfsup: error: ") and words in lines[0], lines[0]


def test_the_real_entry_point_prints_one_line_too(tmp_path):
    r = subprocess.run([sys.executable, "-m", "selfsup", "config", "show", "simclr_resnet18", "method=5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "selfsup: error: method is a section of keys, got 5 (did you mean method.name=...?)"]
    r = subprocess.run([sys.executable, "-m", "selfsup", "--debug", "config", "show", "simclr_resnet18", "method=5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr  # --debug shows it


def test_the_s3_server_dying_mid_shard_is_one_line(tmp_path):
    from selfsup.pipelines.seaweed import EmbeddedS3

    server = EmbeddedS3(tmp_path / "home")
    ep = server.up()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ep.env())
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "shard", "fashion-mnist", "s3://dying/fm", "--quiet",
                             "--samples-per-shard", "200"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if open_store("s3://dying/fm", ep).exists("_progress.json"):
                    break
            except StorageError:
                pass
            time.sleep(0.2)
        os.kill(server._state()["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.down()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"selfsup: error: cannot reach S3 endpoint {ep.url}")
