"""Checkpoints count only once complete: a manifest written last, checked before anything loads."""

import json
import logging

import pytest
import torch

from selfsup.pipelines.storage import open_store
from selfsup.platform.checkpoints import MANIFEST, STATE, read_checkpoint, save_checkpoint, write_manifest
from selfsup.platform.runs import RunError, checkpoint_name


def _write(store, tmp_path, step, manifest=True):
    d = tmp_path / f"tmp{step}"
    d.mkdir()
    files = save_checkpoint({"step": step, "w": torch.full((64,), float(step))}, {"step": step}, str(d))
    name = checkpoint_name(step)
    for f in files:
        store.write(f"{name}/{f}", (d / f).read_bytes())
    if manifest:
        write_manifest(store, name, files)
    return name, files


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_others(tmp_path, caplog):
    run = str(tmp_path / "run")
    store = open_store(run)
    good, _ = _write(store, tmp_path, 10)
    cut, files = _write(store, tmp_path, 20)
    store.write(f"{cut}/{STATE}", store.read(f"{cut}/{STATE}")[: files[STATE]["bytes"] // 2])  # cut short
    changed, _ = _write(store, tmp_path, 30)
    data = bytearray(store.read(f"{changed}/{STATE}"))
    data[-1] ^= 1
    store.write(f"{changed}/{STATE}", bytes(data))
    no_manifest, _ = _write(store, tmp_path, 40, manifest=False)  # its upload never finished
    with caplog.at_level(logging.ERROR, logger="selfsup.train"):
        state, name = read_checkpoint(run, None)
    assert name == good and state["step"] == 10
    assert f"{run}/{no_manifest} failed to load (no {MANIFEST}: incomplete)" in caplog.text
    assert f"{run}/{changed} failed to load ({STATE} does not match its manifest's sha256" in caplog.text
    assert f"{run}/{cut} failed to load ({STATE} is" in caplog.text and "cut short" in caplog.text
    manifest = json.loads(store.read(f"{good}/{MANIFEST}"))
    assert set(manifest["files"]) == {"state.pt", "meta.json"}


def test_asking_for_a_checkpoint_by_name(tmp_path):
    run = str(tmp_path / "run")
    store = open_store(run)
    name, _ = _write(store, tmp_path, 5)
    assert read_checkpoint(run, None, name)[0]["step"] == 5
    with pytest.raises(RunError, match="has no checkpoint 'checkpoint-00000006'"):
        read_checkpoint(run, None, checkpoint_name(6))
    with pytest.raises(RunError, match="is not valid"):
        read_checkpoint(run, None, "../x")
    assert read_checkpoint(str(tmp_path / "empty"), None) == (None, None)
