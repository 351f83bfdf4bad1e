"""Regression tests of the second hardening issue: a stale Ray address, damaged interlaced PNGs,
resource bombs (huge image headers, labels, YAML aliases, grids), sweeps that could never work,
two writers on one shard destination, and errors that name their cause."""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from selfsup.pipelines.decode import decode_image
from selfsup.pipelines.locks import LOCK, Locked, locked
from selfsup.pipelines.shards import MANIFEST, ShardOptions, verify, write_shards
from selfsup.pipelines.sources import open_source
from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import ConfigError, load_config
from selfsup.platform.runs import read_summary

ROOT = "s3://test-runs/hardening2"
TINY_TRAIN = ["data.batch_size=8", "model.name=resnet10t", "model.cifar_stem=false", "data.views.view0.size=16",
              "data.views.view1.size=16", "method.proj_hidden_dim=32", "method.proj_dim=16", "eval.train_samples=0",
              "eval.test_samples=0", "eval.k=5", "scaling.num_workers=1", "schedule.steps=2", "eval.at_start=false"]


def _cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **extra}


# ------------------------------------------------------------------------------ a stale Ray address
def test_a_dead_clusters_address_file_does_not_stop_a_local_run(s3, tiny_labeled):
    """`ray.init()` without an address joins the cluster named in Ray's temp dir; one that died
    without being stopped left its address there. A local run starts its own cluster anyway."""
    data, _ = tiny_labeled
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:  # short: Ray's socket paths live there
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # nothing listens there
        r = subprocess.run([sys.executable, "-m", "selfsup", "train", "simclr_resnet18", f"data.uri={data}",
                            f"storage.root={ROOT}", "storage.name=stale-address", *TINY_TRAIN],
                           env=_cli_env(RAY_TMPDIR=tmp), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_summary(open_store(f"{ROOT}/stale-address"))["status"] == "finished"


# ------------------------------------------------------------------------------ images
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, raw: bytes, colour: int = 0, interlace: int = 1, depth: int = 8) -> bytes:
    """A PNG of these scanlines: every CRC right, whatever the scanlines hold."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) +
            _chunk(b"IEND", b""))


def _interlaced_rows(arr: np.ndarray) -> list[bytes]:
    """The scanlines of an Adam7-interlaced image, pass by pass, each with filter type 0."""
    rows = []
    for x0, y0, dx, dy in ADAM7:
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            rows += [b"\0" + row.tobytes() for row in sub]
    return rows


def test_an_interlaced_png_decodes_and_a_damaged_one_is_an_error_not_a_crash():
    arr = np.random.default_rng(0).integers(0, 255, (13, 11), dtype=np.uint8)
    assert (decode_image(_png(11, 13, b"".join(_interlaced_rows(arr))))[0].numpy() == arr).all()
    # Damaged in ways whose CRCs still match: torchvision 0.29's decoder segfaulted on these. In a
    # child process, so that a crash fails this test rather than the whole run.
    code = r"""
import random, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_hardening2 import _interlaced_rows, _png
from selfsup.pipelines.decode import decode_image
rng, r = np.random.default_rng(1), random.Random(1)
raised = 0
for trial in range(240):
    h, w = r.randint(1, 40), r.randint(1, 40)
    arr = rng.integers(0, 255, (h, w) if trial % 2 else (h, w, 3), dtype=np.uint8)
    rows = _interlaced_rows(arr)
    if trial % 3 == 0:  # a filter type that does not exist, on any row of any pass
        i = r.randrange(len(rows))
        rows[i] = bytes([r.randint(5, 255)]) + rows[i][1:]
        raw = b"".join(rows)
    elif trial % 3 == 1:  # the stream one byte short
        raw = b"".join(rows)[:-1]
    else:  # one byte gone from the middle, or one too many
        raw = bytearray(b"".join(rows))
        i = r.randrange(len(raw))
        raw = raw[:i] + raw[i + 1:] if trial % 2 else raw[:i] + b"\0" + raw[i:]
    try:
        decode_image(_png(w, h, bytes(raw), colour=0 if arr.ndim == 2 else 2))
    except ValueError:
        raised += 1
