"""RA-CNN: the boxcar crop-and-zoom, the ranking loss, the APN's squares, the highest-response
square, the alternating training by step, prediction from fused scales, export, explain and
the recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lookcloser.config import Config, OptimConfig
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.engine.module import parameter_groups
from lookcloser.errors import ConfigError
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import build_method
from lookcloser.methods.racnn import (
    AttentionProposal,
    boxcar_zoom,
    highest_response_square,
    ranking_loss,
    square_box,
    true_class_probability,
)
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

REPO = Path(__file__).resolve().parents[2]


def tiny_config(*overrides: str) -> Config:
    return Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "data.image_size=64",
            "data.crop_pct=1.0",
            "method.name=racnn",
            "method.apn_channels=8",
            "method.apn_hidden=16",
            *overrides,
        ],
    )


def tiny(*overrides: str):
    torch.manual_seed(0)
    return build_method(tiny_config(*overrides), 3)


# ---- crop and zoom ----------------------------------------------------------------------------
def test_a_crop_of_the_whole_image_reproduces_it():
    images = torch.rand(2, 3, 32, 32)
    whole = torch.tensor([[16.0, 16.0, 16.0]]).expand(2, 3)
    crops = boxcar_zoom(images, whole, (32, 32), sharpness=10.0)
    # Inside, exactly the image; on the outermost pixels the boxcar's soft edge: sigmoid(5).
    torch.testing.assert_close(crops[..., 1:-1, 1:-1], images[..., 1:-1, 1:-1])
    edge = torch.sigmoid(torch.tensor(5.0)) - torch.sigmoid(torch.tensor(-315.0))
    torch.testing.assert_close(crops[..., 0, 16], images[..., 0, 16] * edge)
    assert (crops - images).abs().max() < 0.014  # within the edge's 1.3 % everywhere


def test_a_crop_is_the_square_enlarged():
    images = torch.rand(1, 3, 32, 32)
    square = torch.tensor([[12.0, 20.0, 8.0]])  # x 4..20, y 12..28
    crops = boxcar_zoom(images, square, (32, 32), sharpness=1000.0)
    expected = F.interpolate(
        images[:, :, 12:28, 4:20], size=(32, 32), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(crops[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    assert square_box(square).tolist() == [[4.0, 12.0, 20.0, 28.0]]


def test_the_crop_is_differentiable_in_the_square():
    images = torch.rand(1, 3, 32, 32)
    square = torch.tensor([[14.0, 15.0, 9.0]], requires_grad=True)
    boxcar_zoom(images, square, (32, 32), sharpness=10.0).mean().backward()
    assert (square.grad.abs() > 0).all()


# ---- the ranking loss -------------------------------------------------------------------------
def test_ranking_loss_is_zero_once_the_finer_scale_is_surer_by_the_margin():
    coarse = torch.tensor([0.5, 0.25])  # binary fractions: "by exactly the margin" is exact
    assert ranking_loss(coarse, coarse + 0.125, margin=0.125) == 0
    assert ranking_loss(coarse, coarse + 0.3, margin=0.05) == 0
    assert ranking_loss(coarse, coarse + 0.01, margin=0.05) > 0
    torch.testing.assert_close(ranking_loss(coarse, coarse - 0.1, 0.05), torch.tensor(0.15))
    # Only the pairs short of the margin count, averaged over the batch.
    torch.testing.assert_close(
        ranking_loss(coarse, torch.tensor([0.75, 0.25]), 0.125), torch.tensor(0.0625)
    )


def test_true_class_probability_with_indices_and_soft_targets():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    torch.testing.assert_close(
        true_class_probability(logits, torch.tensor([0, 2])), torch.tensor([0.7, 0.8])
    )
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(true_class_probability(logits, soft), torch.tensor([0.45, 0.8]))


# ---- squares ----------------------------------------------------------------------------------
def test_apn_squares_stay_inside_and_no_smaller_than_min_crop():
    torch.manual_seed(0)
    apn = AttentionProposal(16, 8, 4, 16, min_crop=0.25)
    torch.nn.init.normal_(apn.fc[-1].weight, std=50.0)  # push the sigmoids to their ends
    squares = apn(torch.randn(64, 16, 3, 3), (48, 64))
    tx, ty, tl = squares.unbind(-1)
    assert (tl >= 0.125 * 48 - 1e-4).all() and (tl <= 24 + 1e-4).all()
    assert (tx - tl >= -1e-4).all() and (tx + tl <= 64 + 1e-4).all()
    assert (ty - tl >= -1e-4).all() and (ty + tl <= 48 + 1e-4).all()
    fresh = AttentionProposal(16, 8, 4, 16, min_crop=1 / 3)(torch.randn(2, 16, 3, 3), (48, 48))
    torch.testing.assert_close(fresh, torch.tensor([[24.0, 24.0, 16.0]] * 2))  # centred


def test_highest_response_square_centres_on_the_peak_and_stays_inside():
    features = torch.zeros(2, 4, 8, 8)
    features[0, :, 5, 2] = 10.0  # a peak at row 5, column 2 (cells of 8 px)
    features[1, :, 0, 7] = 10.0  # in a corner: the square is pushed inside
    squares = highest_response_square(features, (64, 64), share=0.25)  # 16 px: 2 x 2 cells
    tx, ty, tl = squares[0]
    assert tl == 8 and 16 <= tx <= 24 and 40 <= ty <= 48  # covers the peak cell x 16..24
    x0, y0, x1, y1 = square_box(squares)[1].tolist()
    assert x1 == 64 and y0 == 0 and x1 - x0 == 16


# ---- the alternation --------------------------------------------------------------------------
def grads(modules) -> list:
    return [p.grad for m in modules for p in m.parameters()]


def test_phases_follow_the_step_counter():
    model = tiny("method.apn_pretrain_steps=2", "method.cls_steps=3", "method.apn_steps=2")
    phases = [model.phase(step) for step in range(10)]
    assert phases == ["pretrain"] * 2 + ["classify"] * 3 + ["propose"] * 2 + ["classify"] * 3


def test_each_phase_trains_what_the_paper_trains():
    model = tiny(
        "method.scales=3",
        "method.apn_pretrain_steps=1",
        "method.cls_steps=1",
        "method.apn_steps=1",
        "method.margin=0.9",  # an untrained finer scale is short of it: the loss is positive
    ).train()
    batch = Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 2]))
    classifiers = [*model.scale_backbones(), model.heads, model.fusion]

    # Pretraining: APNs regress onto the highest-response squares; classifiers learn too.
    losses = model.training_losses(batch)
    assert {"apn_pretrain", "scale1", "scale3", "fusion"} <= set(losses)
    losses["loss"].backward()
    assert all(g is not None for g in grads(model.apns))
    assert all(g is not None for g in grads(classifiers))
    model.zero_grad(set_to_none=True)

    # Classification: APNs fixed (no gradient at all, so the optimizer skips them).
    losses = model.training_losses(batch)
    assert float(losses["phase"]) == 1 and "rank12" not in losses
    losses["loss"].backward()
    assert all(g is None for g in grads(model.apns))
    assert model.backbone.model.conv1.weight.grad is not None
    model.zero_grad(set_to_none=True)

    # Proposal: only the ranking loss, only the APNs learn; requires_grad comes back after.
    losses = model.training_losses(batch)
    assert float(losses["phase"]) == 2 and set(losses) == {"loss", "rank12", "rank23", "phase"}
    assert losses["loss"] > 0
    losses["loss"].backward()
    assert all(g is None for g in grads(classifiers))
    for apn in model.apns:  # both APNs move: the first's square shapes both later scales
        assert apn.fc[-1].weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())
    assert int(model.steps_done) == 3


def test_the_step_counter_is_saved_with_the_weights():
    model = tiny("method.apn_pretrain_steps=0", "method.cls_steps=1", "method.apn_steps=1")
    model.training_losses(Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 1])))
    again = tiny("method.apn_pretrain_steps=0", "method.cls_steps=1", "method.apn_steps=1")
    again.load_state_dict(model.state_dict())
    assert int(again.steps_done) == 1 and again.phase() == "propose"


@pytest.mark.parametrize("predict_from", ["fusion", "sum", "last"])
def test_prediction_from_the_scales(predict_from):
    model = tiny(f"method.predict_from={predict_from}").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        looks = model.look_closer(images)
        logits = model(images)
    assert len(looks.logits) == 3 and len(looks.squares) == 2
    if predict_from == "sum":
        torch.testing.assert_close(logits, sum(looks.logits))
    elif predict_from == "last":
        torch.testing.assert_close(logits, looks.logits[-1])
    else:
        fused = torch.cat([F.normalize(p, dim=-1) for p in looks.pooled], dim=-1)
        torch.testing.assert_close(logits, model.fusion(fused))
    # Each scale sees the previous scale's input zoomed into the APN's square.
    for s in range(2):
        torch.testing.assert_close(
            looks.images[s + 1],
            boxcar_zoom(looks.images[s], looks.squares[s], (64, 64), model.options.sharpness),
        )


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="response_crop"):
        tiny("method.min_crop=0.6", "method.response_crop=0.5")
    with pytest.raises(ConfigError, match="method.scales"):
        tiny("method.scales=4")
    with pytest.raises(ConfigError, match="method.apn_lr_scale"):
        tiny("method.apn_lr_scale=0")


def test_apns_learn_at_their_own_rate_when_asked():
    def scales(method, module) -> set:
        """The lr_scale of the groups holding `module`'s parameters."""
        ids = {id(p) for p in module.parameters()}
        groups = parameter_groups(method, OptimConfig(head_lr_scale=5.0))
        return {g.get("lr_scale") for g in groups for p in g["params"] if id(p) in ids}

    default = tiny("method.scales=2")
    assert scales(default, default.apns) == {5.0}
    slow = tiny("method.scales=2", "method.apn_lr_scale=0.1")
    assert scales(slow, slow.apns) == {0.1}
    assert scales(slow, slow.heads) == {5.0}


