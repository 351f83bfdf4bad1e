"""Masked image modeling: the ViT wrapper (token dropping, mask tokens, attention maps), reference
losses, HOG, the BEiT tokenizer from the shards, MAE's reconstruction function."""


import pytest
import torch

from selfsup.methods.backbones import build_backbone
from selfsup.methods.beit import BEiT, BEiTParams, fit_codebook, normalised_patches
from selfsup.methods.ijepa import block_indices
from selfsup.methods.mae import MAE, MAEParams, masked_patch_loss, visible_indices
from selfsup.methods.maskfeat import hog
from selfsup.methods.simmim import SimMIM, masked_l1_loss
from selfsup.methods.vit import MaskedViT, as_vit, attention_masks, cls_attention, patchify, unpatchify

G = torch.Generator().manual_seed(0)


def vit(depth=2):
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=depth)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[0, 1].view(4, 4, 3)[..., 0], x[0, 0, 0:4, 4:8])  # patch 1: top row, second column
    assert torch.equal(unpatchify(p, 4, 3), x)


def test_token_dropping_keeps_the_right_tokens_in_order():
    enc = MaskedViT(vit()[0]).eval()
    img = torch.randn(2, 3, 16, 16, generator=G)
    mask = torch.tensor([[1, 0, 1, 0] * 4, [0, 0, 1, 1] * 4], dtype=torch.bool)
    keep = visible_indices(mask)
    assert keep.tolist() == [[1, 3, 5, 7, 9, 11, 13, 15], [0, 1, 4, 5, 8, 9, 12, 13]]
    # Position embeddings are added before the drop: the kept tokens are exactly those of the full sequence.
    full = enc._embed(img)
    kept = full[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    with torch.no_grad():
        out = enc.visible(img, keep)
        ref = enc._blocks(torch.cat([full[:, :1], kept], 1))
        assert out.shape == (2, 1 + 8, 192) and torch.allclose(out, ref, atol=1e-6)
        every = enc.visible(img, torch.arange(16).expand(2, -1))
        assert torch.allclose(every, enc.all_tokens(img), atol=1e-5)


def test_mask_tokens_replace_masked_patches_only():
    enc = MaskedViT(vit()[0])
    img = torch.randn(1, 3, 16, 16, generator=G)
    none = torch.zeros(1, 16, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(enc.with_mask_tokens(img, none), enc.all_tokens(img)[:, 1:], atol=1e-6)
        some = none.clone()
        some[0, 3] = True
        x = enc.vit.patch_embed(img)
        emb = enc._embed(img, some)
        assert torch.allclose(emb[0, 1 + 3] - enc.vit.pos_embed[0, 1 + 3], enc.mask_token[0, 0], atol=1e-6)
        assert torch.allclose(emb[0, 1 + 4] - enc.vit.pos_embed[0, 1 + 4], x[0, 4], atol=1e-6)
    with pytest.raises(ValueError, match="must be the model's patch size"):
        enc.with_mask_tokens(img, torch.zeros(1, 64, dtype=torch.bool))


def test_cls_attention_maps_sum_to_one_and_match_timm():
    v, _ = vit(depth=3)
    enc = MaskedViT(v).eval()
    img = torch.randn(2, 3, 16, 16, generator=G)
    maps = enc.cls_attention(img)
    assert maps.shape == (2, 3, 16) and torch.allclose(maps.sum(-1), torch.ones(2, 3), atol=1e-5)
    # Against timm's own attention (non-fused path, hooked at attn_drop) of the last block.
    got = {}
    last = v.blocks[-1].attn
    last.fused_attn = False
    h = last.attn_drop.register_forward_hook(lambda m, i, o: got.setdefault("a", o))
    with torch.no_grad():
        v(img)
    h.remove()
    ref = got["a"][:, :, 0, 1:]
    assert torch.allclose(maps, ref / ref.sum(-1, keepdim=True), atol=1e-5)


def test_attention_masks_keep_the_fewest_patches_that_hold_the_mass():
    v, _ = vit(depth=2)
    img = torch.randn(3, 3, 16, 16, generator=G)
    maps = cls_attention(as_vit(MaskedViT(v)), img)
    assert torch.equal(maps, MaskedViT(v).cls_attention(img))  # a MaskedViT and its ViT give one map
    for keep in (0.6, 0.9):
        masks = attention_masks(maps, keep)
        kept = (maps * masks).sum(-1)
        assert (kept >= keep - 1e-5).all()
        # dropping the weakest kept patch goes under the threshold: no smaller set does it
        weakest = torch.where(masks, maps, torch.inf).min(-1).values
        assert (kept - weakest < keep).all()
    uniform = torch.full((1, 1, 10), 0.1)
    assert int(attention_masks(uniform, 0.6).sum()) == 6
    assert int(attention_masks(torch.full((8,), 0.125), 0.6).sum()) == 5
    with pytest.raises(ValueError, match="ViT with a class token"):
        as_vit(torch.nn.Linear(2, 2))


def test_simmim_reconstruct_keeps_the_visible_patches():
    v, d = vit()
    m = SimMIM(v, d, SimMIM.Params())
    img = torch.randn(2, 3, 16, 16, generator=G)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 1::3] = True
    out = m.reconstruct({"image": img, "mask": mask})
    assert torch.allclose(patchify(out["reconstruction"], 4)[:, ~mask[0]], patchify(img, 4)[:, ~mask[0]])
    assert (patchify(out["masked"], 4)[:, mask[0]] == 0).all()
    assert not torch.allclose(out["reconstruction"], img)


def test_masked_patch_loss_reference():
    pred, target = torch.randn(2, 4, 6, generator=G), torch.randn(2, 4, 6, generator=G)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    ref = sum(float(((pred[b, n] - target[b, n]) ** 2).mean()) for b in range(2) for n in range(4) if mask[b, n]) / 3
    assert abs(float(masked_patch_loss(pred, target, mask, norm_pix=False)) - ref) < 1e-6
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = sum(float(((pred[b, n] - t[b, n]) ** 2).mean()) for b in range(2) for n in range(4) if mask[b, n]) / 3
    assert abs(float(masked_patch_loss(pred, target, mask, norm_pix=True)) - ref) < 1e-5


def test_simmim_l1_loss_reference_and_normalised_reconstruction():
    pred, target = torch.randn(2, 4, 6, generator=G), torch.randn(2, 4, 6, generator=G)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    ref = sum(float((pred[b, n] - target[b, n]).abs().mean()) for b in range(2) for n in range(4) if mask[b, n]) / 3
    assert abs(float(masked_l1_loss(pred, target, mask, norm_target=False)) - ref) < 1e-6
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = sum(float((pred[b, n] - t[b, n]).abs().mean()) for b in range(2) for n in range(4) if mask[b, n]) / 3
    assert abs(float(masked_l1_loss(pred, target, mask, norm_target=True)) - ref) < 1e-5
    # A head that predicts each masked patch's normalised pixels reconstructs the image exactly.
    v, d = vit()
    m = SimMIM(v, d, SimMIM.Params(norm_target=True))
    img = torch.randn(2, 3, 16, 16, generator=G)
    patches = patchify(img, 4)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()

    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            return (patches - mean) / std

    m.head = Oracle()
    mask16 = torch.zeros(2, 16, dtype=torch.bool)
    mask16[:, ::2] = True
    assert torch.allclose(m.reconstruct({"image": img, "mask": mask16})["reconstruction"], img, atol=1e-5)


def test_mae_reconstruct_shapes_and_visible_patches():
    v, d = vit()
    m = MAE(v, d, MAEParams(decoder_dim=32, decoder_depth=1))
    img = torch.randn(2, 3, 16, 16, generator=G)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    out = m.reconstruct({"image": img, "mask": mask})
    assert {k: tuple(t.shape) for k, t in out.items()} == {k: (2, 3, 16, 16) for k in ("original", "masked", "reconstruction")}
    visible = ~mask[0]
    assert torch.allclose(patchify(out["reconstruction"], 4)[0, visible], patchify(img, 4)[0, visible], atol=1e-5)
    assert (patchify(out["masked"], 4)[0, mask[0]] == 0).all()


def test_hog_orientation_and_normalisation():
    img = torch.zeros(1, 3, 8, 8)
    img[..., :, 4:] = 1.0  # a vertical edge: horizontal gradient, orientation 0
    h = hog(img, patch=4, cell=2, bins=9)
    assert h.shape == (1, 4, 4 * 9)
    cells = h.view(1, 4, 4, 9)
    strong = cells.norm(dim=-1) > 0
    assert strong.any() and (cells[strong].argmax(-1) == 0).all()
    assert torch.allclose(cells[strong].norm(dim=-1), torch.ones(int(strong.sum())), atol=1e-5)
    assert hog(torch.ones(1, 3, 8, 8), 4, 2).abs().sum() == 0  # flat image: no gradients


def test_ijepa_block_indices_cut_to_the_smallest_block():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, [1, 2, 3]] = True
    m[1, [5, 7]] = True
    assert block_indices(m).tolist() == [[1, 2], [5, 7]]


