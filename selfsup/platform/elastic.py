"""Recovery settings: how fast a run notices a lost worker or node, and resumes or resizes.

With Ray 2.60's defaults a lost node costs about 65 s before the next training step, an added one
about 25 s (measured with `ray.cluster_utils.Cluster` on a 2-core machine). The time goes to:

- Ray's GCS declaring a node dead: `health_check_period_ms` 3000 x `health_check_failure_threshold`
  5 with a 10 s timeout (~15 s). Cluster-wide, so it is set where the cluster starts: here for the
  local cluster the trainer starts, with `ray start --head --system-config=...` on others (README).
- Ray Train's worker-group start timeout (`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, 60 s): after a
  failure the controller asks for the old size; when that no longer fits, the placement group waits
  this long before the controller retries with a fresh view -> `scaling.worker_start_timeout_s`.
- The controller's view of the cluster comes from Ray Data's `AutoscalingCoordinator` actor, which
  re-reads `ray.nodes()` only every 20 s (`_AutoscalingCoordinatorActor.TICK_INTERVAL_S`, a class
  constant with no setting). `fast_coordinator` starts that actor first, ticking every second and
  answering from a fresh view: private API, pinned by `ray==2.60.0` and tested.
- How often an elastic run below its size looks for room to grow
  (`ScalingConfig.elastic_resize_monitor_interval_s`, 60 s) -> `scaling.resize_check_s`.
- How often the controller polls its workers (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s) ->
  `scaling.health_check_s`, and drains (`RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`, 5 s): 1 s here.

What no setting changes: every restart builds a new worker group, whose processes import torch, timm
and Ray Train (9-13 s from the failure to the training function on 2 busy cores), then loads the
checkpoint and plans the epoch's stream anew. What keeps the rest short:
- The streams belong to a run-long actor (pipelines.streaming.stream_owner_actor), not to rank 0:
  Ray would end them, and the decode workers they leased, with the old group. Replaced instead,
  they hand their warm decode workers to the new stream.
- A failed group's streams stop at once (trainer.StopStreams), so they hold no CPU the next group
  needs.
- `lean_trainer` leaves out Ray Train's dataset callback, which starts an actor with every worker
  group for datasets handed to the trainer: this platform hands it none.
See benchmarks/elastic.py for the figures.
"""

from __future__ import annotations

from selfsup.platform.config import Config

# Cluster-wide node health checks: a node that stops answering is dead after ~3 s, not ~15 s.
# Tried at 200 ms / threshold 1 with no false deaths on a loaded 2-core machine; 1 s / 3 is margin.
NODE_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
PREEMPTION_POLL_S = 1.0


def train_env(cfg: Config) -> dict[str, str]:
    """Ray Train settings read from the driver's environment (Train hands them to its controller
    and workers)."""
    s = cfg.scaling
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{s.worker_start_timeout_s:g}",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": f"{s.health_check_s:g}",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": f"{PREEMPTION_POLL_S:g}"}


def fast_coordinator() -> None:
    """Start the cluster's `AutoscalingCoordinator` actor as one that sees node changes within a
    second (see the module docstring). Where one runs already (another job made it), it stays."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class FreshCoordinator(_AutoscalingCoordinatorActor):
        TICK_INTERVAL_S = 1

        def get_reserved_resources(self, requester_id, recompute: bool = False):
            # Train's elastic policy asks before each (re)start: answer from the cluster as it is.
            # Ray Data's executors ("data-<id>") poll often: the 1 s tick is fresh enough for them.
            fresh = recompute or not str(requester_id).startswith("data-")
            return super().get_reserved_resources(requester_id, recompute=fresh)

    # The same options as Ray's get_or_create_autoscaling_coordinator(), which then finds this one.
    ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(FreshCoordinator).options(
        name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()


def lean_trainer(**kwargs):
    """A TorchTrainer without Ray Train's dataset callback (module docstring), for runs that give it
    no `datasets`: that callback starts a DatasetManager actor with every worker group, ~2.5 s of a
    core in each restart of a run on 2 busy cores, for nothing. Private API
    (`_create_default_callbacks`), pinned by `ray==2.60.0` and tested."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return LeanTorchTrainer(**kwargs)
