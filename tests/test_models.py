"""Model zoo tests, generated from the registry: every registered model, whatever its task, is built
with its tiny ``test_config``, run forward/backward, saved as a model folder (model.json spec +
safetensors, the production path) and rebuilt from the spec alone to identical output; its declared
encoder and head name real parameters. Segmentation models are also checked for deep-supervision order."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.io.checkpoint import ModelSpec, load_spec, load_weights, save_spec, save_weights
from medseg.models import create_model, get_entry, list_models, register_model, registry
from medseg.planning.plan import Configuration, Normalization, Plan

torch.set_num_threads(1)

IN_CHANNELS, NUM_CLASSES = 1, 3


def _input_shape(entry) -> tuple[int, ...]:
    """Smallest cube (or square) the model's test topology can downsample cleanly, >= 16."""
    cfg = entry.test_config
    dims = int(cfg.get("spatial_dims", 3))
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    size = [16] * dims
    if "strides" in cfg:
        for axis in range(dims):
            total = math.prod(int(s[axis]) if isinstance(s, (list, tuple)) else int(s) for s in cfg["strides"])
            size[axis] = max(16, 2 * total)
    return tuple(size)


def _build(name: str, *, deep_supervision: bool, seed: int = 0) -> torch.nn.Module:
    entry = get_entry(name)
    missing = [m for m, ok in entry.available().items() if not ok]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    cfg = {k: v for k, v in entry.test_config.items() if k != "input_size"}
    torch.manual_seed(seed)
    return create_model(name, IN_CHANNELS, NUM_CLASSES, deep_supervision=deep_supervision, **cfg)


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor of a forward's result: a tensor, a list of scales, a dict or dataclass of named maps."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "__dataclass_fields__"):
        out = [getattr(out, f) for f in out.__dataclass_fields__]
    return [t for o in out if o is not None for t in _tensors(o)] if isinstance(out, (list, tuple)) else []


def _spec(name: str, shape: tuple[int, ...]) -> ModelSpec:
    """A model.json for the tiny model, as training writes it (kwargs go through JSON)."""
    kwargs = {k: v for k, v in get_entry(name).test_config.items() if k != "input_size"}
    conf = Configuration("zoo", (1.0, 1.0, 1.0), shape, shape, 2, model=name, model_kwargs=kwargs)
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, NUM_CLASSES)}}
    plan = Plan("Dataset999_Zoo", ("MRI",), labels, (Normalization("zscore"),), {"zoo": conf})
    return ModelSpec(name, kwargs, IN_CHANNELS, NUM_CLASSES, labels, plan, "zoo")


MODELS = list_models()
SEGMENTATION = [n for n in MODELS if get_entry(n).task == "segmentation"]