def test_beit_tokens_are_the_nearest_visual_word():
    v, d = vit()
    x = torch.randn(40, 3, 16, 16, generator=G)
    cb = fit_codebook(x, 4, 16, iters=5)
    import io

    buf = io.BytesIO()
    torch.save(cb, buf)
    m = BEiT(v, d, BEiTParams(vocab_size=16))
    m.load_tokenizer(buf.getvalue())
    ids = m.tokens(x[:2])
    ref = (normalised_patches(x[:2], 4) @ cb["codebook"].T).argmax(-1)
    assert ids.shape == (2, 16) and torch.equal(ids, ref)
    bad = io.BytesIO()
    torch.save({"codebook": torch.zeros(3, 3), "patch_size": 4}, bad)
    with pytest.raises(ValueError, match="expected a codebook of shape"):
        m.load_tokenizer(bad.getvalue())


def test_beit_tokenizer_from_the_shards_and_a_run_with_it(tiny_labeled, tmp_path, capsys):
    from selfsup.platform.cli import main
    from selfsup.platform.config import load_config
    from selfsup.platform.step import build_method

    data, _ = tiny_labeled
    over = [f"data.uri={data}", "data.views.view.size=16", "data.views.patch_size=4", "method.vocab_size=16",
            "method.tokenizer_samples=30", "model.kwargs={img_size: 16, patch_size: 4, depth: 2}"]
    out = "s3://test-runs/tokenizers/tiny.pt"
    assert main(["tokenizer", "fit", "beit_vit_tiny", *over, "--out", out]) == 0
    assert "16 visual words from 30 images" in capsys.readouterr().out
    cfg = load_config("beit_vit_tiny", [*over, f"method.tokenizer={out}"])
    m = build_method(cfg)
    assert m.codebook.abs().sum() > 0


