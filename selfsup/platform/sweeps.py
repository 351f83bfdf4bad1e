"""Ray Tune sweeps over any config key: `selfsup tune CONFIG --space SPACE`.

A search space is YAML. Each entry is a config key and its distribution, or a label whose `keys`
all take the entry's one value (both views' jitter strength, say); a list element is addressed by
its index (`data.views.view0.scale.0` is the crop-scale minimum):

    method.temperature: {loguniform: [0.05, 0.5]}
    jitter_strength:
      keys: [data.views.view0.jitter_strength, data.views.view1.jitter_strength]
      uniform: [0.2, 1.0]

Distributions: `grid: [values]` (every value, crossed with the other grids), `choice: [values]`,
`uniform: [lo, hi]`, `loguniform: [lo, hi]`, `randint: [lo, hi]` (both ends included).

Each trial is an ordinary run at `<root>/<sweep>/<trial>/` (`selfsup runs show SWEEP/TRIAL`), its
kNN evaluations reported to Tune, where ASHA stops the weak ones early. Tune's own state lives at
`<root>/<sweep>/_tune/`, so rerunning the same command continues a sweep whose driver was killed;
finished trials are not run again. At the end `trials.csv`, `sweep.json` and `best.yaml` (the best
trial's config, which `selfsup train` takes as is) are written beside the trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from selfsup.methods import METHODS
from selfsup.pipelines.endpoints import Endpoint, environ, resolve_endpoint
from selfsup.pipelines.storage import Store, fs_and_path, is_s3, join, open_store
from selfsup.platform.config import Config, ConfigError, load_config, load_yaml, read_text, to_yaml, validate
from selfsup.platform.trackers import close_trackers, open_trackers
from selfsup.platform.runs import (BEST, SPACE, SUMMARY, SWEEP, TRIAL, TRIALS, TUNE_DIR, best_trial, check_name,
                                   evals, now, read_metrics, read_summary, read_sweep, trials_csv, trials_of)
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHERS = ("grid", "random", "optuna")
# More trials than this is a typo in a grid (10^9 points started without a word)
MAX_TRIALS = 10_000
# A trial's driver only waits on its Ray Train workers, so it takes no CPU: even 0.01 of one left
# 0.99 of the spare CPU on a 2-CPU machine, and Ray Data's whole-CPU read tasks never started (seen).
# Tune refuses a trial that asks for nothing; the driver's process does hold about 1 GiB.
TRIAL_RESOURCES = {"CPU": 0, "memory": 2**30}
# the shipped space for each method's family (selfsup/configs/spaces/)
FAMILY = {"simclr": "contrastive", "mocov2": "contrastive", "mocov3": "contrastive", "swav": "clustering",
          "deepclusterv2": "clustering", "dino": "dino", "byol": "two_views", "simsiam": "two_views",
          "barlowtwins": "two_views", "vicreg": "two_views", "mae": "masked", "simmim": "masked", "beit": "masked",
          "maskfeat": "masked", "ijepa": "masked", "dinov2": "dino", "distill": "two_views"}


class SpaceError(ConfigError):
    """A search space that names a key the config lacks, or a distribution that does not exist."""


# ------------------------------------------------------------------------------------ the space
def shipped_spaces() -> dict[str, Path]:
    from importlib import resources

    root = resources.files("selfsup") / "configs" / "spaces"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def read_space(space: str | None, method: str) -> tuple[str, dict]:
    """(name, entries) of a space file (a local path or an s3:// URI) or shipped space (default: the
    method family's)."""
    where, text = read_text(space or FAMILY[method], "space", shipped_spaces())
    try:
        tree = load_yaml(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"space {where} is not valid YAML: {' '.join(str(e).split())[:500]}") from None
    if not isinstance(tree, dict) or not tree:
        raise SpaceError(f"space {where} must be a mapping of entries (key: {{distribution: values}})")
    return Path(where.rpartition("/")[2]).stem, tree


def _parse_entry(label: str, spec: Any) -> dict:
    """{keys, dist, args} of one entry, or a SpaceError naming it."""
    if not isinstance(spec, dict):
        raise SpaceError(f"space entry {label!r}: give a distribution ({', '.join(DISTRIBUTIONS)}), got {spec!r}")
    unknown = set(spec) - {"keys", *DISTRIBUTIONS}
    if unknown:
        raise SpaceError(f"space entry {label!r}: {', '.join(sorted(map(str, unknown)))} is not a distribution "
                         f"(one of {', '.join(DISTRIBUTIONS)}) or `keys`")
    dists = [d for d in DISTRIBUTIONS if d in spec]
    if len(dists) != 1:
        raise SpaceError(f"space entry {label!r}: give exactly one distribution ({', '.join(DISTRIBUTIONS)})")
    dist, args = dists[0], spec[dists[0]]
    keys = spec.get("keys", [label])
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise SpaceError(f"space entry {label!r}: keys must be a list of config keys")
    if dist in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise SpaceError(f"space entry {label!r}: {dist} takes a non-empty list of values")
    else:
        if (not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args)
                or not args[0] < args[1]):
            raise SpaceError(f"space entry {label!r}: {dist} takes [low, high] with low < high, got {args!r}")
        if dist == "loguniform" and args[0] <= 0:
            raise SpaceError(f"space entry {label!r}: loguniform needs low > 0, got {args!r}")
        if dist == "randint" and not all(isinstance(a, int) for a in args):
            raise SpaceError(f"space entry {label!r}: randint takes integers, got {args!r}")
    return {"keys": keys, "dist": dist, "args": args}


