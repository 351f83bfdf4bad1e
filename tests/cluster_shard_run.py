"""`selfsup shard` and `shard index` as Ray Data tasks on a 2-node `ray.cluster_utils.Cluster` (every
process on 127.0.0.1), beside the same work done by the local thread pool (tests/test_byod.py).

    python tests/cluster_shard_run.py WORKDIR   -> one JSON line on stdout
"""

import json
import os
import re
import signal
import sys

import numpy as np
from PIL import Image


def images(folder: str) -> None:
    """60 RGB JPEGs in 3 class folders (24x32)."""
    for i in range(60):
        os.makedirs(f"{folder}/c{i % 3}", exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (24, 32, 3), np.uint8)
        Image.fromarray(arr).save(f"{folder}/c{i % 3}/{i:03d}.jpg", quality=90)


def main() -> None:
    work = sys.argv[1]
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the finally stops the cluster
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from selfsup.pipelines.index import IndexOptions, index
    from selfsup.pipelines.shards import ShardOptions, write_shards
    from selfsup.pipelines.sources import open_source

    images(f"{work}/src")
    opts = ShardOptions(samples_per_shard=8, workers=2)
    out, lines = {}, []
    out["local"] = write_shards(open_source(f"{work}/src", 0.2), f"{work}/local", opts, progress=False,
                                log=lambda *_: None)
    out["index_local"] = index(f"{work}/local/train/*.tar", IndexOptions(overwrite=True), progress=False,
                               log=lambda *_: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        out["ray"] = write_shards(open_source(f"{work}/src", 0.2), f"{work}/ray", opts, progress=False,
                                  log=lines.append, on_ray=True)
        out["index_ray"] = index(f"{work}/local/train/*.tar", IndexOptions(overwrite=True), progress=False,
                                 log=lines.append, on_ray=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    for key in ("index_local", "index_ray"):
        out[key].pop("created")
    nodes = [int(re.search(r"on (\d+) node", x).group(1)) for x in lines if "node(s)" in x]
    out["shard_nodes"], out["index_nodes"] = nodes
    print(json.dumps(out))


if __name__ == "__main__":
    main()
