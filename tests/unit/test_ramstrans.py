"""RAMS-Trans: attention rollout, DPPM (largest component, box, zoom), the recurrent pass,
CAM importance, export with real boxes, explain and the recipes."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lookcloser import api, cli
from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import LookcloserError
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import build_method
from lookcloser.methods.ramstrans import (
    RolloutAccumulator,
    attention_rollout,
    cells_to_pixels,
    class_activation_map,
    component_box,
    compose_boxes,
    label_components,
    largest_component,
    paste,
    propose_boxes,
    rollout_importance,
    rollout_step,
    threshold_mask,
    zoom,
)
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c"]


def tiny_config(backbone: str = "vit_tiny_patch16_224", *overrides: str, size: int = 64) -> Config:
    return Config.load(
        None,
        [
            f"model.backbone={backbone}",
            "model.pretrained=false",
            f"data.image_size={size}",
            "data.crop_pct=1.0",
            "method.name=ramstrans",
            *overrides,
        ],
    )


def sharpen_attention(method, factor: float = 8.0) -> None:
    """Scale a random ViT's query/key weights so that its attention, and so its rollout, is
    far from uniform (a random ViT attends almost evenly: every box is the whole image)."""
    with torch.no_grad():
        for block in method.backbone.model.blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * dim] *= factor


# ---- attention rollout ----------------------------------------------------------------------------
def test_the_rollout_of_identity_attention_is_the_identity() -> None:
    eye = torch.eye(5).expand(2, 3, 5, 5)  # B x heads x N x N
    torch.testing.assert_close(attention_rollout([eye] * 4), torch.eye(5).expand(2, 5, 5))
    # The class token then attends to itself only: no patch matters, and DPPM keeps the image.
    importance = rollout_importance(attention_rollout([eye] * 4), 1, (2, 2))
    assert (importance == 0).all()
    boxes = propose_boxes(importance, 1.3, (16.0, 16.0), (32, 32))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 32, 32]] * 2))


def test_rollout_rows_sum_to_one_and_follow_block_order() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 3, 6, 6, generator=gen) * 3, -1) for _ in range(4)]
    rollout = attention_rollout(probs)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 6))
    # Later blocks multiply from the left: the order matters.
    assert not torch.allclose(rollout, attention_rollout(probs[::-1]))
    step = rollout_step(rollout_step(None, probs[0]), probs[1])
    torch.testing.assert_close(step, attention_rollout(probs[:2]))


def reference_rollout(per_block: list[np.ndarray]) -> np.ndarray:
    """One sample's rollout (N x N) with plain numpy, from heads x N x N blocks."""
    n = per_block[0].shape[-1]
    joint = np.eye(n)
    for block in per_block:
        attention = block.mean(0) + np.eye(n)
        attention = attention / attention.sum(1, keepdims=True)
        joint = attention @ joint
    return joint


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_rollout_importance_matches_a_plain_computation_on_a_tiny_vit(query: str) -> None:
    from timm.utils import AttentionExtract

    from lookcloser.models.backbones import unfused_attention

    torch.manual_seed(0)
    method = build_method(tiny_config("vit_tiny_patch16_224", f"method.rollout_query={query}"), 3)
    sharpen_attention(method)
    method.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _, importance = method._look(images, with_importance=True)
        with unfused_attention(method.backbone.model):
            extracted = AttentionExtract(method.backbone.model, mode="eval")(
                method.backbone.normalize(images)
            )
    blocks = [v.double().numpy() for v in extracted.values()]
    assert len(blocks) == 12
    for b in range(2):
        joint = reference_rollout([block[b] for block in blocks])
        row = joint[0, 1:] if query == "cls" else joint[:, 1:].mean(0)
        expected = torch.from_numpy(row / row.max()).float().view(4, 4)
        torch.testing.assert_close(importance[b], expected, rtol=1e-4, atol=1e-5)
    assert importance.amax((1, 2)).tolist() == [1.0, 1.0]


