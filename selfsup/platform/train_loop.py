"""The Ray Train worker function: wraps the Ray-free TrainStep with DDP, the dataset shard,
metric reports, kNN evaluation, checkpoints in storage and exact resume."""

from __future__ import annotations

import logging
import tempfile
import time

import torch
import torch.distributed as dist

from selfsup.pipelines.storage import Endpoint
from selfsup.platform.config import Config, validate
from selfsup.platform.checkpoints import read_checkpoint, save_checkpoint
from selfsup.platform.runs import checkpoint_name
from selfsup.platform.step import Progress, TrainStep, build_method

log = logging.getLogger("selfsup.train")


class Diverged(RuntimeError):
    """Updates kept being skipped after every rollback the config allows."""


def _nan_loss(module, inputs, out):
    return {**out, "loss": out["loss"] * float("nan")}


def restore(run_uri: str, ep: Endpoint | None, step_fn: TrainStep) -> tuple[int, float, str | None]:
    """(step, elapsed training time, checkpoint name) after restoring the newest good checkpoint."""
    state, name = read_checkpoint(run_uri, ep)
    if state is None:
        return 0, 0.0, None
    step_fn.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["elapsed"]), name


class Evaluator:
    """kNN on backbone features over fixed subsets of the labeled splits (rank 0 only)."""

    def __init__(self, cfg: Config, ep: Endpoint | None, device: torch.device, dtype):
        from selfsup.platform.evaluate import load_labeled

        e = cfg.eval
        self.cfg, self.device, self.dtype = cfg, device, dtype
        strict = cfg.data.strict
        self.train = load_labeled(cfg.data.uri, e.train_split, e.train_samples, cfg.data.seed, ep, strict)
        self.test = load_labeled(cfg.data.uri, e.test_split, e.test_samples, cfg.data.seed + 1, ep, strict)

    def __call__(self, method) -> dict[str, float]:
        from selfsup.platform.evaluate import extract_features, knn_top1

        c, e = self.cfg, self.cfg.eval
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


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = validate(config["cfg"])
    ep = Endpoint(**config["ep"]) if config["ep"] else None
    run_uri, health, n_train = config["run_uri"], config["health"], config["n_train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or max(1, round(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed + rank)

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    method = build_method(cfg, n_train, ep).to(device)
    step_fn = TrainStep(method, cfg, device)  # sets the memory format: before DDP builds its buckets
    if world > 1:
        # No buffer sync after init: methods keep their cross-worker state in sync themselves (centres,
        # queues), and a memory bank must stay per worker (DeepCluster-v2 merges them to cluster).
        step_fn.model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    step, elapsed, restored = restore(run_uri, ep, step_fn)
    if restored and rank == 0:
        log.warning("resumed from %s/%s at step %d", run_uri, restored, step)

    steps_per_epoch = max(1, n_train // cfg.data.batch_size)
    progress = Progress(cfg, steps_per_epoch)
    evaluator = Evaluator(cfg, ep, device, step_fn.dtype) if rank == 0 else None
    local_bs = cfg.data.batch_size // world
    shard = ray.train.get_dataset_shard("train")

    def report(row: dict, checkpoint_dir: str | None = None) -> None:
        row = {"kind": row.pop("kind"), "step": step, "epoch": round(step / steps_per_epoch, 4), **row}
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(step) if ckpt else None)

    def evaluate_and_checkpoint(eval_now: bool, ckpt_now: bool) -> None:
        row = {"kind": "eval" if eval_now else "checkpoint"}
        if ckpt_now:
            row["checkpoint"] = checkpoint_name(step)
        if eval_now and rank == 0:
            row.update(evaluator(method))
        if not ckpt_now:
            report(row)
            return
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                epoch = step // steps_per_epoch
                state = {**step_fn.state_dict(), "step": step, "epoch": epoch, "elapsed": elapsed,
                         "torch_rng": torch.get_rng_state()}
                # the controller writes these as the checkpoint's manifest once Ray has uploaded it
                row["checkpoint_files"] = save_checkpoint(state, {"step": step, "epoch": epoch, "elapsed": elapsed}, d)
            report(row, d if rank == 0 else None)

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
    if step == 0 and cfg.eval.at_start:
        evaluate_and_checkpoint(True, False)

    def rollback(skipped: int, n: int) -> tuple[int, float]:
        """Back to the last complete checkpoint after `skipped` non-finite updates in a row."""
        why = (f"{skipped} updates in a row were skipped (non-finite loss or gradients) at step {step}; "
               f"train.rollback_after_skipped={cfg.train.rollback_after_skipped}")
        if n > cfg.train.max_rollbacks:
            raise Diverged(f"{why}, after {n - 1} rollbacks (train.max_rollbacks={cfg.train.max_rollbacks}): the run "
                           "diverges; lower optim.lr or check the data")
        new_step, new_elapsed, name = restore(run_uri, ep, step_fn)
        if name is None:
            raise Diverged(f"{why}, and the run has no complete checkpoint to roll back to")
        if rank == 0:
            log.warning("%s: rolled back to %s (rollback %d of %d)", why, name, n, cfg.train.max_rollbacks)
        return new_step, new_elapsed

    # An epoch is steps_per_epoch steps (the split's images once); each starts a new pass over
    # the data, reshuffled. Every worker takes the same steps, so collectives stay in step.
    window_t, window_steps, sums = time.perf_counter(), 0, {}
    skipped_in_a_row, rollbacks = 0, 0
    nan_from, nan_rollbacks = map(int, config["test_nan"].split(":")) if config.get("test_nan") else (None, 0)
    while not progress.done(step, elapsed):
        epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
        pass_start, rolled_back = step, False
        method.start_epoch(step // steps_per_epoch)
        for batch in shard.iter_torch_batches(batch_size=local_bs, drop_last=True,
                                              prefetch_batches=cfg.data.prefetch_batches):
            t0 = time.perf_counter()
            poison = nan_from is not None and step + 1 >= nan_from and rollbacks < nan_rollbacks
            hook = method.register_forward_hook(_nan_loss) if poison else None
            metrics = step_fn(batch, progress(step, elapsed))
            if hook:
                hook.remove()
            step += 1
            skipped_in_a_row = skipped_in_a_row + 1 if metrics["skipped_update"] else 0
            if skipped_in_a_row >= cfg.train.rollback_after_skipped:
                rollbacks += 1
                step, elapsed = rollback(skipped_in_a_row, rollbacks)
                skipped_in_a_row, window_t, window_steps, sums = 0, time.perf_counter(), 0, {}
                rolled_back = True
                break  # a new pass over the data from the restored step
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if world > 1 and progress.budget:  # every worker must stop at the same step
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            elapsed += float(dt)
            window_steps += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            done = progress.done(step, elapsed)
            if step % cfg.train.log_every_steps == 0 or done or step == epoch_end:
                wall = time.perf_counter() - window_t
                row = {k: v / window_steps for k, v in sums.items()}
                row.update(kind="train", images_per_s=window_steps * cfg.data.batch_size / wall, workers=world,
                           rollbacks=rollbacks,
                           progress=round(progress(step, elapsed), 5), elapsed_s=round(elapsed, 2))
                if rank == 0:
                    row["bad_shards"] = _bad_shards(health)
                report(row)
                window_t, window_steps, sums = time.perf_counter(), 0, {}
            eval_now = done or (eval_every is not None and step % eval_every == 0)
            ckpt_now = checkpoint_due() or done
            if eval_now or ckpt_now:
                evaluate_and_checkpoint(eval_now, ckpt_now)
                if ckpt_now:
                    last_ckpt = time.monotonic()
                window_t = time.perf_counter()  # evaluation time is not training time
            if done or step >= epoch_end:
                break
        if step == pass_start and not rolled_back:
            raise RuntimeError(f"rank {rank} got no full batch of {local_bs} samples from the data: "
                               "is the split smaller than one global batch?")
