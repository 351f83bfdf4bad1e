"""Shared fixtures. Every server a test needs is started here, on 127.0.0.1, and stopped."""

import os
import signal
import tempfile
import warnings

# Never touch the user's ~/.selfsup, whatever a test does; keep Ray on loopback.
os.environ["SELFSUP_HOME"] = tempfile.mkdtemp(prefix="selfsup-test-home-")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SELFSUP_STORAGE"):
    os.environ.pop(var, None)
# Tests Ctrl-C the CLIs they start. A shell starts a background job (`make test &`) with SIGINT
# ignored, and an ignored signal stays ignored across exec: Python in those CLIs would then never
# raise KeyboardInterrupt. Restore Python's handler, so children get SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from selfsup.pipelines.seaweed import exported  # noqa: E402


def _orphaned_ray_workers() -> dict[int, str]:
    """{pid: name} of this user's Ray worker processes whose raylet is gone. Ray ends its workers
    with their raylet; two in a full run did not, their exit hung: one spun a core in Ray's crash
    handler after "malloc(): unaligned tcache chunk detected" at shutdown, one slept after its core
    worker had shut down. Either would stay behind, and the spinning one slows every later test."""
    found = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{p}").st_uid != os.getuid():
                continue
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{p}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        raylet = next((e.partition(b"=")[2] for e in env if e.startswith(b"RAY_RAYLET_PID=")), b"")
        if raylet.isdigit() and raylet != p.encode() and not os.path.exists(f"/proc/{int(raylet)}"):
            found[int(p)] = name
    return found


@pytest.fixture(autouse=True)
def no_orphaned_ray_workers():
    """After each test, end (by process id) any Ray worker it left without a raylet, and say so."""
    yield
    orphans = _orphaned_ray_workers()
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if orphans:
        warnings.warn(f"ended Ray worker processes left without their raylet: {orphans}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS on free ports in a temporary directory; its endpoint is in AWS_* for the session."""
    with exported(tmp_path_factory.mktemp("s3home")) as ep:
        yield ep


_bucket_counter = iter(range(10**6))


@pytest.fixture
def s3_uri(s3):
    """A fresh s3:// prefix per test."""
    return f"s3://test-bucket/run{next(_bucket_counter)}-{os.getpid()}"


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """40 grey 16x16 images of 4 classes whose class is visible (a bright band at a class-dependent row)."""
    rng = np.random.default_rng(0)
    n, k = 40, 4
    labels = np.arange(n) % k
    images = rng.integers(0, 60, size=(n, 16, 16), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 3 * y + 2: 3 * y + 5, :] = 230
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["a", "b", "c", "d"]))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 2 CPUs, loopback only, no dashboard."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_shards(s3, tiny_npz):
    """The tiny npz as 5 train shards of 8 samples on the test S3 server."""
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    uri = "s3://test-data/tiny"
    write_shards(open_source(str(tiny_npz)), uri, ShardOptions(samples_per_shard=8), progress=False, log=lambda *_: None)
    return uri


@pytest.fixture(scope="session")
def tiny_labeled(s3, tiny_npz):
    """The tiny npz with a held-out test split, on the test S3 server."""
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    uri = "s3://test-data/tiny-split"
    m = write_shards(open_source(str(tiny_npz), holdout=0.25), uri, ShardOptions(samples_per_shard=8),
                     progress=False, log=lambda *_: None)
    return uri, m


@pytest.fixture(scope="session")
def model_runs(ray_local, tiny_labeled):
    """Two finished 2-step runs for export, embed and the Python API: a ResNet (SimCLR, trained
    through `selfsup.train`) and a DINO ViT with its teacher, at 16 px on the tiny labeled set."""
    import selfsup
    from selfsup.platform.config import load_config
    from selfsup.platform.trainer import train

    data, _ = tiny_labeled
    root = "s3://test-runs/export"
    common = {"data.uri": data, "data.batch_size": 8, "eval.knn": False, "schedule.steps": 2,
              "scaling.num_workers": 1, "train.precision": "fp32", "storage.root": root}
    summary = selfsup.train(**common, **{"model.name": "resnet10t", "model.cifar_stem": False, "storage.name": "resnet",
                                         "data.views.view0.size": 16, "data.views.view1.size": 16,
                                         "method.proj_hidden_dim": 32, "method.proj_dim": 16})
    assert summary["status"] == "finished" and summary["step"] == 2
    train(load_config("dino_vit_tiny", [*(f"{k}={v}" for k, v in common.items()), "storage.name=dino",
                                        "model.kwargs={img_size: 16, patch_size: 4, dynamic_img_size: true}",
                                        "data.views.global_view.size=16", "data.views.local_view.size=8",
                                        "data.views.n_local=2", "method.out_dim=64", "method.hidden_dim=32",
                                        "method.bottleneck_dim=16"]), log=lambda *_: None)
    return {"resnet": f"{root}/resnet", "dino": f"{root}/dino", "data": data}
