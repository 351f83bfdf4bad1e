"""`selfsup export`: a run's backbone alone (no heads, no optimizer), for use outside selfsup.

Formats, each a folder at OUT (local or s3://) with a `selfsup.json` naming the method, run, step,
checkpoint and its sha256, and the input the backbone expects (size, channels, mean, std):
- `timm`: timm's Hugging Face layout, `config.json` + `model.safetensors`; offline, without selfsup:
  `timm.create_model("local-dir:FOLDER", pretrained=True)` (timm >= 1.0.16 reads that prefix). A
  CIFAR-stem ResNet is a selfsup change timm cannot rebuild: that format refuses it in one line.
- `safetensors`: `model.safetensors` alone (the state dict of `selfsup.json`'s timm model).
- `torchscript`: `model.pt`, traced at the training input size with a free batch dimension
  (`torch.jit.load`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from selfsup.pipelines.endpoints import Endpoint
from selfsup.pipelines.storage import open_store
from selfsup.platform.checkpoints import MANIFEST, META as CKPT_META, STATE
from selfsup.platform.evaluate import load_run
from selfsup.platform.runs import RunError

FORMATS = ("timm", "safetensors", "torchscript")
META = "selfsup.json"


def _per_channel(values: list[float], chans: int) -> list[float]:
    return list(values) * chans if len(values) == 1 else list(values)


def export(run_uri: str, fmt: str, out: str, checkpoint: str | None = None, teacher: bool = False,
           overwrite: bool = False, ep: Endpoint | None = None) -> dict:
    """Write the backbone of a run's newest good checkpoint (or `checkpoint`; the EMA teacher's with
    `teacher`) to `out` in `fmt`; returns what selfsup.json says. RunError (one line) for bad input."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise RunError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
    store = open_store(out, ep, create=True)
    if store.list() and not overwrite:
        raise RunError(f"{out} already holds files: pass --overwrite to replace them")
    cfg, method, used = load_run(run_uri, ep, checkpoint)
    if teacher and not hasattr(method, "teacher_backbone"):
        raise RunError(f"method {cfg.method.name!r} has no teacher (--teacher is for DINO-style runs)")
    if fmt == "timm" and cfg.model.cifar_stem:
        raise RunError(f"run {run_uri} has model.cifar_stem (a selfsup change to the ResNet stem) that timm cannot "
                       "rebuild: export --format safetensors or torchscript")
    backbone = (method.teacher_backbone if teacher else method.backbone).float().eval()
    chans, size = cfg.model.in_chans, cfg.eval.image_size or cfg.view_size()
    mean, std = _per_channel(cfg.data.mean, chans), _per_channel(cfg.data.std, chans)
    model_args = {"in_chans": chans, **cfg.model.kwargs}
    run = open_store(run_uri, ep)
    meta = {"method": cfg.method.name, "run": run_uri, "checkpoint": used,
            "step": json.loads(run.read(f"{used}/{CKPT_META}"))["step"],
            "checkpoint_sha256": json.loads(run.read(f"{used}/{MANIFEST}"))["files"][STATE]["sha256"],
            "backbone": "teacher" if teacher else "student", "format": fmt, "architecture": cfg.model.name,
            "model_args": model_args, "cifar_stem": cfg.model.cifar_stem, "num_features": backbone.num_features,
            "input_size": [chans, size, size], "mean": mean, "std": std}
    with tempfile.TemporaryDirectory(prefix="selfsup-export-") as tmp:
        d = Path(tmp)
        if fmt in ("timm", "safetensors"):
            save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(d / "model.safetensors"))
        if fmt == "timm":
            (d / "config.json").write_text(json.dumps({
                "architecture": cfg.model.name, "num_classes": 0, "num_features": backbone.num_features,
                "model_args": model_args,
                "pretrained_cfg": {"input_size": [chans, size, size], "mean": mean, "std": std, "num_classes": 0,
                                   "interpolation": "bilinear", "crop_pct": 1.0}}, indent=1))
        if fmt == "torchscript":
            example = torch.zeros(2, chans, size, size)  # batch 2: a batch of 1 would be specialised to
            # torch 2.14 marks TorchScript deprecated on every call; the format is still what many servers load
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.trace(backbone, example).save(str(d / "model.pt"))
        (d / META).write_text(json.dumps(meta, indent=1))
        for f in sorted(d.iterdir()):
            store.write(f.name, f.read_bytes())
    return meta

