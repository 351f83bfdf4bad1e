"""`selfsup export`: a run's backbone alone (no heads, no optimizer), for use outside selfsup.

Formats, each a folder at OUT (local or s3://) with a `selfsup.json` naming the method, run, step,
checkpoint and its sha256, and the input the backbone expects (size, channels, mean, std):
- `timm`: timm's Hugging Face layout, `config.json` + `model.safetensors`; offline, without selfsup:
  `timm.create_model("local-dir:FOLDER", pretrained=True)` (timm >= 1.0.16 reads that prefix). A
  CIFAR-stem ResNet is a selfsup change timm cannot rebuild: that format refuses it in one line.
- `safetensors`: `model.safetensors` alone (the state dict of `selfsup.json`'s timm model).
- `torchscript`: `model.pt`, traced at the training input size with a free batch dimension
  (`torch.jit.load`).
- `onnx`: `model.onnx` from torch's exporter, input `images` with a free batch dimension, output
  `features`; checked against onnxruntime before it is written (`pip install selfsup[export]`).
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

FORMATS = ("timm", "safetensors", "torchscript", "onnx")
WEIGHTS = {"timm": "model.safetensors", "safetensors": "model.safetensors", "torchscript": "model.pt"}
ONNX_TOLERANCE = 1e-4  # fp32 through onnxruntime's kernels vs torch's
META = "selfsup.json"


def _per_channel(values: list[float], chans: int) -> list[float]:
    return list(values) * chans if len(values) == 1 else list(values)


def _input(cfg) -> tuple[int, int, list[float], list[float]]:
    """(channels, size, mean, std per channel) of what a run's backbone takes, as its evaluator feeds it."""
    chans = cfg.model.in_chans
    return chans, cfg.eval.image_size or cfg.view_size(), _per_channel(cfg.data.mean, chans), _per_channel(cfg.data.std, chans)


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
    chans, size, mean, std = _input(cfg)
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
        if fmt == "onnx":
            _onnx(backbone, torch.zeros(2, chans, size, size), d / "model.onnx")
        (d / META).write_text(json.dumps(meta, indent=1))
        for f in sorted(d.iterdir()):
            store.write(f.name, f.read_bytes())
    return meta


def _onnx(backbone: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export with a free batch dimension, then check onnxruntime's features against torch's on
    another batch size than the example's."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's exporter needs it; checked here to name the extra)
    except ImportError as e:
        raise RunError(f"--format onnx needs {e.name}: pip install 'selfsup[export]'") from None
    with torch.no_grad():
        torch.onnx.export(backbone, (example,), str(path), dynamo=True, verbose=False, external_data=False,
                          input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        x = torch.randn(3, *example.shape[1:])
        expected = backbone(x).numpy()
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    diff = float(abs(got - expected).max())
    if not diff <= ONNX_TOLERANCE:
        raise RunError(f"the ONNX model's features differ from the checkpoint's by {diff:.2g} "
                       f"(more than {ONNX_TOLERANCE:g}): not written")


class Backbone(torch.nn.Module):
    """A backbone in eval mode and the input it expects: `input_size` (C, H, W), `mean` and `std` per
    channel. `preprocess` makes that input from uint8 images, as `selfsup eval` and `embed` do."""

    def __init__(self, model: torch.nn.Module, input_size: list[int], mean: list[float], std: list[float]):
        super().__init__()
        self.model = model.eval()
        self.input_size, self.mean, self.std = tuple(input_size), list(mean), list(std)
        self.eval()

    def preprocess(self, images) -> torch.Tensor:
        """uint8 images (N, C, H, W), or a list of (C, H, W) of any sizes -> float (N, C, size, size):
        each image's centre square resized and normalised, grey expanded to the model's channels."""
        from selfsup.pipelines.views import Plain, make_views, to_model_input

        views = make_views(list(images), Plain(size=self.input_size[1]), torch.Generator())
        return to_model_input(views, self.mean, self.std, self.input_size[0])["image"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def load_backbone(uri: str, teacher: bool = False, ep: Endpoint | None = None) -> Backbone:
    """The backbone of a run (its newest good checkpoint; the EMA teacher's with `teacher`) or of an
    export (`timm`, `safetensors` or `torchscript`: the folder that holds its selfsup.json)."""
    import io

    from safetensors.torch import load as load_safetensors

    from selfsup.methods.backbones import build_backbone

    store = open_store(uri, ep)
    if not store.exists(META):  # a run
        cfg, method, _ = load_run(uri, ep)
        if teacher and not hasattr(method, "teacher_backbone"):
            raise RunError(f"method {cfg.method.name!r} has no teacher (teacher=True is for DINO-style runs)")
        chans, size, mean, std = _input(cfg)
        return Backbone((method.teacher_backbone if teacher else method.backbone).float(), [chans, size, size], mean, std)
    meta = json.loads(store.read(META))
    if teacher and meta["backbone"] != "teacher":
        raise RunError(f"{uri} holds the {meta['backbone']} backbone (exported without --teacher)")
    if meta["format"] not in WEIGHTS:
        raise RunError(f"{uri} is a {meta['format']} export, which torch cannot load: load its run, or a timm, "
                       "safetensors or torchscript export")
    data = store.read(WEIGHTS[meta["format"]])
    if meta["format"] == "torchscript":
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    else:
        model, _ = build_backbone(meta["architecture"], meta["cifar_stem"], **meta["model_args"])
        model.load_state_dict(load_safetensors(data))
    return Backbone(model, meta["input_size"], meta["mean"], meta["std"])