def test_one_forward_per_scale_gives_the_logits_and_the_attention() -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config(), 3).eval()
    for module in method.backbone.model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True  # as on any machine with scaled_dot_product_attention
    calls = []
    original = method.backbone.model.forward_features
    method.backbone.model.forward_features = lambda x: calls.append(1) or original(x)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, importance = method._look(images, with_importance=True)
        assert len(calls) == 1 and importance.shape == (2, 4, 4)
        # Reading the attention does not change the logits (unfused = fused attention).
        plain = method.forward_head(method.forward_features(images))
        torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-5)
        calls.clear()
        method(images)
    assert len(calls) == 2  # two scales, one forward each
    assert all(m.fused_attn for m in method.backbone.model.modules() if hasattr(m, "fused_attn"))


def test_the_accumulator_keeps_no_gradient() -> None:
    probs = torch.softmax(torch.randn(1, 2, 5, 5, requires_grad=True), -1)
    accumulator = RolloutAccumulator()
    accumulator(probs)
    accumulator(probs)
    assert not accumulator.rollout.requires_grad
    torch.testing.assert_close(accumulator.rollout, attention_rollout([probs, probs]).detach())


# ---- DPPM -----------------------------------------------------------------------------------------
def bfs_components(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components of a 2-D bool mask, in raster order of their first cell."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            component, queue = set(), deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                component.add((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            components.append(component)
    return components


def test_a_map_with_two_blobs_selects_the_larger() -> None:
    importance = torch.zeros(1, 8, 8)
    importance[0, 1:3, 1:3] = 1.0  # 4 cells
    importance[0, 4:7, 4:8] = 0.9  # 12 cells, weaker but larger
    mask = threshold_mask(importance, 1.3)
    component = largest_component(mask)
    assert component.sum() == 12 and component[0, 4:7, 4:8].all()
    torch.testing.assert_close(component_box(component), torch.tensor([[4.0, 4, 8, 7]]))


def test_diagonal_neighbours_join_and_ties_go_to_the_first_in_raster_order() -> None:
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = True  # a diagonal: one 8-connected blob
    mask[0, 4, 3] = mask[0, 4, 4] = mask[0, 5, 5] = True  # three cells, met later
    component = largest_component(mask)
    assert component[0, :3, :3].sum() == 3 and component.sum() == 3


def test_the_threshold_is_alpha_times_the_mean() -> None:
    importance = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # mean 3
    assert threshold_mask(importance, 1.0).tolist() == [[[False, False], [False, True]]]
    assert threshold_mask(importance, 0.5).tolist() == [[[False, True], [True, True]]]


@pytest.mark.parametrize(("h", "w", "density"), [(4, 4, 0.5), (7, 9, 0.45), (14, 14, 0.55)])
def test_largest_component_matches_a_breadth_first_search(h: int, w: int, density: float) -> None:
    gen = torch.Generator().manual_seed(h * w)
    masks = torch.rand(64, h, w, generator=gen) < density
    masks[0] = False  # an empty mask: no component
    fixed = largest_component(masks, iterations=h * w - 1)  # the exported (traced) schedule
    torch.testing.assert_close(largest_component(masks), fixed, rtol=0, atol=0)
    for mask, chosen in zip(masks.numpy(), fixed.numpy(), strict=True):
        components = bfs_components(mask)
        if not components:
            assert not chosen.any()
            continue
        biggest = max(len(c) for c in components)
        expected = next(c for c in components if len(c) == biggest)  # raster-first on ties
        assert set(zip(*np.nonzero(chosen), strict=True)) == expected


def test_labels_cross_a_long_snake_in_eager_and_fixed_schedules() -> None:
    """A one-cell-wide snake, the longest path a label must travel on a 7 x 7 grid."""
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 0::2, :] = True
    for row in range(1, 7, 2):
        mask[0, row, 6 if row % 4 == 1 else 0] = True
    labels = label_components(mask)
    assert labels[mask].unique().numel() == 1  # one component: one label everywhere on it
    torch.testing.assert_close(labels, label_components(mask, iterations=48), rtol=0, atol=0)
    assert label_components(mask, iterations=5)[mask].unique().numel() > 1  # too few steps


