"""DDP set-up for Ray Train workers, with the rendezvous store bound to the node's own address.

Ray Train's `TorchConfig` lets `torch.distributed` start its TCPStore on rank 0, and that store
listens on every interface (the wildcard address). Here rank 0 binds the listening socket itself,
to the address Ray knows its node by (127.0.0.1 on a local cluster), and hands it to the store;
the other ranks connect to it, and the process group is built on that store. It extends Ray's
private `_TorchBackend` (Ray is pinned in pyproject.toml), whose start-up this replaces."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_served: tuple | None = None  # rank 0's (socket, store): the store serves until the worker exits


def _serve(world_size: int, timeout_s: int) -> tuple[str, int]:
    global _served
    host = ray.util.get_node_ip_address()
    sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, world_size, is_master=True, master_listen_fd=sock.fileno(),
                          wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    _served = (sock, store)
    return host, port


def _join(backend: str, rank: int, world_size: int, host: str, port: int, timeout_s: int) -> None:
    timeout = timedelta(seconds=timeout_s)
    store = _served[1] if rank == 0 else dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if backend == "nccl":  # as Ray does: a timed-out collective fails the worker instead of hanging it
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        n = len(worker_group)
        host, port = worker_group.execute_single(0, _serve, n, backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, ... as Ray sets them
        ray.get([worker_group.execute_single_async(i, _join, backend_config.backend, i, n, host, port,
                                                   backend_config.timeout_s) for i in range(n)])


class LocalStoreTorchConfig(TorchConfig):
    """`TorchConfig` whose rendezvous store listens on the node's address only."""

    @property
    def backend_cls(self):
        return _Backend
