"""Runs in storage. Layout of a run (`<storage.root>/<name>/`), stable for tools that read it:

    config.yaml                       the resolved config the run was started with
    summary.json                      status, method, backbone, step, epoch, kNN (first, last, best), wall time
    metrics.jsonl                     one JSON object a line: kind (train | eval), step, epoch, metrics
    checkpoint-<step:08d>/state.pt    model (with teacher, centre, queues), optimizer, step, epoch, RNG
    checkpoint-<step:08d>/meta.json   step, epoch, elapsed training time
    checkpoint_manager_snapshot.json  Ray Train's own bookkeeping

Ray Train 2.60 writes no metrics file, so `MetricsLog`, a controller-side callback, keeps
metrics.jsonl and summary.json. S3 has no append: it rewrites the file, and on a restart it reloads
it and drops rows that the resumed run is about to report again (nothing lost, nothing twice).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import ray.train

from selfsup.pipelines.storage import Endpoint, Store, open_store

METRICS, SUMMARY, CONFIG = "metrics.jsonl", "summary.json", "config.yaml"


def read_metrics(store: Store) -> list[dict]:
    try:
        text = store.read_text(METRICS)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_summary(store: Store) -> dict:
    try:
        return json.loads(store.read(SUMMARY))
    except FileNotFoundError:
        return {}


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
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MetricsLog(ray.train.UserCallback):
    """Runs on the Ray Train controller: keeps metrics.jsonl and summary.json of the run."""

    def __init__(self, run_uri: str, ep: Endpoint | None, summary: dict):
        self.run_uri, self.ep, self.base = run_uri, ep, summary
        self._store: Store | None = None
        self.rows: list[dict] | None = None

    def _load(self) -> Store:
        if self._store is None:
            self._store = open_store(self.run_uri, self.ep)
            self.rows = read_metrics(self._store)
        return self._store

    def after_report(self, run_context, metrics, checkpoint):
        store = self._load()
        row = dict(metrics[0])  # rank 0 reports the run's metrics; the others report the same step
        if "kind" not in row:
            return
        self.rows = merge_row(self.rows, row)
        store.write(METRICS, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        store.write(SUMMARY, json.dumps(summarise(self.rows, {**self.base, "status": "running"}), indent=1).encode())


def list_runs(root: str, ep: Endpoint | None = None) -> list[dict]:
    store = open_store(root, ep)
    names = sorted({k.split("/")[0] for k in store.list() if k.endswith("/" + SUMMARY)})
    out = []
    for name in names:
        s = json.loads(store.read(f"{name}/{SUMMARY}"))
        s["name"] = name
        out.append(s)
    return out


def format_runs(runs: list[dict]) -> str:
    head = f"{'name':40} {'status':9} {'method':7} {'backbone':22} {'step':>7} {'epoch':>6} {'kNN first':>9} {'kNN best':>8}"
    lines = [head]
    for r in runs:
        def f(k):
            return f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-"
        lines.append(f"{r['name'][:40]:40} {r.get('status', '?'):9} {r.get('method', '?'):7} {r.get('backbone', '?')[:22]:22} "
                     f"{r.get('step', 0):>7} {r.get('epoch', 0):>6.2f} {f('knn_first'):>9} {f('knn_best'):>8}")
    return "\n".join(lines)
