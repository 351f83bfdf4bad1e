"""DINOv2: iBOT's masked-patch loss, KoLeo and Sinkhorn-Knopp against hand-computed cases; the
global crops' masks from the multi-crop pipeline; the config's checks; the method's update rules.
(Its short run on Fashion-MNIST is test_methods' test_short_run_on_real_images_...)."""

import math

import pytest
import torch

from dist_utils import run_distributed
from selfsup.methods.dinov2 import ibot_loss, koleo_loss
from selfsup.methods.swav import sinkhorn
from selfsup.pipelines.views import Augment, CropMasks, MultiCrop, make_views
from selfsup.platform.config import ConfigError, load_config
from selfsup.platform.step import TrainStep, build_method
from test_methods import _fashion_sample, _tiny


def test_ibot_loss_averages_each_images_masked_patches_then_all_images():
    mask = torch.tensor([[True, False, True], [False, False, False]])  # image 1 has no mask: it counts 0
    student = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])  # softmax (1/4, 3/4), then (1/2, 1/2)
    targets = torch.tensor([[0.0, 1.0], [0.3, 0.7]])
    expected = (math.log(4 / 3) + math.log(2)) / 2 / 2
    assert float(ibot_loss(student, targets, mask, 1.0)) == pytest.approx(expected, abs=1e-6)
    # No masked patch anywhere: zero, not NaN
    assert float(ibot_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(2, 3, dtype=torch.bool), 0.1)) == 0.0


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_neighbour():
    # Unit vectors at 0, 90 and 180 degrees (scaled: KoLeo normalises): every nearest neighbour is sqrt(2) away
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0]])
    assert float(koleo_loss(x)) == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)
    # Two points close together: each is the other's neighbour, 0.2 away after normalising
    y = torch.tensor([[1.0, 0.0], [math.cos(0.2), math.sin(0.2)], [-1.0, 0.0]])
    d = 2 * math.sin(0.1)
    assert float(koleo_loss(y)) == pytest.approx(-(math.log(d) * 2 + math.log(math.dist((-1, 0), (math.cos(0.2), math.sin(0.2))))) / 3,
                                                 abs=1e-5)


def test_sinkhorn_knopp_one_iteration_by_hand():
    # exp(scores) = [[1, 2], [3, 4]] (2 samples x 2 prototypes): prototype rows normalised to 1/2 each,
    # then sample columns to 1: (3/7, 4/7) and (9/17, 8/17)
    q = sinkhorn(torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), eps=1.0, iters=1)
    assert torch.allclose(q, torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]), atol=1e-6)


def _sk_shard(rank, world, scores, cut):
    return sinkhorn(scores[:cut] if rank == 0 else scores[cut:], eps=0.07, iters=3)


def test_sinkhorn_knopp_on_two_ranks_with_unequal_counts_equals_one_rank_on_the_whole_batch():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(11, 6), dim=1)  # 11 masked patches: 7 on rank 0, 4 on rank 1
    two = torch.cat(run_distributed(_sk_shard, 2, scores, 7))
    one = sinkhorn(scores, eps=0.07, iters=3)
    assert torch.allclose(two, one, atol=1e-5)
    assert torch.allclose(one.sum(1), torch.ones(11), atol=1e-5)  # each sample a distribution
    many = sinkhorn(scores, eps=0.07, iters=200)
    assert torch.allclose(many.sum(0), torch.full((6,), 11 / 6), atol=1e-3)  # prototypes equally used


def test_global_crops_get_sometimes_blockwise_masks_from_the_multi_crop_pipeline():
    images = [torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8) for _ in range(400)]
    spec = MultiCrop(n_local=1, global_view=Augment(size=16), local_view=Augment(size=8),
                     masks=CropMasks(patch_size=4, probability=0.5, ratio=(0.1, 0.5)))
    out = make_views(images, spec, torch.Generator().manual_seed(0))
    assert set(out) == {"global0", "global1", "local0", "mask0", "mask1"}
    for k in ("mask0", "mask1"):
        m = out[k]
        assert m.shape == (400, 16) and m.dtype == torch.bool
        per_image = m.sum(1)
        masked = per_image > 0
        assert 0.4 < masked.float().mean() < 0.6  # probability 0.5
        assert per_image[masked].min() >= round(0.1 * 16) and per_image.max() <= round(0.5 * 16)
    again = make_views(images, spec, torch.Generator().manual_seed(0))
    assert torch.equal(again["mask0"], out["mask0"]) and not torch.equal(out["mask0"], out["mask1"])
    with pytest.raises(ValueError, match="global_view.size 18 is not a multiple of masks.patch_size 4"):
        MultiCrop(global_view=Augment(size=18), masks=CropMasks(patch_size=4))


