"""I-MedSAM on LiteMedSAM (medseg/models/sam/imedsam.py), on the registry's tiny test config: resolution-free
output, equality with LiteMedSAM at init, LoRA only on the q/v slices, what trains, the 12.5 % refinement,
eval determinism, and the small-weights-plus-base folder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from medseg.models import create_model, get_entry
from medseg.models.sam.imedsam import IMedSAM, ImplicitOutput, QVLoRA, select_uncertain

torch.set_num_threads(1)

CFG = {k: v for k, v in get_entry("imedsam").test_config.items() if k not in ("input_size", "spatial_dims")}
LITE_CFG = {k: v for k, v in get_entry("litemedsam").test_config.items() if k not in ("input_size", "spatial_dims")}
S = CFG["img_size"]
BOXES = torch.tensor([[5.0, 8.0, 40.0, 50.0], [20.0, 10.0, 60.0, 33.0]])


def _lite(in_channels=3, seed=0):
    """A tiny LiteMedSAM with non-trivial weights everywhere (biases, BatchNorm statistics)."""
    torch.manual_seed(seed)
    lite = create_model("litemedsam", in_channels, 1, **LITE_CFG)
    with torch.no_grad():
        for name, t in lite.state_dict().items():
            if t.is_floating_point() and ("attention_biases" in name or "running" in name or "bn.bias" in name):
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return lite.eval()


def _imedsam(in_channels=3, seed=1, **kw):
    torch.manual_seed(seed)
    return create_model("imedsam", in_channels, 1, **{**CFG, **kw})


def _images(b=2, c=3):
    return torch.rand(b, c, S, S, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("size", [(S, S), (37, 53), (2 * S, 3 * S // 2), (8, 8)])
def test_output_at_any_size(size):
    model = _imedsam().eval()
    with torch.no_grad():
        out = model(_images(), boxes=BOXES, output_size=size)
    assert out.shape == (2, 1, *size) and torch.isfinite(out).all()


def test_default_size_is_the_image_and_decode_splits_forward():
    model = _imedsam().eval()
    x = _images()
    with torch.no_grad():
        whole = model(x, boxes=BOXES)
        split = model.decode(model.embed(x), BOXES, (S, S))
    assert whole.shape == (2, 1, S, S)
    assert torch.equal(whole, split)


def test_encoder_equals_litemedsam_at_init_and_adapters_change_it():
    lite = _lite()
    model = _imedsam()
    model.load_base_state_dict(lite.state_dict())
    model.eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.embed(x), lite.embed(x))
        model.adapters.lora[0].q_b.weight.normal_()
        lora = model.embed(x)
        model.adapters.lora[0].q_b.weight.zero_()
        model.adapters.freq[-1].up.weight.normal_()
        freq = model.embed(x)
        ref = lite.embed(x)
    assert not torch.allclose(lora, ref) and not torch.allclose(freq, ref)


def test_lora_touches_only_the_q_and_v_slices_of_each_head():
    dim, heads = 12, 3
    hd = dim // heads
    qkv = torch.nn.Linear(dim, 3 * dim)
    lora = QVLoRA(dim, heads, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.q_b.weight.normal_()
        lora.v_b.weight.normal_()
    qkv.register_forward_hook(lora.hook)
    x = torch.randn(2, 5, dim)
    with torch.no_grad():
        delta = (qkv(x) - F.linear(x, qkv.weight, qkv.bias)).view(2, 5, heads, 3, hd)
        dq = (x @ lora.q_a.weight.T @ lora.q_b.weight.T * 2.0).view(2, 5, heads, hd)
        dv = (x @ lora.v_a.weight.T @ lora.v_b.weight.T * 2.0).view(2, 5, heads, hd)
    assert torch.allclose(delta[..., 0, :], dq, atol=1e-5)
    assert torch.equal(delta[..., 1, :], torch.zeros_like(dq))  # k untouched
    assert torch.allclose(delta[..., 2, :], dv, atol=1e-5)


def test_lora_is_on_every_attention_block():
    model = _imedsam()
    from medseg.models.sam.tinyvit import TinyViTBlock

    blocks = [m for m in model.base.image_encoder.modules() if isinstance(m, TinyViTBlock)]
    assert len(blocks) == len(model.adapters.lora) == len(model.adapters.freq) == sum(CFG["depths"][1:])
    assert all(len(b.attn.qkv._forward_hooks) == 1 and len(b._forward_hooks) == 1 for b in blocks)


def test_trainable_parameter_count_at_the_full_config():
    with torch.device("meta"):
        model = IMedSAM()
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1_490_238  # the module docstring's number; the paper: 1.6 M on SAM ViT-B
    lora = sum(p.numel() for p in model.adapters.lora.parameters())
    assert lora == 16 * (2 * 128 + 6 * 160 + 2 * 320)  # rank 4, q and v: 2 x (4d + 4d) per block


def test_gradients_reach_only_the_trainable_parameters():
    model = _imedsam().train()
    out = model(_images(), boxes=BOXES, output_size=(24, 24), return_all=True)
    (out.logits.square().mean() + out.coarse.square().mean()).backward()
    trainable = {n for n, _ in model.trainable_parameters()}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got <= trainable
    for prefix in (
        "adapters.lora",
        "adapters.freq",
        "implicit_decoder.coarse",
        "implicit_decoder.fine",
        "base.mask_decoder.output_upscaling",
        "base.prompt_encoder.point_embeddings",
    ):
        assert any(n.startswith(prefix) for n in got), prefix
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert not model.base.image_encoder.training  # frozen BatchNorm statistics


@pytest.mark.parametrize("n", [64 * 64, 37 * 53, 7, 1])
def test_uncertainty_selection_picks_ceil_one_eighth(n):
    var = torch.rand(3, n, generator=torch.Generator().manual_seed(n))
    idx = select_uncertain(var, 0.125)
    k = math.ceil(n / 8)
    assert idx.shape == (3, k)
    for row, sel in zip(var, idx):
        assert len(set(sel.tolist())) == k
        rest = row[torch.ones(n, dtype=torch.bool).index_fill_(0, sel, False)]
        assert rest.numel() == n - k and (rest.numel() == 0 or row[sel].min() >= rest.max())


def test_decoder_refines_exactly_the_selected_pixels():
    model = _imedsam().eval()
    with torch.no_grad():
        out = model(_images(), boxes=BOXES, output_size=(37, 53), return_all=True)
    assert isinstance(out, ImplicitOutput)
    k = math.ceil(37 * 53 / 8)
    assert out.selected.shape == (2, k)
    changed = (out.logits != out.coarse).flatten(1)
    outside = torch.ones_like(changed).scatter(1, out.selected, False)
    assert not (changed & outside).any()  # only selected pixels differ from the coarse prediction
    assert changed.sum() > 0.9 * changed.numel() / 8
    assert torch.equal(
        out.uncertainty.flatten(1).gather(1, out.selected).min(1).values,
        out.uncertainty.flatten(1).topk(k, 1).values.min(1).values,
    )


def test_eval_is_deterministic_train_uses_mc_dropout():
    model = _imedsam()
    x = _images()
    with torch.no_grad():
        model.eval()
        a, b = model(x, boxes=BOXES), model(x, boxes=BOXES)
        model.train()
        c, d = model(x, boxes=BOXES), model(x, boxes=BOXES)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)
    plain = _imedsam(dropout=0.0)  # without dropout training and eval agree: dropout is the only randomness
    with torch.no_grad():
        assert torch.equal(plain.train()(x, boxes=BOXES), plain.eval()(x, boxes=BOXES))


def test_deepcopy_rebinds_the_hooks():
    """EMA (AveragedModel) deep-copies the model: the copy's hooks must use the copy's adapters."""
    model = _imedsam().eval()
    twin = copy.deepcopy(model)
    x = _images()
    with torch.no_grad():
        ref = model.embed(x)
        assert torch.equal(twin.embed(x), ref)
        twin.adapters.lora[0].v_b.weight.normal_()
        assert torch.equal(model.embed(x), ref)
        assert not torch.equal(twin.embed(x), ref)


def test_small_weights_folder_references_the_base(tmp_path):
    from safetensors.torch import save_file

    lite = _lite()
    base = tmp_path / "lite.safetensors"
    save_file({k: v.contiguous() for k, v in lite.state_dict().items()}, str(base))
    trained = _imedsam(base_weights=str(base))
    with torch.no_grad():
        for _, p in trained.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    small = trained.trainable_state_dict()
    assert 0 < len(small) < len(trained.state_dict()) and all(not k.startswith("base.image_encoder") for k in small)
    again = _imedsam(seed=5, base_weights=str(base))
    again.load_state_dict(small)  # strict: only the frozen base tensors may be absent
    with pytest.raises(RuntimeError, match="missing keys"):
        again.load_state_dict({k: v for k, v in small.items() if not k.startswith("implicit_decoder")})
    x = _images()
    with torch.no_grad():
        assert torch.equal(again.eval()(x, boxes=BOXES), trained.eval()(x, boxes=BOXES))
    with pytest.raises(RuntimeError):
        _imedsam().load_state_dict(small)  # without a named base a partial state dict is refused


def test_grey_input_and_no_prompt():
    model = _imedsam(in_channels=1).eval()
    with torch.no_grad():
        out = model(_images(c=1))
    assert out.shape == (2, 1, S, S) and torch.isfinite(out).all()


def test_chunked_coarse_pass_matches_without_dropout():
    """Chunking the coarse MLP over pixels changes nothing but the dropout draws."""
    model = _imedsam(dropout=0.0).eval()
    emb = model.embed(_images())
    with torch.no_grad():
        whole = model.decode(emb, BOXES, (30, 41), return_all=True)
        parts = model.decode(emb, BOXES, (30, 41), return_all=True, chunk=97)
    assert torch.allclose(whole.coarse, parts.coarse, atol=1e-6)
    assert torch.allclose(whole.logits, parts.logits, atol=1e-6)
    with torch.no_grad():
        a = _imedsam().eval().decode(emb, BOXES, (30, 41), chunk=97)
    assert a.shape == (2, 1, 30, 41) and torch.isfinite(a).all()


def test_points_render_what_the_grid_renders_at_the_pixel_centres():
    from medseg.models.sam.imedsam import pixel_coords

    model = _imedsam(dropout=0.0).eval()  # no MC dropout: the coarse pass is a plain function of the point
    grid = pixel_coords((37, 53), (0.8, 0.6))
    idx = torch.randperm(37 * 53, generator=torch.Generator().manual_seed(0))[:50]
    with torch.no_grad():
        full = model(_images(), boxes=BOXES, output_size=(37, 53), extent=(0.8, 0.6), return_all=True)
        pts = model(_images(), boxes=BOXES, extent=(0.8, 0.6), points=grid[idx], return_all=True)
    assert pts.coarse.shape == pts.logits.shape == (2, 1, 50, 1)
    assert torch.allclose(pts.coarse[:, 0, :, 0], full.coarse.flatten(1)[:, idx], atol=1e-5)
