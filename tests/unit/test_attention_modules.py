"""Attention plug-ins (model.attention=se|sk|cbam, model.stn): shapes, identity at step 0 on
pretrained weights, the weights explain shows, the STN's warp and gradients, stage choice,
learning rates, weight sources and use with other methods."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from lookcloser import api
from lookcloser.config import Config, OptimConfig
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.engine.finetune import NORM_TYPES, pretrained_norms
from lookcloser.engine.module import parameter_groups
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.models import backbones
from lookcloser.models.backbones import Backbone, create_timm_model
from lookcloser.models.plugins import (
    SpatialTransformer,
    StageAttention,
    affine_grid,
    stn_theta,
)
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

KINDS = ["se", "sk", "cbam"]


def active(backbone: Backbone, gamma: float = 1.0) -> Backbone:
    """The blocks fully on (gamma = 1: the block as published)."""
    with torch.no_grad():
        for block in backbone.attention_blocks():
            block.gamma.fill_(gamma)
    return backbone


# ---- the blocks -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [16, 24, 40, 7])
def test_every_block_keeps_the_shape(kind, channels):
    block = StageAttention(kind, channels, 16, level=1, module="stage").eval()
    with torch.no_grad():
        block.gamma.fill_(1.0)
        x = torch.randn(2, channels, 9, 11)
        y = block(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)  # it does something once on


def test_a_block_refuses_a_map_of_another_width():
    block = StageAttention("se", 16, 16, level=1, module="layer1")
    with pytest.raises(ConfigError, match="layer1 gives"):
        block(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_leave_the_pretrained_network_unchanged_at_initialisation(kind):
    """Offline ImageNet weights of Lite0 (no network): with fresh blocks the backbone gives the
    pretrained features exactly, and only the blocks are new."""
    images = torch.rand(2, 3, 64, 64)
    plain = Backbone("tf_efficientnet_lite0", pretrained=True).eval()
    plugged = Backbone("tf_efficientnet_lite0", pretrained=True, attention=kind).eval()
    with torch.no_grad():
        torch.testing.assert_close(plugged(images), plain(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            plugged.forward_features(images), plain.forward_features(images), rtol=0, atol=1e-6
        )
    new = {id(p) for p in plugged.new_parameters()}
    names = {n for n, p in plugged.model.named_parameters() if id(p) in new}
    assert names and all(n.startswith("attention_blocks.") for n in names)
    # Once on, the blocks change the features.
    with torch.no_grad():
        assert not torch.allclose(active(plugged)(images), plain(images), atol=1e-3)


def test_gate_init_one_starts_with_the_published_block():
    """model.attention_gate_init=1: every block's output is timm's block alone from step 0."""
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "model.attention=se",
            "model.attention_gate_init=1.0",
        ],
    )
    backbone = build_method(cfg, 3).backbone.eval()
    blocks = backbone.attention_blocks()
    assert len(blocks) == 4 and all(float(b.gamma) == 1.0 for b in blocks)
    x = torch.randn(2, blocks[0].channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(blocks[0](x), blocks[0].block(x))
    with pytest.raises(ConfigError, match="model.attention_gate_init"):
        Config.load(None, ["model.attention_gate_init=2"])


def test_stn_at_identity_leaves_the_pretrained_network_unchanged():
    images = torch.rand(2, 3, 64, 64)
    plain = Backbone("tf_efficientnet_lite0", pretrained=True).eval()
    warped = Backbone("tf_efficientnet_lite0", pretrained=True, stn=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(warped(images), plain(images), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_run_in_every_forward_path_and_copies_use_their_own_blocks(kind):
    """Hooks on the stage modules: forward_intermediates sees the blocks too, and a deep copy
    (the EMA's) runs its own blocks, not the original's."""
    images = torch.rand(1, 3, 64, 64)
    backbone = active(Backbone("resnet18", attention=kind, attention_stages=[1])).eval()
    plain_maps = Backbone("resnet18").eval()
    plain_maps.load_state_dict(
        {k: v for k, v in backbone.state_dict().items() if "attention_blocks" not in k}
    )
    with torch.no_grad():
        mine = backbone.intermediates(images, [1])[0]
        theirs = plain_maps.intermediates(images, [1])[0]
        block = backbone.attention_blocks()[0]
        torch.testing.assert_close(mine, block(theirs))
        twin = copy.deepcopy(backbone)
        twin.attention_blocks()[0].gamma.fill_(0.0)
        torch.testing.assert_close(twin.intermediates(images, [1])[0], theirs)
        torch.testing.assert_close(backbone.intermediates(images, [1])[0], mine)


# ---- the weights explain shows ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_weights_are_in_range_and_maps_have_the_stage_size(kind):
    images = torch.rand(2, 3, 64, 64)
    backbone = active(Backbone("resnet18", attention=kind))
    records = backbone.plugin_weights(images)
    blocks = backbone.attention_blocks()
    assert [b.module_name for b in blocks] == ["layer1", "layer2", "layer3", "layer4"]
    stage_maps = backbone.intermediates(images, [b.level for b in blocks])
    for record, stage in zip(records, stage_maps, strict=True):
        c, h, w = stage.shape[1:]
        if kind in ("se", "cbam"):
            assert record["channel"].shape == (2, c)
            assert record["channel"].min() >= 0 and record["channel"].max() <= 1
        if kind == "cbam":
            assert record["spatial"].shape == (2, h, w)  # at the feature map's size
            assert record["spatial"].min() >= 0 and record["spatial"].max() <= 1
        if kind == "sk":
            branches = record["branches"]
            assert branches.shape == (2, 2, c)
            assert branches.min() >= 0 and branches.max() <= 1
            torch.testing.assert_close(branches.sum(1), torch.ones(2, c))
    maps = backbone.plugin_maps(images)
    if kind == "cbam":
        assert list(maps) == [f"cbam-spatial-layer{i}" for i in range(1, 5)]
        for heatmap in maps.values():
            assert heatmap.shape == (2, 64, 64) and 0 <= heatmap.min() <= heatmap.max() <= 1
    else:
        assert maps == {}
    views = backbone.plugin_views(images)
    (name,) = views
    assert name == ("sk branch weights" if kind == "sk" else f"{kind} channel weights")
    chart = views[name]
    assert chart.shape[:2] == (2, 3) and chart.min() >= 0 and chart.max() <= 1


# ---- the spatial transformer ---------------------------------------------------------------------
def test_our_grid_is_torchs_affine_grid():
    theta = torch.tensor([[[0.8, -0.3, 0.1], [0.2, 1.1, -0.2]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    expected = F.affine_grid(theta, (2, 3, 7, 5), align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 7, 5), expected)


@pytest.mark.parametrize("mode", ["affine", "similarity", "translation_scale"])
def test_stn_at_identity_reproduces_its_input(mode):
    stn = SpatialTransformer(mode)
    images = torch.rand(2, 3, 48, 40)
    torch.testing.assert_close(stn(images), images, rtol=0, atol=1e-5)


def test_similarity_and_translation_scale_parameters():
    zero = torch.zeros(1, 4)
    torch.testing.assert_close(stn_theta(zero, "similarity"), torch.eye(2, 3)[None])
    params = torch.tensor([[np.log(0.5), np.pi / 2, 0.1, -0.2]], dtype=torch.float32)
    expected = torch.tensor([[[0.0, -0.5, 0.1], [0.5, 0.0, -0.2]]])
    torch.testing.assert_close(stn_theta(params, "similarity"), expected)
    params = torch.tensor([[np.log(2.0), 0.3, 0.4]], dtype=torch.float32)
    expected = torch.tensor([[[2.0, 0.0, 0.3], [0.0, 2.0, 0.4]]])
    torch.testing.assert_close(stn_theta(params, "translation_scale"), expected)


def test_a_learned_zoom_samples_the_centre():
    """A translation_scale STN whose bias says scale 0.5 shows the image's centre, enlarged."""
    stn = SpatialTransformer("translation_scale")
    with torch.no_grad():
        stn.regress.bias.copy_(torch.tensor([np.log(0.5), 0.0, 0.0]))
    images = torch.zeros(1, 1, 8, 8).expand(1, 3, 8, 8).clone()
    images[:, :, 2:6, 2:6] = 1.0  # a bright centre square fills the whole view after zoom
    warped = stn(images)
    assert warped[:, :, 1:7, 1:7].min() > 0.99


def test_views_smaller_than_the_input_zoom_into_real_pixels():
    """model.stn_view_size: at identity the view is the input at the view's size (a 2 x 2
    mean); a 2x zoom into an input twice the view's side shows its centre pixels unchanged."""
    images = torch.rand(2, 3, 32, 32)
    stn = SpatialTransformer("translation_scale", view_size=16)
    torch.testing.assert_close(stn(images), F.avg_pool2d(images, 2), rtol=0, atol=1e-5)
    with torch.no_grad():
        stn.regress.bias.copy_(torch.tensor([np.log(0.5), 0.0, 0.0]))
    torch.testing.assert_close(stn(images), images[:, :, 8:24, 8:24], rtol=0, atol=1e-5)
    backbone = Backbone("resnet18", stn=True, stn_view_size=32).eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.rand(1, 3, 64, 64))
    assert features.shape[-2:] == (1, 1)  # the network saw 32 px views (stride 32), not 64
    with pytest.raises(ConfigError, match="model.stn_view_size: set, but there is no STN"):
        Backbone("resnet18", stn_view_size=16)


