"""TASN: trilinear attention, the attention sampler, distillation, the saved model and explain."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lookcloser import api, cli
from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import ConfigError, LookcloserError
from lookcloser.methods import build_method
from lookcloser.methods.tasn import (
    attention_sample,
    detail_map,
    inverse_cdf,
    sampling_grid,
    soft_target_cross_entropy,
    spatial_softmax,
    structure_map,
    trilinear_attention,
    unique_channels,
    warp_densities,
)
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

REPO = Path(__file__).resolve().parents[2]
NORMALISATIONS = ["none", "spatial", "spatial_relation"]


def reference_trilinear(x: torch.Tensor, normalisation: str, scale: float) -> torch.Tensor:
    """M(X) for one C x h x w map with explicit loops over channels."""
    c, h, w = x.shape
    flat = x.reshape(c, h * w).double()
    rows = []
    for i in range(c):
        left = flat[i]
        if normalisation != "none":
            left = torch.exp(scale * left) / torch.exp(scale * left).sum()
        rows.append(torch.stack([(left * flat[j]).sum() for j in range(c)]))
    relation = torch.stack(rows)
    if normalisation == "spatial_relation":
        relation = torch.exp(relation) / torch.exp(relation).sum(1, keepdim=True)
    out = torch.stack([sum(relation[i, j] * flat[j] for j in range(c)) for i in range(c)])
    return out.reshape(c, h, w).float()


# ---- trilinear attention ------------------------------------------------------------------------
@pytest.mark.parametrize("normalisation", NORMALISATIONS)
def test_trilinear_attention_matches_a_plain_computation(normalisation: str) -> None:
    x = torch.rand(2, 5, 3, 4)
    out = trilinear_attention(x, normalisation, scale=2.0)
    assert out.shape == x.shape  # c maps of h x w
    for b in range(2):
        torch.testing.assert_close(
            out[b], reference_trilinear(x[b], normalisation, 2.0), rtol=1e-4, atol=1e-5
        )


def test_spatial_softmax_makes_every_channel_a_distribution_over_space() -> None:
    x = torch.randn(3, 6, 5, 7) * 4
    n = spatial_softmax(x, scale=7.0)
    assert n.shape == (3, 6, 35) and (n >= 0).all()
    torch.testing.assert_close(n.sum(-1), torch.ones(3, 6))
    # With distributions as input, the relation-normalised maps are distributions too: each
    # output map is a convex combination of the input maps.
    maps = trilinear_attention(n.view(3, 6, 5, 7), "spatial_relation")
    torch.testing.assert_close(maps.flatten(2).sum(-1), torch.ones(3, 6))


@pytest.mark.parametrize("normalisation", NORMALISATIONS)
def test_permuting_channels_permutes_the_maps(normalisation: str) -> None:
    x = torch.rand(2, 6, 4, 4)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    out = trilinear_attention(x, normalisation, 3.0)
    torch.testing.assert_close(trilinear_attention(x[:, perm], normalisation, 3.0), out[:, perm])


def test_identical_channels_count_once_in_the_structure_map() -> None:
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 0, 0, 0] = 1.0  # one peaked map and three identical flat ones
    maps[0, 1:] = 0.5  # (sums 2 vs 1: maps are told apart by their sums, as released)
    assert unique_channels(maps).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(structure_map(maps, 1.0)[0], (maps[0, 0] + maps[0, 1]) / 2)
    torch.testing.assert_close(structure_map(maps, 2.0)[0], ((maps[0, 0] + maps[0, 1]) / 2) ** 2)
    drawn = {int(detail_map(maps)[1]) for _ in range(200)}
    assert drawn == {0, 1}  # a random distinct map, never a duplicate


# ---- attention sampler --------------------------------------------------------------------------
def test_a_uniform_map_gives_the_identity_and_a_plain_resize() -> None:
    images = torch.rand(2, 3, 20, 30)
    flat = torch.ones(2, 5, 5)
    torch.testing.assert_close(attention_sample(images, flat, (20, 30)), images)
    resized = F.interpolate(images, size=(10, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(attention_sample(images, flat, (10, 12)), resized)


@pytest.mark.parametrize("max_zoom", [1.5, 2.0, 4.0])
def test_max_zoom_bounds_how_much_any_row_or_column_is_magnified(max_zoom: float) -> None:
    peaked = torch.full((1, 32), 0.01)
    peaked[0, 5] = 1.0
    zx, zy = warp_densities(peaked, peaked.clone(), max_zoom)
    torch.testing.assert_close(zx.mean(), torch.tensor(1.0))  # the output size is kept
    # Capped at max_zoom, then the removed mass is spread evenly (less than 1 per pixel).
    assert zx.max() < max_zoom + 1 and zx[0, 5] == zx.max()


def test_more_zoom_gives_the_attended_region_more_pixels() -> None:
    maps = torch.full((1, 16, 16), 0.05)
    maps[0, 6:10, 6:10] = 1.0
    shares = []
    for zoom in (1.5, 3.0, 6.0):
        x = (sampling_grid(maps, (64, 64), (64, 64), zoom)[0, 0, :, 0] + 1) * 32
        shares.append(((x >= 24) & (x < 40)).float().mean().item())
    assert shares[0] < shares[1] < shares[2]


def test_a_peaked_region_gets_more_output_pixels_than_its_share() -> None:
    maps = torch.full((1, 16, 16), 0.05)
    maps[0, 4:8, 10:14] = 1.0  # rows 4-7 and columns 10-13 of 16: a quarter of each axis
    grid = sampling_grid(maps, (64, 64), (64, 64), max_zoom=4.0)
    x_pixels = (grid[0, 0, :, 0] + 1) / 2 * 64  # input column each output column samples
    y_pixels = (grid[0, :, 0, 1] + 1) / 2 * 64
    share_x = ((x_pixels >= 40) & (x_pixels < 56)).float().mean().item()
    share_y = ((y_pixels >= 16) & (y_pixels < 32)).float().mean().item()
    # The region holds 1/4 of each axis of the input; it fills well over half the output.
    assert share_x > 0.5 and share_y > 0.5, (share_x, share_y)


@pytest.mark.parametrize("seed", range(5))
def test_the_warp_is_monotonic_along_each_axis(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(3, 7, 9, generator=gen) ** 4  # peaky random maps
    grid = sampling_grid(maps, (40, 50), (32, 24), max_zoom=6.0)
    assert grid.shape == (3, 32, 24, 2)
    assert (grid[..., 0].diff(dim=2) > 0).all() and (grid[..., 1].diff(dim=1) > 0).all()
    assert grid.min() > -1 and grid.max() < 1  # inside the image: no folding, no padding
    # Separable: x depends on the column only, y on the row only.
    assert (grid[..., 0] == grid[:, :1, :, 0]).all() and (grid[..., 1] == grid[:, :, :1, 1]).all()


def test_a_batch_of_maps_in_one_call_equals_one_call_per_map() -> None:
    images, maps = torch.rand(4, 3, 24, 24), torch.rand(4, 6, 6) ** 3
    batched = attention_sample(images, maps, 16)
    single = torch.cat([attention_sample(images[i : i + 1], maps[i : i + 1], 16) for i in range(4)])
    torch.testing.assert_close(batched, single)


def test_inverse_cdf_inverts_a_two_step_density() -> None:
    # Input pixel 0 holds 3/4 of the output pixels, pixel 1 a quarter.
    grid = inverse_cdf(torch.tensor([[1.5, 0.5]]), out=4)
    positions = (grid + 1) / 2 * 2  # back to input pixel coordinates in [0, 2]
    # Output centres at 1/8, 3/8, 5/8, 7/8 of the mass; pixel 0 spans mass [0, 3/4].
    expected = torch.tensor([[1 / 6, 1 / 2, 5 / 6, 1.5]])
    torch.testing.assert_close(positions, expected)


# ---- distillation -------------------------------------------------------------------------------
def test_soft_target_cross_entropy_by_hand() -> None:
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 4.0]])
    t = 2.0
    q = [math.exp(0) / (math.exp(0) + math.exp(2)), math.exp(2) / (math.exp(0) + math.exp(2))]
    log_p = [1 - math.log(math.e + 1), 0 - math.log(math.e + 1)]  # log softmax([1, 0])
    expected = -(q[0] * log_p[0] + q[1] * log_p[1])
    assert soft_target_cross_entropy(student, teacher, t).item() == pytest.approx(expected)


# ---- the method ---------------------------------------------------------------------------------
def tiny_config(*overrides: str) -> Config:
    return Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            "data.image_size=64",
            "data.crop_pct=1.0",
            "method.name=tasn",
            "method.attention_channels=16",
            *overrides,
        ],
    )


def test_losses_and_which_network_learns_from_which() -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config(), 3)
    batch = Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))
    losses = method.training_losses(batch)
    assert set(losses) == {"loss", "master", "part", "distill", "attention"}
    weighted = losses["master"] + losses["part"] + losses["distill"] + losses["attention"]
    torch.testing.assert_close(losses["loss"], weighted)

    # The attention network learns from its own classifier only: the sampler passes no gradient.
    losses["master"].backward()
    attention_params = list(method.attention_net.parameters())
    assert all(p.grad is None for p in attention_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    method.zero_grad(set_to_none=True)
    method.training_losses(batch)["attention"].backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_params)


def test_share_fc_uses_one_classifier_and_inference_drops_training_parts() -> None:
    shared = build_method(tiny_config("method.share_fc=true"), 3)
    assert shared.part_head is None
    separate = build_method(tiny_config(), 3)
    kept = {name.split(".")[0] for name in separate.for_inference().state_dict()}
    assert kept == {"backbone", "attention_net", "head"}


def test_input_size_reaches_the_loader_the_predictor_and_the_model_dir(tmp_path: Path) -> None:
    cfg = tiny_config("method.input_size=96")
    method = build_method(cfg, 3).eval()
    assert method.input_size == 96 and method.image_size == 64
    images = torch.rand(2, 3, 96, 96)
    sampled, _ = method.structure_image(images)
    assert sampled.shape == (2, 3, 64, 64)  # the master network sees data.image_size
    save_run_model(
        tmp_path, method.for_inference(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic"
    )
    predictor = Predictor.load(tmp_path)
    assert predictor.image_size == 96
    picture = Image.fromarray(np.zeros((120, 150, 3), dtype=np.uint8))
    assert predictor.preprocess(picture).shape == (3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(predictor.logits(images), method(images))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasn")
    cfg = tiny_config()
    method = build_method(cfg, 3).eval()
    save_run_model(out, method.for_inference(), TrainingData(["a", "b", "c"]), cfg, {}, "bicubic")
    return out


def test_explain_shows_the_structure_map_and_the_sampled_image(model_dir: Path) -> None:
    predictor = Predictor.load(model_dir)
    picture = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    explanation = predictor.explain(picture)
    assert explanation.map_name == "structure-attention"
    assert list(explanation.views) == ["structure-preserved (sampled)"]
    # The sampled view is exactly the image the master network classifies.
    tensor = predictor.preprocess(picture)[None]
    sampled, _ = predictor.method.structure_image(tensor)
    view = np.asarray(explanation.views["structure-preserved (sampled)"]).astype(int)
    expected = (sampled[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(int)
    assert np.abs(view - expected).max() <= 1

    part = predictor.explain(picture, part=3)
    assert part.map_name == "part-3" and list(part.views) == ["detail-preserved (part 3)"]
    assert not np.allclose(part.heatmap, explanation.heatmap)
    with pytest.raises(ConfigError, match=r"--part: expected a part map index in 0\.\.15"):
        predictor.explain(picture, part=16)


def test_cli_explain_part_writes_a_picture_with_the_view(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "bird.png"
    Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8)).save(image)
    assert cli.main(["explain", str(model_dir), str(image), "--part", "2"]) == 0
    written = model_dir / "explanations" / "bird-part2.png"
    plain = api.explain(model_dir, image, tmp_path / "plain.png")
    for png in (Image.open(written), Image.open(plain)):
        # Three panels (input, overlay, sampled view) side by side; two would be ~2x as wide.
        assert png.width > 2.5 * png.height
    assert np.asarray(Image.open(written)).tolist() != np.asarray(Image.open(plain)).tolist()


def test_part_on_a_method_without_parts_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_config("method.name=baseline")
    method = build_method(cfg, 3).eval()
    save_run_model(tmp_path, method, TrainingData(["a", "b", "c"]), cfg, {}, "bicubic")
    picture = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="method 'baseline' has no part maps"):
        Predictor.load(tmp_path).explain(picture, part=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.normalisation=softmax", "method.normalisation: expected 'none' | 'spatial'"),
        ("method.temperature=0", "method.temperature"),
        ("method.max_zoom=0.5", "method.max_zoom"),
        ("method.attention_backbone=no_such_net", "unknown timm model 'no_such_net'"),
    ],
)
def test_bad_options_name_the_option(override: str, message: str) -> None:
    with pytest.raises(LookcloserError, match=message):
        build_method(tiny_config(override), 3)


RECIPES = sorted((REPO / "configs").glob("*/tasn-*.yaml"))


def test_the_recipes_exist() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert {"cub200/tasn-resnet50.yaml", "cars/tasn-resnet50.yaml"} <= names
    assert {"flowers12/tasn-lite0.yaml", "butterflies10/tasn-lite0.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_load_with_valid_options(path: Path) -> None:
    from lookcloser.api import check_config

    cfg = Config.load(path, ["data.root=/nonexistent"])
    assert cfg.method["name"] == "tasn"
    check_config(cfg)
