"""`selfsup export`: a run's backbone alone, loaded outside selfsup (timm's local-dir in a process
that never imports selfsup; TorchScript; safetensors; ONNX in onnxruntime) with the checkpoint's features; bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.evaluate import load_run

ROOT = "s3://test-runs/export"
# Runs in a fresh interpreter: imports timm and torch only, never selfsup.
OUTSIDE = """
import sys, torch, timm
m = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert "selfsup" not in sys.modules
torch.save(m(torch.load(sys.argv[2], weights_only=True)).detach(), sys.argv[3])
print(m.pretrained_cfg["mean"], m.pretrained_cfg["input_size"])
"""


@pytest.fixture(scope="module")
def runs(model_runs):
    return model_runs


def _features_outside(folder, x, tmp_path) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", OUTSIDE, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp_path / "y.pt", weights_only=True)


@pytest.mark.parametrize("run,teacher", [("resnet", False), ("dino", False), ("dino", True)])
def test_timm_export_loads_without_selfsup_and_matches_the_checkpoint(runs, run, teacher, tmp_path):
    out = tmp_path / "timm"
    assert main(["export", runs[run], "--format", "timm", "--out", str(out), *(["--teacher"] if teacher else [])]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "selfsup.json"]
    meta = json.loads((out / "selfsup.json").read_text())
    cfg, method, used = load_run(runs[run])
    ckpt = json.loads(open_store(runs[run]).read(f"{used}/manifest.json"))["files"]["state.pt"]["sha256"]
    assert meta["checkpoint"] == used and meta["checkpoint_sha256"] == ckpt and meta["step"] == 2
    assert meta["method"] == cfg.method.name and meta["input_size"] == [3, 16, 16]
    backbone = method.teacher_backbone if teacher else method.backbone
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = backbone.eval()(x)
    assert (_features_outside(out, x, tmp_path) - expected).abs().max() <= 1e-5


def test_torchscript_and_safetensors_exports_match(runs, tmp_path):
    from safetensors.torch import load_file

    from selfsup.methods.backbones import build_backbone

    run = runs["resnet"]
    _, method, _ = load_run(run)
    x = torch.randn(5, 3, 16, 16)  # another batch size than the trace's
    with torch.no_grad():
        expected = method.backbone.eval()(x)
    assert main(["export", run, "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    assert (scripted(x) - expected).abs().max() <= 1e-5
    assert main(["export", run, "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    meta = json.loads((tmp_path / "st" / "selfsup.json").read_text())
    model, _ = build_backbone(meta["architecture"], meta["cifar_stem"], **meta["model_args"])
    model.load_state_dict(load_file(str(tmp_path / "st" / "model.safetensors")))
    with torch.no_grad():
        assert (model.eval()(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("run,teacher", [("resnet", False), ("dino", True)])
def test_onnx_export_runs_in_onnxruntime_at_any_batch_size_with_the_checkpoints_features(runs, run, teacher, tmp_path):
    import onnxruntime

    _, method, _ = load_run(runs[run])
    backbone = (method.teacher_backbone if teacher else method.backbone).eval()
    assert main(["export", runs[run], "--format", "onnx", "--out", str(tmp_path / "o"),
                 *(["--teacher"] if teacher else [])]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["model.onnx", "selfsup.json"]
    session = onnxruntime.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            expected = backbone(x).numpy()
        got = session.run(["features"], {"images": x.numpy()})[0]
        assert got.shape == expected.shape and abs(got - expected).max() <= 1e-4


def test_export_to_s3(runs):
    assert main(["export", runs["resnet"], "--format", "timm", "--out", "s3://test-runs/exported/resnet"]) == 0
    assert sorted(open_store("s3://test-runs/exported/resnet").list()) == ["config.json", "model.safetensors",
                                                                          "selfsup.json"]


def test_bad_export_requests_are_one_line_exit_2(runs, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    run = runs["resnet"]
    assert "--format 'keras': give one of timm, safetensors, torchscript, onnx" in err(
        ["export", run, "--format", "keras", "--out", str(tmp_path / "a")])
    assert "has no teacher" in err(["export", run, "--format", "timm", "--teacher", "--out", str(tmp_path / "b")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    assert "already holds files: pass --overwrite" in err(["export", run, "--format", "timm", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "x").read_text() == "mine"
    open_store(f"{ROOT}/empty", create=True).write("config.yaml", open_store(run).read("config.yaml"))
    assert "has no checkpoint yet" in err(["export", f"{ROOT}/empty", "--format", "timm", "--out", str(tmp_path / "d")])
