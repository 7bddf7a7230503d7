"""DCL: region confusion, alignment targets, losses, the saved model and its maps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lookcloser.config import Config, method_options
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.methods.baseline import Baseline
from lookcloser.methods.dcl import (
    DCL,
    DCLOptions,
    RegionAlignment,
    alignment_map,
    alignment_targets,
    identity_source,
    rcm_permutation,
    region_confusion,
    region_grid,
)
from lookcloser.models.backbones import Backbone

TINY = "test_efficientnet"  # timm's test model: 0.1 M parameters, stride 32
REPO = Path(__file__).resolve().parents[2]


def tiny_dcl(classes: int = 5, **options) -> DCL:
    """A DCL on timm's tiny test backbone (random weights)."""
    options.setdefault("regions", 2)
    options.setdefault("neighbourhood", 1)
    return DCL(Backbone(TINY), classes, DCLOptions(**options))


def tiles_of(images: Tensor, regions: int) -> Tensor:
    """B x N x N x C x th x tw regions of the centred grid, cut with plain loops."""
    _, _, h, w = images.shape
    top, left, th, tw = region_grid(h, w, regions)
    return torch.stack(
        [
            torch.stack(
                [
                    images[
                        :, :, top + r * th : top + (r + 1) * th, left + c * tw : left + (c + 1) * tw
                    ]
                    for c in range(regions)
                ],
                dim=1,
            )
            for r in range(regions)
        ],
        dim=1,
    )


