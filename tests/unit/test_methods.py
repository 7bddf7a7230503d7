"""The Method contract's open ends: heads, backbone factories, parameter groups, training-only
parts and methods defined outside the package."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.engine.module import FGVCSystem, parameter_groups
from lookcloser.errors import ConfigError, ModelDirError
from lookcloser.methods import build_method
from lookcloser.methods.base import METHODS, Method, method_class, register_method
from lookcloser.methods.baseline import Baseline
from lookcloser.models.backbones import Backbone
from lookcloser.models.heads import HEADS, build_head, register_head

TINY = "test_efficientnet"  # 5 one-block stages; timm's group_matcher gives layer-decay depths


def tiny_cfg(*overrides: str) -> Config:
    return Config.load(None, [f"model.backbone={TINY}", "model.pretrained=false", *overrides])


@pytest.fixture
def registries():
    """Methods and heads registered by a test are gone after it."""
    methods, heads = dict(METHODS), dict(HEADS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    HEADS.clear()
    HEADS.update(heads)


# ---- heads ------------------------------------------------------------------------------------
def test_unknown_head_lists_the_registered_ones():
    available = "arcface, cosine, linear, prototype, subcenter_arcface"
    with pytest.raises(
        ConfigError, match=f"model.head: unknown head 'cos'; available: {available}"
    ):
        build_head("cos", 8, 3)
    with pytest.raises(ConfigError, match="unknown head 'cos'"):
        build_method(tiny_cfg("model.head=cos"), 3)
    from lookcloser.api import check_config

    with pytest.raises(ConfigError, match="unknown head 'cos'"):
        check_config(tiny_cfg("model.head=cos"))


def test_methods_build_their_class_heads_from_the_registry(registries):
    """model.head picks the class head of every method; DCL's adversary stays a Linear."""

    class Scaled(nn.Linear):
        pass

    @register_head("scaled")
    def scaled(in_features: int, num_classes: int) -> nn.Module:
        return Scaled(in_features, num_classes)

    baseline = build_method(tiny_cfg("model.head=scaled"), 3)
    assert type(baseline.head) is Scaled and baseline.head.out_features == 3
    dcl = build_method(tiny_cfg("model.head=scaled", "method.name=dcl", "method.regions=2"), 3)
    assert type(dcl.head) is Scaled and type(dcl.adversary) is nn.Linear
    assert type(build_method(tiny_cfg(), 3).head) is nn.Linear


# ---- model.kwargs in saved models -----------------------------------------------------------------
def test_vit_with_img_size_reloads_from_its_model_directory(tmp_path):
    """model.json keeps model.kwargs, so Predictor.load rebuilds the 96 px ViT."""
    from lookcloser.predictor import Predictor
    from lookcloser.training import save_run_model

    cfg = Config.load(
        None,
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.pretrained=false",
            "model.kwargs.img_size=96",
            "data.image_size=96",
        ],
    )
    method = build_method(cfg, 3).eval()
    save_run_model(tmp_path, method, TrainingData(["a", "b", "c"]), cfg, {}, "bicubic")
    predictor = Predictor.load(tmp_path)
    assert predictor.method.backbone.model.patch_embed.grid_size == (6, 6)
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(predictor.logits(images), method(images))


# ---- several backbones through the factory ------------------------------------------------------
class TwoNetworks(Baseline):
    """A method with a second backbone of another architecture (as TASN has)."""

    name = "test-two-networks"

    def __init__(self, backbone, num_classes, options=None, second=None, **kwargs):
        super().__init__(backbone, num_classes, options, **kwargs)
        self.second = second
        self.second_head = self.make_head(second.num_features)

    @classmethod
    def build(cls, make_backbone, num_classes, options, **kwargs):
        return cls(
            make_backbone(), num_classes, options, second=make_backbone("test_vit"), **kwargs
        )

    def new_modules(self):
        return [self.head, self.second_head]


def test_a_method_builds_two_backbones(registries):
    register_method(TwoNetworks)
    method = build_method(tiny_cfg("method.name=test-two-networks"), 3)
    assert method.backbone.name == TINY and method.second.name == "test_vit"
    groups = parameter_groups(method, tiny_cfg("optim.layer_decay=0.5").optim)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters())  # each once
    second = {id(p) for p in method.second.parameters()}
    scales = {g.get("lr_scale", 1.0) for g in groups if second & {id(p) for p in g["params"]}}
    assert len(scales) > 2  # the second backbone gets its own layer-decay depths


# ---- parameter groups ---------------------------------------------------------------------------
class ZeroResidual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class WithInsertedBlock(Baseline):
    """A baseline with a new block inside the backbone's stage 1 (declared as new)."""

    name = "test-inserted-block"

    @classmethod
    def build(cls, make_backbone, num_classes, options, **kwargs):
        def insert(model: nn.Module) -> None:
            model.blocks[1].append(ZeroResidual(model.blocks[1][-1].conv_pwl.out_channels))

        backbone = make_backbone(edit=insert, new_prefixes=["blocks.1.1."])
        return cls(backbone, num_classes, options, **kwargs)


