"""The console's progress line: what it says, and how it behaves on a terminal and in a log."""

import io
import json
import os
import subprocess
import sys
import time

from selfsup.pipelines.storage import open_store
from selfsup.platform.console import failure_text, progress, progress_text
from selfsup.platform.runs import SUMMARY

ROW = {"status": "running", "step": 120, "epoch": 0.2564, "loss": 4.12345, "images_per_s": 812.4, "knn_last": 75.95,
       "workers": 2, "progress": 0.25, "elapsed_s": 60.0}


def test_the_line_names_step_epoch_loss_speed_knn_workers_and_time_left():
    line = progress_text(ROW, 65.0)
    assert line == "step 120 · epoch 0.26 · loss 4.123 · 812 img/s · kNN 75.95% · 2 workers · 1:05 elapsed, ~3:00 left (25%)"
    assert progress_text({"step": 0, "epoch": 0.0}, 3) == "step 0 · epoch 0.00 · 0:03 elapsed"
    assert "restart 2" in failure_text({"restarts": 2, "last_failure": "RayActorError: worker died"})


class Tty(io.StringIO):
    def isatty(self):
        return True


def _write(store, **kw):
    store.write(SUMMARY, json.dumps({**ROW, **kw}).encode())


def test_a_terminal_gets_one_line_rewritten_and_a_failure_on_its_own_line(tmp_path):
    store = open_store(str(tmp_path / "run"), create=True)
    out = Tty()
    with progress(store, out, poll_s=0.05):
        _write(store, step=10)
        time.sleep(0.3)
        _write(store, step=20, restarts=1, last_failure="RayActorError: the actor died")
        time.sleep(0.3)
        _write(store, step=30, restarts=1, last_failure="RayActorError: the actor died")
    text = out.getvalue()
    assert text.count("\n") == 2  # the failure line, and the end of the progress line
    lines = text.split("\n")
    assert "recovered from a failure (RayActorError: the actor died)" in lines[0]
    assert lines[1].split("\r\033[K")[-1].startswith("step 30 ")
    assert "step 10 " in text and "\r\033[K" in text


def test_a_log_gets_plain_lines_at_evaluations_and_the_last_state(tmp_path):
    store = open_store(str(tmp_path / "run"), create=True)
    out = io.StringIO()
    with progress(store, out, poll_s=0.05, plain_every_s=3600):
        _write(store, step=10, knn_last=None)
        time.sleep(0.3)
        _write(store, step=20, knn_last=None)  # no new evaluation, too soon: no line
        time.sleep(0.3)
        _write(store, step=30, knn_last=80.0)  # a new evaluation: a line
        time.sleep(0.3)
        _write(store, step=40, knn_last=80.0)  # the last state: a line at the end
    lines = out.getvalue().splitlines()
    assert [ln.split(" · ")[0] for ln in lines] == ["step 10", "step 30", "step 40"]
    assert "\r" not in out.getvalue() and "kNN 80.00%" in lines[1]


RAY_WARNING = """
import sys, time
if sys.argv[1] == "selfsup":
    import selfsup  # noqa: F401
import ray

ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

actors = [Idle.remote() for _ in range(12)]  # past 4x the node's 1 CPU, where the raylet warns
ray.get([a.ping.remote() for a in actors])
time.sleep(3)  # the warning reaches the driver's console asynchronously
ray.shutdown()
"""


def test_rays_worker_pool_warning_stays_off_the_console():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    out = {}
    for who in ("ray", "selfsup"):
        r = subprocess.run([sys.executable, "-c", RAY_WARNING, who], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out[who] = r.stdout + r.stderr
    assert "PYTHON worker processes have been started" in out["ray"]  # Ray alone prints it
    assert "PYTHON worker processes" not in out["selfsup"], out["selfsup"]
