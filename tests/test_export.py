"""`selfsup export`: a run's backbone alone, loaded outside selfsup (timm's local-dir in a process
that never imports selfsup; TorchScript; safetensors) with the checkpoint's features; bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from selfsup.pipelines.storage import open_store
from selfsup.platform.cli import main
from selfsup.platform.config import load_config
from selfsup.platform.evaluate import load_run
from selfsup.platform.trainer import train

ROOT = "s3://test-runs/export"
COMMON = ["data.batch_size=8", "eval.knn=false", "schedule.steps=2", "scaling.num_workers=1", "train.precision=fp32",
          f"storage.root={ROOT}"]
# Runs in a fresh interpreter: imports timm and torch only, never selfsup.
OUTSIDE = """
import sys, torch, timm
m = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert "selfsup" not in sys.modules
torch.save(m(torch.load(sys.argv[2], weights_only=True)).detach(), sys.argv[3])
print(m.pretrained_cfg["mean"], m.pretrained_cfg["input_size"])
"""


@pytest.fixture(scope="module")
def runs(ray_local, tiny_labeled):
    data, _ = tiny_labeled
    train(load_config(None, [f"data.uri={data}", *COMMON, "model.name=resnet10t", "model.cifar_stem=false",
                             "data.views.view0.size=16", "data.views.view1.size=16", "method.proj_hidden_dim=32",
                             "method.proj_dim=16", "storage.name=resnet"]), log=lambda *_: None)
    train(load_config("dino_vit_tiny", [f"data.uri={data}", *COMMON, "storage.name=dino",
                                        "model.kwargs={img_size: 16, patch_size: 4, dynamic_img_size: true}",
                                        "data.views.global_view.size=16", "data.views.local_view.size=8",
                                        "data.views.n_local=2", "method.out_dim=64", "method.hidden_dim=32",
                                        "method.bottleneck_dim=16"]), log=lambda *_: None)
    return {"resnet": f"{ROOT}/resnet", "dino": f"{ROOT}/dino"}


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
    assert "--format 'keras': give one of timm, safetensors, torchscript" in err(
        ["export", run, "--format", "keras", "--out", str(tmp_path / "a")])
    assert "has no teacher" in err(["export", run, "--format", "timm", "--teacher", "--out", str(tmp_path / "b")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    assert "already holds files: pass --overwrite" in err(["export", run, "--format", "timm", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "x").read_text() == "mine"
    open_store(f"{ROOT}/empty", create=True).write("config.yaml", open_store(run).read("config.yaml"))
    assert "has no checkpoint yet" in err(["export", f"{ROOT}/empty", "--format", "timm", "--out", str(tmp_path / "d")])