# ---- the saved model, export, explain ---------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("racnn")
    cfg = tiny_config("model.attention=se")
    torch.manual_seed(0)
    method = build_method(cfg, 3).eval()
    with torch.no_grad():  # squares away from the centre, so the export carries real ones
        for apn in method.apns:
            torch.nn.init.normal_(apn.fc[-1].weight, std=0.5)
    save_run_model(out, method.for_inference(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic")
    return out


def test_three_scales_export_with_parity(model_dir: Path, tmp_path: Path):
    predictor = Predictor.load(model_dir)
    assert predictor.info["method_options"]["scales"] == 3
    onnx_path = export_onnx(predictor, tmp_path / "racnn.onnx")
    assert max_abs_difference(predictor, onnx_path) < 1e-3


def test_explain_shows_squares_crops_and_responses(model_dir: Path):
    predictor = Predictor.load(model_dir)
    picture = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    explanation = predictor.explain(picture)
    assert explanation.map_name == "grad-cam-scale1"
    views = list(explanation.views)
    assert views[:4] == [
        "scale 1: square",
        "scale 2: zoomed crop",
        "scale 2: square",
        "scale 3: zoomed crop",
    ]
    # SE plug-ins in every scale's network: one chart each, named by scale.
    assert views[4:] == [f"scale{s}: se channel weights" for s in (1, 2, 3)]
    tensor = predictor.preprocess(picture)[None]
    maps = predictor.method.explain_maps(tensor)
    assert list(maps) == [
        "grad-cam-scale1",
        "response-scale1",
        "response-scale2",
        "response-scale3",
    ]
    looks = predictor.method._explained(tensor)
    x0, y0, x1, y1 = (int(v) for v in square_box(looks.squares[0])[0])
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    assert maps["response-scale2"][0][outside].max() == 0  # scale 2 saw only its square
    drawn = np.asarray(explanation.views["scale 1: square"])
    assert tuple(drawn[y0 + 1, (x0 + x1) // 2]) == (0, 255, 0)


# ---- recipes ----------------------------------------------------------------------------------
RECIPES = sorted((REPO / "configs").glob("*/racnn-*.yaml"))


def test_the_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    expected = {"synthetic", "flowers12", "butterflies10", "cars66"}
    assert {f"{d}/racnn-lite0.yaml" for d in expected} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_load_with_valid_options(path: Path):
    from lookcloser.api import check_config

    cfg = Config.load(path, ["data.root=/nonexistent"])
    assert cfg.method["name"] == "racnn"
    assert cfg.data.root == "/nonexistent"  # recipes name no data folder
    check_config(cfg)
