"""Ray Train's DDP workers keep every listener on the node's address: no wildcard sockets."""

import os


def test_process_group_store_listens_on_the_node_address_only(ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfsup.platform.process_group import LocalStoreTorchConfig

    def wildcard_listeners() -> list[str]:
        """This process's listening TCP sockets bound to the wildcard address (0.0.0.0 or ::), from /proc."""
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for row in f.readlines()[1:]:
                    cols = row.split()
                    addr, port = cols[1].split(":")
                    if cols[3] == "0A" and cols[9] in inodes and set(addr) == {"0"}:  # 0A: LISTEN
                        found.append(f"{table[-4:]} port {int(port, 16)}")
        return found

    def check_group():  # defined here so that Ray ships it by value to its workers
        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == dist.get_world_size() == 2
        assert wildcard_listeners() == [], f"rank {dist.get_rank()} listens on {wildcard_listeners()}"

    TorchTrainer(check_group, torch_config=LocalStoreTorchConfig(),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=os.environ["SELFSUP_HOME"], name="pg")).fit()
