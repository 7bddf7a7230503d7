"""Object-crop fusion: boxes from the data (dataset annotations, JSON box files), crops cut
from the original image, attention boxes chosen without gradient, the fused head."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from lookcloser.config import Config
from lookcloser.data.boxes import (
    check_box_config,
    crop_to_box,
    read_box_file,
    sample_boxes,
)
from lookcloser.data.loading import ImageDataset
from lookcloser.data.sources import Sample
from lookcloser.data.transforms import eval_transform
from lookcloser.errors import ConfigError, DataError
from lookcloser.methods import build_method
from lookcloser.models.crops import CropFusedHead, attention_crops
from lookcloser.models.zoom import zoom
from lookcloser.predictor import Predictor

SIZE = 32


def _picture(path, size=(80, 60), box=(20, 10, 30, 24), colour=(255, 0, 0)) -> Image.Image:
    """A grey image with one coloured rectangle [x, y, w, h], saved to `path`."""
    image = Image.new("RGB", size, (128, 128, 128))
    x, y, w, h = box
    image.paste(colour, (x, y, x + w, y + h))
    image.save(path)
    return image


def _model(*extra: str):
    cfg = Config.load(
        None,
        [
            "model.backbone=resnet18",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            "model.crop_fusion=concat",
            *extra,
        ],
    )
    torch.manual_seed(0)
    return build_method(cfg, 3).eval()


# ---- crops from boxes of the data ------------------------------------------------------------------
def test_a_box_of_the_whole_image_gives_the_image_itself(tmp_path):
    path = tmp_path / "a.png"
    image = _picture(path)
    assert list(crop_to_box(image, (0, 0, 80, 60), "a").getdata()) == list(image.getdata())
    dataset = ImageDataset(
        [Sample(str(path), 0)], eval_transform(SIZE, 1.0), 10**8, boxes=[(0, 0, 80, 60)]
    )
    tensor, _, _, _, crop = dataset[0]
    torch.testing.assert_close(crop, tensor)
    # In the model: zooming into a box of the whole input is the identity.
    images = torch.rand(2, 3, SIZE, SIZE)
    whole = torch.tensor([[0.0, 0.0, SIZE, SIZE]] * 2)
    torch.testing.assert_close(zoom(images, whole, (SIZE, SIZE)), images)


def test_a_box_cuts_exactly_its_pixels_before_the_transform(tmp_path):
    path = tmp_path / "a.png"
    image = _picture(path, box=(20, 10, 30, 24))
    crop = crop_to_box(image, (20, 10, 30, 24), "a")
    assert crop.size == (30, 24) and set(crop.getdata()) == {(255, 0, 0)}
    # One pixel more on each side takes in the grey background.
    assert (128, 128, 128) in set(crop_to_box(image, (19, 9, 32, 26), "a").getdata())
    # Through the dataset (resize to the input size), the crop is all rectangle: the box is
    # cut from the original image, then resized, with no border from the resize of the image.
    samples = [Sample(str(path), 0), Sample(str(path), 0)]
    dataset = ImageDataset(
        samples, eval_transform(SIZE, 1.0), 10**8, boxes=[(20, 10, 30, 24), None]
    )
    _, _, _, _, crop_tensor = dataset[0]
    assert crop_tensor.shape == (3, SIZE, SIZE)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert (crop_tensor - red).abs().max() < 0.02
    # A sample without a box has the whole image as its crop.
    image_tensor, _, _, _, whole = dataset[1]
    torch.testing.assert_close(whole, image_tensor)


def test_crops_follow_the_training_augmentation_seed(tmp_path):
    from lookcloser.config import DataConfig
    from lookcloser.data.transforms import train_transform

    path = tmp_path / "a.png"
    _picture(path)
    dataset = ImageDataset(
        [Sample(str(path), 0)],
        train_transform(DataConfig(image_size=SIZE)),
        10**8,
        boxes=[(20, 10, 30, 24)],
    )
    first, again = dataset[(0, 7)], dataset[(0, 7)]
    torch.testing.assert_close(first[4], again[4])  # reproducible per (index, seed)
    assert not torch.equal(first[4], dataset[(0, 8)][4])


def test_box_file_reads_relative_and_absolute_paths(tmp_path):
    (tmp_path / "train").mkdir()
    elsewhere = tmp_path / "other.png"
    path = tmp_path / "boxes.json"
    path.write_text(
        json.dumps({"train/a.png": [1, 2, 3, 4], str(elsewhere): [0, 0, 5.5, 6]}),
        encoding="utf-8",
    )
    boxes = read_box_file(path)
    found = sample_boxes([str(tmp_path / "train" / "a.png"), str(elsewhere)], str(path))
    assert found == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 5.5, 6.0)]
    assert len(boxes) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[[1, 2, 3, 4]]", "expected an object mapping image path"),
        ('{"a.png": [1, 2, 3]}', "entry 'a.png': expected a box \\[x, y, w, h\\]"),
        ('{"a.png": [1, 2, "3", 4]}', "entry 'a.png': expected a box \\[x, y, w, h\\] of numbers"),
        ('{"a.png": [1, 2, 0, 4]}', "entry 'a.png': box .* width or height <= 0"),
        ('{"a.png": [-5, 2, 3, 4]}', "entry 'a.png': box .* left of or above the image"),
        ('{"a.png": [1, 2, NaN, 4]}', "entry 'a.png': box .* non-finite"),
    ],
)
def test_malformed_box_files_name_the_file_and_entry(tmp_path, content, message):
    path = tmp_path / "boxes.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_box_file(path)
    assert str(path) in str(err.value)


def test_missing_unmatched_and_out_of_range_boxes_are_errors(tmp_path):
    with pytest.raises(DataError, match="box file .*nope.json does not exist"):
        read_box_file(tmp_path / "nope.json")
    path = tmp_path / "boxes.json"
    path.write_text('{"x/a.png": [1, 2, 3, 4]}', encoding="utf-8")
    with pytest.raises(DataError, match="no entry matches the images"):
        sample_boxes([str(tmp_path / "b.png")], str(path))
    image = _picture(tmp_path / "a.png", size=(80, 60))
    with pytest.raises(DataError, match=r"a.png \(boxes\): box .* outside the 80 x 60 image"):
        crop_to_box(image, (50, 10, 40, 20), "a.png (boxes)")  # x + w = 90 > 80
    # Within a pixel of the edge (detector rounding) is clipped, not refused.
    assert crop_to_box(image, (50, 10, 30.6, 20), "a").size == (30, 20)


def test_images_without_a_box_are_counted_and_reported(tmp_path, caplog):
    metas = [{"bbox": [1, 2, 3, 4]}, {}, {"bbox": None}]
    with caplog.at_level(logging.WARNING):
        boxes = sample_boxes(["a", "b", "c"], "dataset", metas, split="train")
    assert boxes == [(1.0, 2.0, 3.0, 4.0), None, None]
    assert "data.boxes=dataset (train): 2 of 3 images have no box" in caplog.text
    assert sample_boxes(["a"], "attention") is None  # the model's own crops
    with pytest.raises(ConfigError, match="expected attention, dataset or a .json box file"):
        sample_boxes(["a"], "boxes.txt")


def test_box_settings_that_cannot_work_are_refused():
    def cfg(*items):
        return Config.load(None, list(items))

    with pytest.raises(ConfigError, match="data.boxes=dataset: boxes are used by crop fusion"):
        check_box_config(cfg("data.boxes=dataset"))
    with pytest.raises(ConfigError, match="streamed shards carry no boxes"):
        check_box_config(cfg("model.crop_fusion=add", "data.source=shards", "data.boxes=b.json"))
    with pytest.raises(ConfigError, match="mixed but not their crops"):
        check_box_config(cfg("model.crop_fusion=add", "data.boxes=dataset", "data.mixup=0.2"))
    check_box_config(cfg("model.crop_fusion=add", "data.mixup=0.2"))  # attention crops: fine


# ---- the model ---------------------------------------------------------------------------------
def test_attention_boxes_carry_no_gradient():
    model = _model()
    images = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    _, boxes, crops = attention_crops(model, images)
    assert not boxes.requires_grad and not crops.requires_grad
    # The gradient reaching the images is the image branch's alone: the same as with the
    # crops given as constants.
    (through_attention,) = torch.autograd.grad(model(images).sum(), images)
    (given,) = torch.autograd.grad(model(images, crops=crops.detach()).sum(), images)
    torch.testing.assert_close(through_attention, given)
    assert through_attention.abs().sum() > 0


def test_concat_head_with_zero_crop_weights_is_the_image_classifier():
    head = CropFusedHead("concat", torch.nn.Linear(8, 3))
    with torch.no_grad():
        head.classifier.weight[:, 4:] = 0
    image, crop = torch.randn(5, 4), torch.randn(5, 4)
    expected = image @ head.classifier.weight[:, :4].T + head.classifier.bias
    torch.testing.assert_close(head(torch.cat([image, crop])), expected)
    torch.testing.assert_close(head.image_logits(image), expected)
    add = CropFusedHead("add", torch.nn.Linear(4, 3))
    torch.testing.assert_close(add(torch.cat([image, crop])), add.classifier(image + crop))


def test_given_crops_change_the_prediction_and_need_crop_fusion(tmp_path):
    model = _model()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        own = model(images)
        other = model(images, crops=torch.rand(2, 3, SIZE, SIZE))
    assert not torch.allclose(own, other)
    plain = build_method(
        Config.load(None, ["model.backbone=resnet18", "model.pretrained=false"]), 3
    )
    with pytest.raises(ConfigError, match="built without model.crop_fusion"):
        plain(images, crops=images)


def test_predictor_boxes_refuse_test_time_augmentation(tmp_path):
    path = tmp_path / "a.png"
    _picture(path)
    predictor = Predictor(_model(), ["a", "b", "c"], SIZE, tta="flip")
    with pytest.raises(ConfigError, match="boxes with test-time augmentation"):
        predictor.predict([str(path)], boxes={str(path): [0, 0, 10, 10]})


@pytest.mark.parametrize("head", ["linear", "cosine", "arcface", "subcenter_arcface", "prototype"])
def test_attention_crops_work_with_every_class_head(head):
    model = _model(f"model.head={head}", "model.crop_fusion=add")
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        _, boxes, _ = attention_crops(model, images)
        assert model(images).shape == (2, 3)
    assert ((boxes[:, 2:] > boxes[:, :2]) & (boxes >= 0).all(1, keepdim=True)).all()
    assert (boxes <= SIZE).all()
