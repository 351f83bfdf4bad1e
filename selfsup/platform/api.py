"""The Python API: what `selfsup train`, `tune`, `eval`, `export` and `embed` do, as functions.

`import selfsup` exposes these (see selfsup/__init__.py). Overrides are the CLI's `key=value`
pairs as keyword arguments: `train("simclr", **{"data.batch_size": 64})`, or with `__` for the
dot, `train("simclr", data__batch_size=64)`. Bad input raises the exception whose message is the
CLI's one line (ConfigError, RunError, StorageError, SourceError, all ValueError or RuntimeError);
nothing here exits the process.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_DATA = "s3://selfsup/datasets/fashion-mnist"
DEFAULT_RUNS = "s3://selfsup/runs"


def _overrides(options: dict[str, Any]) -> list[str]:
    """Keyword overrides as the CLI's `key=value` strings (non-strings as JSON, which is YAML)."""
    return [f"{k.replace('__', '.')}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()]


def _run(run: str, root: str) -> str:
    from selfsup.platform.runs import resolve_run

    return resolve_run(str(run), root)


def train(config: str | None = None, /, progress: bool = False, **overrides: Any) -> dict:
    """Train (or resume) the run that `config` (a file, an s3:// URI or a shipped config's name)
    with `overrides` names; returns its summary (name, step, loss, kNN, ...) once it has finished,
    and raises what ended it otherwise. `progress`: the console's progress line on stderr."""
    from selfsup.platform.config import load_config
    from selfsup.platform.trainer import train as run_training

    return run_training(load_config(config, _overrides(overrides)), show_progress=progress)


def tune(config: str | None = None, /, space: str | None = None, searcher: str | None = None,
         samples: int | None = None, metric: str = "knn_top1", mode: str = "max", grace_period: int = 1,
         max_concurrent: int | None = None, name: str | None = None, **overrides: Any) -> dict:
    """Run (or continue) a Ray Tune sweep of `config` over the search space `space` (a file, URI or
    shipped space's name); returns the sweep's state (its trials and the best one)."""
    from selfsup.platform.sweeps import tune_sweep

    return tune_sweep(config, _overrides(overrides), space=space, searcher=searcher, samples=samples, metric=metric,
                      mode=mode, grace_period=grace_period, max_concurrent=max_concurrent, name=name)


def eval_knn(run: str, data: str | None = None, checkpoint: str | None = None, teacher: bool = False,
             random_init: bool = False, train_samples: int = 0, test_samples: int = 0,
             root: str = DEFAULT_RUNS) -> dict:
    """Weighted kNN top-1 (%) of a run's backbone (a name under `root`, or a URI) on the labeled set
    `data` (default: the run's eval.data_uri, else its data.uri)."""
    from selfsup.platform.evaluate import evaluate_run

    return evaluate_run(_run(run, root), "knn", train_samples, test_samples, checkpoint, random_init, teacher, data=data)


def eval_linear(run: str, data: str | None = None, checkpoint: str | None = None, teacher: bool = False,
                random_init: bool = False, train_samples: int = 0, test_samples: int = 0,
                root: str = DEFAULT_RUNS) -> dict:
    """Linear-probe top-1 (%) on frozen features with 100%, 10% and 1% of the labels."""
    from selfsup.platform.evaluate import evaluate_run

    return evaluate_run(_run(run, root), "linear", train_samples, test_samples, checkpoint, random_init, teacher,
                        data=data)


def eval_finetune(run: str, data: str | None = None, checkpoint: str | None = None, teacher: bool = False,
                  train_samples: int = 0, test_samples: int = 0, root: str = DEFAULT_RUNS, **params: Any) -> dict:
    """Fine-tune the backbone and the same one at random init on a fraction of the labels;
    `params`: FinetuneParams' fields (fraction, epochs, batch_size, lr, layer_decay, ...)."""
    from selfsup.platform.finetune import FinetuneParams, finetune_run
    from selfsup.platform.runs import RunError

    try:
        p = FinetuneParams(**params)
    except (TypeError, ValueError) as e:
        raise RunError(str(e)) from None
    return finetune_run(_run(run, root), p, checkpoint, teacher, train_samples, test_samples, log=lambda _: None,
                        data=data)


def export(run: str, format: str, out: str, checkpoint: str | None = None, teacher: bool = False,
           overwrite: bool = False, root: str = DEFAULT_RUNS) -> dict:
    """Write a run's backbone alone to `out` as timm, safetensors, torchscript or onnx; returns
    what the export's selfsup.json says."""
    from selfsup.platform.export import export as write_export

    return write_export(_run(run, root), format, out, checkpoint, teacher, overwrite)


def embed(run: str, data: str, out: str, splits: list[str] | None = None, batch_size: int = 256, workers: int = 1,
          gpus_per_worker: float = 0, cpus_per_worker: float = 1, checkpoint: str | None = None, teacher: bool = False,
          overwrite: bool = False, root: str = DEFAULT_RUNS) -> dict:
    """Embed every sample of `splits` (default: all) of the shards at `data` with a run's backbone, as
    Parquet under `out/<split>/` (key, label, split, embedding); Ray Data with `workers` actors."""
    from selfsup.platform.embed import embed as run_embed

    return run_embed(_run(run, root), data, out, splits, batch_size, workers, gpus_per_worker, cpus_per_worker,
                     checkpoint, teacher, overwrite)


def load_backbone(uri: str, teacher: bool = False, root: str = DEFAULT_RUNS):
    """A run's backbone (newest good checkpoint; the EMA teacher's with `teacher`), or an export's
    (timm, safetensors, torchscript), as a torch module in eval mode with `input_size`, `mean`,
    `std` and `preprocess(uint8 images)`."""
    from selfsup.platform.export import load_backbone as load

    return load(_run(uri, root), teacher)
