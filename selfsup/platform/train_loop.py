"""The Ray Train worker function: wraps the Ray-free TrainStep with DDP, the epoch's data stream,
metric reports, kNN evaluation, checkpoints in storage and exact resume.

A worker group may be restarted at any time (a killed worker, a lost or added node, a resize):
the new group restores the newest complete checkpoint, its step, optimizer and data position, and
continues the interrupted epoch with the samples that epoch had not yet trained on."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.streaming import decoded_collate
from selfsup.platform.config import Config, validate
from selfsup.platform.checkpoints import read_checkpoint, save_checkpoint, wait_complete
from selfsup.platform.runs import checkpoint_name
from selfsup.platform.step import Progress, TrainStep, build_method
from selfsup.platform.teacher import attach_teacher

log = logging.getLogger("selfsup.train")


class Diverged(RuntimeError):
    """Updates kept being skipped after every rollback the config allows."""


def _nan_loss(module, inputs, out):
    return {**out, "loss": out["loss"] * float("nan")}


class DataPosition:
    """Which samples of the current epoch the run has trained on: one bit per sample index.

    Every worker marks the indices of the batches it steps on; at a checkpoint (every worker at
    the same step) the marks are summed across workers into the bitmap the checkpoint stores. A
    mark on a sample already marked counts as a repeat. A resumed epoch reads only the samples
    its bitmap lacks, so within an epoch each sample is trained on at most once in the history
    that survives: the steps after the last checkpoint are lost with a crash, and their samples
    are read again after it."""

    def __init__(self, n: int, epoch: int = 0, seen: np.ndarray | None = None, repeated: int = 0):
        self.n, self.epoch, self.repeated = n, epoch, repeated
        self.seen = np.zeros(n, bool) if seen is None else seen  # agreed by every worker
        self.new = np.zeros(n, bool)  # this worker's marks since the last sync
        self.local_repeats = 0

    def mark(self, index: torch.Tensor) -> None:
        idx = index.numpy()
        idx = idx[(idx >= 0) & (idx < self.n)]
        self.local_repeats += int(self.seen[idx].sum() + self.new[idx].sum())
        self.new[idx] = True

    def sync(self, world: int) -> None:
        """Merge every worker's marks into `seen` (a collective: every worker calls it)."""
        counts = torch.from_numpy(self.new.astype(np.int32))
        repeats = torch.tensor([self.local_repeats], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(repeats)
        c = counts.numpy()
        self.repeated += int(repeats) + int(np.maximum(c - 1, 0).sum())
        self.seen |= c > 0
        self.new[:] = False
        self.local_repeats = 0

    def next_epoch(self, world: int) -> None:
        self.sync(world)
        self.epoch += 1
        self.seen[:] = False

    def state(self) -> dict:
        return {"epoch": self.epoch, "seen": torch.from_numpy(self.seen.copy()), "repeated": self.repeated}

    @classmethod
    def from_state(cls, n: int, state: dict | None) -> "DataPosition":
        if not state:
            return cls(n)
        seen = state["seen"].numpy().astype(bool)
        if len(seen) != n:  # the split changed under the run: its bitmap means nothing now
            log.warning("the train split has %d samples, the checkpoint's data position %d: epoch %d restarts",
                        n, len(seen), state["epoch"])
            seen = None
        return cls(n, int(state["epoch"]), seen, int(state.get("repeated", 0)))


def apply_state(step_fn: TrainStep, state: dict | None) -> tuple[int, float]:
    """(step, elapsed training time) after loading a checkpoint's state (0, 0.0 without one)."""
    if state is None:
        return 0, 0.0
    step_fn.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["elapsed"])


def _from_rank_zero(value, world: int):
    import ray.train.collective

    return ray.train.collective.broadcast_from_rank_zero(value) if world > 1 else value


def newest_state(run_uri: str, ep: Endpoint | None, rank: int, world: int,
                 reported: str | None = None) -> tuple[dict | None, str | None]:
    """(state, name) of the newest complete checkpoint, the same one on every worker: rank 0
    chooses (a checkpoint may complete while the workers look), after waiting a little for the
    checkpoint it `reported` last to finish uploading. A collective."""
    if rank == 0 and reported and not wait_complete(run_uri, ep, reported, 30.0):
        log.warning("checkpoint %s is still not complete after 30 s: taking the newest complete one", reported)
    state, name = read_checkpoint(run_uri, ep) if rank == 0 else (None, None)
    name = _from_rank_zero(name, world)
    if rank != 0 and name:
        state, _ = read_checkpoint(run_uri, ep, name)
    return state, name


