"""The console of `selfsup train`: one progress line while the run trains, one line per failure
the run recovers from, and none of Ray's internal chatter (`ensure_ray` keeps worker output off
the driver: errors that end the run come back as exceptions and are printed as one line).

The line is read from the run's summary.json, which the controller-side metrics callback
(trainer.MetricsLog) rewrites after every report (with the count of restarts and the last
failure's cause, once the run has recovered from it), so the driver never waits on the
workers for it. On a terminal it is rewritten in place; otherwise (CI logs, `ray job logs`) a
plain line goes out every PLAIN_EVERY_S seconds and at each new evaluation."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time

from selfsup.pipelines.storage import Store
from selfsup.platform.runs import SUMMARY

POLL_S, PLAIN_EVERY_S = 1.0, 30.0


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_text(s: dict, wall_s: float) -> str:
    """One line from a run's summary: step, epoch, loss, images/s, last kNN, workers, time."""
    parts = [f"step {s.get('step', 0)}", f"epoch {s.get('epoch', 0):.2f}"]
    if isinstance(s.get("loss"), (int, float)):
        parts.append(f"loss {s['loss']:.4g}")
    if isinstance(s.get("images_per_s"), (int, float)):
        parts.append(f"{s['images_per_s']:.0f} img/s")
    if isinstance(s.get("knn_last"), (int, float)):
        parts.append(f"kNN {s['knn_last']:.2f}%")
    if s.get("workers"):
        parts.append(f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}")
    p = s.get("progress")
    when = f"{_clock(wall_s)} elapsed"
    if isinstance(p, (int, float)) and 0 < p < 1 and s.get("elapsed_s"):
        when += f", ~{_clock(s['elapsed_s'] * (1 - p) / p)} left ({p:.0%})"
    parts.append(when)
    return " · ".join(parts)


def failure_text(s: dict) -> str:
    return (f"recovered from a failure ({s.get('last_failure', 'unknown cause')}): the workers restarted from "
            f"the newest checkpoint (restart {s.get('restarts')})")


@contextlib.contextmanager
def progress(store: Store, stream=None, poll_s: float = POLL_S, plain_every_s: float = PLAIN_EVERY_S):
    """Show the run's progress on `stream` (stderr) while the block runs."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    stop = threading.Event()
    t0 = time.monotonic()
    state = {"shown": False, "restarts": 0, "evals": None, "plain_at": float("-inf"), "row": None}

    def emit(line: str, final: bool = False) -> None:
        if tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            stream.write("\r\033[K" + line[:width] + ("\n" if final else ""))
            state["shown"] = not final
        else:
            stream.write(line + "\n")
        stream.flush()

    def tick(force: bool = False) -> None:
        try:
            s = json.loads(store.read(SUMMARY))
        except Exception:  # not written yet, or storage away for a while: the next tick tries again
            return
        if not isinstance(s, dict):
            return
        if "step" not in s:  # Ray, the workers and the first evaluation are starting
            if tty:
                emit(f"starting the workers · {_clock(time.monotonic() - t0)} elapsed")
            return
        if s.get("restarts", 0) > state["restarts"]:
            state["restarts"] = s["restarts"]
            emit(failure_text(s), final=True)
        line = progress_text(s, time.monotonic() - t0)
        new_eval = s.get("knn_last") != state["evals"]
        state["evals"] = s.get("knn_last")
        now = time.monotonic()
        if tty:
            emit(line)
        elif (s.get("step"), s.get("knn_last")) != state["row"] and (
                force or new_eval or now - state["plain_at"] >= plain_every_s):
            state["plain_at"], state["row"] = now, (s.get("step"), s.get("knn_last"))
            emit(line)

    def loop() -> None:
        while not stop.wait(poll_s):
            tick()

    th = threading.Thread(target=loop, name="selfsup-progress", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=5)
        tick(force=True)  # the last state, so the line ends on the final step
        if tty and state["shown"]:
            stream.write("\n")
            stream.flush()
