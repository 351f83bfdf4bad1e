"""distill: the losses against hand-computed cases; pooled and spatial features of CNNs and ViTs;
the frozen teacher (never trained, never in a checkpoint, not needed to evaluate); a run through
`selfsup train` from a selfsup run's backbone; a bad teacher is one line and exit 2."""

import math

import pytest
import torch

from selfsup.methods.backbones import build_backbone
from selfsup.methods.distill import pooled_and_spatial, queue_kl_loss, token_kl_loss
from selfsup.pipelines.views import make_views
from selfsup.platform.cli import main
from selfsup.platform.step import TrainStep, build_method
from test_methods import _fashion_sample, _tiny, tiny_teacher


def test_queue_kl_by_hand():
    queue = torch.eye(2)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])  # the student's is normalised first
    assert float(queue_kl_loss(e1, e1, queue, 1.0)) == pytest.approx(0.0, abs=1e-7)
    p = math.e / (1 + math.e)  # the teacher's softmax(1, 0); the student's is (1 - p, p)
    assert float(queue_kl_loss(e2, e1, queue, 1.0)) == pytest.approx((2 * p - 1) * math.log(p / (1 - p)), abs=1e-6)


def test_token_kl_by_hand():
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two orthogonal tokens: each row softmax(1, 0)
    student = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # one direction: each row uniform
    p = math.e / (1 + math.e)
    per_row = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert float(token_kl_loss(student, teacher, 1.0)) == pytest.approx(per_row, abs=1e-6)
    assert float(token_kl_loss(teacher, teacher, 0.07)) == pytest.approx(0.0, abs=1e-6)


def test_pooled_and_spatial_features_of_a_cnn_a_vit_and_torchscript():
    x = torch.randn(2, 3, 16, 16)
    cnn, vit = build_backbone("resnet10t")[0].eval(), tiny_teacher().eval()
    with torch.no_grad():
        pooled, grid = pooled_and_spatial(cnn, x)
        assert torch.allclose(pooled, cnn(x), atol=1e-6) and grid.shape == (2, 512, 1, 1)
        pooled, grid = pooled_and_spatial(vit, x)
        assert torch.allclose(pooled, vit(x), atol=1e-6) and grid.shape == (2, 192, 4, 4)
        tokens = vit.forward_features(x)[:, 1:]
        assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 * 4 + 2])  # row-major patches
        # resnet10t's deep stem (a Sequential of convolutions) takes the CIFAR stem too: a 2x2 map at 16 px
        small = build_backbone("resnet10t", cifar_stem=True)[0].eval()
        assert pooled_and_spatial(small, x)[1].shape == (2, 512, 2, 2)
        traced = torch.jit.trace(vit, x)
        pooled, grid = pooled_and_spatial(traced, x)
        assert grid is None and torch.allclose(pooled, vit(x), atol=1e-5)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_teacher_stays_frozen_and_out_of_checkpoints_and_evaluation_needs_no_teacher(loss):
    torch.manual_seed(0)
    cfg = _tiny("distill", f"method.loss={loss}", "method.queue_size=64")
    m = build_method(cfg, num_samples=32)
    m.set_teacher(tiny_teacher(), (3, 16, 16))
    frozen = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    step = TrainStep(m, cfg, torch.device("cpu"))
    images = _fashion_sample(32)
    outs = [step(make_views(images, cfg.data.views, torch.Generator().manual_seed(i)), i / 3) for i in range(3)]
    assert all(math.isfinite(o["loss"]) and o["patch_loss"] > 0 for o in outs)  # ResNet map vs ViT patch tokens
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in frozen.items())
    assert not m.teacher.training
    trained = {id(q) for g in step.optimizer.param_groups for q in g["params"]}
    assert not any(id(p) in trained for p in m.teacher.parameters())
    state = step.state_dict()["model"]
    assert not any(k.startswith("teacher.") for k in state) and "queue" not in state
    assert state["project.weight"].shape == (192, 512) and state["project_patch.weight"].shape == (192, 512)
    fresh = build_method(cfg, num_samples=32)  # as eval, export and embed build it: no teacher
    fresh.load_state_dict(state)
    assert torch.equal(fresh.project.weight, m.project.weight)
    resumed = build_method(cfg, num_samples=32)  # as a resume: the teacher first, then the checkpoint
    resumed.set_teacher(tiny_teacher(), (3, 16, 16))
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match="distill has no teacher attached"):
        fresh(make_views(images[:4], cfg.data.views, torch.Generator()))


def test_a_teacher_without_spatial_features_gives_the_global_term_alone():
    cfg = _tiny("distill", "method.queue_size=64")
    m = build_method(cfg, num_samples=32)
    m.set_teacher(torch.jit.trace(tiny_teacher().eval(), torch.zeros(2, 3, 16, 16)), (3, 16, 16))
    assert not hasattr(m, "project_patch")
    out = TrainStep(m, cfg, torch.device("cpu"))(make_views(_fashion_sample(32), cfg.data.views, torch.Generator()), 0.0)
    assert "patch_loss" not in out and math.isfinite(out["loss"])


def _train_args(runs, *extra):
    return ["train", "distill_resnet18", f"data.uri={runs['data']}", "data.batch_size=8", "eval.knn=false",
            "schedule.steps=2", "scaling.num_workers=1", "train.precision=fp32", "storage.root=s3://test-runs/distill",
            "model.name=resnet10t", "model.cifar_stem=false", "data.views.view0.size=16", "data.views.view1.size=16",
            "method.queue_size=16", *extra]


def test_selfsup_train_distills_from_a_runs_backbone(model_runs):
    import io

    from selfsup.pipelines.storage import open_store
    from selfsup.platform.evaluate import load_run

    teacher = open_store(model_runs["dino"])
    before = {f: teacher.read(f) for f in teacher.list() if "ckpt" in f}
    assert main(_train_args(model_runs, f"method.teacher={model_runs['dino']}", "storage.name=from-dino")) == 0
    run = "s3://test-runs/distill/from-dino"
    cfg, method, used = load_run(run)  # as eval, export and embed: no teacher needed
    assert not hasattr(method, "teacher") and method.project.weight.shape[0] == 192
    state = torch.load(io.BytesIO(open_store(run).read(f"{used}/state.pt")), map_location="cpu", weights_only=True)
    assert state["step"] == 2 and not any(k.startswith("teacher.") for k in state["model"])
    assert {f: teacher.read(f) for f in teacher.list() if "ckpt" in f} == before  # the teacher run is untouched


@pytest.mark.parametrize("extra,message", [
    (["method.teacher=s3://test-runs/export/nothing-here"], "method.teacher s3://test-runs/export/nothing-here: no selfsup run"),
    (["data.views.view0.size=20", "data.views.view1.size=20"], "takes 16 px images, the student's views are 20 and 20 px"),
    (["model.in_chans=1"], "takes 3-channel images, the student 1 (model.in_chans)"),
    (["data.mean=[0.5]"], "takes images normalised with mean [0.286, 0.286, 0.286]"),
])
def test_a_teacher_that_cannot_teach_this_student_is_one_line_exit_2(model_runs, extra, message, capsys):
    args = _train_args(model_runs, f"method.teacher={model_runs['resnet']}", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