def _set_key(tree: dict, key: str, value: Any, method: str) -> None:
    """Set dotted `key` (a list element by its index) in a full config tree, or fail naming it."""
    parts = key.split(".")
    if parts[0] == "method" and len(parts) == 2:  # the method's parameters are not all in the tree
        if parts[1] == "name" or parts[1] not in METHODS[method].Params.model_fields:
            raise SpaceError(f"{key} is not a parameter of method {method!r} (it has: "
                             f"{', '.join(METHODS[method].Params.model_fields)})")
        tree["method"][parts[1]] = value
        return
    node: Any = tree
    for i, p in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, dict):
            if p not in node:
                raise SpaceError(f"{key} is not a config key ({where} has: {', '.join(map(str, node))})")
        elif isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise SpaceError(f"{key}: {where} is a list of {len(node)}, index it with 0..{len(node) - 1}")
            p = int(p)
        else:
            raise SpaceError(f"{key} is not a config key ({where} is a value)")
        if i == len(parts) - 1:
            node[p] = value
        else:
            node = node[p]


class Space:
    """The entries of a search space, checked against a base config."""

    def __init__(self, name: str, tree: dict, base: Config):
        self.name, self.base = name, base
        self.entries = {str(label): _parse_entry(str(label), spec) for label, spec in tree.items()}
        for label, e in self.entries.items():  # every key takes every listed value and both ends of a range
            for sample in e["args"]:
                try:
                    self.config({label: sample})
                except SpaceError as err:
                    raise SpaceError(f"space entry {label!r}: {err}") from None
                except ConfigError as err:
                    raise SpaceError(f"space entry {label!r} = {sample!r}: {err}") from None

    def config(self, params: dict[str, Any], root: str | None = None, name: str | None = None) -> Config:
        """The base config with `params` (label -> value) set, stored as run `name` under `root`."""
        tree = self.base.model_dump(mode="json")
        tree["method"] = {"name": self.base.method.name, **self.base.method_params()}
        for label, value in params.items():
            for key in self.entries[label]["keys"]:
                _set_key(tree, key, value, self.base.method.name)
        if root is not None:
            tree["storage"] = {**tree["storage"], "root": root, "name": name}
        return validate(tree)

    def as_dict(self) -> dict:
        return {label: {"keys": e["keys"], e["dist"]: e["args"]} for label, e in self.entries.items()}

    def param_space(self, searcher: str) -> dict:
        out = {}
        for label, e in self.entries.items():
            d, a = e["dist"], e["args"]
            if d == "grid":
                if searcher == "optuna":
                    raise SpaceError(f"space entry {label!r}: grid does not go with --searcher optuna (use choice)")
                out[label] = tune.grid_search(a)
            elif searcher == "grid":
                raise SpaceError(f"space entry {label!r}: --searcher grid takes grid entries only, got {d}")
            elif d == "choice":
                out[label] = tune.choice(a)
            elif d == "uniform":
                out[label] = tune.uniform(*a)
            elif d == "loguniform":
                out[label] = tune.loguniform(*a)
            else:
                out[label] = tune.randint(a[0], a[1] + 1)  # Tune's upper end is excluded
        return out