# ---------------------------------------------------------------- the masked methods learn on real images

def _fashion(n):
    import gzip

    import numpy as np

    from selfsup.pipelines.sources import FASHION_MNIST_DIR

    with gzip.open(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return [torch.from_numpy(im.copy()).unsqueeze(0) for im in images]


def _shipped_tiny(method, *extra):
    """The shipped ViT-tiny config at 16 px views and 2 blocks, so a few dozen steps run in seconds."""
    from selfsup.platform.config import load_config

    return load_config(f"{method}_vit_tiny", ["data.views.view.size=16", "data.views.view.scale=[0.5, 1.0]",
                                             "model.kwargs={img_size: 16, patch_size: 4, depth: 2}",
                                             "data.batch_size=64", "schedule.steps=40", *extra])


def _beit_tokenizer(m, cfg, images):
    import io

    from selfsup.platform.tokenizer import tokenizer_inputs

    buf = io.BytesIO()
    torch.save(fit_codebook(tokenizer_inputs(cfg, images), m.patch, m.params.vocab_size, seed=0), buf)
    m.load_tokenizer(buf.getvalue())


@pytest.mark.parametrize("method", ["mae", "simmim", "beit", "maskfeat", "ijepa"])
def test_masked_method_loss_falls_well_below_its_start_on_fashion_mnist(method):
    # 40 steps on 64 images: MAE, SimMIM, BEiT and I-JEPA fell by 20-29%, MaskFeat by 82% when written
    from selfsup.pipelines.views import make_views
    from selfsup.platform.step import TrainStep, build_method

    torch.manual_seed(0)
    cfg = _shipped_tiny(method, *(["method.vocab_size=32"] if method == "beit" else []))
    m = build_method(cfg, num_samples=64)
    images = _fashion(64)
    if method == "beit":
        _beit_tokenizer(m, cfg, images)
    step = TrainStep(m, cfg, torch.device("cpu"))
    m.start_epoch(0)
    outs = [step(make_views(images, cfg.data.views, torch.Generator().manual_seed(i)), i / 40) for i in range(40)]
    losses = [o["loss"] for o in outs]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last, losses)
    assert outs[-1]["embed_std"] > 0.01  # not by collapsing (I-JEPA's targets come from its own encoder)


