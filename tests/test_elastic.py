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


def run(faults: str, tmp_path, steps: int = STEPS, log_every: int = 2, checkpoint_every: int = 6) -> dict:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["SELFSUP_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, HARNESS, faults, str(out), "--steps", str(steps), "--at", str(AT),
                           "--log-every", str(log_every), "--checkpoint-every", str(checkpoint_every)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "error" not in result, result["error"]
    assert result["summary"]["status"] == "finished" and result["summary"]["step"] == steps
    # every logged step exactly once: no gap, no duplicate, whatever was replayed
    assert result["train_steps"] == list(range(log_every, steps + 1, log_every))
    # every complete checkpoint loads, the final one among them
    assert all(isinstance(v, int) for v in result["checkpoints"].values()), result["checkpoints"]
    assert result["checkpoints"][f"checkpoint-{steps:08d}"] == steps
    rows = result["checkpoint_rows"]
    assert rows[-1]["samples_repeated"] == 0
    return result


def test_storage_away_for_20_s_then_a_killed_worker_cost_only_the_steps_since_the_checkpoint(tmp_path):
    r = run("s3-outage,kill-worker", tmp_path)
    outage, kill = r["faults"]
    assert outage["outage_s"] >= 20
    assert kill["resumed_at_step"] <= kill["fault_step"] and kill["steps_repeated"] <= 6  # checkpoint_every_steps
    # the epoch continued at its data position: each step of it trained on 16 samples it had not seen
    first = [c for c in r["checkpoint_rows"] if c["data_epoch"] == 0]
    assert any(c["step"] > kill["resumed_at_step"] for c in first)
    assert all(c["epoch_samples_seen"] == c["step"] * BATCH for c in first), first


def test_a_drained_node_checkpoints_before_it_goes_and_the_run_shrinks_then_grows(tmp_path):
    # training goes on during the 15 s notice, then shrinks and grows; fewer reports and checkpoints
    # than the other test, so that the notice's checkpoint does not queue behind others
    r = run("drain", tmp_path, steps=96, log_every=4, checkpoint_every=12)
    (drain,) = r["faults"]
    notice = [c for c in r["checkpoint_rows"] if c["checkpoint_reason"] == "preemption"]
    assert notice and notice[0]["time"] < drain["deadline"], (notice, drain["deadline"])
    assert drain["resumed_at_step"] >= notice[0]["step"]  # resumed from that checkpoint or a later one
    sizes = [w for _, w, _, _ in r["observed"]]
    assert 1 in sizes and 2 in sizes[sizes.index(1):]
    assert {g for _, _, g, _ in r["observed"]} == {BATCH}  # scaling.batch_policy=global keeps it


pytestmark = pytest.mark.timeout(900)
