"""Margin heads (model.head=cosine|arcface|subcenter_arcface): the logits, the margin the loss
sees, their options, and the closed-form input gradient DCN's saliency needs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.models.fusion import FusedHead, MetaFusion
from lookcloser.models.gradients import input_gradient
from lookcloser.models.heads import CosineHead, HeadSpec, additive_angular_margin, build_head

S = 16.0


def scaled_cosines(head: CosineHead, x: torch.Tensor) -> torch.Tensor:
    """What a scaled cosine classifier computes, written out."""
    return S * F.normalize(x, dim=-1) @ F.normalize(head.weight, dim=-1).t()


def test_arcface_with_margin_zero_is_a_scaled_cosine_classifier():
    torch.manual_seed(0)
    head = build_head("arcface", 8, 5, scale=S, margin=0.0)
    x, targets = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head(x)
    torch.testing.assert_close(logits, scaled_cosines(head, x))
    spec = HeadSpec("arcface", scale=S, margin=0.0)
    torch.testing.assert_close(spec.training_logits(logits, targets), logits)
    assert (logits.abs() <= S + 1e-5).all()


def test_arcface_target_logit_is_cos_of_angle_plus_margin():
    torch.manual_seed(0)
    m = 0.4
    spec = HeadSpec("arcface", scale=S, margin=m)
    head = spec.build(8, 5)
    x, targets = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head(x)
    trained = spec.training_logits(logits, targets)
    rows = torch.arange(6)
    theta = torch.acos(logits[rows, targets] / S)
    inside = theta + m <= math.pi
    assert inside.all()  # random 8-d vectors: no angle near pi here
    torch.testing.assert_close(trained[rows, targets], S * torch.cos(theta + m))
    others = torch.ones_like(logits, dtype=torch.bool)
    others[rows, targets] = False
    torch.testing.assert_close(trained[others], logits[others])  # only the target moves
    assert (trained[rows, targets] < logits[rows, targets]).all()


def test_margin_keeps_falling_past_pi_minus_m():
    """Near theta = pi, cos(theta + m) would rise again; the logit keeps falling and is
    continuous at the boundary."""
    m = 0.5
    theta = torch.tensor([math.pi - m - 1e-4, math.pi - m + 1e-4, math.pi - 0.1, math.pi])
    logits = S * torch.cos(theta)[:, None]
    out = additive_angular_margin(logits, torch.zeros(4, dtype=torch.long), S, m)[:, 0] / S
    assert (out[1:] <= out[:-1]).all()
    assert abs(out[0] - out[1]) < 1e-3 and abs(out[-1] - (-2 + math.cos(m))) < 1e-4


def test_margin_with_class_probabilities_follows_each_share():
    """Mixup targets: a one-hot row equals its class index; a 50/50 row moves each of the two
    logits halfway to its margin value."""
    torch.manual_seed(0)
    logits = S * torch.rand(3, 4).mul(2).sub(1)
    index = torch.tensor([1, 2, 3])
    by_index = additive_angular_margin(logits, index, S, 0.3)
    by_probs = additive_angular_margin(logits, F.one_hot(index, 4).float(), S, 0.3)
    torch.testing.assert_close(by_probs, by_index)
    mixed = torch.zeros(3, 4)
    mixed[:, 0] = mixed[:, 1] = 0.5
    half = additive_angular_margin(logits, mixed, S, 0.3)
    full = additive_angular_margin(logits, torch.zeros(3, dtype=torch.long), S, 0.3)
    torch.testing.assert_close(half[:, 0], (logits[:, 0] + full[:, 0]) / 2)
    torch.testing.assert_close(half[:, 2:], logits[:, 2:])


def test_subcenter_head_takes_the_closest_centre():
    head = build_head("subcenter_arcface", 2, 2, scale=S, subcenters=3)
    with torch.no_grad():  # class 0: centres at 0, 90, 180 degrees; class 1: at 45 degrees x3
        head.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [1, 1], [1, 1], [1, 1]]))
    x = torch.tensor([[0.0, 2.0], [-3.0, 0.1], [1.0, 1.0]])
    cos = F.normalize(x, dim=-1) @ F.normalize(head.weight, dim=-1).t()
    expected = S * cos.view(3, 2, 3).amax(-1)
    torch.testing.assert_close(head(x), expected)
    assert head(x)[0, 0].item() == pytest.approx(S)  # the 90-degree centre of class 0 matches x[0]


@pytest.mark.parametrize("name", ["linear", "cosine", "subcenter_arcface", "fused"])
def test_closed_form_input_gradient_equals_autograd(name):
    """DCN's saliency differentiates through the head without autograd (it must export)."""
    torch.manual_seed(0)
    if name == "fused":
        fusion = MetaFusion(["latitude", "longitude"], 6, "concat", hidden=4)
        head = FusedHead(fusion, build_head("cosine", fusion.out_features, 5))
    else:
        head = build_head(name, 6, 5)
    x = torch.randn(3, 6, requires_grad=True)
    grad = torch.randn(3, 5)
    (expected,) = torch.autograd.grad((head(x) * grad).sum(), x)
    torch.testing.assert_close(input_gradient(head, x.detach(), grad), expected)