def test_registry_lists_the_builtin_unet():
    assert "unet" in MODELS
    assert get_entry("unet").description


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = _build(name, deep_supervision=False)
    shape = _input_shape(get_entry(name))
    x = torch.randn(2, IN_CHANNELS, *shape)
    out = model(x)
    if get_entry(name).task == "segmentation":
        assert isinstance(out, torch.Tensor), "without deep supervision forward returns one logits tensor"
        assert out.shape == (2, NUM_CLASSES, *shape)
    outs = _tensors(out)
    assert outs and all(torch.isfinite(o).all() for o in outs)
    sum(o.float().square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_deep_supervision_scales(name):
    model = _build(name, deep_supervision=True)
    shape = _input_shape(get_entry(name))
    outs = _outputs(model(torch.randn(1, IN_CHANNELS, *shape)))
    assert outs[0].shape == (1, NUM_CLASSES, *shape), "full resolution first"
    for hi, lo in zip(outs, outs[1:]):
        assert lo.shape[:2] == (1, NUM_CLASSES)
        assert all(b <= a for a, b in zip(hi.shape[2:], lo.shape[2:])), "resolutions decrease"
        assert lo.shape[2:] != hi.shape[2:]
    sum(o.float().square().mean() for o in outs).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"with deep supervision every parameter reaches an output (DDP needs this): {unused}"


def test_unet_deep_supervision_has_one_output_per_decoder_stage():
    entry = get_entry("unet")
    model = _build("unet", deep_supervision=True)
    outs = _outputs(model(torch.randn(1, 1, *_input_shape(entry))))
    assert len(outs) == len(entry.test_config["features"]) - 1
    assert [o.shape[2:] for o in outs] == [torch.Size([16] * 3), torch.Size([8] * 3)]


@pytest.mark.parametrize("name", MODELS)
def test_model_folder_round_trip_gives_identical_output(name, tmp_path):
    """Saved as training saves it (model.json + fold_0/model.safetensors), rebuilt from the spec alone."""
    model = _build(name, deep_supervision=False, seed=0).eval()
    shape = _input_shape(get_entry(name))
    x = torch.randn(1, IN_CHANNELS, *shape)
    save_spec(tmp_path, _spec(name, shape))
    save_weights(tmp_path / "fold_0", model.state_dict(), info={"fold": "0"})
    torch.manual_seed(1)
    other = load_spec(tmp_path).build(deep_supervision=False).eval()
    with torch.no_grad():
        expected = _tensors(model(x))
        differs = [not torch.equal(a, b) for a, b in zip(_tensors(other(x)), expected)]
        assert any(differs), "a differently seeded model must differ (test sanity)"
        other.load_state_dict(load_weights(tmp_path / "fold_0"))
        got = _tensors(other(x))
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", MODELS)
def test_declared_encoder_and_head_name_real_parameters(name):
    """Each declared encoder/head module holds parameters (freezing and fine-tuning rely on the names);
    the head holds every tensor whose shape follows the class count, the encoder none of them."""
    from medseg.training.transfer import encoder_parameters

    entry = get_entry(name)
    assert entry.task and isinstance(entry.task, str)
    model = _build(name, deep_supervision=True)
    for prefix in (*entry.encoder, *entry.head):
        assert entry.parameters_under(model, (prefix,)), f"{name}: '{prefix}' matches no parameter"
    encoder = {n for n, _ in entry.parameters_under(model, entry.encoder)}
    head = {n for n, _ in entry.parameters_under(model, entry.head)}
    assert not encoder & head
    more = create_model(
        name, IN_CHANNELS, NUM_CLASSES + 2, **{k: v for k, v in entry.test_config.items() if k != "input_size"}
    )
    shapes = {n: p.shape for n, p in more.named_parameters()}
    follows_classes = {n for n, p in model.named_parameters() if shapes[n] != p.shape}
    assert follows_classes <= head, f"{name}: class-count tensors outside the head: {sorted(follows_classes - head)}"
    if entry.encoder:  # what --freeze-encoder-epochs freezes
        assert {id(p) for p in encoder_parameters(model)} == {
            id(p) for _, p in entry.parameters_under(model, entry.encoder)
        }


@pytest.mark.parametrize("name", [n for n in MODELS if get_entry(n).memory_estimate is not None])
def test_memory_estimate_grows_with_the_patch(name):
    entry = get_entry(name)
    kwargs = {k: v for k, v in entry.test_config.items() if k != "input_size"}
    shape = _input_shape(entry)
    small = entry.memory_estimate(shape, kwargs, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    big = entry.memory_estimate([2 * s for s in shape], kwargs, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    assert 0 < small < big
    if entry.planner is not None:  # the architecture it plans for a topology builds and has a cost
        from medseg.models.flops import build_meta

        dims = len(shape)
        strides = kwargs["strides"]
        planned = {**entry.planner.model_kwargs(strides, [[3] * dims] * len(strides), dims), "spatial_dims": dims}
        assert isinstance(build_meta(name, IN_CHANNELS, NUM_CLASSES, **planned), torch.nn.Module)
        assert entry.memory_estimate(shape, planned, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES) > small


@pytest.mark.parametrize("name", MODELS)
def test_deep_supervision_flag_does_not_change_parameters(name):
    """Weights trained with deep supervision must load into the inference model (no DS)."""
    a = _build(name, deep_supervision=True).state_dict()
    b = _build(name, deep_supervision=False).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_unet_2d():
    model = create_model("unet", 2, 4, spatial_dims=2, features=[4, 8, 16], deep_supervision=True)
    outs = model(torch.randn(2, 2, 32, 24))
    assert [tuple(o.shape) for o in outs] == [(2, 4, 32, 24), (2, 4, 16, 12)]
    assert all(
        isinstance(m, torch.nn.Conv2d)
        for m in model.modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd) and not isinstance(m, torch.nn.ConvTranspose2d)
    )
    single = create_model("unet", 1, 2, spatial_dims=2, features=[4, 8], deep_supervision=False)
    assert single(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_unet_anisotropic_strides():
    model = create_model(
        "unet",
        1,
        2,
        features=[4, 8, 16],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        deep_supervision=True,
    )
    outs = model(torch.randn(1, 1, 8, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 16, 16), (8, 8, 8)]


def test_unet_rejects_bad_topology():
    with pytest.raises(ValueError):
        create_model("unet", 1, 2, features=[4, 8], strides=[[1, 1, 1]], kernel_sizes=[[3, 3, 3]])
    with pytest.raises(ValueError, match="spatial_dims"):
        create_model("unet", 1, 2, spatial_dims=4, features=[4, 8])


# ---------------------------------------------------------------- registry behaviour
@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry: models registered by a test vanish after it."""
    list_models()  # make sure built-ins are in before copying
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def test_register_model_decorator_and_kwargs(scratch_registry):
    seen = {}

    @register_model("tiny_test_net", test_config={"width": 2}, description="a test net")
    def build_tiny(in_channels, num_classes, *, spatial_dims=3, deep_supervision=False, width=1):
        seen.update(
            in_channels=in_channels,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
            deep_supervision=deep_supervision,
            width=width,
        )
        return torch.nn.Conv3d(in_channels, num_classes, 1)

    assert "tiny_test_net" in list_models()
    entry = get_entry("tiny_test_net")
    assert entry.builder is build_tiny
    assert entry.test_config == {"width": 2}
    assert entry.description == "a test net"
    model = create_model("tiny_test_net", 2, 5, width=7, deep_supervision=True)
    assert isinstance(model, torch.nn.Conv3d) and model.out_channels == 5
    assert seen == {"in_channels": 2, "num_classes": 5, "spatial_dims": 3, "deep_supervision": True, "width": 7}


def test_description_from_docstring_and_explicit(scratch_registry):
    @register_model("doc_net")
    def build_doc(in_channels, num_classes, **kw):
        """First line.

        More text."""

    @register_model("explicit_net", description="explicit wins")
    def build_explicit(in_channels, num_classes, **kw):
        pass

    @register_model("blank_doc_net")
    def build_blank(in_channels, num_classes, **kw):
        """ """

    assert get_entry("doc_net").description == "First line."
    assert get_entry("explicit_net").description == "explicit wins"
    assert get_entry("blank_doc_net").description == ""


def test_duplicate_registration_raises(scratch_registry):
    @register_model("dup_net")
    def first(in_channels, num_classes, **kw):
        return torch.nn.Identity()

    register_model("dup_net")(first)  # re-registering the same builder is harmless (module reload)
    with pytest.raises(ValueError, match="dup_net"):

        @register_model("dup_net")
        def second(in_channels, num_classes, **kw):
            return torch.nn.Identity()

    assert get_entry("dup_net").builder is first
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(lambda *a, **k: None)


def test_unknown_model_is_a_clear_key_error():
    with pytest.raises(KeyError) as info:
        create_model("no_such_net", 1, 2)
    msg = str(info.value)
    assert "no_such_net" in msg and "unet" in msg  # names the request and what exists
    with pytest.raises(KeyError):
        get_entry("no_such_net")


def test_scratch_registry_cleans_up():
    assert "tiny_test_net" not in list_models()
    assert "dup_net" not in list_models()