def test_beit_tokens_of_an_image_are_the_same_at_fit_time_and_at_train_time():
    from selfsup.pipelines.views import make_views, to_model_input
    from selfsup.platform.step import build_method

    # A full, unflipped crop at train time is the very image the tokenizer was fitted on
    cfg = _shipped_tiny("beit", "method.vocab_size=32", "data.views.view.scale=[1.0, 1.0]",
                        "data.views.view.ratio=[1.0, 1.0]", "data.views.view.flip_p=0")
    m = build_method(cfg)
    images = _fashion(64)
    _beit_tokenizer(m, cfg, images)
    from selfsup.platform.tokenizer import tokenizer_inputs

    at_fit = m.tokens(tokenizer_inputs(cfg, images))
    view = make_views(images, cfg.data.views, torch.Generator().manual_seed(0))
    at_train = m.tokens(to_model_input(view, cfg.data.mean, cfg.data.std, cfg.model.in_chans)["image"])
    assert torch.equal(at_fit, at_train)
    assert len(at_fit.unique()) > 8  # the words are used, not one catch-all


def test_ijepa_target_encoder_is_never_updated_by_gradients():
    from selfsup.pipelines.views import make_views
    from selfsup.platform.step import TrainStep, build_method

    torch.manual_seed(0)
    cfg = _shipped_tiny("ijepa")
    m = build_method(cfg, num_samples=64)
    step = TrainStep(m, cfg, torch.device("cpu"))
    assert not any(p.requires_grad for p in m.target_encoder.parameters())
    assert not any(p is q for p in m.target_encoder.parameters() for g in step.optimizer.param_groups for q in g["params"])
    images = _fashion(64)
    for i in range(3):
        before = [p.detach().clone() for p in m.target_encoder.parameters()]
        step(make_views(images, cfg.data.views, torch.Generator().manual_seed(i)), i / 40)
        mom = m.momentum
        # exactly the EMA of the context encoder after its update: nothing else moved it
        for b, t, o in zip(before, m.target_encoder.parameters(), m.encoder.parameters()):
            assert t.grad is None and torch.allclose(t, mom * b + (1 - mom) * o.detach(), atol=1e-6)


def test_every_vit_method_attends_with_fused_scaled_dot_product_attention(monkeypatch):
    """Every attention of every ViT method (encoders, MAE's decoder, I-JEPA's predictor, teachers)
    runs as torch's fused SDPA (flash/memory-efficient kernels on a GPU); only cls_attention, when
    maps are asked for, computes the softmax itself."""
    from importlib import resources

    import torch.nn.functional as F

    from selfsup.pipelines.views import make_views, to_model_input
    from selfsup.platform.config import load_config
    from selfsup.platform.step import build_method

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    imgs = [torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8, generator=G) for _ in range(4)]
    for path in sorted((resources.files("selfsup") / "configs").glob("*_vit_tiny.yaml")):
        cfg = load_config(str(path), ["model.kwargs.depth=2", "data.batch_size=4"])
        torch.manual_seed(0)
        m = build_method(cfg, num_samples=64)
        attention = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
        assert attention and all(a.fused_attn for a in attention), path.name
        if cfg.method.name == "beit":  # its targets need a fitted tokenizer; its encoder is SimMIM's
            continue
        calls.clear()
        views = {**make_views(imgs, cfg.data.views, torch.Generator().manual_seed(0)), "index": torch.arange(4)}
        m(to_model_input(views, cfg.data.mean, cfg.data.std, cfg.model.in_chans))
        assert calls, f"{path.name}: no fused attention ran"


@pytest.mark.parametrize("size", ["vit_tiny", "vit_small"])
def test_shipped_masked_configs_judge_the_mean_of_the_patch_tokens(size):
    # their losses train the patch tokens, never the class token: kNN, probes and fine-tuning read the mean
    from selfsup.platform.config import load_config
    from selfsup.platform.step import build_method

    for method in ["mae", "simmim", "beit", "maskfeat", "ijepa"]:
        cfg = load_config(f"{method}_{size}", ["model.kwargs.depth=1", "model.kwargs.img_size=32",
                                                "data.views.view.size=32"])
        torch.manual_seed(0)
        m = build_method(cfg, num_samples=64).eval()
        x = torch.randn(2, cfg.model.in_chans, 32, 32)
        tokens = MaskedViT(m.backbone).all_tokens(x)
        with torch.no_grad():
            assert torch.allclose(m.backbone(x), tokens[:, m.backbone.num_prefix_tokens:].mean(1), atol=1e-5), method
            assert not torch.allclose(m.backbone(x), tokens[:, 0], atol=1e-3), method