# ---- RCM ----------------------------------------------------------------------------------------
def test_rcm_is_a_bijection_within_the_neighbourhood() -> None:
    rng = random.Random(0)
    moved = 0
    for trial in range(60):
        n, k = rng.randint(1, 9), rng.randint(0, 4)
        gen = torch.Generator().manual_seed(trial)
        source = rcm_permutation(3, n, k, gen)
        assert source.shape == (3, n, n) and source.dtype == torch.long
        for perm in source:
            assert sorted(perm.flatten().tolist()) == list(range(n * n)), (n, k)
            rows = torch.arange(n).view(n, 1).expand(n, n)
            cols = torch.arange(n).view(1, n).expand(n, n)
            if k == 0:
                assert torch.equal(perm, rows * n + cols)
                continue
            assert ((perm // n - rows).abs() < 2 * k).all(), (n, k, perm)
            assert ((perm % n - cols).abs() < 2 * k).all(), (n, k, perm)
            moved += int(not torch.equal(perm, rows * n + cols))
    assert moved > 20  # it does shuffle, not just return the identity


@pytest.mark.parametrize(("regions", "neighbourhood"), [(1, 2), (1, 0), (7, 0), (4, 0)])
def test_rcm_with_one_region_or_no_neighbourhood_is_the_identity(
    regions: int, neighbourhood: int
) -> None:
    images = torch.rand(3, 3, 28, 28)
    destroyed, source = region_confusion(images, regions, neighbourhood)
    assert torch.equal(source, identity_source(3, regions))
    assert torch.equal(destroyed, images)


def test_rcm_uses_the_global_rng() -> None:
    torch.manual_seed(3)
    first = rcm_permutation(4, 7, 2)
    torch.manual_seed(3)
    assert torch.equal(rcm_permutation(4, 7, 2), first)
    assert not torch.equal(rcm_permutation(4, 7, 2), first)


@pytest.mark.parametrize(("height", "width", "regions"), [(28, 28, 7), (64, 48, 4), (37, 50, 4)])
def test_destroyed_image_is_a_retiling_of_the_original(
    height: int, width: int, regions: int
) -> None:
    images = torch.rand(3, 3, height, width)
    destroyed, source = region_confusion(images, regions, 2, torch.Generator().manual_seed(height))
    assert destroyed.shape == images.shape
    original, shuffled = tiles_of(images, regions), tiles_of(destroyed, regions)
    for b in range(3):
        for r in range(regions):
            for c in range(regions):
                s = int(source[b, r, c])
                assert torch.equal(shuffled[b, r, c], original[b, s // regions, s % regions])
    # Outside the centred grid (sizes not divisible by N) the pixels stay where they were.
    top, left, th, tw = region_grid(height, width, regions)
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[top : top + th * regions, left : left + tw * regions] = True
    assert torch.equal(destroyed[..., ~inside], images[..., ~inside])
    assert not torch.equal(destroyed, images)


def test_region_grid_of_sizes_not_divisible_by_n() -> None:
    # 37 = 4 * 9 + 1 rows, 50 = 4 * 12 + 2 columns: the leftovers are split around the grid.
    assert region_grid(37, 50, 4) == (0, 1, 9, 12)
    assert region_grid(448, 448, 7) == (0, 0, 64, 64)
    with pytest.raises(ConfigError, match="method.regions=9"):
        region_grid(8, 64, 9)


# ---- alignment targets ----------------------------------------------------------------------------
def test_alignment_targets_of_identity_and_of_a_permutation() -> None:
    identity = identity_source(1, 2)
    coords = alignment_targets(identity, 2, "coords")[0]
    assert torch.allclose(coords[0], torch.tensor([[0.25, 0.25], [0.75, 0.75]]))  # rows
    assert torch.allclose(coords[1], torch.tensor([[0.25, 0.75], [0.25, 0.75]]))  # columns
    index = alignment_targets(identity_source(1, 3), 3, "index")[0, 0]
    assert torch.allclose(index, (torch.arange(9).view(3, 3) - 4).float() / 9)
    # The top row swapped: cell (0, 0) shows region (0, 1) and cell (0, 1) shows region (0, 0).
    swapped = torch.tensor([[[1, 0], [2, 3]]])
    coords = alignment_targets(swapped, 2, "coords")[0]
    assert torch.allclose(coords[0], torch.tensor([[0.25, 0.25], [0.75, 0.75]]))
    assert torch.allclose(coords[1], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert torch.allclose(
        alignment_targets(swapped, 2, "index")[0, 0], torch.tensor([[-0.25, -0.5], [0.0, 0.25]])
    )


class FixedOutput(RegionAlignment):
    """An alignment head that always predicts `output`."""

    def __init__(self, output: Tensor, regions: int, kind: str):
        super().__init__(1, regions, kind)
        self.output = output

    def forward(self, grid: Tensor) -> Tensor:
        return self.output + 0 * grid.sum()  # keeps the graph connected


@pytest.mark.parametrize("kind", ["coords", "index"])
def test_training_targets_are_identity_for_originals_and_the_permutation_for_destroyed(
    kind: str,
) -> None:
    method = tiny_dcl(regions=4, neighbourhood=2, alignment=kind)
    images, labels = torch.rand(3, 3, 128, 128), torch.tensor([0, 1, 2])
    torch.manual_seed(11)
    expected_source = rcm_permutation(3, 4, 2)
    assert not torch.equal(expected_source, identity_source(3, 4))
    truth = alignment_targets(torch.cat([identity_source(3, 4), expected_source]), 4, kind)
    method.alignment = FixedOutput(truth, 4, kind)
    torch.manual_seed(11)
    assert method.training_losses(Batch(images, labels))["loc"].item() == 0.0
    method.alignment = FixedOutput(alignment_targets(identity_source(6, 4), 4, kind), 4, kind)
    torch.manual_seed(11)
    assert method.training_losses(Batch(images, labels))["loc"].item() > 0.0


# ---- losses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("head", "kind"), [("binary", "coords"), ("class_pairs", "index")])
def test_losses_are_finite_and_decrease_on_a_tiny_batch(head: str, kind: str) -> None:
    torch.manual_seed(0)
    method = tiny_dcl(adversarial_head=head, alignment=kind)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])

    def losses() -> dict[str, Tensor]:
        torch.manual_seed(123)  # the same destroyed images before and after
        return method.training_losses(Batch(images, labels))

    before = losses()
    assert set(before) == {"loss", "cls", "adv", "loc"}
    assert all(torch.isfinite(v) for v in before.values())
    expected = before["cls"] + before["adv"] + before["loc"]
    assert torch.allclose(before["loss"], expected)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    for step in range(6):
        torch.manual_seed(step)
        loss = method.training_losses(Batch(images, labels))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = losses()
    assert all(torch.isfinite(v) for v in after.values())
    assert after["loss"] < before["loss"]


def test_loss_weights_and_one_hot_probabilities() -> None:
    method = tiny_dcl(alpha=0.5, beta=2.0, gamma=0.01, adversarial_head="class_pairs")
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 4])
    torch.manual_seed(5)
    hard = method.training_losses(Batch(images, labels))
    weighted = 0.5 * hard["cls"] + 2.0 * hard["adv"] + 0.01 * hard["loc"]
    assert torch.allclose(hard["loss"], weighted)
    # Mixup hands class probabilities (B x C); one-hot ones must give the same losses.
    torch.manual_seed(5)
    soft = method.training_losses(Batch(images, nn.functional.one_hot(labels, 5).float()))
    for name in hard:
        assert torch.allclose(hard[name], soft[name], atol=1e-6), name
    torch.manual_seed(5)
    mixed = torch.full((4, 5), 0.2)
    assert torch.isfinite(method.training_losses(Batch(images, mixed))["loss"])


@pytest.mark.parametrize(("ratio", "expected"), [(1.0, 8), (0.5, 6), (2.0, 12), (0.0, 4)])
def test_destroy_ratio_is_destroyed_images_per_original(ratio: float, expected: int) -> None:
    method = tiny_dcl(destroy_ratio=ratio)
    seen: list[int] = []
    forward_features = method.forward_features

    def record(images: Tensor) -> Tensor:
        seen.append(images.shape[0])
        return forward_features(images)

    method.forward_features = record
    losses = method.training_losses(Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])))
    assert seen == [expected]
    assert torch.isfinite(losses["loss"])


