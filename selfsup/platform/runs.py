"""Runs in storage: the one module that owns their layout and names. A run (`<storage.root>/<name>/`),
stable for tools that read it:

    config.yaml                       the resolved config the run was started with
    summary.json                      status, method, backbone, step, epoch, kNN (first, last, best), wall
                                      time, and the last train row's loss, images/s, workers, progress
    metrics.jsonl                     one JSON object a line: kind (train | eval), step, epoch, metrics
    heartbeat.json                    rewritten by the live driver every HEARTBEAT_S seconds
    checkpoint-<step:08d>/state.pt    model (with teacher, centre, queues), optimizer, step, epoch, RNG
    checkpoint-<step:08d>/meta.json   step, epoch, elapsed training time
    checkpoint_manager_snapshot.json  Ray Train's own bookkeeping
    eval/finetune-<fraction>-<epochs>ep.json  `selfsup eval finetune`: the run's and the random
                                      init's fine-tuned accuracy under one schedule

Ray Train 2.60 writes no metrics file, so a controller-side callback (`trainer.MetricsLog`) keeps
metrics.jsonl and summary.json. S3 has no append: it rewrites the file, and on a restart it reloads
it and drops rows that the resumed run is about to report again (nothing lost, nothing twice).

Status: `running` while the driver lives, then `finished`, `failed` (with `error`), `interrupted`
(Ctrl-C) or `terminated` (SIGTERM), or `stopped` (a sweep's trial that ASHA stopped early). A driver
killed outright writes nothing more: readers show such a run as `lost` once its heartbeat is older
than LOST_AFTER_S.

A sweep (`<storage.root>/<sweep>/`, sweeps.py) holds its trials as runs, `<sweep>/<trial>/` (named
`SWEEP/TRIAL` wherever a run name is taken), each with a trial.json (its parameters), and:

    sweep.json    spec (base config, space, searcher, metric, mode), status, the trials, the best
    space.yaml    the search space, as parsed
    trials.csv    one row per trial: status, stopped early, step, final and best metric, parameters
    best.yaml     the best trial's whole config, for `selfsup train`
    _tune/        Ray Tune's experiment state (what a rerun continues from)
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

from selfsup.pipelines.endpoints import Endpoint, StorageError
from selfsup.pipelines.storage import Store, is_s3, join, open_store

METRICS, SUMMARY, CONFIG, HEARTBEAT = "metrics.jsonl", "summary.json", "config.yaml", "heartbeat.json"
SWEEP, SPACE, TRIALS, BEST, TRIAL, TUNE_DIR = "sweep.json", "space.yaml", "trials.csv", "best.yaml", "trial.json", "_tune"
CKPT_PREFIX = "checkpoint-"
LIVE = ("loss", "images_per_s", "workers", "global_batch", "progress", "elapsed_s")  # from the last train row
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


def finetune_key(fraction: float, epochs: int) -> str:
    return f"eval/finetune-{fraction:g}-{epochs}ep.json"


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def checkpoint_names(store: Store) -> list[str]:
    """The run's checkpoint folders, oldest first (names that follow the rule only)."""
    return sorted({k.split("/")[0] for k in store.list() if _CKPT.fullmatch(k.split("/")[0])})


def resolve_run(run: str, root: str, ep: Endpoint | None = None) -> str:
    """A run's URI from a URI (`s3://...`), a local path (`/...`, `./...`, `~/...`), a name under
    `root`, or a sweep's trial `SWEEP/TRIAL` (SWEEP must hold a sweep.json)."""
    if is_s3(run) or run.startswith(("/", "./", "../", "~")):
        return run.rstrip("/")
    if run.count("/") == 1:
        sweep, trial = run.split("/")
        uri = join(root, check_name(sweep, "sweep"))
        check_name(trial, "trial")
        try:
            is_sweep = open_store(uri, ep).exists(SWEEP)
        except StorageError:
            is_sweep = False
        if not is_sweep:
            raise RunError(f"run name {run!r} is not valid: SWEEP/TRIAL names a sweep's trial, and there is no "
                           f"sweep {sweep!r} under {root}")
        return join(uri, trial)
    return join(root, check_name(run))


def read_metrics(store: Store) -> list[dict]:
    try:
        text = store.read_text(METRICS)
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:
        raise RunError(f"{store.url(METRICS)} is not UTF-8 text (byte {e.start}; corrupt file?)") from None
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
    last = next((r for r in reversed(rows) if r["kind"] == "train"), None)
    if last:  # what the console's progress line and the dashboard's runs table show
        out.update({k: last[k] for k in LIVE if k in last})
    out["updated"] = now()
    return out


def now() -> str:
    return _iso(time.time())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_runs(root: str, ep: Endpoint | None = None) -> tuple[list[dict], list[str]]:
    """(summaries of the runs under `root`, sweeps' trials as `SWEEP/TRIAL`; one line per run
    whose files are unreadable)."""
    store = open_store(root, ep)
    keys = store.list()
    sweeps = {k.split("/")[0] for k in keys if k.count("/") == 1 and k.endswith("/" + SWEEP)}
    names = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith("/" + SUMMARY)
                    and all(_NAME.fullmatch(p) for p in k.split("/")[:-1])
                    and (k.count("/") == 1 or (k.count("/") == 2 and k.split("/")[0] in sweeps))})
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