def test_config_asks_dinov2_for_masks_and_refuses_them_elsewhere():
    with pytest.raises(ConfigError, match="method 'dinov2' masks its global crops: set data.views.masks"):
        load_config("dino_vit_tiny", ["method.name=dinov2"])
    with pytest.raises(ConfigError, match="data.views.masks is for methods that mask their global crops"):
        load_config("dino_vit_tiny", ["data.views.masks.patch_size=4"])
    cfg = load_config("dinov2_vit_tiny", [])
    assert cfg.data.views.masks.ratio == (0.1, 0.5) and cfg.method_params()["centering"] == "ema"


def test_layerscale_and_drop_path_come_from_timm_kwargs_and_the_teacher_never_drops_a_path():
    cfg = load_config("dinov2_vit_tiny", ["model.kwargs.depth=2", "method.out_dim=64", "method.hidden_dim=32"])
    m = build_method(cfg)
    block = m.backbone.blocks[1]
    assert torch.allclose(block.ls1.gamma, torch.full_like(block.ls1.gamma, 1e-5))
    assert block.drop_path1.drop_prob == pytest.approx(0.1)
    m.train()
    batch = make_views(_fashion_sample(8), cfg.data.views, torch.Generator().manual_seed(0))
    from selfsup.pipelines.views import to_model_input

    x = to_model_input(batch, cfg.data.mean, cfg.data.std)
    m(x)
    assert not m.teacher_backbone.training  # eval mode: no drop-path, the same features every call
    first = m.teacher_backbone(x["global0"])
    assert torch.equal(first, m.teacher_backbone(x["global0"]))


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_dinov2_steps_update_the_teacher_by_ema_and_centre_only_with_ema(centering):
    torch.manual_seed(0)
    cfg = _tiny("dinov2", "method.out_dim=64", "method.hidden_dim=32", f"method.centering={centering}",
                "method.separate_ibot_head=true")
    m = build_method(cfg)
    step = TrainStep(m, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in m.teacher_backbone.parameters()]
    images = _fashion_sample(32)
    outs = [step(make_views(images, cfg.data.views, torch.Generator().manual_seed(i)), i / 4) for i in range(2)]
    assert all(math.isfinite(o["loss"]) and o["ibot_loss"] > 0 and o["masked_patches"] > 0 for o in outs)
    mom = m.momentum
    assert mom < 1 and any(not torch.equal(b, t) for b, t in zip(before, m.teacher_backbone.parameters()))
    assert (m.center.abs().sum() > 0) == (centering == "ema") and (m.patch_center.abs().sum() > 0) == (centering == "ema")
    assert set(n.split(".")[0] for n, _ in m.named_parameters() if n.startswith("teacher_")) == {
        "teacher_backbone", "teacher_head", "teacher_ibot_head"}
    trained = {id(q) for g in step.optimizer.param_groups for q in g["params"]}
    assert not any(id(p) in trained for n, p in m.named_parameters() if n.startswith("teacher_"))


def test_selfsup_train_runs_dinov2_through_ray_data_and_evaluates_student_and_teacher(ray_local, tiny_labeled):
    from selfsup.pipelines.storage import open_store
    from selfsup.platform.cli import main
    from selfsup.platform.runs import read_metrics

    data, _ = tiny_labeled
    root = "s3://test-runs/dinov2"
    assert main(["train", "dinov2_vit_tiny", f"data.uri={data}", "data.batch_size=8", "schedule.steps=2",
                 "scaling.num_workers=2", "train.precision=fp32", f"storage.root={root}", "storage.name=tiny",
                 "model.kwargs={img_size: 16, patch_size: 4, depth: 2, dynamic_img_size: true, init_values: 1.0e-5}",
                 "data.views.global_view.size=16", "data.views.local_view.size=8", "data.views.n_local=2",
                 "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
                 "method.centering=sinkhorn_knopp", "eval.every_epochs=null", "eval.at_start=false"]) == 0
    rows = read_metrics(open_store(f"{root}/tiny"))
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert train and all(math.isfinite(r["loss"]) and r["masked_patches"] > 0 for r in train)
    assert evals and "knn_top1" in evals[-1] and "knn_top1_teacher" in evals[-1]
