"""Dynamic Capacity Networks: cells, the entropy-gradient saliency against autograd, top-k,
replacement, k = every cell equals the fine model, the hint's gradients, the measured cost,
explain and the recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.methods.dcn import (
    cell_boxes,
    cell_patches,
    entropy_saliency,
    gather_cells,
    replace_cells,
    to_grid,
    top_cells,
)
from lookcloser.models.backbones import Backbone

REPO = Path(__file__).resolve().parents[2]


def tiny(*overrides: str, size: int = 64):
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            f"data.image_size={size}",
            "method.name=dcn",
            "method.patch_size=16",
            "method.coarse_stage=2",
            "method.top_channels=32",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return build_method(cfg, 3)


# ---- cells -------------------------------------------------------------------------------------------
def test_cells_are_the_image_tiles_in_raster_order():
    images = torch.rand(2, 3, 48, 32)
    patches = cell_patches(images, 16)
    assert patches.shape == (2, 6, 3, 16, 16)
    for n in range(6):
        row, col = divmod(n, 2)
        expected = images[:, :, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16]
        torch.testing.assert_close(patches[:, n], expected)
    boxes = cell_boxes(torch.tensor([[0, 3, 5]]), (3, 2), 16)
    assert boxes[0].tolist() == [[0, 0, 16, 16], [16, 16, 32, 32], [16, 32, 32, 48]]


def test_maps_come_to_the_cell_grid():
    features = torch.rand(2, 5, 8, 8)
    torch.testing.assert_close(to_grid(features, (4, 4)), F.adaptive_avg_pool2d(features, 4))
    assert to_grid(features, (8, 8)) is features
    assert to_grid(features[..., :2, :2], (4, 4)).shape == (2, 5, 4, 4)


def test_chosen_cells_are_replaced_and_the_rest_kept():
    coarse = torch.rand(2, 5, 3)
    index = torch.tensor([[4, 1], [0, 2]])
    fine = torch.rand(2, 2, 3)
    refined = replace_cells(coarse, index, fine)
    torch.testing.assert_close(gather_cells(refined, index), fine)
    for b, keep in enumerate([[0, 2, 3], [1, 3, 4]]):
        torch.testing.assert_close(refined[b, keep], coarse[b, keep])


def test_top_cells_takes_the_most_salient_and_breaks_ties_by_position():
    saliency = torch.tensor([[0.1, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    assert top_cells(saliency, 3).tolist() == [[1, 3, 2], [0, 1, 2]]


# ---- the saliency ---------------------------------------------------------------------------------
def test_entropy_saliency_is_the_norm_of_the_entropys_gradient():
    torch.manual_seed(0)
    top, head = nn.Linear(6, 5), nn.Linear(5, 4)
    vectors = torch.randn(3, 7, 6, requires_grad=True)
    logits = head(F.relu(top(vectors)).mean(1))
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum()
    (grad,) = torch.autograd.grad(entropy, vectors)
    saliency, our_logits = entropy_saliency(vectors.detach(), top, head)
    torch.testing.assert_close(saliency, grad.norm(dim=-1))
    torch.testing.assert_close(our_logits, logits.detach())
    assert saliency.std() > 0  # the ReLU makes it depend on the cell


# ---- the method ----------------------------------------------------------------------------------
def test_k_covering_every_cell_equals_the_fine_model():
    """With k = every cell, no coarse vector is left: the output is g on the fine network's
    pooled features of each cell, computed here cell by cell."""
    model = tiny("method.glimpses=16").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        vectors = []
        for row in range(4):
            for col in range(4):
                crop = images[:, :, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16]
                vectors.append(model.backbone(crop))
        fine_model = model.classify(torch.stack(vectors, dim=1))
        torch.testing.assert_close(model(images), fine_model)


def test_fewer_glimpses_keep_the_coarse_vectors_elsewhere():
    model = tiny("method.glimpses=3").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        looked = model.glimpse(images)
    assert looked.index.shape == (2, 3)
    # The chosen cells are the most salient ones.
    best = looked.saliency.topk(3, dim=1).values
    torch.testing.assert_close(gather_cells(looked.saliency, looked.index), best)
    chosen = torch.zeros(2, 16, dtype=torch.bool).scatter(1, looked.index, True)
    torch.testing.assert_close(looked.refined[~chosen], looked.coarse[~chosen])
    torch.testing.assert_close(gather_cells(looked.refined, looked.index), looked.fine)


def test_the_hint_trains_the_coarse_path_only_and_the_loss_reaches_everything():
    model = tiny("method.glimpses=3", "method.hint_weight=1.0").train()
    batch = Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "refined", "hint"}
    torch.testing.assert_close(losses["loss"], losses["refined"] + losses["hint"])
    losses["hint"].backward(retain_graph=True)
    fine_grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is None for g in fine_grads)  # the fine vectors are the hint's fixed targets
    assert model.adapter.weight.grad.abs().sum() > 0
    model.zero_grad()
    losses["loss"].backward()
    assert model.backbone.model.conv1.weight.grad.abs().sum() > 0
    assert model.coarse_net.backbone.model.conv1.weight.grad.abs().sum() > 0
    assert model.top.weight.grad.abs().sum() > 0


def test_the_coarse_loss_is_optional():
    model = tiny("method.coarse_weight=0.5").train()
    losses = model.training_losses(Batch(torch.rand(2, 3, 64, 64), torch.tensor([0, 1])))
    expected = losses["refined"] + losses["hint"] + 0.5 * losses["coarse"]
    torch.testing.assert_close(losses["loss"], expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.patch_size=24"], "not a whole number of patches"),
        (["method.glimpses=17"], "only 16 patches"),
        (["model.backbone=vit_tiny_patch16_224", "model.kwargs.img_size=64"], "must be a CNN"),
        (["method.coarse_backbone=vit_tiny_patch16_224"], "coarse_backbone must be a CNN"),
    ],
)
def test_bad_settings_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_plugins_go_to_the_fine_network_only():
    model = tiny("model.attention=se")
    assert model.backbone.attention_blocks()
    assert not model.coarse_net.backbone.has_plugins()


# ---- cost ----------------------------------------------------------------------------------------
def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_inference_costs_less_than_the_fine_network_on_the_whole_image():
    """The point of the method, at the CPU recipe's settings (Lite0, 128 px, 32 px cells,
    4 glimpses, coarse Lite0 to stage 3 at half size): about half the fine network's FLOPs."""
    cfg = Config.load(REPO / "configs/flowers12/dcn-lite0.yaml", ["model.pretrained=false"])
    model = build_method(cfg, 12).eval()
    images = torch.rand(1, 3, 128, 128)
    fine = Backbone("tf_efficientnet_lite0").eval()
    ratio = flops(lambda: model(images)) / flops(lambda: fine(images))
    assert ratio < 0.6, ratio