# ------------------------------------------------------------------------------------ sweeps
def read_sweep(store: Store) -> dict | None:
    """The sweep.json at `store` (None when there is none)."""
    try:
        s = json.loads(store.read(SWEEP))
    except FileNotFoundError:
        return None
    except ValueError:
        s = None
    spec = s.get("spec") if isinstance(s, dict) else None
    if (not isinstance(spec, dict) or not isinstance(s.get("name"), str)
            or not all(isinstance(spec.get(k), str) for k in ("metric", "mode", "searcher"))
            or not isinstance(spec.get("space"), dict)):
        raise RunError(f"{store.url(SWEEP)} is not a sweep's state (corrupt file?)")
    return s


def evals(rows: list[dict], metric: str) -> list[dict]:
    """The evaluations a sweep compares trials by: not the one of the random init at step 0."""
    return [r for r in rows if r["kind"] == "eval" and metric in r and r["step"] > 0]


def trials_of(store: Store, spec: dict, ep: Endpoint | None = None) -> list[dict]:
    """One row per trial of the sweep at `store`, read from the trials' runs (live while it runs)."""
    metric, sign = spec["metric"], 1 if spec["mode"] == "max" else -1
    names = sorted({k.split("/")[0] for k in store.list() if k.count("/") == 1 and k.endswith("/" + TRIAL)})
    out = []
    for n in names:
        if not _NAME.fullmatch(n):
            continue
        try:
            trial = json.loads(store.read(f"{n}/{TRIAL}"))
            summary = read_summary(store, n)
            done = evals(read_metrics(open_store(join(store.uri, n), ep)), metric)
        except (ValueError, RunError) as e:
            trial, summary, done = {}, {"status": "unreadable", "error": str(e)}, []
        out.append({"trial": n, "status": summary.get("status", "pending"),
                    "stopped_early": bool(summary.get("stopped_early")), "step": summary.get("step", 0),
                    f"final_{metric}": done[-1][metric] if done else None,
                    f"best_{metric}": max(done, key=lambda r: sign * r[metric])[metric] if done else None,
                    "params": trial.get("params", {})})
    return out


def best_trial(rows: list[dict], spec: dict) -> dict | None:
    """The finished trial with the best final metric (any trial with one, when none finished)."""
    key, sign = f"final_{spec['metric']}", 1 if spec["mode"] == "max" else -1
    scored = [r for r in rows if r[key] is not None]
    pool = [r for r in scored if r["status"] == "finished"] or scored
    return max(pool, key=lambda r: sign * r[key]) if pool else None


def trials_csv(rows: list[dict], spec: dict) -> str:
    import csv
    import io

    m, labels = spec["metric"], list(spec["space"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", "status", "stopped_early", "step", f"final_{m}", f"best_{m}", *labels])
    for r in rows:
        w.writerow([r["trial"], r["status"], r["stopped_early"], r["step"], r[f"final_{m}"], r[f"best_{m}"],
                    *(r["params"].get(k) for k in labels)])
    return buf.getvalue()


def format_trials(state: dict) -> str:
    """A sweep's trials as a table for the console."""
    spec = state["spec"]
    m, labels = spec["metric"], list(spec["space"])

    def num(v):
        return f"{v:7.4f}" if isinstance(v, float) else f"{'-':>7}"

    def val(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"sweep {state['name']} ({state['status']}), {m} ({spec['mode']}):",
             f"{'trial':13} {'status':9} {'early':5} {'step':>6} {'final':>7} {'best':>7}  " + "  ".join(labels)]
    for r in state.get("trials", []):
        lines.append(f"{r['trial'][:13]:13} {r['status']:9} {'yes' if r['stopped_early'] else 'no':5} {r['step']:>6} "
                     f"{num(r[f'final_{m}'])} {num(r[f'best_{m}'])}  "
                     + "  ".join(f"{val(r['params'].get(k)):>{len(k)}}" for k in labels))
    if state.get("best"):
        lines.append(f"best: {state['best']}; its config: {join(state['uri'], BEST)}")
    return "\n".join(lines)


def list_sweeps(root: str, ep: Endpoint | None = None) -> tuple[list[dict], list[str]]:
    """(the sweeps directly under `root`, one line per sweep whose state is unreadable)."""
    store = open_store(root, ep)
    names = sorted({k.split("/")[0] for k in store.list() if k.count("/") == 1 and k.endswith("/" + SWEEP)})
    out, bad = [], []
    for n in names:
        if not _NAME.fullmatch(n):
            continue
        try:
            out.append(read_sweep(open_store(join(root, n), ep)))
        except RunError as e:
            bad.append(str(e))
    return out, bad


def show_sweep(root: str, name: str, ep: Endpoint | None = None) -> dict:
    """Sweep `name` under `root` with its trials as they are now."""
    store = open_store(join(root, check_name(name, "sweep")), ep)
    state = read_sweep(store)
    if state is None:
        raise RunError(f"no sweep at {store.uri} (no {SWEEP})")
    return {**state, "trials": trials_of(store, state["spec"], ep)}


def format_sweeps(sweeps: list[dict]) -> str:
    lines = [f"{'sweep':32} {'status':9} {'searcher':8} {'trials':>6} {'metric':10} {'best trial':13} {'best':>7}"]
    for s in sweeps:
        spec, trials = s["spec"], s.get("trials", [])
        m = spec["metric"]
        best = next((t for t in trials if t["trial"] == s.get("best")), None)
        value = f"{best[f'final_{m}']:7.4f}" if best and best[f"final_{m}"] is not None else f"{'-':>7}"
        lines.append(f"{s['name'][:32]:32} {s['status']:9} {spec['searcher']:8} {len(trials):>6} {m[:10]:10} "
                     f"{str(s.get('best') or '-')[:13]:13} {value}")
    return "\n".join(lines)