def test_gradients_reach_the_backbone_from_each_loss() -> None:
    method = tiny_dcl(adversarial_head="binary", alignment="coords")
    torch.manual_seed(1)
    losses = method.training_losses(Batch(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])))
    backbone = [p for p in method.backbone.parameters() if p.requires_grad]
    for name in ("cls", "adv", "loc"):
        grads = torch.autograd.grad(losses[name], backbone, retain_graph=True, allow_unused=True)
        total = sum(g.abs().sum() for g in grads if g is not None)
        assert total > 0, f"{name} does not reach the backbone"
    heads = {"cls": method.head, "adv": method.adversary, "loc": method.alignment}
    for name, head in heads.items():
        grads = torch.autograd.grad(losses[name], list(head.parameters()), retain_graph=True)
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_vit_token_grids_are_supported() -> None:
    method = DCL(Backbone("test_vit"), 3, DCLOptions(regions=5, neighbourhood=1))
    torch.manual_seed(0)
    losses = method.training_losses(Batch(torch.rand(2, 3, 160, 160), torch.tensor([0, 2])))
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert method.alignment.conv.weight.grad.abs().sum() > 0


def test_new_modules_are_the_three_heads() -> None:
    method = tiny_dcl()
    assert method.new_modules() == [method.head, method.adversary, method.alignment]


# ---- options and recipes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.regions=0", "method.regions"),
        ("method.neighbourhood=-1", "method.neighbourhood"),
        ("method.destroy_ratio=-0.5", "method.destroy_ratio"),
        ("method.gamma=-1", "method.gamma"),
        ("method.alignment=grid", "method.alignment"),
        ("method.adversarial_head=ternary", "method.adversarial_head"),
        ("method.region=3", "method.regions"),  # a typo gets a suggestion
    ],
)
def test_bad_options_name_the_option(override: str, message: str) -> None:
    cfg = Config.load(None, ["method.name=dcl", override])
    with pytest.raises(ConfigError, match=message):
        method_options(cfg, DCLOptions)


