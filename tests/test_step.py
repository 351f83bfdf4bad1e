"""The Ray-free training step and the schedules, on a tiny backbone."""

import math

import pytest
import torch
from torch import nn

from selfsup.methods.base import cosine, ema_update
from selfsup.pipelines.views import make_views
from selfsup.platform.config import load_config
from selfsup.platform.step import Progress, TrainStep, build_method, fp32_convs_on_tiny_maps, lr_at, wd_at

TINY = ["model.name=resnet10t", "model.cifar_stem=false", "data.batch_size=16", "schedule.steps=4"]


def test_lr_warms_up_then_anneals_over_the_planned_steps():
    cfg = load_config(None, ["optim.lr=0.1", "optim.warmup_fraction=0.1", "data.batch_size=512",
                             "optim.min_lr_ratio=0.01", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"])
    peak = 0.1 * 512 / 256
    assert lr_at(cfg, 0.0) == 0 and math.isclose(lr_at(cfg, 0.05), peak / 2)
    assert math.isclose(lr_at(cfg, 0.1), peak) and math.isclose(lr_at(cfg, 1.0), peak * 0.01)
    assert math.isclose(wd_at(cfg, 0.0), 0.04) and math.isclose(wd_at(cfg, 1.0), 0.4)
    assert math.isclose(cosine(0.996, 1.0, 0.5), 0.998)


def test_progress_by_epochs_steps_and_time():
    assert Progress(load_config(None, ["schedule.epochs=2"]), steps_per_epoch=50)(25, 0) == 0.25
    p = Progress(load_config(None, ["schedule.time_budget_s=60"]), steps_per_epoch=50)
    assert p(10**6, 30.0) == 0.5 and not p.done(1, 59.0) and p.done(1, 60.0)


def test_dino_schedules_follow_progress():
    cfg = load_config(None, ["method.name=dino", "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07",
                             "method.warmup_teacher_temp_fraction=0.5", "method.freeze_last_layer_fraction=0.1", *TINY])
    m = build_method(cfg)
    m.before_step(0.25)
    assert math.isclose(m.teacher_temp, 0.055) and 0.996 < m.momentum < 1
    m.before_step(1.0)
    assert m.teacher_temp == 0.07 and m.momentum == 1.0
    for p in m.head.last_layer.parameters():
        p.grad = torch.ones_like(p)
    m.after_backward(0.05)
    assert all(p.grad is None for p in m.head.last_layer.parameters())


def test_bf16_weight_gradient_of_a_strided_conv_on_a_1x1_map_is_right():
    # oneDNN's bf16 kernel gives NaN or ~1e37 here on most steps on an AVX512-BF16 AMD EPYC once the
    # layer has seen another size; fp32_convs_on_tiny_maps takes such maps out of autocast.
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False).to(memory_format=torch.channels_last)
    fp32_convs_on_tiny_maps(conv)
    for i in range(40):
        x = torch.randn(32, 64, 2 - i % 2, 2 - i % 2).contiguous(memory_format=torch.channels_last)
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        g = torch.randn_like(y)
        y.backward(g)
        want = nn.grad.conv2d_weight(x, conv.weight.shape, g.float(), stride=2, padding=1)
        assert torch.allclose(conv.weight.grad, want, rtol=0.05, atol=0.05 * float(want.abs().max())), i


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_train_step_runs_without_ray_and_learns(method):
    torch.manual_seed(0)
    # DINO's 16 px local crops leave 1x1 maps in resnet10t's last stage (fp32_convs_on_tiny_maps)
    extra = ["data.views.global_view.size=32", "data.views.local_view.size=16", "data.views.n_local=2"] if method == "dino" \
        else ["data.views.view0.size=32", "data.views.view1.size=32"]
    cfg = load_config(None, [f"method.name={method}", *TINY, *extra, "optim.warmup_fraction=0"])
    m = build_method(cfg)
    step = TrainStep(m, cfg, torch.device("cpu"))
    imgs = [torch.randint(0, 255, (1, 20, 20), dtype=torch.uint8) for _ in range(16)]
    batch = make_views(imgs, cfg.data.views, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in m.backbone.parameters()]
    out = [step(batch, i / 4) for i in range(4)]
    assert all(math.isfinite(o["loss"]) for o in out)
    assert {"loss", "lr", "grad_norm", "step_time_s"} <= set(out[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.backbone.parameters()))
    if method == "dino":  # the teacher moved towards the student
        assert any(not torch.equal(t, s) for t, s in zip(m.teacher_backbone.parameters(), m.backbone.parameters()))


def _decoded(n=16, sizes=((20, 20), (24, 18))):
    """A `decoded` batch as the pipeline streams it with data.augment_on=trainer (mixed sizes)."""
    import numpy as np

    from selfsup.pipelines.streaming import collate_decoded

    g = torch.Generator().manual_seed(0)
    col = np.empty(n, dtype=object)
    col[:] = [torch.randint(0, 255, (1, *sizes[i % len(sizes)]), generator=g, dtype=torch.uint8).numpy() for i in range(n)]
    return collate_decoded({"image": col, "index": np.arange(n), "label": np.arange(n) % 4})


def test_with_augment_on_trainer_the_step_makes_the_views():
    cfg = load_config(None, ["method.name=simclr", *TINY, "data.views.view0.size=24", "data.views.view1.size=24",
                             "data.augment_on=trainer", "optim.warmup_fraction=0", "train.precision=fp32"])
    m = build_method(cfg)
    step = TrainStep(m, cfg, torch.device("cpu"))
    batch = _decoded()
    views = step.views(batch)
    assert {k: tuple(v.shape) for k, v in views.items()} == {"view0": (16, 1, 24, 24), "view1": (16, 1, 24, 24),
                                                            "index": (16,), "label": (16,)}
    assert not torch.equal(views["view0"], step.views(batch)["view0"])  # fresh views every step
    before = [p.detach().clone() for p in m.backbone.parameters()]
    out = step(batch, 0.5)
    assert math.isfinite(out["loss"]) and any(not torch.equal(a, b) for a, b in zip(before, m.backbone.parameters()))


@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_train_compile_runs_the_compiled_forward_with_the_eager_result(method, monkeypatch):
    from importlib import resources

    compiled = []
    real = torch.compile

    def compile_(model, **kw):
        # aot_eager: Dynamo's graph capture and AOT autograd as inductor gets them, without the C++
        # code generation (minutes on 2 cores; benchmarks/gpu_step.py measures inductor itself)
        compiled.append(model)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    shipped = str(resources.files("selfsup") / "configs" / f"{method}_{'vit_tiny' if method == 'mae' else 'resnet18'}.yaml")
    args = [*TINY[2:], "optim.warmup_fraction=0", "train.precision=fp32", "model.kwargs.depth=2"] if method == "mae" \
        else [*TINY, "data.views.view0.size=24", "data.views.view1.size=24", "optim.warmup_fraction=0", "train.precision=fp32"]
    batch = make_views([torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8) for _ in range(16)],
                       load_config(shipped, args).data.views, torch.Generator().manual_seed(0))
    outs, weights = [], []
    for on in (False, True):
        cfg = load_config(shipped, [*args, f"train.compile={str(on).lower()}"])
        torch.manual_seed(0)
        m = build_method(cfg)
        outs.append(TrainStep(m, cfg, torch.device("cpu"))(batch, 0.5))
        weights.append([p.detach() for p in m.student_parameters()])
    assert len(compiled) == 1 and isinstance(compiled[0], type(m))
    assert math.isclose(outs[0]["loss"], outs[1]["loss"], rel_tol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*weights))
