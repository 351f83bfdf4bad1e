"""Checkpoints of a run: written by the train loop, read by resume, `eval` and the dashboard alike.

A checkpoint is the folder `<run>/checkpoint-<step:08d>/`:

    state.pt       model (with EMA teacher, centre, queues; not distill's frozen teacher), optimizer, step,
                   epoch, elapsed time, RNG
    meta.json      step, epoch, elapsed training time
    manifest.json  every other file of the folder with its size and sha256; written last

It counts only once complete. Ray Train uploads the folder (in no set order) from rank 0's report;
the manifest is then written by the controller (`trainer.MetricsLog`) once Ray has committed the
upload, from the sizes and hashes rank 0 computed. Readers take the newest checkpoint whose
manifest is there and whose files match it: one without a manifest (an upload cut short) or with a
file cut short or changed is named in the log and passed over. Nothing is unpickled:
`torch.load(weights_only=True)`. `prune` keeps the newest K complete ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time

import torch

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import Store, open_store
from selfsup.platform.runs import RunError, check_name, checkpoint_names

log = logging.getLogger("selfsup.train")
STATE, META, MANIFEST = "state.pt", "meta.json", "manifest.json"


def save_checkpoint(state: dict, meta: dict, directory: str) -> dict[str, dict]:
    """Write state.pt and meta.json into `directory`; return their manifest entries."""
    torch.save(state, os.path.join(directory, STATE))
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f)
    files = {}
    for name in (STATE, META):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def write_manifest(store: Store, name: str, files: dict[str, dict]) -> None:
    """Mark checkpoint `name` complete: call only once its files are in storage."""
    check_name(name, "checkpoint")
    store.write(f"{name}/{MANIFEST}", json.dumps({"files": files}, indent=1).encode())


def prune(store: Store, keep: int | None) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and every incomplete one older than
    the newest complete one (Ray uploads in order: those will never complete). Returns the
    deleted names."""
    names = checkpoint_names(store)
    complete = [n for n in names if store.exists(f"{n}/{MANIFEST}")]
    if not complete:
        return []
    kept = set(complete[-keep:]) if keep else set(complete)
    gone = [n for n in names if n not in kept and (n in complete or n < complete[-1])]
    for n in gone:
        # the manifest first: a deletion cut short leaves an incomplete checkpoint, never a wrong one
        keys = [k for k in store.list(n) if k.startswith(f"{n}/")]
        for key in sorted(keys, key=lambda k: not k.endswith(MANIFEST)):
            store.delete(key)
    return gone


def wait_complete(run_uri: str, ep: Endpoint | None, name: str, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for checkpoint `name` (reported, perhaps still uploading) to complete."""
    store = open_store(run_uri, ep)
    deadline = time.monotonic() + timeout_s
    while not store.exists(f"{name}/{MANIFEST}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class IncompleteCheckpoint(RunError):
    """A checkpoint without its manifest, or with a file that does not match it."""


def load_checkpoint(store: Store, name: str) -> dict:
    """The state of complete checkpoint `name` (checked against its manifest before unpickling)."""
    try:
        manifest = json.loads(store.read(f"{name}/{MANIFEST}"))
        expected = manifest["files"][STATE]
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"no {MANIFEST}: incomplete") from None
    except (ValueError, KeyError, TypeError):
        raise IncompleteCheckpoint(f"{MANIFEST} is unreadable") from None
    try:
        data = store.read(f"{name}/{STATE}")
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{STATE} is missing") from None
    if len(data) != expected["bytes"]:
        raise IncompleteCheckpoint(f"{STATE} is {len(data)} bytes, its manifest says {expected['bytes']} (cut short?)")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise IncompleteCheckpoint(f"{STATE} does not match its manifest's sha256 (changed or corrupt)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint(run_uri: str, ep: Endpoint | None, name: str | None = None) -> tuple[dict | None, str | None]:
    """(state, name) of the newest complete checkpoint that loads (or of `name`), (None, None)
    when the run has none. One passed over is named in the log and the one before it is tried, so
    a damaged checkpoint never silently restarts a run from zero."""
    store = open_store(run_uri, ep)
    names = checkpoint_names(store)
    if name:
        check_name(name, "checkpoint")
        if name not in names:
            raise RunError(f"run {run_uri} has no checkpoint {name!r} (it has: {', '.join(names) or 'none'})")
        names = [name]
    names = names[::-1]
    failed = []
    for n in names:
        try:
            return load_checkpoint(store, n), n
        except Exception as e:
            why = str(e) if isinstance(e, IncompleteCheckpoint) else f"{type(e).__name__}: {e}"
            failed.append(f"{n}: {why}")
            log.error("checkpoint %s failed to load (%s)%s", store.url(n), why,
                      "; trying the one before it" if n != names[-1] else "")
    if names:
        raise RunError(f"no checkpoint of {run_uri} loads ({'; '.join(failed)})")
    return None, None
