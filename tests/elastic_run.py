"""One training run under one real fault, on a multi-node Ray cluster on this machine.

    python tests/elastic_run.py FAULT[,FAULT...] OUT.json [--ray-defaults] [--steps N] [--at STEP] [--set K=V]

FAULT: kill-worker (kill -9 of a train worker process), node-loss (the node of a worker
removed without notice), drain (that node drained with a 15 s preemption notice and removed at its
deadline; once the run has checkpointed on the one node left, a node is added back), s3-outage
(the embedded S3 server stopped for 20 s). `--ray-defaults` runs with Ray 2.60's own
recovery settings instead of the platform's. Used by tests/test_elastic.py and
benchmarks/elastic.py; writes what happened to OUT.json.

The cluster (`ray.cluster_utils.Cluster`, every process on 127.0.0.1): a head with 1 CPU for Ray
Data's decode tasks and 2 worker nodes with 1 CPU and one `slot` each; a train worker takes 0.5
CPU and a `slot`, so each node holds at most one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("SELFSUP_HOME", tempfile.mkdtemp(prefix="selfsup-elastic-"))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
    os.environ.pop(var, None)

import numpy as np  # noqa: E402

DATA, ROOT, NAME = "s3://elastic-data/synthetic", "s3://elastic-runs/runs", "elastic"
WORKER_NODE = {"num_cpus": 1, "resources": {"slot": 1}}


def synthetic_data(path: str) -> None:
    """400 grey 16x16 images of 4 classes (a bright band at a class-dependent row), as shards of 40."""
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    rng = np.random.default_rng(0)
    labels = np.arange(480) % 4
    images = rng.integers(0, 60, size=(480, 16, 16), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 3 * y + 2: 3 * y + 5, :] = 230
    np.savez(path, images=images, labels=labels, class_names=np.array(["a", "b", "c", "d"]))
    write_shards(open_source(path, holdout=1 / 6), DATA, ShardOptions(samples_per_shard=40), progress=False,
                 log=lambda *_: None)


def config(args, elastic: bool):
    from selfsup.platform.config import load_config

    overrides = [
        f"data.uri={DATA}", "data.batch_size=16", "data.views.view0.size=16", "data.views.view1.size=16",
        "model.name=resnet10t", "model.cifar_stem=false", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "eval.train_samples=0", "eval.test_samples=0", "eval.k=5", "eval.at_start=false", "eval.every_epochs=null",
        f"storage.root={ROOT}", f"storage.name={NAME}", f"schedule.steps={args.steps}",
        f"train.log_every_steps={args.log_every}", f"train.checkpoint_every_steps={args.checkpoint_every}",
        "train.max_failures=-1",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.extra_resources_per_worker={slot: 1}",
    ]
    if elastic:
        overrides.append("scaling.min_workers=1")
    if args.ray_defaults:  # Ray 2.60's own values of the platform's recovery settings
        overrides += ["scaling.resize_check_s=60", "scaling.worker_start_timeout_s=60", "scaling.health_check_s=2"]
    return load_config(None, overrides + args.set)


SEEN: dict = {}  # every train row observed, by (worker group, step): a restart replaces rows in the file


def train_rows():
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.runs import read_metrics

    try:
        rows = read_metrics(open_store(f"{ROOT}/{NAME}"))
    except Exception:
        return []
    rows = [r for r in rows if r["kind"] == "train"]
    SEEN.update({(r["worker_group"], r["step"]): r for r in rows})
    return rows


def checkpoint_rows():
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.runs import read_metrics

    try:
        return [r for r in read_metrics(open_store(f"{ROOT}/{NAME}")) if r.get("checkpoint")]
    except Exception:
        return []


# Each look reads metrics.jsonl from S3: CPU the run under test needs on 2 cores. Recovery is timed
# by the rows' own timestamps, so looking once a second changes no figure.
def wait_for(pred, timeout: float, what: str, poll: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def node_of_worker(cluster) -> tuple:
    """(cluster node, worker pid) of one Ray Train worker process."""
    import psutil

    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.worker_nodes}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            for parent in p.parents():
                if parent.pid in raylets:
                    return raylets[parent.pid], p.pid
    raise RuntimeError("no Ray Train worker process found")


FAULTS = ("kill-worker", "node-loss", "drain", "s3-outage")


def inject(name: str, cluster, nodes: list, home: str, out: dict) -> None:
    """One fault, recorded in `out`; returns once the run trains again after it."""
    from selfsup.pipelines.seaweed import EmbeddedS3

    group, fault = train_rows()[-1]["worker_group"], time.time()
    out["fault"] = name
    if name == "kill-worker":
        os.kill(node_of_worker(cluster)[1], 9)
    elif name == "node-loss":
        cluster.remove_node(node_of_worker(cluster)[0])
    elif name == "drain":
        node, _ = node_of_worker(cluster)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                        f"--address={cluster.address}", f"--node-id={node.node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=elastic test",
                        "--deadline-remaining-seconds=15"], check=True, capture_output=True)
        out["deadline"] = fault + 15
        time.sleep(max(0.0, out["deadline"] - time.time()))
        fault = time.time()  # recovery counts from the node's loss
        cluster.remove_node(node)  # what the cloud does at the deadline
    else:
        server = EmbeddedS3(home)
        server.down()
        time.sleep(20)
        server.up()
        out["outage_s"] = round(time.time() - fault, 1)
        return
    # the file still holds rows of earlier groups, up to the checkpoint each restart resumed from
    new = wait_for(lambda: [r for r in train_rows() if r["worker_group"] != group and r["time"] > fault], 300,
                   "a new worker group")
    out["fault_at"], out["recovery_s"] = round(fault, 3), round(new[0]["time"] - fault, 2)
    out["resumed_at_step"] = max((c["step"] for c in checkpoint_rows() if c["step"] < new[0]["step"]), default=0)
    # The step at the fault from the killed group's own rows, read after the fact (they stay in the
    # file until the new group reports): the last row read before the kill lags it on a busy machine.
    out["fault_step"] = max(r["step"] for (g, _), r in SEEN.items() if g == group)
    out["steps_repeated"] = max(0, out["fault_step"] - out["resumed_at_step"])
    if name == "drain":  # once the run has checkpointed on the node left, a node comes back
        one = wait_for(lambda: [r for r in train_rows() if r["workers"] == 1], 300, "steps on one worker")
        wait_for(lambda: any(r["time"] > one[0]["time"] for r in checkpoint_rows()), 300, "a checkpoint on one worker")
        added = time.time()
        nodes.append(cluster.add_node(**WORKER_NODE))
        grown = wait_for(lambda: [r for r in train_rows() if r["time"] > added and r["workers"] == 2], 300,
                         "the run to grow back")
        out["grow_s"] = round(grown[0]["time"] - added, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("faults", help=f"comma-separated, in order: {', '.join(FAULTS)}")
    ap.add_argument("out")
    ap.add_argument("--ray-defaults", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override after the others (one recovery setting at a time, say)")
    ap.add_argument("--steps", type=int, default=60)
    # Ray Train takes one report per health check (0.5 s) and uploads checkpoints one at a time
    # (~3-5 s for this one on 2 busy cores): more often than that, reports queue up behind training.
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=6)
    ap.add_argument("--at", type=int, default=12, help="the step after which the first fault comes; "
                                                       "each next one 6 steps after the run trains again")
    args = ap.parse_args()
    # SIGTERM (`timeout`) ends it as Ctrl-C does: the `finally` below stops its cluster and S3 server
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    faults = args.faults.split(",")
    if set(faults) - set(FAULTS):
        ap.error(f"unknown fault(s) {', '.join(sorted(set(faults) - set(FAULTS)))}")

    import ray
    from ray.cluster_utils import Cluster

    from selfsup.pipelines.seaweed import exported
    from selfsup.platform.elastic import NODE_HEALTH
    from selfsup.platform.trainer import train

    result: dict = {"settings": "ray-defaults" if args.ray_defaults else "platform", "faults": []}
    home = os.environ["SELFSUP_HOME"]
    with exported(home):
        synthetic_data(os.path.join(home, "synthetic.npz"))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False,
            "_system_config": {} if args.ray_defaults else NODE_HEALTH})
        nodes = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        try:
            if args.ray_defaults:  # Ray's own coordinator, which the platform's would otherwise replace
                from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
                    get_or_create_autoscaling_coordinator
                get_or_create_autoscaling_coordinator()
            box: dict = {}
            elastic = bool({"node-loss", "drain"} & set(faults))

            def run():
                try:
                    box["summary"] = train(config(args, elastic), log=lambda *_: None)
                except BaseException as e:  # reported in the result
                    box["error"] = f"{type(e).__name__}: {e}"

            t = threading.Thread(target=run, daemon=True)
            t.start()
            at = args.at
            for name in faults:
                wait_for(lambda: any(r["step"] >= at for r in train_rows()), 300, f"step {at}")
                result["faults"].append({})
                inject(name, cluster, nodes, home, result["faults"][-1])
                at = train_rows()[-1]["step"] + 6
            t.join(600)
            result.update({k: box[k] for k in ("summary", "error") if k in box})
        finally:
            ray.shutdown()
            cluster.shutdown()
        result.update(inspect())
        train_rows()
        result["observed"] = [[r["step"], r["workers"], r["global_batch"], r["worker_group"]]
                              for _, r in sorted(SEEN.items(), key=lambda kv: kv[1]["time"])]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def inspect() -> dict:
    """What the run left in storage: metric rows, checkpoints (does each complete one load?)."""
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.checkpoints import MANIFEST, load_checkpoint
    from selfsup.platform.runs import checkpoint_names, read_metrics

    store = open_store(f"{ROOT}/{NAME}")
    rows = read_metrics(store)
    out = {"train_steps": [r["step"] for r in rows if r["kind"] == "train"],
           "workers": [[r["step"], r["workers"], r["global_batch"]] for r in rows if r["kind"] == "train"],
           "checkpoint_rows": [{k: r.get(k) for k in ("step", "time", "checkpoint", "checkpoint_reason", "data_epoch",
                                                        "epoch_samples_seen", "samples_repeated")}
                               for r in rows if r.get("checkpoint")],
           "rows": [{k: r.get(k) for k in ("kind", "step", "time", "workers", "worker_group", "checkpoint")}
                    for r in rows],
           "checkpoints": {}}
    for name in checkpoint_names(store):
        if not store.exists(f"{name}/{MANIFEST}"):
            out["checkpoints"][name] = "incomplete"
            continue
        try:
            out["checkpoints"][name] = int(load_checkpoint(store, name)["step"])
        except Exception as e:
            out["checkpoints"][name] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    main()