print("raised", raised)
"""
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["raised", "240"]


def _jpeg_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(b)


def test_an_image_whose_header_claims_30000x30000_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    png = _png(30000, 30000, b"\0" * 30001, interlace=0)  # 875 KB made verify --decode use 2.7 GB
    for data in (png, _jpeg_claiming(30000, 30000)):
        with pytest.raises(ValueError, match="30000x30000, over the cap of 64000000 pixels"):
            decode_image(data)
    from selfsup.dashboard.pictures import decode_upload

    with pytest.raises(ValueError, match="over the cap"):
        decode_upload(png, 3)
    # the cap is the user's to set
    small = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(small, format="PNG")
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", "700")
    with pytest.raises(ValueError, match="28x28, over the cap of 700 pixels"):
        decode_image(small.getvalue())
    # an image folder's huge image is skipped, named in the manifest
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", str(40 * 40))
    for cls, side in (("a", 28), ("b", 28), ("b", 41)):
        (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "src" / cls / f"{side}.png")
    m = write_shards(open_source(str(tmp_path / "src")), str(tmp_path / "out"), ShardOptions(),
                     progress=False, log=lambda *_: None)
    assert m["splits"]["train"]["num_samples"] == 2
    assert len(m["skipped"]) == 1 and "41x41 is over the cap of 1600 pixels" in m["skipped"][0]["error"]


def test_a_shard_holding_a_huge_header_fails_verify_decode_naming_it(tmp_path):
    import tarfile

    dest = tmp_path / "shards"
    write_shards(open_source(str(_npz(tmp_path, "ok", np.zeros((4, 8, 8), np.uint8), np.arange(4)))), str(dest),
                 ShardOptions(), progress=False, log=lambda *_: None)
    m = json.loads((dest / MANIFEST).read_text())
    entry = m["splits"]["train"]["shards"][0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("train_00000000.png", _png(30000, 30000, b"\0" * 30001, interlace=0)),
                           ("train_00000000.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (dest / entry["path"]).write_bytes(buf.getvalue())
    import hashlib

    entry.update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), num_samples=1)
    (dest / MANIFEST).write_text(json.dumps(m))
    _, problems = verify(str(dest), decode=True)
    assert len(problems) == 1 and entry["path"] in problems[0] and "over the cap" in problems[0]


def _npz(d, name, images, labels, **extra):
    path = d / f"{name}.npz"
    np.savez(path, images=images, labels=labels, **extra)
    return path


def test_npz_channels_are_squeezed_or_stripped_of_alpha(tmp_path):
    for name, images, mode, pixel in (
            ("grey1", np.full((4, 8, 8, 1), 200, np.uint8), "L", [200]),
            ("grey_alpha", np.stack([np.full((4, 8, 8), 90, np.uint8), np.zeros((4, 8, 8), np.uint8)], -1), "L", [90]),
            ("rgba", np.concatenate([np.full((4, 8, 8, 3), (200, 10, 10), np.uint8),
                                     np.zeros((4, 8, 8, 1), np.uint8)], -1), "RGB", [200, 10, 10])):
        dest = tmp_path / f"out-{name}"
        m = write_shards(open_source(str(_npz(tmp_path, name, images, np.arange(4)))), str(dest),
                         ShardOptions(fmt="png"), progress=False, log=lambda *_: None)
        assert m["image"]["mode"] == mode, name
        from selfsup.pipelines.decode import shard_samples

        _, imgs, _ = shard_samples((dest / m["splits"]["train"]["shards"][0]["path"]).read_bytes())
        assert imgs[0][:, 0, 0].tolist() == pixel, name


def test_16_bit_images_are_scaled_and_float_ones_refused_naming_the_mode(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "src" / "a" / "dark16.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "src" / "a" / "float.tiff")
    m = write_shards(open_source(str(tmp_path / "src")), str(tmp_path / "out"), ShardOptions(fmt="png"),
                     progress=False, log=lambda *_: None)
    from selfsup.pipelines.decode import shard_samples

    _, imgs, _ = shard_samples((tmp_path / "out" / m["splits"]["train"]["shards"][0]["path"]).read_bytes())
    assert [int(im.max()) for im in imgs] == [1000 >> 8]  # not clipped to 255: dark stays dark
    assert len(m["skipped"]) == 1 and "image mode F (float pixels) has no known range" in m["skipped"][0]["error"]
    # a 16-bit PNG in a shard decodes to 8 bits too
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 51400, np.uint16)).save(buf, format="PNG")
    t = decode_image(buf.getvalue())
    assert t.dtype.itemsize == 1 and int(t.max()) == 51400 >> 8


# ------------------------------------------------------------------------------ two writers
def test_a_second_writer_on_the_same_dest_fails_naming_the_first(s3, s3_uri, tmp_path, tiny_npz):
    for dest in (s3_uri, str(tmp_path / "local")):
        store = open_store(dest, create=True)
        with locked(store, "selfsup shard"):
            assert store.exists(LOCK)
            with pytest.raises(Locked, match=r"is being written by .* pid \d+ \(selfsup shard, heartbeat \d+ s ago\)"):
                write_shards(open_source(str(tiny_npz)), dest, ShardOptions(overwrite=True), progress=False,
                             log=lambda *_: None)
            assert main(["shard", str(tiny_npz), dest, "--overwrite", "--quiet"]) == 2
        assert not store.exists(LOCK)  # released
        # a lock whose owner stopped beating, or whose process here is gone (killed), is taken over
        dead = subprocess.Popen(["true"])
        dead.wait()  # its pid is free now
        for lock in ({"id": "x", "owner": "gone", "heartbeat": time.time() - 3600},
                     {"id": "y", "owner": "killed", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}):
            store.write(LOCK, json.dumps(lock).encode())
            m = write_shards(open_source(str(tiny_npz)), dest, ShardOptions(samples_per_shard=8), progress=False,
                             log=lambda *_: None)
            assert verify(dest)[1] == [] and m["splits"]["train"]["num_samples"] == 40 and not store.exists(LOCK)


def test_two_selfsup_shard_runs_into_one_dest_leave_a_manifest_that_matches(s3, tmp_path):
    """The first one (all of Fashion-MNIST) holds the lock while it runs; the second, with
    --overwrite, fails at once naming it; the first's manifest matches every shard."""
    dest = "s3://test-data/two-writers"
    first = subprocess.Popen([sys.executable, "-m", "selfsup", "shard", "fashion-mnist", dest, "--quiet",
                              "--samples-per-shard", "2000"], env=_cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        store = open_store(dest, create=True)
        deadline = time.monotonic() + 120
        while not store.exists(LOCK) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert store.exists(LOCK), first.stderr.read() if first.poll() is not None else "no lock"
        npz = _npz(tmp_path, "other", np.zeros((4, 8, 8), np.uint8), np.arange(4))
        second = subprocess.run([sys.executable, "-m", "selfsup", "shard", str(npz), dest, "--overwrite", "--quiet"],
                                env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-2000:]
        assert f"selfsup: error: {dest} is being written by" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.wait(300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    manifest, problems = verify(dest)
    assert problems == [] and manifest["source"] == "fashion-mnist" and not store.exists(LOCK)


def test_s3_creates_an_object_only_when_it_is_absent(s3, s3_uri):
    store = open_store(s3_uri, create=True)
    assert store.create("k", b"1") and not store.create("k", b"2") and store.read("k") == b"1"


# ------------------------------------------------------------------------------ YAML and sweeps
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, capsys):
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    assert len(LAUGHS) < 400
    with pytest.raises(ConfigError, match=r"aliases \(\*a\) are not allowed"):
        load_config(str(tmp_path / "laughs.yaml"))
    with pytest.raises(ConfigError, match="not allowed"):
        load_config("simclr_resnet18", ["optim.lr=&x [*x]"])
    assert main(["tune", "simclr_resnet18", "--space", str(tmp_path / "laughs.yaml"),
                 f"storage.root={tmp_path}/never"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and "aliases (*a) are not allowed" in err and not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, words", [
    (["--space", "{d}/grid.yaml"], "the sweep would run 1,000,000,000 trials (grid points x --samples), more than 10,000"),
    (["--metric", "nope"], "--metric 'nope' is not reported by simclr runs (they report knn_top1)"),
    (["--samples", "0"], "--samples, --grace-period and --max-concurrent must be >= 1"),
    (["--name", ""], "sweep name '' is not valid"),
])
def test_a_sweep_that_cannot_work_is_refused_before_it_starts(tmp_path, capsys, args, words):
    (tmp_path / "grid.yaml").write_text("".join(
        f"k{i}:\n  keys: [optim.lr]\n  grid: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]\n" for i in range(9)))
    code = main(["tune", "simclr_resnet18", *[a.format(d=tmp_path) for a in args], f"storage.root={tmp_path}/never"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------ one-line errors
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_npz):
    d = tmp_path_factory.mktemp("bad2")
    _npz(d, "biglabel", np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 300_000_000]))
    _npz(d, "shortnames", np.zeros((4, 8, 8), np.uint8), np.arange(4), class_names=np.array(["a", "b"]))
    _npz(d, "ch5", np.zeros((4, 8, 8, 5), np.uint8), np.arange(4))
    _npz(d, "empty-images", np.zeros((4, 0, 8), np.uint8), np.arange(4))
    _npz(d, "uint16", np.zeros((4, 8, 8), np.uint16), np.arange(4))
    write_shards(open_source(str(tiny_npz)), str(d / "shards"), ShardOptions(), progress=False, log=lambda *_: None)
    run = d / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {{uri: {d / 'shards'}}}\n")
    (run / "summary.json").write_text('{"status": "finished"}')
    (run / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 1, "note": "\xe9t\xe9"}\n')
    for name, state in (("sw1", {"spec": 5, "name": "sw1"}), ("sw2", {"spec": {"metric": "knn_top1"}, "name": "sw2"})):
        (d / "runs" / name).mkdir()
        (d / "runs" / name / "sweep.json").write_text(json.dumps(state))
    return d


