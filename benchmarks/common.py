"""Shared helpers for the benchmark scripts: a private S3 server and the RESULTS.md writer."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def sigterm_as_exit() -> None:
    """SIGTERM (`timeout`, a scheduler) ends a benchmark as Ctrl-C does: its `finally` blocks stop
    the S3 server and the Ray cluster it started, instead of leaving them running. (A local
    `ray.init` puts a handler of its own in place that does the same.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


sigterm_as_exit()  # every benchmark imports this module first


@contextlib.contextmanager
def private_s3():
    """An embedded SeaweedFS in a temporary home, its endpoint exported for this process and Ray."""
    from selfsup.pipelines.seaweed import exported

    with tempfile.TemporaryDirectory(prefix="selfsup-bench-") as home, exported(home) as ep:
        yield ep


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def commit() -> str:
    """The code a result was measured with: HEAD, marked when selfsup/ differs from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/selfsup"], capture_output=True, text=True, cwd=here).stdout
    return (head or "unknown") + ("+changes" if dirty.strip() else "")


def keep_rows(path: str, key: dict, rows: dict[str, dict]) -> dict[str, dict]:
    """Merge `rows` (by name) into the table stored under `key` in the JSON file at `path`, so a
    re-run of some rows keeps the others; returns the whole table."""
    stored = json.load(open(path)) if os.path.exists(path) else {}
    table = stored.setdefault(json.dumps(key, sort_keys=True), {})
    table.update(rows)
    with open(path, "w") as f:
        json.dump(stored, f, indent=1, sort_keys=True)
    return table


def write_section(title: str, body: str) -> None:
    """Replace (or add) the `## title` section of RESULTS.md, stamped with the command and date."""
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    section = f"## {title}\n\nCommand: `{cmd}` ({stamp}, {machine()})\n\n{body.strip()}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEvery figure here comes from a script in this folder; each section names the command that made it.\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def run(cmd: list[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, except that a benchmark ended meanwhile (SIGTERM, Ctrl-C, its timeout) asks
    the child to end with SIGTERM and waits for it to clean up, instead of SIGKILLing it."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_child(cmd: list[str], name: str) -> dict | None:
    """Run one measurement in its own process (its memory and threads its own); its last stdout
    line is a JSON row, returned with the wall time; None, with the error printed, when it fails."""
    import time

    t0 = time.time()
    r = run(cmd)
    if r.returncode != 0:
        print(f"{name}: FAILED\n{r.stderr[-3000:]}", flush=True)
        return None
    res = {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": time.time() - t0}
    print(json.dumps(res), flush=True)
    return res
