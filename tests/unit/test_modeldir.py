"""Model directories (JSON + safetensors, crash-safe) and the Predictor that loads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lookcloser import modeldir
from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.errors import BadImagesError, ModelDirError
from lookcloser.methods import build_method
from lookcloser.modeldir import is_model_dir, read_model_json, save_model_dir
from lookcloser.predictor import Predictor
from lookcloser.training import save_run_model

CLASSES = ["alpha", "beta", "gamma"]
SIZE = 64


def _cfg() -> Config:
    return Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            f"data.image_size={SIZE}",
            "data.crop_pct=1.0",
            "method.label_smoothing=0.2",
        ],
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Baseline and the model directory it was saved to."""
    torch.manual_seed(0)
    cfg = _cfg()
    method = build_method(cfg, len(CLASSES)).eval()
    run_dir = tmp_path_factory.mktemp("run")
    save_run_model(run_dir, method, TrainingData(CLASSES), cfg, {"test": {"top1": 0.5}}, "bicubic")
    return method, run_dir


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_gives_identical_logits(saved):
    """A loaded Predictor computes exactly the saved method's logits."""
    method, run_dir = saved
    predictor = Predictor.load(run_dir)
    assert predictor.classes == CLASSES
    assert predictor.image_size == SIZE
    assert predictor.method.options.label_smoothing == 0.2
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = method(images)
    assert torch.equal(predictor.logits(images), expected)


def test_files_hold_no_pickle(saved):
    """Only model.json (JSON) and model.safetensors are written."""
    method, run_dir = saved
    assert {p.name for p in run_dir.iterdir()} == {"model.json", "model.safetensors"}
    record = json.loads((run_dir / "model.json").read_text())
    assert record["format"] == "lookcloser.model"
    assert record["method"] == "baseline" and record["classes"] == CLASSES
    assert record["weights"]["sha256"] == modeldir.file_sha256(run_dir / "model.safetensors")
    tensors = load_file(str(run_dir / "model.safetensors"))
    assert set(tensors) == set(method.state_dict())
    assert is_model_dir(run_dir)


def test_missing_model_json_says_training_did_not_finish(saved, tmp_path):
    """A directory without model.json is not a model: the error says training did not finish."""
    _, run_dir = saved
    copy = _copy_dir(run_dir, tmp_path / "copy")
    (copy / "model.json").unlink()
    assert not is_model_dir(copy)
    with pytest.raises(ModelDirError, match="training did not finish"):
        Predictor.load(copy)
    with pytest.raises(ModelDirError, match="not a directory"):
        read_model_json(tmp_path / "absent")


def test_sha_mismatch_is_refused(saved, tmp_path):
    """Weights replaced after saving fail the SHA-256 check."""
    _, run_dir = saved
    copy = _copy_dir(run_dir, tmp_path / "copy")
    tensors = load_file(str(copy / "model.safetensors"))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ModelDirError, match="SHA-256"):
        Predictor.load(copy)


def test_newer_format_version_is_refused(saved, tmp_path):
    """A model.json from a newer lookcloser asks for an upgrade."""
    _, run_dir = saved
    copy = _copy_dir(run_dir, tmp_path / "copy")
    record = json.loads((copy / "model.json").read_text())
    record["format_version"] = modeldir.FORMAT_VERSION + 1
    (copy / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelDirError, match="newer"):
        Predictor.load(copy)


def test_weights_that_do_not_fit_are_reported(saved, tmp_path):
    """A record whose classes disagree with the weights is a ModelDirError."""
    _, run_dir = saved
    copy = _copy_dir(run_dir, tmp_path / "copy")
    update_model_json(copy, classes=[*CLASSES, "delta"])
    with pytest.raises(ModelDirError, match="do not fit"):
        Predictor.load(copy)