class Evaluator:
    """kNN on backbone features over fixed subsets of the labeled splits (rank 0 only)."""

    def __init__(self, cfg: Config, ep: Endpoint | None, device: torch.device, dtype):
        self.cfg, self.ep, self.device, self.dtype = cfg, ep, device, dtype
        self.train = self.test = None  # loaded at the first evaluation: not on a restart's way to training

    def __call__(self, method) -> dict[str, float]:
        from selfsup.platform.evaluate import extract_features, knn_top1, load_labeled

        c, e = self.cfg, self.cfg.eval
        if self.train is None:
            self.train = load_labeled(c.eval_uri(), e.train_split, e.train_samples, c.data.seed, self.ep, c.data.strict)
            self.test = load_labeled(c.eval_uri(), e.test_split, e.test_samples, c.data.seed + 1, self.ep, c.data.strict)
        size = e.image_size or c.view_size()
        out = {}
        backbones = {"knn_top1": method.backbone}
        if hasattr(method, "teacher_backbone"):
            backbones["knn_top1_teacher"] = method.teacher_backbone
        t0 = time.perf_counter()
        for key, bb in backbones.items():
            f = [extract_features(bb, imgs, size, c.data.mean, c.data.std, c.model.in_chans, self.device, self.dtype)
                 for imgs, _ in (self.train, self.test)]
            out[key] = knn_top1(f[0], self.train[1], f[1], self.test[1], e.k, e.temperature)
        out["eval_time_s"] = time.perf_counter() - t0
        return out


def _bad_shards(health: str | None) -> int:
    if not health:
        return 0
    import ray

    try:
        return len(ray.get(ray.get_actor(health).bad_shards.remote(), timeout=10))
    except Exception:
        return 0


_NEXT = object()  # the stream to take at the top of the epoch loop: the next epoch's