def test_gradients_reach_the_localisation_net():
    torch.manual_seed(0)
    stn = SpatialTransformer("affine")
    images = torch.rand(2, 3, 32, 32)
    target = torch.rand(2, 3, 32, 32)
    optimizer = torch.optim.SGD(stn.parameters(), lr=0.1)
    ((stn(images) - target) ** 2).mean().backward()
    assert stn.regress.weight.grad.abs().sum() > 0  # the transform responds to the loss
    assert all(p.grad is not None for p in stn.parameters())
    optimizer.step()
    optimizer.zero_grad()
    ((stn(images) - target) ** 2).mean().backward()
    first_conv = stn.features[0].weight
    assert first_conv.grad.abs().sum() > 0  # once the last layer moved, the whole net learns


def test_stn_warps_what_the_backbone_sees_and_explain_shows_it():
    backbone = Backbone("resnet18", stn=True).eval()
    with torch.no_grad():
        backbone.stn.regress.bias.copy_(torch.tensor([0.5, 0.0, 0.2, 0.0, 0.5, 0.0]))
    images = torch.rand(1, 3, 64, 64)
    plain = Backbone("resnet18").eval()
    plain.load_state_dict({k: v for k, v in backbone.state_dict().items() if "stn" not in k})
    with torch.no_grad():
        warped = backbone.warp(images)
        torch.testing.assert_close(backbone(images), plain(warped))
        torch.testing.assert_close(backbone.plugin_views(images)["stn: warped input"], warped)
    assert backbone.lr_scales() == [(backbone.stn, 0.1)]
    assert not {id(p) for p in backbone.stn.parameters()} & {
        id(p) for p in backbone.new_parameters()
    }