def scales_by_name(method: Method, optim) -> dict[str, float]:
    groups = parameter_groups(method, optim)
    by_id = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in method.named_parameters()}


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_new_block_inside_the_backbone_gets_the_head_rate(registries, layer_decay):
    register_method(WithInsertedBlock)
    overrides = ["optim.head_lr_scale=10"]
    if layer_decay is not None:
        overrides.append(f"optim.layer_decay={layer_decay}")
    optim = tiny_cfg(*overrides).optim
    plain = scales_by_name(build_method(tiny_cfg(), 3), optim)
    method = build_method(tiny_cfg("method.name=test-inserted-block"), 3)
    inserted = scales_by_name(method, optim)
    new = {n for n in inserted if n.startswith("backbone.model.blocks.1.1.")}
    assert new == {"backbone.model.blocks.1.1.conv.weight", "backbone.model.blocks.1.1.conv.bias"}
    assert all(inserted[n] == 10 for n in new) and inserted["head.weight"] == 10
    # Every pretrained tensor keeps the scale it has without the new block.
    assert {n: inserted[n] for n in plain} == plain
    depths = {v for n, v in plain.items() if n.startswith("backbone.")}
    # Layer decay gives depths from the stem (smallest) to the last conv (1.0).
    assert len(depths) == 1 if layer_decay is None else len(depths) > 4


# ---- training-only parts ------------------------------------------------------------------------
class WithAuxiliary(Baseline):
    name = "test-auxiliary"
    training_only = ("aux",)

    def __init__(self, backbone, num_classes, options=None, **kwargs):
        super().__init__(backbone, num_classes, options, **kwargs)
        self.aux = nn.Linear(backbone.num_features, 2)


def test_for_inference_drops_training_only_parts_and_shares_the_rest():
    method = WithAuxiliary(Backbone(TINY), 3)
    inference = method.for_inference()
    assert inference is not method and inference.inference_only and not method.inference_only
    assert "aux" not in dict(inference.named_children()) and "aux" in dict(method.named_children())
    assert not any(n.startswith("aux.") for n in inference.state_dict())
    assert inference.backbone is method.backbone and inference.head is method.head
    assert inference.for_inference() is inference  # nothing left to drop
    method.register_buffer("extra", torch.zeros(1))  # the copy's registries are its own
    assert "extra" not in inference.state_dict()
    with pytest.raises(ConfigError, match="inference form"):
        FGVCSystem(inference, tiny_cfg().optim, epochs=1)
    assert Baseline(Backbone(TINY), 3).for_inference().inference_only is False


# ---- methods defined outside the package ----------------------------------------------------------
PLUGIN = '''
from lookcloser.methods.base import register_method
from lookcloser.methods.baseline import Baseline


@register_method
class Plugged(Baseline):
    """A method that lives outside lookcloser."""

    name = "{name}"
'''


def write_plugin(folder: Path, module: str, name: str) -> None:
    (folder / f"{module}.py").write_text(textwrap.dedent(PLUGIN.format(name=name)))


def forget(module: str, name: str) -> None:
    """As a fresh process would be: neither the module nor its method known."""
    sys.modules.pop(module, None)
    METHODS.pop(name, None)


def test_method_from_an_importable_module(tmp_path, monkeypatch, registries):
    from lookcloser.predictor import Predictor
    from lookcloser.training import save_run_model

    write_plugin(tmp_path, "lc_plugin_methods", "plugged")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown method 'plugged'.*method.module"):
        build_method(tiny_cfg("method.name=plugged"), 3)
    cfg = tiny_cfg("method.module=lc_plugin_methods", "method.name=plugged")
    method = build_method(cfg, 3).eval()
    assert type(method).__module__ == "lc_plugin_methods" and method.name == "plugged"

    run_dir = tmp_path / "run"
    save_run_model(run_dir, method, TrainingData(["a", "b", "c"]), cfg, {}, "bicubic")
    forget("lc_plugin_methods", "plugged")
    with pytest.raises(ModelDirError, match="--trust-module lc_plugin_methods"):
        Predictor.load(run_dir)  # a model directory never imports a module by itself
    predictor = Predictor.load(run_dir, trust_modules=["lc_plugin_methods"])
    assert type(predictor.method).__module__ == "lc_plugin_methods"
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(predictor.logits(images), method(images))
    forget("lc_plugin_methods", "plugged")


def test_unknown_method_module_is_named():
    with pytest.raises(ConfigError, match=r"method.module: cannot import 'no_such_methods_mod'"):
        method_class("plugged", "no_such_methods_mod")
    with pytest.raises(ConfigError, match="no_such_methods_mod"):
        build_method(tiny_cfg("method.module=no_such_methods_mod", "method.name=x"), 3)


def test_method_from_an_entry_point(tmp_path, monkeypatch, registries):
    """An installed distribution's `lookcloser.methods` entry point is loaded on demand."""
    write_plugin(tmp_path, "lc_ep_methods", "ep-plugged")
    info = tmp_path / "lc_ep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lc-ep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[lookcloser.methods]\nep-plugged = lc_ep_methods:Plugged\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ep-plugged" not in METHODS
    assert method_class("ep-plugged").__module__ == "lc_ep_methods"
    with pytest.raises(ConfigError, match="available: .*ep-plugged"):
        method_class("nope")
    forget("lc_ep_methods", "ep-plugged")


class SlowStem(Baseline):
    """A baseline whose pretrained stem learns at its own rate (Method.lr_scales)."""

    name = "test-slow-stem"

    def lr_scales(self):
        return [(self.backbone.model.conv_stem, 0.01)]


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_a_pretrained_module_at_its_own_rate_is_in_one_group(registries, layer_decay):
    register_method(SlowStem)
    overrides = [] if layer_decay is None else [f"optim.layer_decay={layer_decay}"]
    optim = tiny_cfg(*overrides).optim
    method = build_method(tiny_cfg("method.name=test-slow-stem"), 3)
    grouped = [id(p) for g in parameter_groups(method, optim) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters())  # each once
    scales = scales_by_name(method, optim)
    slow = {name for name, scale in scales.items() if scale == 0.01}
    assert slow == {n for n, _ in method.named_parameters() if ".conv_stem." in n}