# ------------------------------------------------------------------------------------ a trial
class EvalsToTune(TuneReportCallback):
    """On the trial's Ray Train controller: reports the run's kNN evaluations to Tune (each one a
    Tune iteration, which ASHA's grace period counts), nothing else."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        for row in evals([dict(metrics[0])], self.metric):
            self._training_actor_item_queue.put(_numbers(row))


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _trial(params: dict, spec: dict) -> None:
    """One trial: an ordinary run under the sweep, named by its Tune trial id."""
    from selfsup.platform.trainer import train

    space = Space(spec["space_name"], spec["space"], validate(spec["config"]))
    name = check_name(tune.get_context().get_trial_id(), "trial")
    ep = Endpoint(**spec["ep"]) if spec["ep"] else None
    store = open_store(join(spec["uri"], name), ep, create=True)
    store.write(TRIAL, json.dumps({"trial": name, "params": params}, indent=1).encode())
    if read_summary(store).get("status") == "finished":  # a resumed sweep whose state missed this trial's end
        for row in evals(read_metrics(store), spec["metric"]):
            tune.report(_numbers(row))
        return
    train(space.config(params, spec["uri"], name), log=lambda *_: None, callbacks=[EvalsToTune(spec["metric"])],
          tracker_parent=spec.get("mlflow_parent"))


class Progress(tune.Callback):
    """One line per trial that ends, on the sweep's console."""

    def __init__(self, log, metric: str):
        self.log, self.metric = log, metric

    def on_trial_complete(self, iteration, trials, trial, **info):
        value = (trial.last_result or {}).get(self.metric)
        self.log(f"trial {trial.trial_id}: {self.metric} {value:.4f} at step {trial.last_result.get('step')}"
                 if value is not None else f"trial {trial.trial_id}: ended without a {self.metric}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id}: failed (selfsup runs show SWEEP/{trial.trial_id} says why)")


# ------------------------------------------------------------------------------------ the sweep
def reported_metrics(method: str) -> list[str]:
    """What a run's evaluations report (train_loop's Evaluator): the backbone's kNN top-1, and that
    of the EMA teacher for a method that has one (DINO, DINOv2)."""
    return ["knn_top1", *(["knn_top1_teacher"] if method in ("dino", "dinov2") else [])]


def sweep_name(config: str | None, space: str) -> str:
    """The default name: the same command names the same sweep, so rerunning it continues it."""
    stem = Path(config).stem if config else "default"
    return check_name(f"{stem}-{space}", "sweep")


def max_trials_at_once(cfg: Config) -> int:
    """Trials whose workers the cluster holds now, leaving one CPU free: Ray Data's read tasks
    take a whole one, and without it every trial waits for data forever."""
    import ray

    from selfsup.platform.trainer import worker_resources

    workers = cfg.scaling.min_workers or cfg.scaling.num_workers
    total = ray.cluster_resources()
    free = {k: total.get(k, 0.0) - (1.0 if k == "CPU" else 0.0) for k in worker_resources(cfg)}
    fits = [free[k] / (v * workers) for k, v in worker_resources(cfg).items()]
    fits.append(total.get("memory", 0.0) / TRIAL_RESOURCES["memory"])
    return max(1, int(min(fits) + 1e-9))