BAD = [
    (["shard", "{d}/biglabel.npz", "{d}/o1"], "labels reach 300000000, more than 100000 classes"),
    (["shard", "{d}/shortnames.npz", "{d}/o2"], "label 3 has no class name (`class_names` holds 2)"),
    (["shard", "{d}/ch5.npz", "{d}/o3"], "`images` has 5 channels; give 1 (grey), 3 (RGB) or 4 (RGBA)"),
    (["shard", "{d}/empty-images.npz", "{d}/o4"], "`images` are of size 0x8"),
    (["shard", "{d}/uint16.npz", "{d}/o5"], "`images` must be uint8"),
    (["runs", "show", "r1", "--root", "{d}/runs"], "r1/metrics.jsonl is not UTF-8 text (byte"),
    (["sweeps", "show", "sw1", "--root", "{d}/runs"], "sw1/sweep.json is not a sweep's state"),
    (["sweeps", "show", "sw2", "--root", "{d}/runs"], "sw2/sweep.json is not a sweep's state"),
    (["data", "preview", "simclr_resnet18", "data.uri={d}/shards", "--out", "{d}/x.xyz"], "write a .png, .jpg, .jpeg file"),
    (["data", "preview", "simclr_resnet18", "data.uri={d}/shards", "--out", "{d}"], "is a folder: name the picture"),
    (["data", "preview", "simclr_resnet18", "data.uri={d}/shards", "data.train_split=nope", "--out", "{d}/v.png"],
     "data.train_split 'nope' is not a split of"),
    (["dashboard", "--root", "http://x", "--port", "8599"], "--root: unsupported location 'http://x'"),
    (["train", "s3://test-runs/hardening2/nothing-here.yaml"], "config s3://test-runs/hardening2/nothing-here.yaml not found"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(BAD)])