def test_an_empty_map_falls_back_to_the_whole_image() -> None:
    flat = torch.ones(2, 4, 5)  # nothing exceeds 1.3 x the mean
    boxes = propose_boxes(flat, 1.3, (16.0, 16.0), (64, 80))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 80, 64]] * 2))
    images = torch.rand(2, 3, 64, 80)
    torch.testing.assert_close(zoom(images, boxes, (64, 80)), images)  # no zoom at all


@pytest.mark.parametrize(
    ("image", "patch", "cells", "pixels"),
    [
        (224, 16, [2, 3, 9, 7], [32, 48, 144, 112]),
        (320, 16, [0, 0, 20, 20], [0, 0, 320, 320]),
        (448, 16, [27, 0, 28, 1], [432, 0, 448, 16]),
        (448, 32, [3, 5, 10, 14], [96, 160, 320, 448]),
        (100, 32, [2, 1, 4, 4], [64, 32, 100, 100]),  # a CNN's last cells overhang: clamped
    ],
)
def test_boxes_map_from_cells_to_pixels(image, patch, cells, pixels) -> None:
    box = torch.tensor([cells], dtype=torch.float32)
    out = cells_to_pixels(box, (float(patch), float(patch)), (image, image))
    assert out[0].tolist() == pixels


FIXED = "model.kwargs.dynamic_img_size=false"


@pytest.mark.parametrize(
    ("backbone", "extra", "size", "grid", "cell"),
    [
        ("test_vit", "", 224, 14, 16.0),  # timm's test ViT: 160 px, dynamic_img_size
        ("test_vit", FIXED, 320, 20, 16.0),  # a fixed-size ViT built for 160 px
        ("test_vit", FIXED, 448, 28, 16.0),
        ("resnet18", "", 64, 2, 32.0),
        ("resnet18", "", 100, 4, 32.0),
    ],
)
def test_the_method_maps_its_grid_to_pixels_at_several_input_sizes(
    backbone, extra, size, grid, cell
) -> None:
    """ViTs take any configured size (position embeddings resampled); a box of cells lands on
    the pixels those patches cover."""
    torch.manual_seed(0)
    method = build_method(tiny_config(backbone, *filter(None, [extra]), size=size), 3).eval()
    images = torch.rand(1, 3, size, size)
    with torch.no_grad():
        logits, importance = method._look(images, with_importance=True)
        assert logits.shape == (1, 3) and importance.shape == (1, grid, grid)
        assert method(images).shape == (1, 3)
    assert method._cell_size((size, size), (grid, grid)) == (cell, cell)
    if backbone.startswith("test_vit"):  # embeddings resampled once, to the input's grid
        assert method.backbone.model.pos_embed.shape[1] == 1 + grid * grid
    importance = torch.zeros(1, grid, grid)
    importance[0, 1, 0:2] = 1.0  # patches (row 1, cols 0-1)
    boxes = propose_boxes(importance, 1.3, (cell, cell), (size, size))
    assert boxes[0].tolist() == [0.0, cell, min(2 * cell, size), min(2 * cell, size)]


def test_dynamic_image_size_vits_work_too() -> None:
    method = build_method(tiny_config("test_vit", "model.kwargs.dynamic_img_size=true", size=96), 3)
    assert method.backbone.model.pos_embed.shape[1] == 1 + 36  # no resize at every forward
    with torch.no_grad():
        _, importance = method.eval()._look(torch.rand(1, 3, 96, 96), with_importance=True)
    assert importance.shape == (1, 6, 6)


def ramp(h: int, w: int) -> torch.Tensor:
    """1 x 3 x h x w image whose channels hold each pixel centre's x, y and x + y (linear:
    bilinear sampling reproduces it exactly)."""
    y = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w) + 0.5
    x = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w) + 0.5
    return torch.stack([x, y, x + y])[None]


