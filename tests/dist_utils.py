"""Run a function on W gloo processes (spawned, loopback only) and collect what each returns."""

import os
import pickle
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # By value: torch would share tensors by file descriptor, which dies with this process.
        queue.put((rank, pickle.dumps(fn(rank, world, *args))))
    finally:
        dist.destroy_process_group()


# Forked from one server process that imported these once: a fresh interpreter per rank and test
# spent ~10 s importing torch and timm on a 2-core machine. (Never forked from pytest itself.)
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "timm", "selfsup.methods", "dist_utils"])


def run_distributed(fn, world, *args):
    """[fn(rank, world, *args) for each rank], each in its own process with torch.distributed up."""
    ctx = _CTX
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = {r: pickle.loads(b) for r, b in (queue.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [out[r] for r in range(world)]
