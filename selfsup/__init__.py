"""selfsup: self-supervised pretraining of vision models on Ray, from data in object storage.

The Python API (the CLI's commands, as functions; see selfsup.platform.api):
    train(config, **overrides)                   train or resume a run; its summary
    tune(config, space=..., **overrides)         a Ray Tune sweep; its trials and best one
    eval_knn / eval_linear / eval_finetune(run)  what a run's backbone learned
    export(run, format=..., out=...)             the backbone alone: timm, safetensors, torchscript, onnx
    embed(run, data, out)                        a data set's embeddings as Parquet (Ray Data)
    load_backbone(run_or_export)                 a torch module with its preprocessing

    >>> import selfsup
    >>> summary = selfsup.train("simclr", **{"schedule.epochs": 1})
    >>> model = selfsup.load_backbone(summary["name"])
"""

import os

# A run on a small node starts several times its CPU count in Ray worker processes as a matter of
# course (workers, Ray Data tasks, checkpoint uploads, trial drivers), and the raylet then warns on
# the driver's console about "PYTHON worker processes". Ray's documented filter for driver output
# is read when Ray is imported, hence here, before any of it; a user's own filter is kept.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "PYTHON worker processes have been started")

API = ("train", "tune", "eval_knn", "eval_linear", "eval_finetune", "export", "embed", "load_backbone")
__all__ = list(API)


def __getattr__(name: str):
    # Loaded on first use: `import selfsup` (every Ray worker does) stays free of torch and Ray.
    if name in API:
        from selfsup.platform import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
