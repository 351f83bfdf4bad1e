"""Runs in storage: the one module that owns their layout and names. A run (`<storage.root>/<name>/`),
stable for tools that read it:

    config.yaml                       the resolved config the run was started with
    summary.json                      status, method, backbone, step, epoch, kNN (first, last, best), wall time
    metrics.jsonl                     one JSON object a line: kind (train | eval), step, epoch, metrics
    heartbeat.json                    rewritten by the live driver every HEARTBEAT_S seconds
    checkpoint-<step:08d>/state.pt    model (with teacher, centre, queues), optimizer, step, epoch, RNG
    checkpoint-<step:08d>/meta.json   step, epoch, elapsed training time
    checkpoint_manager_snapshot.json  Ray Train's own bookkeeping

Ray Train 2.60 writes no metrics file, so a controller-side callback (`trainer.MetricsLog`) keeps
metrics.jsonl and summary.json. S3 has no append: it rewrites the file, and on a restart it reloads
it and drops rows that the resumed run is about to report again (nothing lost, nothing twice).

Status: `running` while the driver lives, then `finished`, `failed` (with `error`), `interrupted`
(Ctrl-C) or `terminated` (SIGTERM). A driver killed outright writes nothing more: readers show such a
run as `lost` once its heartbeat is older than LOST_AFTER_S.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

from selfsup.pipelines.storage import Endpoint, Store, StorageError, is_s3, join, open_store

METRICS, SUMMARY, CONFIG, HEARTBEAT = "metrics.jsonl", "summary.json", "config.yaml", "heartbeat.json"
CKPT_PREFIX = "checkpoint-"
HEARTBEAT_S, LOST_AFTER_S = 10.0, 60.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CKPT = re.compile(re.escape(CKPT_PREFIX) + r"\d{8}")


class RunError(StorageError):
    """A run, checkpoint or name that does not exist or cannot be read. One line for the user."""


class RunFailed(RuntimeError):
    """The run ended on a failure that restarting its workers cannot fix; `str()` is its cause
    as `Type: message`, taken from the worker that raised it."""


def check_name(name: str, what: str = "run") -> str:
    """The rule for run, sweep and trial names: one path part of letters, digits, `.`, `_`, `-`,
    starting with a letter or digit (so never `..`, never nested, never absolute)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RunError(f"{what} name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if what == "checkpoint" and not _CKPT.fullmatch(name):
        raise RunError(f"checkpoint name {name!r} is not valid: checkpoints are named {CKPT_PREFIX}<8-digit step>")
    return name


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def checkpoint_names(store: Store) -> list[str]:
    """The run's checkpoint folders, oldest first (names that follow the rule only)."""
    return sorted({k.split("/")[0] for k in store.list() if _CKPT.fullmatch(k.split("/")[0])})


def resolve_run(run: str, root: str) -> str:
    """A run's URI from a URI (`s3://...`), a local path (`/...`, `./...`, `~/...`) or a name under `root`."""
    if is_s3(run) or run.startswith(("/", "./", "../", "~")):
        return run.rstrip("/")
    return join(root, check_name(run))


def read_metrics(store: Store) -> list[dict]:
    try:
        text = store.read_text(METRICS)
    except FileNotFoundError:
        return []
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "kind" not in row:
            raise RunError(f"{store.url(METRICS)} line {n} is not a metrics row (corrupt file?)")
        rows.append(row)
    return rows


def read_summary(store: Store, run: str = "") -> dict:
    """The summary ({} when none) of the run at `store` (or of run `run` under it), its status
    corrected for a lost driver."""
    key = f"{run}/{SUMMARY}" if run else SUMMARY
    try:
        s = json.loads(store.read(key))
    except FileNotFoundError:
        return {}
    except ValueError:
        s = None
    if not isinstance(s, dict):
        raise RunError(f"{store.url(key)} is not a JSON object (corrupt file?)")
    if s.get("status") == "running":
        beat = _read_heartbeat(store, f"{run}/{HEARTBEAT}" if run else HEARTBEAT)
        if beat is None or time.time() - beat > LOST_AFTER_S:
            s["status"] = "lost"
            s["error"] = ("the driver stopped without a word: no heartbeat since "
                          f"{_iso(beat) if beat else 'the start'} (killed, or its machine went away)")
    return s


def _read_heartbeat(store: Store, key: str) -> float | None:
    try:
        return float(json.loads(store.read(key))["time"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def write_heartbeat(store: Store) -> None:
    store.write(HEARTBEAT, json.dumps({"time": time.time(), "iso": now()}).encode())


def merge_row(rows: list[dict], row: dict) -> list[dict]:
    """Append `row`; rows it replays (a restart from an earlier checkpoint) go first."""
    keep = [r for r in rows if r["step"] < row["step"] or (r["step"] == row["step"] and r["kind"] != row["kind"])]
    return keep + [row]


def summarise(rows: list[dict], base: dict) -> dict:
    evals = [r for r in rows if r["kind"] == "eval" and "knn_top1" in r]
    out = dict(base)
    if rows:
        out.update(step=rows[-1]["step"], epoch=rows[-1]["epoch"])
    if evals:
        out.update(knn_first=evals[0]["knn_top1"], knn_last=evals[-1]["knn_top1"],
                   knn_best=max(r["knn_top1"] for r in evals))
    out["updated"] = now()
    return out


def now() -> str:
    return _iso(time.time())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_runs(root: str, ep: Endpoint | None = None) -> tuple[list[dict], list[str]]:
    """(summaries of the runs directly under `root`, one line per run whose files are unreadable)."""
    store = open_store(root, ep)
    names = sorted({k.split("/")[0] for k in store.list()
                    if k.count("/") == 1 and k.endswith("/" + SUMMARY) and _NAME.fullmatch(k.split("/")[0])})
    out, bad = [], []
    for name in names:
        try:
            s = read_summary(store, name)
        except RunError as e:
            bad.append(str(e))
            continue
        s["name"] = name
        out.append(s)
    return out, bad


def one_line_cause(exc: BaseException) -> str:
    """The root cause of a failure, however deep Ray wrapped it, as `Type: first line`."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:
            exc = failures[min(failures)]
            continue
        inner = (getattr(exc, "controller_failure", None) or getattr(exc, "cause", None)
                 or getattr(exc, "_base_exc", None) or exc.__cause__)  # _base_exc: Ray Train's wrap of a worker's error
        if isinstance(inner, BaseException):
            exc = inner
            continue
        break
    if isinstance(exc, RunFailed):
        return str(exc)
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's remote errors put a traceback before the message: the last line is the cause.
    line = lines[-1] if lines and lines[0].startswith(("Traceback", "ray::")) else (lines[0] if lines else "")
    prefix = f"{type(exc).__name__}: "
    return line if line.startswith(prefix.split(":")[0] + ":") else prefix + line


def format_runs(runs: list[dict]) -> str:
    head = f"{'name':40} {'status':11} {'method':7} {'backbone':22} {'step':>7} {'epoch':>6} {'kNN first':>9} {'kNN best':>8}"
    lines = [head]
    for r in runs:
        def f(k):
            return f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-"

        def num(k):
            return r[k] if isinstance(r.get(k), (int, float)) else 0
        lines.append(f"{r['name'][:40]:40} {str(r.get('status', '?')):11} {str(r.get('method', '?')):7} "
                     f"{str(r.get('backbone', '?'))[:22]:22} {num('step'):>7} {num('epoch'):>6.2f} "
                     f"{f('knn_first'):>9} {f('knn_best'):>8}")
    return "\n".join(lines)