def test_zoom_samples_the_box_and_resizes_it_like_interpolate() -> None:
    image = ramp(64, 80)
    box = torch.tensor([[16.0, 8.0, 48.0, 40.0]], dtype=torch.float64)  # 32 x 32 px
    crop = zoom(image, box, (64, 64))
    centres = 16 + (torch.arange(64, dtype=torch.float64) + 0.5) * 0.5  # x of output centres
    inner = slice(1, -1)  # the outermost ring reads half a pixel outside the box
    torch.testing.assert_close(crop[0, 0, inner, inner], centres[None, inner].expand(62, 62))
    expected = F.interpolate(
        image[:, :, 8:40, 16:48], size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(crop[..., inner, inner], expected[..., inner, inner])


def test_three_scales_zoom_into_the_previous_crop() -> None:
    image = ramp(64, 64)
    outer = torch.tensor([[8.0, 16.0, 56.0, 48.0]], dtype=torch.float64)
    inner = torch.tensor([[16.0, 16.0, 48.0, 40.0]], dtype=torch.float64)
    twice = zoom(zoom(image, outer, (64, 64)), inner, (64, 64))
    direct = zoom(image, compose_boxes(outer, inner, (64, 64)), (64, 64))
    torch.testing.assert_close(twice[..., 2:-2, 2:-2], direct[..., 2:-2, 2:-2])

    torch.manual_seed(0)
    method = build_method(tiny_config("resnet18", "method.scales=3", "method.alpha=1.0"), 3)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        looks = method.eval().look_closer(images)
    assert len(looks.logits) == 3 and len(looks.boxes) == 2
    torch.testing.assert_close(looks.images[2], zoom(looks.images[1], looks.boxes[1], (64, 64)))
    torch.testing.assert_close(looks.images[1], zoom(images, looks.boxes[0], (64, 64)))


def test_box_selection_passes_no_gradient_and_all_scales_share_one_parameter_set() -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config("resnet18", "method.alpha=1.0"), 3)
    baseline = build_method(tiny_config("resnet18", "method.name=baseline"), 3)
    # The same tensors as a plain classifier: no per-scale copies, no extra heads.
    assert [n for n, _ in method.named_parameters()] == [n for n, _ in baseline.named_parameters()]
    images = torch.rand(4, 3, 64, 64, requires_grad=True)
    batch = Batch(images, torch.tensor([0, 1, 2, 0]))
    looks = method.look_closer(images)
    assert looks.boxes[0].requires_grad is False and looks.images[1].requires_grad is False
    assert not torch.equal(looks.boxes[0], torch.tensor([[0.0, 0, 64, 64]] * 4))  # real zooms

    losses = method.training_losses(batch)
    assert set(losses) == {"loss", "scale1", "scale2"}
    torch.testing.assert_close(losses["loss"], losses["scale1"] + losses["scale2"])
    losses["scale2"].backward()
    assert images.grad is None  # the zoomed crop is detached from the input
    from_zoom = {n for n, p in method.named_parameters() if p.grad is not None and p.grad.any()}
    method.zero_grad(set_to_none=True)
    method.training_losses(batch)["scale1"].backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    from_image = {n for n, p in method.named_parameters() if p.grad is not None and p.grad.any()}
    # Both scales train the same weights, the head included.
    assert from_zoom == from_image and "head.weight" in from_zoom


def test_zoom_loss_weight_and_predict_from() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    method = build_method(tiny_config("resnet18", "method.zoom_loss_weight=0"), 3)
    losses = method.training_losses(Batch(images, torch.tensor([0, 1])))
    torch.testing.assert_close(losses["loss"], losses["scale1"])  # the released trainer's loss
    method.eval()
    with torch.no_grad():
        looks = method.look_closer(images)
        torch.testing.assert_close(method(images), looks.logits[0] + looks.logits[1])
        method.options.predict_from = "last"
        torch.testing.assert_close(method(images), looks.logits[1])


# ---- CAM importance ---------------------------------------------------------------------------------
def test_cam_is_the_predicted_class_weights_times_the_feature_map() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 3, 4, generator=gen)
    head = nn.Linear(5, 3)
    classes = torch.tensor([2, 0])
    cam = class_activation_map(features, head, classes)
    for b in range(2):
        expected = torch.einsum("c,chw->hw", head.weight[classes[b]], features[b]).clamp_min(0)
        torch.testing.assert_close(cam[b], expected / expected.max())