def tune_sweep(config: str | None, overrides: list[str], space: str | None = None, searcher: str | None = None,
               samples: int | None = None, metric: str = "knn_top1", mode: str = "max", grace_period: int = 1,
               max_concurrent: int | None = None, name: str | None = None, log=print) -> dict:
    """Run (or continue) a sweep; returns its final state (sweep.json)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from selfsup.platform.trainer import ensure_ray

    base = load_config(config, overrides)
    space_name, tree = read_space(space, base.method.name)
    sp = Space(space_name, tree, base)
    searcher = searcher or ("grid" if {e["dist"] for e in sp.entries.values()} == {"grid"} else "random")
    if searcher not in SEARCHERS:
        raise ConfigError(f"--searcher {searcher!r} is not one of {', '.join(SEARCHERS)}")
    param_space = sp.param_space(searcher)
    samples = (1 if searcher == "grid" else 8) if samples is None else samples
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode {mode!r} is not max or min")
    if samples < 1 or grace_period < 1 or (max_concurrent is not None and max_concurrent < 1):
        raise ConfigError("--samples, --grace-period and --max-concurrent must be >= 1")
    reported = reported_metrics(base.method.name)
    if metric not in reported:
        raise ConfigError(f"--metric {metric!r} is not reported by {base.method.name} runs (they report "
                          f"{', '.join(reported)})")
    trials = samples * math.prod(len(e["args"]) for e in sp.entries.values() if e["dist"] == "grid")
    if trials > MAX_TRIALS:
        raise ConfigError(f"the sweep would run {trials:,} trials (grid points x --samples), more than "
                          f"{MAX_TRIALS:,}: shrink the grid or sample it (choice, --searcher random)")
    if base.eval.every_epochs is None:
        raise ConfigError("eval.every_epochs is null: trials report nothing before their end, so ASHA cannot "
                          "compare them; set it (e.g. eval.every_epochs=0.25)")
    name = check_name(name if name is not None else base.storage.name or sweep_name(config, space_name), "sweep")
    ep = resolve_endpoint() if is_s3(base.storage.root) or is_s3(base.data.uri) else None
    if ep is not None:
        ep = dataclasses.replace(ep, retry_s=base.storage.retry_s)
    uri = join(base.storage.root, name)
    store = open_store(uri, ep, create=True)
    spec = {"config": base.model_dump(mode="json"), "space_name": space_name, "space": sp.as_dict(),
            "searcher": searcher, "samples": samples, "metric": metric, "mode": mode, "grace_period": grace_period}
    previous = read_sweep(store)
    if previous and previous["spec"] != json.loads(json.dumps(spec)):
        raise ConfigError(f"sweep {name!r} at {uri} was started with another config, space or search: rerun that "
                          "command to continue it, or name a new sweep with --name")
    state = {"name": name, "uri": uri, "spec": spec, "status": "running",
             "started": (previous or {}).get("started", now()), "updated": now()}
    store.write(SWEEP, json.dumps(state, indent=1).encode())
    store.write(SPACE, yaml.safe_dump(sp.as_dict(), sort_keys=False).encode())

    ensure_ray()
    # On a joined cluster too (`ray job submit`): Tune alone starts every trial whose driver fits, and
    # trials whose workers take the last CPU wait for data forever on a cluster that does not grow.
    if max_concurrent is None:
        max_concurrent = max_trials_at_once(base)
    log(f"sweep {name}: {uri} ({searcher} search, {samples} sample(s) of space {space_name!r}, "
        f"{max_concurrent} trial(s) at once" + (", continuing" if previous else "") + ")")
    # with MLflow among train.loggers, the sweep is a parent run and each trial a run under it
    parent = open_trackers([x for x in base.train.loggers if x == "mlflow"], store, uri, name, spec, None,
                           lambda line: log(f"warning: {line}"))
    trial_spec = {"config": spec["config"], "space_name": space_name, "space": sp.as_dict(), "uri": uri,
                  "ep": dataclasses.asdict(ep) if ep else None, "metric": metric,
                  "mlflow_parent": parent}
    trainable = tune.with_resources(tune.with_parameters(_trial, spec=trial_spec), TRIAL_RESOURCES)
    fs, root_path = fs_and_path(uri, ep)
    tune_path = f"{root_path.rstrip('/')}/{TUNE_DIR}"
    if previous and tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(tune_path, trainable, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        # (Tune applies max_concurrent_trials to a Searcher such as Optuna's, not to this generator)
        search_alg = BasicVariantGenerator(random_state=base.data.seed, max_concurrent=max_concurrent or 0)
        if searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric=metric, mode=mode, seed=base.data.seed)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=root_path, storage_filesystem=fs, verbose=0,
                                      callbacks=[Progress(log, metric)]),
            tune_config=tune.TuneConfig(
                num_samples=samples, search_alg=search_alg,
                max_concurrent_trials=max_concurrent if searcher == "optuna" else None,
                scheduler=ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                                        grace_period=grace_period, reduction_factor=2, max_t=10_000),
                trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id))
    # Tune 2.60's default output engine prints its experiment table and result paths even at
    # verbose=0; the legacy engine at verbosity 0 prints nothing (our Progress callback reports)
    with environ({"RAY_AIR_NEW_OUTPUT": "0"}):
        try:
            results = tuner.fit()
        except BaseException:
            close_trackers(parent, "failed", lambda line: log(f"warning: {line}"))
            raise
    close_trackers(parent, "finished", lambda line: log(f"warning: {line}"))
    errored = {Path(r.path).name for r in results if r.error is not None}  # a trial's folder is its id
    return finish_sweep(store, state, sp, ep, errored)


def finish_sweep(store: Store, state: dict, sp: Space, ep: Endpoint | None, errored: set[str]) -> dict:
    """Mark the trials ASHA stopped, then write trials.csv, best.yaml and the final sweep.json."""
    spec = state["spec"]
    for r in trials_of(store, spec, ep):
        # Tune ended it without an error before its schedule did: ASHA stopped it (the run may read as
        # running, lost, or failed on its last report to a trial that was going away)
        if r["status"] not in ("finished", "stopped") and r["trial"] not in errored:
            s = read_summary(store, r["trial"])
            s.update(status="stopped", stopped_early=True,
                     error=f"stopped early by ASHA on {spec['metric']} at step {s.get('step', 0)}")
            store.write(f"{r['trial']}/{SUMMARY}", json.dumps(s, indent=1).encode())
    rows = trials_of(store, spec, ep)
    store.write(TRIALS, trials_csv(rows, spec).encode())
    best = best_trial(rows, spec)
    if best is not None:
        cfg = sp.config(best["params"])  # the base config's storage: `selfsup train` starts a new run
        store.write(BEST, (f"# the best trial of sweep {state['name']}, {best['trial']}: {spec['metric']} "
                           f"{best['final_' + spec['metric']]:.4f}\n" + to_yaml(cfg)).encode())
    state = {**state, "status": "finished", "updated": now(), "best": best and best["trial"], "trials": rows}
    store.write(SWEEP, json.dumps(state, indent=1).encode())
    return state