def _info(method, cfg):
    return {
        "method": method.name,
        "method_options": {"label_smoothing": 0.2},
        "classes": CLASSES,
        "preprocessing": {"image_size": SIZE, "crop_pct": 1.0, "interpolation": "bicubic"},
        "config": cfg.to_dict(),
    }


def test_interrupted_save_is_not_a_model_dir(saved, tmp_path, monkeypatch):
    """Weights written but model.json not: not a model, even over an older complete save."""
    method, run_dir = saved
    target = tmp_path / "model"
    save_model_dir(target, method.state_dict(), _info(method, _cfg()))
    assert is_model_dir(target)
    Predictor.load(target)

    def crash(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(modeldir, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(target, method.state_dict(), _info(method, _cfg()))
    assert (target / "model.safetensors").is_file()
    assert not is_model_dir(target)
    with pytest.raises(ModelDirError, match="did not finish"):
        Predictor.load(target)


# ---- predict / explain ---------------------------------------------------------------------
def _png(path, seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_predict_folder(saved, tmp_path):
    """Predictions for a folder come in sorted path order with descending top-k probs."""
    _, run_dir = saved
    names = ["b.png", "a.png", "sub/c.png", "sub/a.png"]
    for i, name in enumerate(names):
        _png(tmp_path / "imgs" / name, i)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    predictor = Predictor.load(run_dir)
    results = predictor.predict([tmp_path / "imgs"], top_k=2, batch_size=3)
    expected = sorted(str(tmp_path / "imgs" / n) for n in names)
    assert [r.path for r in results] == expected
    for r in results:
        assert len(r.probs) == 2 and r.probs[0] >= r.probs[1]
        assert sum(r.probs) <= 1.0 + 1e-6
        assert r.classes == [CLASSES[i] for i in r.indices]
    everything = predictor.predict([tmp_path / "imgs" / "a.png"], top_k=10)
    assert len(everything[0].probs) == 3 and sum(everything[0].probs) == pytest.approx(1.0)
    # The batched path agrees with preprocessing one image by hand.
    single = predictor.probabilities(predictor.preprocess(expected[0]).unsqueeze(0))[0]
    assert results[0].probs[0] == pytest.approx(float(single.max()), abs=1e-6)


def test_predict_corrupt_file_names_it(saved, tmp_path):
    """A corrupt image makes predict raise naming the file; skip predicts the others."""
    _, run_dir = saved
    good = _png(tmp_path / "good.png", 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    predictor = Predictor.load(run_dir)
    with pytest.raises(BadImagesError) as err:
        predictor.predict([good, bad])
    assert str(bad) in str(err.value) and [p for p, _ in err.value.bad] == [str(bad)]
    kept = predictor.predict([bad, good], on_bad_image="skip", batch_size=1)
    assert [p.path for p in kept] == [str(good)]
    assert kept.skipped == [(str(bad), err.value.bad[0][1])]


def test_explain_heatmap(saved, tmp_path):
    """explain gives an input-sized heatmap in [0, 1] for the predicted class."""
    _, run_dir = saved
    predictor = Predictor.load(run_dir)
    image = _png(tmp_path / "x.png", 3, size=(80, 70))
    result = predictor.explain(image)
    assert result.heatmap.shape == (SIZE, SIZE)
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    assert result.image.size == (SIZE, SIZE)
    top = predictor.predict([image], top_k=1)[0]
    assert result.class_name == top.classes[0]
    assert result.prob == pytest.approx(top.probs[0], abs=1e-5)
    by_name = predictor.explain(image, target="gamma")
    assert by_name.class_name == "gamma"
    with pytest.raises(ValueError, match="unknown class"):
        predictor.explain(image, target="omega")


def update_model_json(path, **fields) -> None:
    """Rewrite top-level fields of a model directory's model.json (to fake other versions)."""
    record = json.loads((path / "model.json").read_text())
    record.update(fields)
    (path / "model.json").write_text(json.dumps(record, indent=2) + "\n")