def test_head_options_reach_the_head_and_wrong_ones_are_named():
    assert HeadSpec("cosine", scale=7.0).build(4, 3).scale == 7.0
    assert HeadSpec("subcenter_arcface", subcenters=4).build(4, 3).weight.shape == (12, 4)
    with pytest.raises(ConfigError, match="model.head_margin: model.head=linear has no margin"):
        HeadSpec("linear", margin=0.2).build(4, 3)
    with pytest.raises(ConfigError, match="model.head_subcenters: .* subcenter_arcface"):
        HeadSpec("arcface", subcenters=2).build(4, 3)
    with pytest.raises(ConfigError, match="model.head_margin"):
        Config.load(None, ["model.head_margin=2"])
    from lookcloser.api import check_config

    with pytest.raises(ConfigError, match="model.head_scale: model.head=linear"):
        check_config(Config.load(None, ["model.head_scale=10"]))


def tiny(*overrides: str) -> Config:
    return Config.load(
        None, ["model.backbone=test_efficientnet", "model.pretrained=false", *overrides]
    )


def test_method_class_loss_applies_the_configured_margin():
    torch.manual_seed(0)
    method = build_method(tiny("model.head=arcface", "model.head_margin=0.5"), 3)
    assert isinstance(method.head, CosineHead)
    logits, targets = method.head(torch.randn(4, method.backbone.num_features)), torch.arange(4) % 3
    margin = additive_angular_margin(logits, targets, 30.0, 0.5)
    torch.testing.assert_close(method.class_loss(logits, targets), F.cross_entropy(margin, targets))
    linear = build_method(tiny(), 3)
    torch.testing.assert_close(linear.class_loss(logits, targets), F.cross_entropy(logits, targets))


def test_a_training_step_with_arcface_lowers_the_margin_loss():
    """The margin trains: a few steps on one batch lower the baseline's loss."""
    torch.manual_seed(0)
    method = build_method(tiny("model.head=arcface", "data.image_size=32"), 3).train()
    batch = Batch(torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss = method.training_losses(batch)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


def test_linear_head_is_unchanged():
    """Existing model directories keep loading: the default head is still a plain Linear."""
    head = HeadSpec().build(4, 3)
    assert type(head) is nn.Linear and set(head.state_dict()) == {"weight", "bias"}


# ---- the strong recipe (configs/<set>/strong-lite0.yaml) -------------------------------------
STRONG_RECIPES = sorted(
    (Path(__file__).resolve().parents[2] / "configs").glob("*/strong-lite0.yaml")
)


def test_every_real_set_has_a_strong_recipe():
    assert {p.parent.name for p in STRONG_RECIPES} == {"flowers12", "butterflies10", "cars66"}


@pytest.mark.parametrize("path", STRONG_RECIPES, ids=lambda p: p.parent.name)
def test_strong_recipes_check_and_build_an_arcface_model_with_flip_tta(path):
    from lookcloser.api import check_config

    cfg = check_config(Config.load(path, ["data.root=/nonexistent", "model.pretrained=false"]))
    assert (cfg.model.head, cfg.model.head_scale, cfg.model.head_margin) == ("arcface", 30.0, 0.3)
    assert cfg.model.tta == "flip"
    # The baseline's budget: the settings benchmarks/accuracy.py gives its baseline.
    assert (cfg.trainer.epochs, cfg.data.image_size, cfg.optim.lr) == (5, 128, 0.002)
    method = build_method(cfg, 4).eval()
    with torch.no_grad():
        logits = method(torch.rand(2, 3, 128, 128))
    assert logits.shape == (2, 4) and logits.abs().max() <= 30.0 + 1e-4  # scaled cosines