# ---- explain -------------------------------------------------------------------------------------
def test_explain_shows_the_saliency_and_the_glimpses():
    model = tiny("method.glimpses=2").eval()
    images = torch.rand(1, 3, 64, 64)
    maps = model.explain_maps(images)
    assert list(maps) == ["entropy-saliency", "grad-cam"]
    saliency = maps["entropy-saliency"]
    assert saliency.shape == (1, 64, 64) and saliency.max() == 1 and saliency.min() >= 0
    views = model.explain_views(images)
    (drawn,) = views.values()
    looked = model.glimpse(images)
    for box in cell_boxes(looked.index, looked.grid, 16)[0]:
        x0, y0, x1, _ = (int(v) for v in box)
        assert drawn[0, :, y0, (x0 + x1) // 2].tolist() == [0.0, 1.0, 0.0]  # green outline
    # The most salient cell is where the saliency map peaks.
    row, col = divmod(int(looked.index[0, 0]), 4)
    assert saliency[0, row * 16 + 8, col * 16 + 8] == 1


# ---- recipes -------------------------------------------------------------------------------------
RECIPES = sorted((REPO / "configs").glob("*/dcn-*.yaml"))


def test_the_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    expected = {"synthetic", "flowers12", "butterflies10", "cars66"}
    assert {f"{d}/dcn-lite0.yaml" for d in expected} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_load_with_valid_options(path):
    from lookcloser.api import check_config

    cfg = Config.load(path, ["data.root=/nonexistent"])
    assert cfg.method["name"] == "dcn"
    assert cfg.data.root == "/nonexistent"  # recipes name no data folder
    check_config(cfg)