def test_a_pretrained_localisation_net_starts_at_identity_and_learns_slowly(tmp_path):
    """model.stn_localisation=backbone: the localisation net is a copy of the backbone with the
    same pretrained weights; the warp starts as the identity; the whole STN learns at
    stn_lr_scale and its norms count as pretrained (model.freeze_norm freezes them)."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = Backbone(
        "test_efficientnet", weights=path, stn=True, stn_localisation="backbone", stn_size=48
    ).eval()
    localisation = backbone.stn.localisation
    assert torch.equal(localisation.model.conv_stem.weight, source.conv_stem.weight)
    assert localisation.model.conv_stem.weight is not backbone.model.conv_stem.weight
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.warp(images), images, rtol=0, atol=1e-5)
    # Gradients reach the regressor at once (the pretrained features are not zero).
    backbone.train()
    backbone(images).sum().backward()
    assert backbone.stn.regress.weight.grad.abs().sum() > 0
    method = build_method(
        Config.load(
            None,
            [
                "model.pretrained=false",
                "model.stn=true",
                "model.stn_localisation=backbone",
                "model.stn_lr_scale=0.2",
                "model.backbone=test_efficientnet",
            ],
        ),
        3,
    )
    groups = parameter_groups(method, OptimConfig(head_lr_scale=5.0))
    slow = {id(p) for g in groups if g.get("lr_scale") == 0.2 for p in g["params"]}
    assert slow == {id(p) for p in method.backbone.stn.parameters()}
    norms = {id(m) for m in pretrained_norms(method)}
    assert {
        id(m) for m in method.backbone.stn.localisation.modules() if isinstance(m, NORM_TYPES)
    } <= norms


def test_a_fixed_size_localisation_net_must_take_stn_size():
    with pytest.raises(ConfigError, match=r"model.stn_size: 64.*takes 32 x 32 images only"):
        Backbone(
            "vit_tiny_patch16_224", stn=True, stn_localisation="backbone", kwargs={"img_size": 32}
        )
    with pytest.raises(ConfigError, match="model.stn_localisation: expected 'scratch' or"):
        Backbone("resnet18", stn=True, stn_localisation="imagenet")


def test_a_model_with_a_pretrained_localisation_net_saves_and_loads(tmp_path):
    cfg = Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            "data.image_size=64",
            "data.crop_pct=1.0",
            "model.stn=true",
            "model.stn_mode=translation_scale",
            "model.stn_localisation=backbone",
        ],
    )
    torch.manual_seed(0)
    method = build_method(cfg, 3).eval()
    with torch.no_grad():
        method.backbone.stn.regress.weight.normal_(0, 0.05)  # a warp that depends on the image
    save_run_model(
        tmp_path, method.for_inference(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic"
    )
    predictor = Predictor.load(tmp_path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(predictor.method(images), method.for_inference()(images))


# ---- stages, config, learning rates, weight sources ---------------------------------------------
def test_chosen_stages_and_bad_ones():
    lite = Backbone("test_efficientnet", attention="se", attention_stages=[0, -1])
    assert [b.module_name for b in lite.attention_blocks()] == ["blocks.0", "blocks.4"]
    default = Backbone("test_efficientnet", attention="se")  # from stride 4 on
    assert [b.level for b in default.attention_blocks()] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"7 is not a stage.*0: blocks\.0 \(16 ch, stride 2\)"):
        Backbone("test_efficientnet", attention="cbam", attention_stages=[7])


def test_transformers_are_refused_with_a_reason_but_take_the_stn():
    kwargs = {"img_size": 64}
    with pytest.raises(ConfigError, match="transformer.*model.stn works with any backbone"):
        Backbone("vit_tiny_patch16_224", attention="se", kwargs=kwargs)
    vit = Backbone("vit_tiny_patch16_224", stn=True, kwargs=kwargs).eval()
    with torch.no_grad():
        assert vit(torch.rand(1, 3, 64, 64)).shape == (1, vit.num_features)


def test_config_keys_are_checked():
    cfg = Config.load(None, ["model.attention=cbam", "model.attention_stages=[2, 3]"])
    assert cfg.model.attention == "cbam" and cfg.model.attention_stages == [2, 3]
    with pytest.raises(ConfigError, match="model.attention: expected 'none' | 'se'"):
        Config.load(None, ["model.attention=eca"])
    with pytest.raises(ConfigError, match="model.stn_mode"):
        Config.load(None, ["model.stn_mode=projective"])
    with pytest.raises(ConfigError, match="model.attention_reduction"):
        Config.load(None, ["model.attention_reduction=0"])


def test_new_blocks_learn_at_the_head_rate_and_other_networks_stay_plain():
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "model.attention=se",
            "model.stn=true",
            "model.stn_lr_scale=0.25",
            "method.name=tasn",
            "method.attention_backbone=test_efficientnet",
            "method.attention_channels=8",
        ],
    )
    method = build_method(cfg, 3)
    assert method.backbone.attention_blocks() and method.backbone.stn is not None
    # The plug-ins belong to model.backbone; TASN's attention network is another one.
    assert not method.attention_net.backbone.has_plugins()
    groups = parameter_groups(method, OptimConfig(head_lr_scale=5.0))
    fast = {id(p) for g in groups if g.get("lr_scale") == 5.0 for p in g["params"]}
    assert {id(p) for p in method.backbone.new_parameters()} <= fast
    conv1 = method.backbone.model.conv1.weight
    assert id(conv1) not in fast
    # The STN learns at its own (slow) rate, every parameter of it exactly once.
    slow = [id(p) for g in groups if g.get("lr_scale") == 0.25 for p in g["params"]]
    assert sorted(slow) == sorted(id(p) for p in method.backbone.stn.parameters())
    everything = [id(p) for g in groups for p in g["params"]]
    assert len(everything) == len(set(everything)) == len(list(method.parameters()))


def test_blocks_of_pruned_stages_go_with_them():
    """TASN's attention network named like model.backbone gets the plug-ins too; cut after
    stage 2 it keeps only the blocks it runs, so every parameter still learns."""
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "data.image_size=64",
            "model.attention=se",
            "method.name=tasn",
            "method.attention_backbone=resnet18",
            "method.attention_stage=2",
            "method.attention_output_stride=0",
            "method.attention_channels=8",
        ],
    )
    torch.manual_seed(0)
    model = build_method(cfg, 3).train()
    kept = model.attention_net.backbone.attention_blocks()
    assert [b.module_name for b in kept] == ["layer1", "layer2"]
    assert len(model.backbone.attention_blocks()) == 4
    model.training_losses(Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 1])))["loss"].backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unreached, unreached[:5]


def test_weights_from_a_file_and_from_the_hub_path_load_around_the_blocks(tmp_path, monkeypatch):
    source = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = Backbone("test_efficientnet", weights=path, attention="sk")
    assert torch.equal(loaded.model.conv_stem.weight, source.conv_stem.weight)
    # timm's hub loads inside timm.create_model: the blocks go in afterwards.
    calls = []

    def hub(name, pretrained, kwargs):
        calls.append(pretrained)
        return timm.create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(backbones, "_create", hub)
    model = create_timm_model(
        "test_efficientnet",
        pretrained=True,
        edit=backbones._attention_edit("cbam", [], 16, "test_efficientnet"),
        new_prefixes=["attention_blocks."],
    )
    assert calls == [True] and len(model.attention_blocks) == 4


# ---- with other methods, saved and explained -------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [("dcl", ["method.regions=2", "method.neighbourhood=1"]), ("ramstrans", [])],
)
def test_plugins_train_with_other_methods(method, options):
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "data.image_size=64",
            "model.attention=cbam",
            "model.stn=true",
            f"method.name={method}",
            *options,
        ],
    )
    torch.manual_seed(0)
    model = build_method(cfg, 3).train()
    losses = model.training_losses(Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert model.backbone.attention_blocks()[0].gamma.grad is not None
    assert model.backbone.stn.regress.weight.grad is not None
    maps = model.explain_maps(torch.rand(1, 3, 64, 64))
    assert "cbam-spatial-layer4" in maps
    assert list(maps)[0] != "cbam-spatial-layer1"  # the method's own map stays the default


def test_explain_figure_shows_the_chart_and_the_warped_input(tmp_path):
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "data.image_size=64",
            "data.crop_pct=1.0",
            "model.attention=cbam",
            "model.stn=true",
        ],
    )
    method = build_method(cfg, 3).eval()
    save_run_model(
        tmp_path, method.for_inference(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic"
    )
    predictor = Predictor.load(tmp_path)
    picture = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    explanation = predictor.explain(picture, map_name="cbam-spatial-layer3")
    assert explanation.map_name == "cbam-spatial-layer3"
    assert list(explanation.views) == ["stn: warped input", "cbam channel weights"]
    assert explanation.views["stn: warped input"].size == (64, 64)
    with pytest.raises(ConfigError, match="cbam-spatial-layer1"):
        predictor.explain(picture, map_name="nope")
    # The figure `lookcloser explain` writes has the two extra panels.
    image = tmp_path / "bird.png"
    picture.save(image)
    out = api.explain(tmp_path, image, tmp_path / "explained.png", map_name="cbam-spatial-layer2")
    assert Image.open(out).width > 3.5 * Image.open(out).height  # input, overlay and 2 views


# ---- recipes ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
PLUGIN_RECIPES = sorted(
    p for kind in ("se", "sk", "cbam", "stn") for p in (REPO / "configs").glob(f"*/{kind}-*.yaml")
)


def test_the_plugin_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in PLUGIN_RECIPES}
    datasets = ("synthetic", "flowers12", "butterflies10", "cars66")
    assert {f"{d}/{k}-lite0.yaml" for d in datasets for k in ("se", "sk", "cbam", "stn")} <= names


@pytest.mark.parametrize("path", PLUGIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plugin_recipes_load_and_build(path):
    from lookcloser.api import check_config

    cfg = Config.load(path, ["data.root=/nonexistent"])
    assert cfg.data.root == "/nonexistent"  # recipes name no data folder
    check_config(cfg)
    assert cfg.model.attention != "none" or cfg.model.stn
    cfg.model.pretrained = False
    method = build_method(cfg, 4).eval()
    assert method.backbone.has_plugins()
    size = cfg.data.image_size
    with torch.no_grad():
        assert method(torch.rand(1, 3, size, size)).shape == (1, 4)
