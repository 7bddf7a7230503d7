"""Test-time augmentation: the spec, the views, the averaging, the model's stored default."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from lookcloser import api, cli
from lookcloser.config import Config
from lookcloser.errors import ConfigError
from lookcloser.methods import build_method
from lookcloser.methods.baseline import Baseline
from lookcloser.modeldir import save_model_dir
from lookcloser.predictor import Predictor
from lookcloser.tta import TTA, five_crop_boxes

CLASSES = ["a", "b", "c"]


def tiny_method(seed: int = 0) -> Baseline:
    torch.manual_seed(seed)
    cfg = Config.load(None, ["model.backbone=test_resnet", "model.pretrained=false"])
    return build_method(cfg, len(CLASSES)).eval()


class MirrorInvariant(torch.nn.Module):
    """A model whose logits are the same for an image and its mirror image."""

    def __init__(self, method: Baseline):
        super().__init__()
        self.inner = method
        self.meta_keys: list[str] = []

    def forward(self, images, meta=None, meta_mask=None):
        return self.inner(images) + self.inner(images.flip(-1))


def picture(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


# ---- the spec ------------------------------------------------------------------------------------
def test_spec_parses_and_prints_back():
    tta = TTA.parse("flip,five_crop,scales=224+288")
    assert tta == TTA(flip=True, five_crop=True, scales=(224, 288))
    assert tta.view_count() == 20 and TTA.parse(tta.spec()) == tta
    assert TTA.parse("none") is None and TTA.parse("") is None and TTA.parse(None) is None
    with pytest.raises(ConfigError, match="unknown item 'mirror'.*flip, five_crop"):
        TTA.parse("mirror")
    with pytest.raises(ConfigError, match="scales=S1\\+S2"):
        TTA.parse("scales=224+big")


# ---- the views -----------------------------------------------------------------------------------
def test_five_crop_boxes_are_the_corners_and_the_centre():
    assert five_crop_boxes(10, 8, 4) == [
        (0, 0, 4, 4),
        (6, 0, 10, 4),
        (0, 4, 4, 8),
        (6, 4, 10, 8),
        (3, 2, 7, 6),
    ]
    with pytest.raises(ConfigError, match="larger than the image"):
        five_crop_boxes(10, 8, 9)
    # The crops are torchvision's FiveCrop of the resized image, in the same order.
    image = picture(48, 40)
    views = TTA(five_crop=True, scales=(32,)).views(32, crop_pct=0.8)(image)
    assert len(views) == 1 and views[0].shape == (5, 3, 32, 32)
    resized = T.Resize(40, interpolation=T.InterpolationMode.BICUBIC)(image)  # 32 / 0.8
    expected = torch.stack([TF.to_tensor(c) for c in T.FiveCrop(32)(resized)])
    assert torch.equal(views[0], expected)


def test_one_view_at_the_model_size_is_the_plain_evaluation_transform():
    predictor = Predictor(tiny_method(), CLASSES, 32, crop_pct=0.875)
    image = picture()
    (views,) = TTA(scales=(32,)).views(32, 0.875)(image)
    assert torch.equal(views[0], predictor.transform(image))


# ---- averaging -----------------------------------------------------------------------------------
def test_flip_tta_on_a_mirror_invariant_model_equals_no_tta(tmp_path):
    images = [picture(seed=s) for s in range(3)]
    model = MirrorInvariant(tiny_method())
    plain = Predictor(model, CLASSES, 32, crop_pct=1.0).image_probabilities(images)
    flipped = Predictor(model, CLASSES, 32, crop_pct=1.0, tta="flip").image_probabilities(images)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-6)
    # The test can fail: a model that is not mirror-invariant gives other probabilities.
    method = tiny_method()
    other = Predictor(method, CLASSES, 32, 1.0, tta="flip").image_probabilities(images)
    assert not torch.allclose(
        other, Predictor(method, CLASSES, 32, 1.0).image_probabilities(images)
    )


def test_tta_averages_the_softmax_of_every_view():
    method = tiny_method()
    image = picture(48, 40)
    predictor = Predictor(method, CLASSES, 32, crop_pct=1.0, tta="flip,five_crop,scales=32+40")
    got = predictor.image_probabilities([image])[0]
    # By hand: each scale resized (shorter side), five crops, each and its mirror.
    views = []
    for size in (32, 40):
        resized = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(image)
        for crop in T.FiveCrop(size)(resized):
            views += [TF.to_tensor(crop), TF.to_tensor(TF.hflip(crop))]
    with torch.no_grad():
        expected = torch.stack([method(v[None]).softmax(dim=1)[0] for v in views]).mean(dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got.sum()) == pytest.approx(1.0)


# ---- files, eval and the stored default ----------------------------------------------------------
def folder_overrides(root) -> list[str]:
    """A tiny untrained model on the 32 px image folder at `root`."""
    return [
        "model.backbone=test_resnet",
        "model.pretrained=false",
        "data.source=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.crop_pct=1.0",
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved (untrained) model and a 3-class image folder it can be evaluated on."""
    from lookcloser.data.synthetic import generate

    root = generate(tmp_path_factory.mktemp("set"), 3, 4, 3, 40, seed=2)
    cfg = Config.load(None, folder_overrides(root))
    method = tiny_method()
    classes = sorted(p.name for p in (root / "train").iterdir())
    info = {
        "method": "baseline",
        "method_options": {"label_smoothing": 0.1},
        "classes": classes,
        "preprocessing": {"image_size": 32, "crop_pct": 1.0, "interpolation": "bicubic"},
        "meta_keys": [],
        "config": cfg.to_dict(),
    }
    path = save_model_dir(tmp_path_factory.mktemp("model") / "m", method.state_dict(), info)
    return path, root