class EpochStreams:
    """Each epoch's data as one Ray Data stream, split in equal parts, one per worker.

    Rank 0 has the run's stream owner (pipelines.streaming.stream_owner_actor) plan every stream,
    and the next epoch's ahead of time: a stream's first batch takes ~5 s to come when it is planned
    just before use (Ray Data starts a coordinator actor and its tasks), ~0.7 s when planned an
    epoch before."""

    def __init__(self, cfg: Config, ep: Endpoint | None, owner: str, health: str | None, rank: int, world: int,
                 local_bs: int):
        self.cfg, self.ep, self.owner, self.health, self.rank, self.world, self.local_bs = \
            cfg, ep, owner, health, rank, world, local_bs
        self.group = os.urandom(8).hex()  # this worker group: its streams replace every other group's
        self.ahead: tuple[int, list | None] | None = None

    def _plan(self, epoch: int, seen: np.ndarray | None):
        import ray

        c = self.cfg
        read = dict(manifest_uri=c.data.uri, split=c.data.train_split, ep=self.ep, seed=c.data.seed,
                    strict=c.data.strict, health=self.health, batch_size=self.local_bs, epoch=epoch, seen=seen,
                    spec=c.data.views if c.data.augment_on == "pipeline" else None)
        return ray.get(ray.get_actor(self.owner).split.remote(self.group, self.world, read))

    def get(self, position: DataPosition):
        """This worker's part of the epoch at `position` (None when it has nothing left). A collective."""
        splits = None
        if self.rank == 0:
            fresh = not position.seen.any()
            if self.ahead and self.ahead[0] == position.epoch and fresh:
                splits = self.ahead[1]
            else:
                splits = self._plan(position.epoch, None if fresh else position.seen)
        self.ahead = None
        splits = _from_rank_zero(splits, self.world)
        return None if splits is None else splits[self.rank]

    def plan_next(self, epoch: int) -> None:
        """Plan epoch `epoch` + 1 now (once training runs: a restart's first steps come first). A collective."""
        self.ahead = (epoch + 1, _from_rank_zero(self._plan(epoch + 1, None) if self.rank == 0 else None, self.world))


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    cfg = validate(config["cfg"])
    ep = Endpoint(**config["ep"]) if config["ep"] else None
    run_uri, health, n_train = config["run_uri"], config["health"], config["n_train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or max(1, round(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed + rank)

    group_started = round(time.time(), 3)  # marks this worker group's rows: a restart or resize shows
    local_bs, global_bs, accum = cfg.batch_at(world)
    steps_per_epoch = max(1, n_train // cfg.data.batch_size)
    progress = Progress(cfg, steps_per_epoch)
    # The checkpoint and the epoch's stream first: Ray Data starts the stream while the model builds.
    state, restored = newest_state(run_uri, ep, rank, world)
    position = DataPosition.from_state(n_train, state.get("position") if state else None)
    streams = EpochStreams(cfg, ep, config["streams"], health, rank, world, local_bs)

    stream = streams.get(position)
    method = build_method(cfg, n_train, ep)
    attach_teacher(method, cfg, ep)  # distill's frozen teacher
    method.to(device)
    # sets the memory format: before DDP builds its buckets
    step_fn = TrainStep(method, cfg, device, global_batch=global_bs, accum=accum)
    if world > 1:
        # No buffer sync after init: methods keep their cross-worker state in sync themselves (centres,
        # queues), and a memory bank must stay per worker (DeepCluster-v2 merges them to cluster).
        step_fn.model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    step, elapsed = apply_state(step_fn, state)
    if restored and rank == 0:
        log.warning("resumed from %s/%s at step %d on %d worker(s), epoch %d at %d of %d samples", run_uri,
                    restored, step, world, position.epoch, int(position.seen.sum()), n_train)

    evaluator = Evaluator(cfg, ep, device, step_fn.dtype) if rank == 0 and cfg.eval.knn else None
    reported = [None]  # the checkpoint rank 0 reported last (it may still be uploading)

    def report(row: dict, checkpoint_dir: str | None = None) -> None:
        row = {"kind": row.pop("kind"), "step": step, "epoch": round(step / steps_per_epoch, 4),
               "time": round(time.time(), 3), **row}
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Every report asynchronous: reports stay in order, and training goes on while a
        # checkpoint uploads (Ray deletes the local copy once it is in storage).
        ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(step) if ckpt else None,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def evaluate_and_checkpoint(eval_now: bool, ckpt_now: bool, why: str | None = None) -> None:
        row = {"kind": "eval" if eval_now else "checkpoint"}
        if ckpt_now:
            position.sync(world)
            row.update(checkpoint=checkpoint_name(step), data_epoch=position.epoch,
                       epoch_samples_seen=int(position.seen.sum()), samples_repeated=position.repeated)
            if why:
                row["checkpoint_reason"] = why
        if eval_now and evaluator:
            row.update(evaluator(method))
        if not ckpt_now:
            report(row)
            return
        d = tempfile.mkdtemp(prefix="selfsup-ckpt-") if rank == 0 else None
        if rank == 0:
            reported[0] = checkpoint_name(step)
            meta = {"step": step, "epoch": position.epoch, "elapsed": elapsed}
            state = {**step_fn.state_dict(), **meta, "torch_rng": torch.get_rng_state(), "position": position.state()}
            # the controller writes these as the checkpoint's manifest once Ray has uploaded it
            row["checkpoint_files"] = save_checkpoint(state, meta, d)
        report(row, d)

    def period(n_epochs: float | None) -> int | None:
        return None if n_epochs is None else max(1, round(n_epochs * steps_per_epoch))

    eval_every, ckpt_every = period(cfg.eval.every_epochs), period(cfg.train.checkpoint_every_epochs)
    last_ckpt = time.monotonic()

    def checkpoint_due() -> bool:
        """By epochs, steps or seconds, whichever comes first; rank 0's clock decides for all."""
        if step % ckpt_every == 0 or (cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0):
            return True
        if not cfg.train.checkpoint_every_s:
            return False
        due = torch.tensor([float(time.monotonic() - last_ckpt >= cfg.train.checkpoint_every_s)])
        if world > 1:
            dist.broadcast(due, src=0)
        return bool(due.item())

    noticed = set()  # preemption deadlines already answered with a checkpoint

    def preemption_notice() -> str | None:
        info = ray.train.get_preemption_info()  # the same on every worker (rank 0's)
        if info is None or info.deadline_ms in noticed:
            return None
        noticed.add(info.deadline_ms)
        left = "" if not info.deadline_ms else f" in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s"
        if rank == 0:
            log.warning("node(s) %s will be preempted%s: checkpointing at step %d",
                        ", ".join(n[:8] for n in info.preempted_node_to_ranks), left, step)
        return "preemption"

    if step == 0 and cfg.eval.at_start and cfg.eval.knn:
        evaluate_and_checkpoint(True, False)

    def rollback(skipped: int, n: int) -> tuple[int, float]:
        """Back to the last complete checkpoint after `skipped` non-finite updates in a row (the
        data stream goes on: the batches that diverged are not fed again)."""
        why = (f"{skipped} updates in a row were skipped (non-finite loss or gradients) at step {step}; "
               f"train.rollback_after_skipped={cfg.train.rollback_after_skipped}")
        if n > cfg.train.max_rollbacks:
            raise Diverged(f"{why}, after {n - 1} rollbacks (train.max_rollbacks={cfg.train.max_rollbacks}): the run "
                           "diverges; lower optim.lr or check the data")
        state, name = newest_state(run_uri, ep, rank, world, reported[0])
        new_step, new_elapsed = apply_state(step_fn, state)
        if name is None:
            raise Diverged(f"{why}, and the run has no complete checkpoint to roll back to")
        if rank == 0:
            log.warning("%s: rolled back to %s (rollback %d of %d)", why, name, n, cfg.train.max_rollbacks)
        return new_step, new_elapsed

    # An epoch is one pass over the split, planned by rank 0 as its own stream (shard order a
    # function of (seed, epoch)); every worker takes the same number of steps from it, so
    # collectives stay in step. `epoch` in the metrics is steps / (split size // data.batch_size).
    window_t, window_steps, sums = time.perf_counter(), 0, {}
    skipped_in_a_row, rollbacks = 0, 0
    nan_from, nan_rollbacks = map(int, config["test_nan"].split(":")) if config.get("test_nan") else (None, 0)
    while not progress.done(step, elapsed):
        fresh = not position.seen.any()
        if stream is _NEXT:
            stream = streams.get(position)
        method.start_epoch(position.epoch)
        pass_start, done = step, False
        batches = [] if stream is None else stream.iter_torch_batches(
            batch_size=local_bs, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
            collate_fn=decoded_collate() if cfg.data.augment_on == "trainer" else None,
            pin_memory=device.type == "cuda")
        for batch in batches:
            t0 = time.perf_counter()
            poison = nan_from is not None and step + 1 >= nan_from and rollbacks < nan_rollbacks
            hook = method.register_forward_hook(_nan_loss) if poison else None
            metrics = step_fn(batch, progress(step, elapsed))
            if hook:
                hook.remove()
            position.mark(batch["index"])
            step += 1
            if step == pass_start + 1 and (progress.total_steps is None
                                           or step + n_train // global_bs < progress.total_steps):
                streams.plan_next(position.epoch)  # the run goes past this epoch
            skipped_in_a_row = skipped_in_a_row + 1 if metrics["skipped_update"] else 0
            if skipped_in_a_row >= cfg.train.rollback_after_skipped:
                rollbacks += 1
                step, elapsed = rollback(skipped_in_a_row, rollbacks)
                skipped_in_a_row, window_t, window_steps, sums = 0, time.perf_counter(), 0, {}
                continue
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if world > 1 and progress.budget:  # every worker must stop at the same step
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            elapsed += float(dt)
            window_steps += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            done = progress.done(step, elapsed)
            if step % cfg.train.log_every_steps == 0 or done:
                wall = time.perf_counter() - window_t
                row = {k: v / window_steps for k, v in sums.items()}
                row.update(kind="train", images_per_s=window_steps * global_bs / wall, workers=world,
                           global_batch=global_bs, micro_batches=accum, worker_group=group_started, rollbacks=rollbacks,
                           progress=round(progress(step, elapsed), 5), elapsed_s=round(elapsed, 2))
                if rank == 0:
                    row["bad_shards"] = _bad_shards(health)
                report(row)
                window_t, window_steps, sums = time.perf_counter(), 0, {}
            eval_now = cfg.eval.knn and (done or (eval_every is not None and step % eval_every == 0))
            why = preemption_notice()
            ckpt_now = why is not None or checkpoint_due() or done
            if eval_now or ckpt_now:
                evaluate_and_checkpoint(eval_now, ckpt_now, why)
                if ckpt_now:
                    last_ckpt = time.monotonic()
                window_t = time.perf_counter()  # evaluation time is not training time
            if done:
                break
        if done:
            break
        if step == pass_start and fresh:
            raise RuntimeError(f"rank {rank} got no full batch of {local_bs} samples from epoch {position.epoch} "
                               "of the data: is the split smaller than one global batch?")
        position.next_epoch(world)
        stream = _NEXT
