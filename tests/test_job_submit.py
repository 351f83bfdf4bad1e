"""`ray job submit` for real: a Ray head started here on 127.0.0.1 (its own temp dir and free
ports), the repository as the job's working dir, a tiny training run against the test S3 server.
Only the processes this test started are stopped (`ray start --block` ends its own children)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from selfsup.pipelines.storage import open_store
from selfsup.platform.runs import read_metrics, read_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny SimCLR run on tiny_labeled, for the training job and the sweep's trials alike
TINY = ["data.batch_size=8", "data.views.view0.size=16", "data.views.view1.size=16", "model.name=resnet10t",
        "model.cifar_stem=false", "method.proj_hidden_dim=64", "method.proj_dim=32", "scaling.num_workers=1",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=5"]
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(temp_dir: str) -> list[int]:
    __import__("ray")  # puts the psutil that Ray ships (ray/thirdparty_files) on the path
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture
def ray_head(s3):
    """A Ray head on 127.0.0.1 in a temp dir of its own; yields (dashboard URL, env for clients)."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-")
    gcs, dash, client, agent, agent_grpc, rt_env, node_mgr, obj_mgr, metrics = ports = _free_ports(9)
    # the workers' 201 ports must hold none of the others (Ray refuses to start otherwise)
    lo = next(p for p in _free_ports(20) if not any(p <= q <= p + 200 for q in ports))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # the head's AWS_* reach every job's driver and workers: the test S3 server's, not on a command line
    env.update(s3.env(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_DATA_DISABLE_PROGRESS_BARS="1", SELFSUP_HOME=os.path.join(temp_dir, "home"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # `python`: this venv's
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}",
         f"--min-worker-port={lo}", f"--max-worker-port={lo + 200}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    started = time.monotonic()
    try:
        while True:
            assert head.poll() is None, head.stderr.read()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", dash), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() - started < 120, "the Ray head did not come up in 120 s"
                time.sleep(0.5)
        yield url, env, time.monotonic() - started
    finally:
        # `ray start --block` stops what it started, only that; its graceful stop takes ~30 s on 2
        # cores and nothing here needs it: after 5 s, SIGKILL to this test's session (its temp dir
        # is on their command lines) and the head.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 30
        while (left := _session_processes(temp_dir)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of this test still running: {left}"


def test_ray_job_submit_runs_a_training_job_its_embedding_and_a_sweep_to_completion(ray_head, tiny_labeled, tmp_path):
    url, env, head_s = ray_head
    data, _ = tiny_labeled
    root, name = "s3://test-runs/jobs", "submitted"
    t0 = time.monotonic()
    r = subprocess.run(
        [RAY, "job", "submit", f"--address={url}", "--submission-id=selfsup-test-job", f"--working-dir={REPO}",
         "--runtime-env-json", '{"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}', "--",
         "python", "-m", "selfsup", "train", "simclr_resnet18", f"data.uri={data}", *TINY, "schedule.steps=3",
         f"storage.root={root}", f"storage.name={name}"],
        env=env, capture_output=True, text=True, timeout=600)
    submit_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    status = subprocess.run([RAY, "job", "status", f"--address={url}", "selfsup-test-job"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "Job 'selfsup-test-job' succeeded" in status.stdout, status.stdout + status.stderr  # SUCCEEDED
    store = open_store(f"{root}/{name}")
    summary = read_summary(store)
    assert summary["status"] == "finished"
    train_rows = [r for r in read_metrics(store) if r["kind"] == "train"]
    assert train_rows[-1]["step"] == 3
    assert store.exists("checkpoint-00000003/manifest.json")
    # for benchmarks/RESULTS.md (pytest -s): where the job's time goes
    print(f"\nray start --head until the dashboard answers: {head_s:.1f} s; ray job submit until SUCCEEDED: "
          f"{submit_s:.1f} s, of which the run's driver (selfsup train) {summary['wall_time_s']:.1f} s, of which "
          f"training steps {train_rows[-1]['elapsed_s']:.1f} s")

    # that run's embeddings as a job: Ray Data actors on the cluster, Parquet in storage
    r = subprocess.run(
        [RAY, "job", "submit", f"--address={url}", "--submission-id=selfsup-test-embed", f"--working-dir={REPO}",
         "--", "python", "-m", "selfsup", "embed", f"{root}/{name}", data, f"{root}/{name}/embeddings"],
        env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    from selfsup.pipelines.shards import load_manifest

    splits = load_manifest(data)["splits"]
    assert (f"embedded train {splits['train']['num_samples']}, test {splits['test']['num_samples']} samples"
            in r.stdout), r.stdout[-2000:]
    parquet = [k for k in open_store(f"{root}/{name}/embeddings").list() if k.endswith(".parquet")]
    assert {k.split("/")[0] for k in parquet} == {"train", "test"}

    # a sweep as a job too, with the model-based searcher: two trials of one 1-CPU worker on the head's
    # 2 CPUs, where two trials at once would leave no CPU for Ray Data's read tasks and wait forever
    space = tmp_path / "space.yaml"
    space.write_text("eval.temperature: {choice: [0.07, 0.2]}\n")
    r = subprocess.run(
        [RAY, "job", "submit", f"--address={url}", "--submission-id=selfsup-test-sweep", f"--working-dir={REPO}",
         "--", "python", "-m", "selfsup", "tune", "simclr_resnet18", "--space", str(space), "--searcher", "optuna",
         "--samples", "2", "--name", "swept", f"data.uri={data}", *TINY, "scaling.cpus_per_worker=1",
         "eval.every_epochs=1", "eval.at_start=false", "schedule.epochs=1", f"storage.root={root}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    sweep = json.loads(open_store(f"{root}/swept").read("sweep.json"))
    assert sweep["status"] == "finished" and [t["status"] for t in sweep["trials"]] == ["finished"] * 2
    assert "sweep swept:" in r.stdout and sweep["best"] in r.stdout