def test_each_bad_input_is_one_line_exit_2_naming_its_file(s3, bad, capsys, argv, words):
    open_store(ROOT, create=True)  # the bucket is there; the config is not
    assert main([a.format(d=bad) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfsup: error: ") and words in lines[0], lines


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as a full disk needs root (CI runs as root)")
def test_a_full_disk_is_one_line_naming_the_file_under_dest(tmp_path):
    np.savez(tmp_path / "noise.npz", images=np.random.default_rng(0).integers(0, 255, (400, 32, 32), np.uint8),
             labels=np.arange(400) % 4)
    dest = tmp_path / "full"
    dest.mkdir()
    # a private mount namespace: the 64 KB disk goes away with the command
    script = (f"mount -t tmpfs -o size=64k tmpfs {dest} && exec {sys.executable} -m selfsup shard "
              f"{tmp_path / 'noise.npz'} {dest}/fm --quiet --samples-per-shard 50")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=_cli_env(),
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"selfsup: error: cannot write {dest}/fm/") and "No space left on device" in lines[0]


# ------------------------------------------------------------------------------ SIGTERM
def test_a_benchmark_stopped_by_sigterm_stops_its_s3_server(tmp_path):
    """`timeout` sends SIGTERM: the benchmark's S3 server (in a session of its own, so not in the
    signalled group) goes with it, as on Ctrl-C."""
    import signal

    import ray  # noqa: F401  (puts the psutil that Ray ships on the path)
    import psutil

    bench = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "shard_throughput.py")
    proc = subprocess.Popen([sys.executable, bench, "--quick"], env=_cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    weed = None
    try:
        deadline = time.monotonic() + 120
        while weed is None and time.monotonic() < deadline and proc.poll() is None:
            weed = next((c for c in psutil.Process(proc.pid).children(recursive=True)
                         if "weed" in " ".join(c.cmdline()[:1])), None)
            time.sleep(0.2)
        assert weed is not None, proc.stderr.read() if proc.poll() is not None else "no S3 server started"
        time.sleep(2)  # sharding under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 143
        weed.wait(30)  # raises TimeoutExpired while it still runs
        assert not weed.is_running()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if weed is not None and weed.is_running():
            weed.kill()