def test_options_defaults_are_the_papers() -> None:
    cfg = Config.load(None, ["method.name=dcl"])
    opts = method_options(cfg, DCLOptions)
    assert (opts.regions, opts.neighbourhood, opts.destroy_ratio) == (7, 2, 1.0)
    assert (opts.alpha, opts.beta, opts.gamma) == (1.0, 1.0, 1.0)
    assert (opts.adversarial_head, opts.alignment) == ("binary", "coords")


RECIPES = sorted((REPO / "configs").glob("*/dcl-*.yaml"))


def test_the_recipes_exist() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert {
        "cub200/dcl-resnet50.yaml",
        "cars/dcl-resnet50.yaml",
        "aircraft/dcl-resnet50.yaml",
        "synthetic/dcl-lite0.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_load_with_valid_dcl_options(path: Path) -> None:
    cfg = Config.load(path)
    assert cfg.method["name"] == "dcl"
    opts = method_options(cfg, DCLOptions)
    # Regions must fit the (train and test) input size.
    region_grid(cfg.data.image_size, cfg.data.image_size, opts.regions)
    if path.parent.name in ("cars", "aircraft"):
        assert opts.gamma == 0.01
    if path.parent.name == "aircraft":
        assert opts.regions == 2


# ---- the saved model ---------------------------------------------------------------------------------
def onnx_parameter_count(method: nn.Module, tmp_path: Path, name: str) -> int:
    """Numbers stored in the exported ONNX graph's initializers."""
    from lookcloser.export.onnx import export_onnx
    from lookcloser.predictor import Predictor

    path = export_onnx(Predictor(method, [str(i) for i in range(5)], 64), tmp_path / name)
    graph = onnx.load(str(path)).graph
    return sum(int(torch.tensor(list(t.dims)).prod()) for t in graph.initializer)


def test_inference_graph_costs_exactly_the_baselines(tmp_path: Path) -> None:
    method = tiny_dcl()
    inference = method.for_inference().eval()
    assert isinstance(inference, DCL) and inference.name == "dcl" and inference.inference_only
    baseline = Baseline(Backbone(TINY), 5).eval()
    images = torch.rand(2, 3, 64, 64)

    def flops(model: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images)
        return counter.get_total_flops()

    assert flops(inference) == flops(baseline) > 0
    assert onnx_parameter_count(inference, tmp_path, "dcl.onnx") == onnx_parameter_count(
        baseline, tmp_path, "baseline.onnx"
    )
    # It shares the trained weights, and computes exactly what a baseline with them computes.
    assert inference.backbone is method.backbone and inference.head is method.head
    shared = Baseline(method.backbone, 5).eval()
    shared.head = method.head
    with torch.no_grad():
        assert torch.equal(inference(images), shared(images))
    # The adversarial head is gone; the alignment conv stays (for explain) but is not in the graph.
    keys = set(inference.state_dict())
    assert not any(k.startswith("adversary.") for k in keys)
    assert not any(k.startswith("adversary.") for k, _ in inference.named_parameters())
    assert keys - set(shared.state_dict()) == {"alignment.conv.weight", "alignment.conv.bias"}
    # The training model keeps it, and computes the same logits.
    assert "adversary.weight" in method.state_dict()
    with torch.no_grad():
        assert torch.equal(method.eval()(images), inference(images))


def saved_dcl(run_dir: Path) -> tuple[DCL, Config]:
    """A tiny DCL (regions=2, index alignment) saved as a model directory in `run_dir`."""
    from lookcloser.training import save_run_model

    cfg = Config.load(
        None,
        [
            f"model.backbone={TINY}",
            "model.pretrained=false",
            "data.image_size=64",
            "method.name=dcl",
            "method.regions=2",
            "method.alignment=index",
            "method.gamma=0.01",
        ],
    )
    method = build_method(cfg, 5)
    assert isinstance(method, DCL)
    inference = method.for_inference().eval()
    save_run_model(
        run_dir, inference, TrainingData([f"c{i}" for i in range(5)]), cfg, {}, "bicubic"
    )
    return method.eval(), cfg


def test_model_directory_round_trip_and_explain_maps(tmp_path: Path) -> None:
    from lookcloser.predictor import Predictor

    method, _ = saved_dcl(tmp_path)
    inference = method.for_inference()
    predictor = Predictor.load(tmp_path)
    assert isinstance(predictor.method, DCL) and predictor.method.inference_only
    assert predictor.info["method"] == predictor.info["trained_with"] == "dcl"
    assert not hasattr(predictor.method, "adversary")
    assert predictor.method.options.regions == 2
    assert predictor.method.options.alignment == "index"
    assert predictor.method.options.gamma == 0.01
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(predictor.logits(images), method(images))

    maps = predictor.method.attention_maps(images)
    assert list(maps) == ["grad-cam", "region-alignment"]
    for heatmap in maps.values():
        assert heatmap.shape == (2, 64, 64)
        assert heatmap.min() >= 0 and heatmap.max() <= 1
    alignment = maps["region-alignment"]
    assert torch.allclose(alignment, inference.attention_maps(images)["region-alignment"])
    # One value per region cell (nearest upsampling of the 2 x 2 grid).
    assert torch.equal(alignment[:, :32, :32], alignment[:, :1, :1].expand(-1, 32, 32))
    # `lookcloser explain --map region-alignment` goes through Predictor.explain.
    picture = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    explanation = predictor.explain(picture, map_name="region-alignment")
    assert explanation.heatmap.shape == (64, 64)
    assert explanation.heatmap.min() > 0 and explanation.heatmap.max() <= 1


def test_loading_is_strict_about_training_only_tensors(tmp_path: Path) -> None:
    """A directory holding the adversary too does not fit the rebuilt model: no silent extras."""
    from lookcloser.errors import ModelDirError
    from lookcloser.modeldir import read_model_json, save_model_dir
    from lookcloser.predictor import Predictor

    method, _ = saved_dcl(tmp_path)
    record = read_model_json(tmp_path)
    info = {k: v for k, v in record.items() if k not in ("format", "format_version", "weights")}
    save_model_dir(tmp_path / "full", method.state_dict(), info)
    with pytest.raises(ModelDirError, match="adversary"):
        Predictor.load(tmp_path / "full")


def test_directory_of_the_previous_version_loads(tmp_path: Path) -> None:
    """model.json from before (method "dcl-classifier", its two options) loads as `dcl`."""
    from lookcloser.predictor import Predictor

    method, _ = saved_dcl(tmp_path)
    # The previous version wrote the same tensors under this name and these options.
    update_model_json(
        tmp_path, method="dcl-classifier", method_options={"regions": 2, "alignment": "index"}
    )
    predictor = Predictor.load(tmp_path)
    assert predictor.method.name == "dcl"
    assert predictor.method.options.alignment == "index"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(predictor.logits(images), method(images))
    assert "region-alignment" in predictor.method.attention_maps(images)


@pytest.mark.parametrize("kind", ["coords", "index"])
def test_region_alignment_map_scores_how_well_regions_are_placed(kind: str) -> None:
    method = tiny_dcl(regions=2).for_inference().eval()
    images = torch.rand(1, 3, 64, 64)
    exact = alignment_targets(identity_source(1, 2), 2, kind)
    assert torch.allclose(alignment_map(method, FixedOutput(exact, 2, kind), images), torch.ones(1))
    # Cell (0, 0) claims to be region (0, 1): one cell off along one axis.
    wrong = alignment_targets(torch.tensor([[[1, 1], [2, 3]]]), 2, kind)
    heatmap = alignment_map(method, FixedOutput(wrong, 2, kind), images)
    top_left = 1 / (1 + 0.5) if kind == "coords" else 1 / (1 + 1)  # coords: mean of 2 axes
    assert torch.allclose(heatmap[0, 0, 0], torch.tensor(top_left))
    assert torch.allclose(heatmap[0, 63, 63], torch.tensor(1.0))


def update_model_json(path, **fields) -> None:
    """Rewrite top-level fields of a model directory's model.json (to fake other versions)."""
    record = json.loads((path / "model.json").read_text())
    record.update(fields)
    (path / "model.json").write_text(json.dumps(record, indent=2) + "\n")