def test_importance_auto_picks_rollout_on_vits_and_cam_on_cnns() -> None:
    assert build_method(tiny_config(), 3).importance_kind == "rollout"
    assert build_method(tiny_config("resnet18"), 3).importance_kind == "cam"
    vit_cam = build_method(tiny_config("vit_tiny_patch16_224", "method.importance=cam"), 3)
    assert vit_cam.importance_kind == "cam"
    with torch.no_grad():
        assert vit_cam.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("resnet18", "method.importance=rollout"), "not a Vision Transformer"),
        (
            (
                "vit_tiny_patch16_224",
                "model.kwargs.class_token=false",
                "model.kwargs.global_pool=avg",
            ),
            "has no class token; use method.rollout_query=mean",
        ),
        (("resnet18", "method.scales=4"), "method.scales"),
        (("resnet18", "method.predict_from=max"), "method.predict_from"),
    ],
)
def test_bad_options_name_the_option(overrides, message) -> None:
    with pytest.raises(LookcloserError, match=message):
        build_method(tiny_config(*overrides), 3)


def test_mean_query_works_without_a_class_token() -> None:
    cfg = tiny_config(
        "vit_tiny_patch16_224",
        "model.kwargs.class_token=false",
        "model.kwargs.global_pool=avg",
        "method.rollout_query=mean",
    )
    with torch.no_grad():
        _, importance = build_method(cfg, 3).eval()._look(torch.rand(1, 3, 64, 64), True)
    assert importance.shape == (1, 4, 4)


