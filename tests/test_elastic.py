"""Training under real faults on a multi-node Ray cluster on this machine (tests/elastic_run.py, one
subprocess per fault): a killed worker, a node drained with notice then lost, object storage away
for 20 s. The run finishes, logs every step once, and continues its epoch where it was."""

import json
import os
import subprocess
import sys

import pytest

HARNESS = os.path.join(os.path.dirname(__file__), "elastic_run.py")
STEPS, AT, BATCH = 36, 8, 16


def run(scenario: str, tmp_path) -> dict:
    out = tmp_path / f"{scenario}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["SELFSUP_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, HARNESS, scenario, str(out), "--steps", str(STEPS), "--at", str(AT)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "error" not in result, result["error"]
    assert result["summary"]["status"] == "finished" and result["summary"]["step"] == STEPS
    # every logged step exactly once: no gap, no duplicate, whatever was replayed
    assert result["train_steps"] == list(range(2, STEPS + 1, 2))
    # every complete checkpoint loads, the final one among them
    assert all(isinstance(v, int) for v in result["checkpoints"].values()), result["checkpoints"]
    assert result["checkpoints"][f"checkpoint-{STEPS:08d}"] == STEPS
    rows = result["checkpoint_rows"]
    assert rows[-1]["samples_repeated"] == 0
    return result


def test_a_killed_worker_costs_only_the_steps_since_the_checkpoint_and_its_epoch_goes_on(tmp_path):
    r = run("kill-worker", tmp_path)
    assert AT <= r["fault_step"] and r["resumed_at_step"] <= r["fault_step"]
    assert r["steps_repeated"] <= 6  # train.checkpoint_every_steps=6
    # the epoch continued at its data position: each step of it trained on 16 samples it had not seen
    first = [c for c in r["checkpoint_rows"] if c["data_epoch"] == 0]
    assert any(c["step"] > r["resumed_at_step"] for c in first)
    assert all(c["epoch_samples_seen"] == c["step"] * BATCH for c in first), first


def test_a_drained_node_checkpoints_before_it_goes_and_the_run_shrinks_then_grows(tmp_path):
    r = run("drain", tmp_path)
    notice = [c for c in r["checkpoint_rows"] if c["checkpoint_reason"] == "preemption"]
    assert notice and notice[0]["time"] < r["deadline"], (notice, r["deadline"])
    assert r["resumed_at_step"] >= notice[0]["step"]  # nothing repeated: resumed from that checkpoint
    sizes = [w for _, w, _, _ in r["observed"]]
    assert 1 in sizes and 2 in sizes[sizes.index(1):]
    assert {g for _, _, g, _ in r["observed"]} == {BATCH}  # scaling.batch_policy=global keeps it


def test_object_storage_away_for_20_s_is_waited_for(tmp_path):
    r = run("s3-outage", tmp_path)
    assert r["outage_s"] >= 20
    assert len(r["checkpoints"]) == STEPS // 6


pytestmark = pytest.mark.timeout(900)
