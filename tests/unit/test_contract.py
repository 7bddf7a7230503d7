"""The Method contract, checked for every registered method on a CNN and a ViT.

A new method is covered by its registration alone: it must train (finite losses, gradients to
every trainable parameter), infer (its `for_inference` copy gives the trained model's logits),
round-trip through a model directory, export to ONNX with parity, and explain with a map in
[0, 1]. A method whose defaults cannot run on 64 px images names its small-image options in
`CONTRACT_OPTIONS` below (the one place a method may need to appear here); a method that
cannot run on a ViT at all says so in `CNN_ONLY`, and the contract then checks that building
it on the ViT fails with a ConfigError naming the reason.

The attention plug-ins (model.attention=se|sk|cbam, model.stn=true) go through the same
contract on the baseline (`PLUGINS`): they must train, save, reload, export and explain with
any method, so the baseline stands for all.

Class heads and metadata fusion are the method's own code paths (each method calls its heads
and its loss), so every method also passes the contract with an ArcFace head, and with
metadata fused into sub-centre ArcFace heads (`HEAD_VARIANTS`, on the CNN); with metadata the
contract also checks that the model's logits depend on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookcloser.config import Config
from lookcloser.data.batch import Batch
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import ConfigError
from lookcloser.export.onnx import export_onnx, max_abs_difference
from lookcloser.methods import _import_builtin_methods, build_method
from lookcloser.methods.base import METHODS
from lookcloser.models.fusion import MetaFusion
from lookcloser.models.modes import eval_mode
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

SIZE, CLASSES = 64, ["a", "b", "c"]
BACKBONES = {
    "resnet18": [],
    "vit_tiny_patch16_224": ["model.kwargs.img_size=64"],  # a 4 x 4 patch grid
}
# Options for 64 px inputs where a method's defaults assume paper-sized images.
CONTRACT_OPTIONS = {
    "dcl": ["method.regions=2", "method.neighbourhood=1"],
    "tasn": ["method.attention_channels=32"],  # a small dilated head: fast enough here
    # Two scales and a small APN (the contract's first step is the APN pretraining one, which
    # reaches every parameter).
    "racnn": ["method.scales=2", "method.apn_channels=8", "method.apn_hidden=16"],
    # 16 px cells: a 4 x 4 grid, matched by the coarse ResNet's stage 2 at half size.
    "dcn": [
        "method.patch_size=16",
        "method.glimpses=3",
        "method.coarse_stage=2",
        "method.top_channels=32",
    ],
}

# Methods that need CNN feature maps where a ViT has tokens: building one on the ViT must fail
# with a ConfigError matching this text.
CNN_ONLY = {
    "dcn": "must be a CNN",  # its fine network classifies patches smaller than the input
}
HEAD_VARIANTS = {
    "arcface": ["model.head=arcface"],
    "fusion": [
        "model.head=subcenter_arcface",
        "model.fusion=gate",
        "model.meta_hidden=16",
        "data.meta_keys=[latitude, longitude, day_of_year, elevation]",
    ],
}
# Object-crop fusion (model.crop_fusion): every method that declares supports_crop_fusion runs
# the whole contract with it (crops from its own attention, exported in the ONNX graph).
CROP_FUSION = {
    "concat": ["model.crop_fusion=concat"],
    "add": ["model.crop_fusion=add", "model.crop_alpha=1.3"],
}
PLUGINS = {
    "se": ["model.attention=se"],
    "sk": ["model.attention=sk"],
    "cbam": ["model.attention=cbam"],
    "stn": ["model.stn=true"],
    # A pretrained localisation net, and views smaller than the input (zoom headroom).
    "stn-localisation-backbone": [
        "model.stn=true",
        "model.stn_localisation=backbone",
        f"model.stn_view_size={SIZE // 2}",
    ],
}

_import_builtin_methods()
BUILTIN = sorted(name for name, cls in METHODS.items() if cls.__module__.startswith("lookcloser."))


def _config(method: str, backbone: str, *extra: str) -> Config:
    return Config.load(
        None,
        [
            f"model.backbone={backbone}",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            "data.crop_pct=1.0",
            f"method.name={method}",
            *BACKBONES[backbone],
            *CONTRACT_OPTIONS.get(method, []),
            *extra,
        ],
    )


@pytest.fixture(params=BACKBONES)
def backbone(request) -> str:
    return request.param


@pytest.mark.parametrize("name", BUILTIN)
def test_method_contract(name, backbone, tmp_path):
    torch.manual_seed(0)
    cfg = _config(name, backbone)
    if name in CNN_ONLY and backbone.startswith("vit"):
        with pytest.raises(ConfigError, match=CNN_ONLY[name]):
            build_method(cfg, len(CLASSES))
        return
    check_contract(name, cfg, tmp_path)


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
@pytest.mark.parametrize("name", BUILTIN)
def test_method_contract_with_margin_heads_and_fusion(name, variant, tmp_path):
    torch.manual_seed(0)
    check_contract(name, _config(name, "resnet18", *HEAD_VARIANTS[variant]), tmp_path)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_baseline_with_each_attention_plugin(plugin, tmp_path):
    torch.manual_seed(0)
    cfg = _config("baseline", "resnet18", *PLUGINS[plugin])
    names = check_contract("baseline", cfg, tmp_path)
    # Explain shows what the plug-in did: CBAM's spatial maps, the STN's warped input, the
    # blocks' channel weights.
    expected = {
        "se": ("se channel weights",),
        "sk": ("sk branch weights",),
        "cbam": ("cbam channel weights", "cbam-spatial-layer4"),
        "stn": ("stn: warped input",),
        "stn-localisation-backbone": ("stn: warped input",),
    }[plugin]
    assert set(expected) <= names, names


def check_contract(name: str, cfg: Config, tmp_path) -> set[str]:
    """Train, infer, save, reload, export and explain `cfg`'s method; the names of the maps
    and views explain showed."""
    method = build_method(cfg, len(CLASSES))
    images = torch.rand(4, 3, SIZE, SIZE)
    targets = torch.tensor([0, 1, 2, 0])
    meta = ()
    if cfg.data.meta_keys:  # values for every key, some masked
        mask = torch.rand(4, len(cfg.data.meta_keys)) > 0.3
        meta = (torch.where(mask, torch.rand(mask.shape) * 90, 0.0), mask)
        for fusion in [m for m in method.modules() if isinstance(m, MetaFusion)]:
            # Fusion starts as the identity (zero last layer); make the metadata count.
            torch.nn.init.normal_(fusion.mlp[-1].weight)

    # Training: finite losses, and every trainable parameter is reached by the loss (a zero
    # gradient counts: timm zero-initialises ResNets' last BN in each block).
    method.train()
    losses = method.training_losses(Batch(images, targets, *meta))
    assert "loss" in losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    losses["loss"].backward()
    unreached = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not unreached, f"no gradient reaches {unreached[:5]}"

    # Inference: the saved form computes the trained model's logits.
    method.eval()
    inference = method.for_inference().eval()
    with torch.no_grad():
        logits = method(images, *meta)
        assert logits.shape == (4, len(CLASSES))
        torch.testing.assert_close(inference(images, *meta), logits)
        if meta:  # declared metadata is never silently ignored
            other = (meta[0].flip(0), meta[1].flip(0))
            assert not torch.allclose(method(images, *other), logits)

    # A model directory round trip gives the same logits.
    save_run_model(tmp_path, inference, TrainingData(CLASSES), cfg, {}, "bicubic")
    predictor = Predictor.load(tmp_path)
    assert predictor.info["method"] == name
    torch.testing.assert_close(predictor.logits(images, *meta), logits)

    # ONNX export matches PyTorch.
    onnx_path = export_onnx(predictor, tmp_path / "model.onnx")
    assert max_abs_difference(predictor, onnx_path) < 1e-3

    # Explain: every map of the method is image-sized and in [0, 1].
    picture = Image.fromarray(
        (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8")
    )
    maps = predictor.method.explain_maps(predictor.preprocess(picture)[None])
    assert maps
    for map_name, heatmap in maps.items():
        assert heatmap.shape == (1, SIZE, SIZE), map_name
        assert heatmap.min() >= 0 and heatmap.max() <= 1, map_name
    explanation = predictor.explain(picture)
    assert explanation.heatmap.shape == (SIZE, SIZE)
    # Views a method shows beside the map (TASN's sampled image) are RGB pictures.
    for view_name, view in explanation.views.items():
        assert view.mode == "RGB" and min(view.size) > 0, view_name
    return set(maps) | set(explanation.views)


@pytest.mark.parametrize(
    ("backbone", "variant"),
    [("resnet18", "concat"), ("resnet18", "add"), ("vit_tiny_patch16_224", "concat")],
)
@pytest.mark.parametrize(
    "name", [n for n in BUILTIN if METHODS[n].supports_crop_fusion] or ["baseline"]
)
def test_method_contract_with_crop_fusion(name, variant, backbone, tmp_path):
    """CAM boxes on the CNN, rollout boxes on the ViT (both fusions on the CNN)."""
    torch.manual_seed(0)
    cfg = _config(name, backbone, *CROP_FUSION[variant])
    names = check_contract(name, cfg, tmp_path)
    assert {"crop box (attention)", "crop"} <= names, names  # explain shows the crop


@pytest.mark.parametrize("name", [n for n in BUILTIN if not METHODS[n].supports_crop_fusion])
def test_methods_without_crop_fusion_refuse_it(name):
    with pytest.raises(ConfigError, match=f"method {name!r} does not support crop fusion"):
        build_method(_config(name, "resnet18", "model.crop_fusion=concat"), len(CLASSES))


# ---- semi-supervised strategies compose with every method ------------------------------------------
@pytest.mark.parametrize("strategy", ["pseudo_label", "fixmatch"])
@pytest.mark.parametrize("name", BUILTIN)
def test_method_trains_with_each_online_semi_strategy(name, strategy):
    """The unlabelled objective (semi.strategy) labels through the method's inference path and
    trains through it: a finite loss whose gradient reaches the method's class decision."""
    from lookcloser.config import SemiConfig
    from lookcloser.semi.online import UnlabelledObjective

    torch.manual_seed(0)
    method = build_method(_config(name, "resnet18"), len(CLASSES))
    images = torch.rand(4, 3, SIZE, SIZE)
    batch = Batch(images, torch.tensor([0, 1, 2, 0]), unlabelled=images, unlabelled_strong=images)
    semi = SemiConfig(strategy=strategy, ood_score="prototype", threshold=0.0, val_keep=1.0)
    objective = UnlabelledObjective(semi, len(CLASSES), method.backbone.num_features)
    method.train()
    objective.losses(method, method, batch)  # labelled embeddings -> class prototypes
    objective.start_validation()
    with torch.no_grad(), eval_mode(method):
        objective.observe_validation(method, images, method(images))
    objective.end_validation()  # threshold: keeps every val image
    losses = objective.losses(method, method, batch)
    assert torch.isfinite(losses["unlabelled"]) and losses["kept"] > 0
    losses["unlabelled"].backward()
    grads = [p.grad for p in method.for_inference().parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