# ---- saved model, export, explain -----------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "alpha"), [("vit_tiny_patch16_224", 1.3), ("resnet18", 1.0)])
def test_onnx_runs_the_multi_scale_graph_with_real_boxes(
    backbone: str, alpha: float, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(backbone, "method.scales=3", f"method.alpha={alpha}")
    method = build_method(cfg, 3).eval()
    if backbone.startswith("vit"):
        sharpen_attention(method)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        boxes = method.look_closer(images).boxes
    whole = torch.tensor([0.0, 0, 64, 64])
    assert all(not torch.equal(box, whole) for box in boxes[0])  # every image zooms
    predictor = Predictor(method, CLASSES, 64)
    path = export_onnx(predictor, tmp_path / "model.onnx")
    assert max_abs_difference(predictor, path, images) < 1e-3
    assert max_abs_difference(predictor, path, torch.rand(3, 3, 64, 64)) < 1e-3


class Proposals(nn.Module):
    def forward(self, importance: torch.Tensor) -> torch.Tensor:
        return propose_boxes(importance, 1.0, (16.0, 16.0), (224, 224))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the grid size is a constant
def test_exported_box_selection_matches_eager_on_long_components(tmp_path: Path) -> None:
    """The traced schedule (h*w - 1 label steps) on a 14 x 14 grid, snakes included."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(8, 14, 14, generator=gen)
    maps[0] = 0.0
    maps[0, 0::2, :] = 1.0  # a snake across the whole grid
    maps[0, 1:13:4, 13] = 1.0
    maps[0, 3:13:4, 0] = 1.0
    path = tmp_path / "boxes.onnx"
    example = torch.rand(2, 14, 14, generator=gen)  # the graph must not depend on it
    torch.onnx.export(
        Proposals(),
        (example,),
        str(path),
        input_names=["importance"],
        output_names=["boxes"],
        dynamic_axes={"importance": {0: "batch"}, "boxes": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_boxes,) = session.run(["boxes"], {"importance": maps.numpy()})
    expected = Proposals()(maps)
    np.testing.assert_array_equal(onnx_boxes, expected.numpy())
    assert expected[0].tolist() == [0.0, 0.0, 224.0, 208.0]  # rows 0-12, every column


def test_paste_places_a_map_over_its_box() -> None:
    maps = torch.ones(1, 2, 2)
    out = paste(maps, torch.tensor([[16.0, 32.0, 48.0, 64.0]]), (64, 64))
    assert out[0, 32:64, 16:48].min() == 1 and out.sum() == 32 * 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ramstrans")
    torch.manual_seed(0)
    cfg = tiny_config("resnet18", "method.alpha=1.0", "method.scales=3")
    method = build_method(cfg, 3).eval()
    save_run_model(out, method.for_inference(), TrainingData(CLASSES), cfg, {}, "bicubic")
    return out


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8))


def test_explain_shows_each_scale_its_map_box_and_crop(model_dir: Path) -> None:
    predictor = Predictor.load(model_dir)
    explanation = predictor.explain(picture())
    assert explanation.map_name == "cam-scale1"
    assert list(explanation.views) == [
        "scale 1: importance, box",
        "scale 2: zoomed crop",
        "scale 2: importance, box",
        "scale 3: zoomed crop",
        "scale 3: importance",
    ]
    tensor = predictor.preprocess(picture())[None]
    with torch.no_grad():
        looks = predictor.method.look_closer(tensor)
    crop = np.asarray(explanation.views["scale 2: zoomed crop"]).astype(int)
    expected = (looks.images[1][0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(int)
    assert np.abs(crop - expected).max() <= 1
    # The box is drawn in green on the first scale's view.
    drawn = np.asarray(explanation.views["scale 1: importance, box"])
    x0, y0, x1, y1 = (int(v) for v in looks.boxes[0][0])
    assert tuple(drawn[y0, (x0 + x1) // 2]) == (0, 255, 0)

    maps = predictor.method.attention_maps(tensor)
    assert list(maps) == ["cam-scale1", "cam-scale2", "cam-scale3"]
    # A zoomed scale's map covers the region of the image that scale saw, nothing else.
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert maps["cam-scale2"][0][outside].max() == 0 and maps["cam-scale2"].max() > 0
    second = predictor.explain(picture(), map_name="cam-scale2")
    assert not np.allclose(second.heatmap, explanation.heatmap)


def test_cli_explain_writes_every_scale(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "bird.png"
    picture(1).save(image)
    out = api.explain(model_dir, image, tmp_path / "plain.png")
    # Seven panels (input, overlay and five views): far wider than tall.
    assert Image.open(out).width > 4.5 * Image.open(out).height
    assert cli.main(["explain", str(model_dir), str(image), "--map", "cam-scale3"]) == 0


def test_for_inference_and_a_model_directory_keep_the_logits(model_dir: Path) -> None:
    predictor = Predictor.load(model_dir)
    assert predictor.info["method"] == "ramstrans"
    assert predictor.info["method_options"]["scales"] == 3
    images = torch.rand(2, 3, 64, 64)
    cfg = tiny_config("resnet18", "method.alpha=1.0", "method.scales=3")
    torch.manual_seed(0)
    fresh = build_method(cfg, 3).eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor.logits(images), fresh(images))


# ---- recipes -----------------------------------------------------------------------------------
RECIPES = sorted((REPO / "configs").glob("*/ramstrans-*.yaml"))


def test_the_recipes_exist() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert {"cub200/ramstrans-vitb16.yaml", "dogs/ramstrans-vitb16.yaml"} <= names
    assert {
        "synthetic/ramstrans-vit.yaml",
        "flowers12/ramstrans-lite0.yaml",
        "butterflies10/ramstrans-lite0.yaml",
        "cars66/ramstrans-lite0.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_load_with_valid_options(path: Path) -> None:
    from lookcloser.api import check_config

    cfg = Config.load(path, ["data.root=/nonexistent"])
    assert cfg.method["name"] == "ramstrans"
    assert cfg.data.root == "/nonexistent"  # recipes name no data folder
    check_config(cfg)


def test_cpu_recipe_models_build_and_run() -> None:
    """The from-scratch ViT recipe and the CAM recipe build at their sizes (no weights)."""
    for name in ("synthetic/ramstrans-vit.yaml", "flowers12/ramstrans-lite0.yaml"):
        cfg = Config.load(REPO / "configs" / name, ["model.pretrained=false"])
        method = build_method(cfg, 4).eval()
        size = cfg.data.image_size
        with torch.no_grad():
            assert method(torch.rand(1, 3, size, size)).shape == (1, 4)