def test_predict_and_eval_take_tta_and_the_stored_default(model_dir, capsys):
    path, root = model_dir
    plain = api.evaluate(path, progress=False)
    with_tta = api.evaluate(path, progress=False, tta="flip,five_crop")
    assert plain["images"] == with_tta["images"] == 9
    assert plain["ece"] != with_tta["ece"]  # other probabilities
    files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    by_hand = Predictor.load(path, tta="flip,five_crop").image_probabilities(
        [Image.open(f) for f in files]
    )
    predicted = api.predict(path, [root / "test"], top_k=3, tta="flip,five_crop")
    got = {p.path: p.probs[0] for p in predicted}
    assert [got[f] for f in files] == pytest.approx(by_hand.max(dim=1).values.tolist(), abs=1e-6)

    assert cli.main(["tta-default", str(path), "flip,five_crop"]) == 0
    assert json.loads((path / "model.json").read_text())["tta"] == "flip,five_crop"
    assert api.load(path).tta == TTA(flip=True, five_crop=True)
    assert api.evaluate(path, progress=False) == with_tta  # the default applies
    assert api.load(path, tta="none").tta is None  # and can be turned off
    assert cli.main(["eval", str(path), "--tta", "none", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["ece"] == plain["ece"]
    assert cli.main(["tta-default", str(path), "none"]) == 0
    assert "tta" not in json.loads((path / "model.json").read_text())
    Predictor.load(path)  # the weights' checksum still matches after the rewrite
    assert cli.main(["predict", str(path), str(root / "test"), "--tta", "nope"]) == 2


def test_every_view_carries_its_image_metadata():
    from lookcloser.tta import average_probabilities

    def by_meta(images, meta, meta_mask):  # logits from the metadata alone
        assert len(images) <= 2  # forward passes no larger than the batch
        return torch.where(meta_mask, meta, 0.0) * 5

    meta = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    views = [torch.rand(2, 5, 3, 8, 8), torch.rand(2, 5, 3, 12, 12)]
    probs = average_probabilities(by_meta, views, True, meta, mask)
    torch.testing.assert_close(probs, (torch.where(mask, meta, 0.0) * 5).softmax(dim=1))


def test_model_tta_is_the_trained_models_default_and_its_report(model_dir, tmp_path):
    _, root = model_dir
    out = tmp_path / "run"
    common = [
        *folder_overrides(root),
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.epochs=1",
        "trainer.val_every_n_epochs=0",
    ]
    with pytest.raises(ConfigError, match="model.tta='mirror': .*unknown item 'mirror'"):
        api.train(overrides=[*common, "model.tta=mirror", f"out={out}"], progress=False)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="model.tta='flip' with data.test_boxes='dataset'"):
        api.check_config(
            Config.load(
                None, ["model.tta=flip", "model.crop_fusion=concat", "data.test_boxes=dataset"]
            )
        )

    result = api.train(overrides=[*common, "model.tta=flip", f"out={out}"], progress=False)
    assert json.loads((out / "model.json").read_text())["tta"] == "flip"
    assert api.load(out).tta == TTA(flip=True)
    reported = json.loads((out / "metrics.json").read_text())["test"]
    assert reported["tta"] == "flip" and result.metrics["test"]["tta"] == "flip"
    # The run's test report is the stored default's evaluation, not the plain one.
    with_flip = api.evaluate(out, progress=False)
    plain = api.evaluate(out, progress=False, tta="none")
    assert reported["ece"] == pytest.approx(with_flip["ece"], abs=1e-6)
    assert reported["ece"] != pytest.approx(plain["ece"], abs=1e-6)
