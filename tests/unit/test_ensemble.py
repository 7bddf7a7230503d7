"""Ensembles: weights fitted on the validation split, the directory, and the Predictor interface
(eval, predict, explain per member, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lookcloser import api, cli
from lookcloser.config import Config
from lookcloser.ensemble import EnsemblePredictor, fit_weights, objective, score
from lookcloser.errors import ConfigError, DataError, ModelDirError
from lookcloser.methods import build_method
from lookcloser.modeldir import save_model_dir
from lookcloser.predictor import Predictor


# ---- the search ------------------------------------------------------------------------------
def confident(labels: np.ndarray, classes: int, right: np.ndarray) -> np.ndarray:
    """N x C probabilities: 0.9 on the label where `right`, else on the next class."""
    chosen = np.where(right, labels, (labels + 1) % classes)
    probs = np.full((len(labels), classes), 0.1 / (classes - 1))
    probs[np.arange(len(labels)), chosen] = 0.9
    return probs


def test_fitted_weights_beat_equal_weights_where_equal_weights_fail():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    first_half = np.arange(60) < 30
    probs = [
        confident(labels, 4, np.ones(60, bool)),  # always right
        confident(labels, 4, ~first_half),  # wrong on the first half
        confident(labels, 4, ~first_half),
    ]
    fit = fit_weights(probs, labels, seed=0, maxiter=40)
    assert fit.equal_score["top1"] == 0.5
    assert fit.fitted_score["top1"] == 1.0
    assert sum(fit.weights) == pytest.approx(1.0) and min(fit.weights) >= 0
    assert fit.member_scores[0]["top1"] == 1.0
    # Seeded: the same search gives the same weights.
    assert fit_weights(probs, labels, seed=0, maxiter=40).weights == fit.weights


@pytest.mark.parametrize("seed", range(4))
def test_fitted_weights_are_never_worse_than_equal_weights_on_the_fitted_data(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=40)
    probs = rng.dirichlet(np.ones(5), size=(3, 40))
    fit = fit_weights(probs, labels, seed=seed, maxiter=30)
    p = np.stack(probs)
    assert objective(np.array(fit.weights), p, labels) <= objective(np.full(3, 1 / 3), p, labels)
    assert fit.fitted_score["top1"] >= fit.equal_score["top1"]
    assert fit.fitted_score["top1"] >= max(m["top1"] for m in fit.member_scores)
    assert score(np.array(fit.weights), p, labels) == fit.fitted_score


def test_log_loss_breaks_ties_only():
    labels = np.array([0, 1])
    sure = np.array([[0.99, 0.01], [0.01, 0.99]])
    unsure = np.array([[0.6, 0.4], [0.4, 0.6]])
    p = np.stack([sure, unsure])
    # Same top-1: the confident member wins on log-loss.
    assert objective(np.array([1.0, 0.0]), p, labels) < objective(np.array([0.0, 1.0]), p, labels)
    # One more correct answer outweighs any log-loss.
    wrong = np.stack([np.array([[0.01, 0.99], [0.01, 0.99]]), unsure])
    assert objective(np.array([0.0, 1.0]), wrong, labels) < objective(
        np.array([1.0, 0.0]), wrong, labels
    )


# ---- model directories -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    from lookcloser.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("set"), 3, 8, 3, 40, seed=3)


def save_member(root, path, seed: int, *overrides: str):
    """An (untrained, seeded) model directory whose config carves a validation split."""
    cfg = Config.load(
        None,
        [
            "model.backbone=test_resnet",
            "model.pretrained=false",
            "data.source=imagefolder",
            f"data.root={root}",
            "data.image_size=32",
            "data.crop_pct=1.0",
            "data.val_fraction=0.25",
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    method = build_method(cfg, 3)
    info = {
        "method": "baseline",
        "method_options": {"label_smoothing": 0.1},
        "classes": sorted(p.name for p in (root / "train").iterdir()),
        "preprocessing": {"image_size": 32, "crop_pct": 1.0, "interpolation": "bicubic"},
        "meta_keys": [],
        "config": cfg.to_dict(),
    }
    return save_model_dir(path, method.state_dict(), info)


@pytest.fixture(scope="module")
def members(image_set, tmp_path_factory):
    base = tmp_path_factory.mktemp("members")
    return [save_member(image_set, base / f"m{s}", s) for s in range(3)]


@pytest.fixture(scope="module")
def ensemble_dir(members, tmp_path_factory, image_set):
    read = []
    original = Predictor.stream_samples

    def recording(self, samples, *args, **kwargs):
        read.extend(s.path for s in samples)
        return original(self, samples, *args, **kwargs)

    Predictor.stream_samples = recording
    try:
        result = api.fit_ensemble(
            members, tmp_path_factory.mktemp("ens") / "ens", progress=False, maxiter=20
        )
    finally:
        Predictor.run_samples = original
    test_dir = str(image_set / "test")
    assert read and not any(p.startswith(test_dir) for p in read)  # never the test split
    assert len(read) == 3 * 6  # each member on the 6 carved validation images
    return result


def test_fit_writes_a_self_contained_directory(ensemble_dir, members):
    record = json.loads((ensemble_dir.path / "ensemble.json").read_text())
    assert record["format"] == "lookcloser.ensemble"
    assert [m["source"] for m in record["members"]] == [str(m.resolve()) for m in members]
    for member in record["members"]:
        copied = ensemble_dir.path / member["path"]
        assert (copied / "model.json").is_file() and (copied / "model.safetensors").is_file()
        assert set(member["validation"]) == {"top1", "correct", "log_loss"}
    assert record["weights"] == ensemble_dir.weights and len(record["equal_weights"]) == 3
    assert (
        record["validation"]["images"] == 6
        and record["validation"]["split"]["val_fraction"] == 0.25
    )
    assert record["validation"]["fitted"]["correct"] >= record["validation"]["equal"]["correct"]
    assert record["fit"]["optimizer"] == "scipy.optimize.differential_evolution"


def test_ensemble_eval_and_predict_are_the_weighted_mixture(ensemble_dir, members, image_set):
    ensemble = api.load(ensemble_dir.path)
    assert (
        isinstance(ensemble, EnsemblePredictor)
        and ensemble.classes == Predictor.load(members[0]).classes
    )
    files = sorted(str(p) for p in (image_set / "test").rglob("*.png"))
    singles = [Predictor.load(m).file_probabilities(files)[1] for m in members]
    expected = sum(w * p for w, p in zip(ensemble_dir.weights, singles, strict=True))
    predictions = ensemble.predict([image_set / "test"], top_k=3)
    by_path = {p.path: p for p in predictions}
    for i, f in enumerate(files):
        assert by_path[f].probs == pytest.approx(
            expected[i].sort(descending=True).values.tolist(), abs=1e-6
        )
    metrics = api.evaluate(ensemble_dir.path, progress=False)
    labels = torch.tensor([ensemble.classes.index(f.split("/")[-2]) for f in files])
    assert metrics["images"] == 9
    assert metrics["top1"] == pytest.approx(float((expected.argmax(1) == labels).float().mean()))
    # TTA reaches every member.
    flipped = api.load(ensemble_dir.path, tta="flip")
    assert all(m.tta is not None and m.tta.flip for m in flipped.members)


def test_equal_weights_on_request(members, tmp_path):
    result = api.fit_ensemble(members, tmp_path / "eq", weights="equal", maxiter=5, progress=False)
    record = json.loads((result.path / "ensemble.json").read_text())
    assert record["weights"] == record["equal_weights"] == [1 / 3] * 3 == result.weights
    assert record["uses"] == "equal" and len(record["fitted_weights"]) == 3
    assert api.load(result.path).weights == pytest.approx([1 / 3] * 3)


def test_one_member_ensemble_equals_its_member(members, image_set, tmp_path):
    result = api.fit_ensemble(members[:1], tmp_path / "one", progress=False)
    assert result.weights == [1.0]
    one, single = api.load(result.path), Predictor.load(members[0])
    files = sorted(str(p) for p in (image_set / "test").rglob("*.png"))
    torch.testing.assert_close(
        one.file_probabilities(files)[1], single.file_probabilities(files)[1]
    )
    a, b = api.evaluate(result.path, progress=False), api.evaluate(members[0], progress=False)
    assert a["top1"] == b["top1"] and a["most_confused"] == b["most_confused"]
    assert a["ece"] == pytest.approx(b["ece"], abs=1e-6)


def test_ensemble_explain_and_export_per_member(ensemble_dir, image_set, tmp_path):
    image = next((image_set / "test").rglob("*.png"))
    paths = api.explain(ensemble_dir.path, image, out=tmp_path / "why.png")
    assert [p.name for p in paths] == [f"why-{i}-m{i}.png" for i in range(3)]
    assert all(p.is_file() for p in paths)
    out, diff = api.export(ensemble_dir.path, out=tmp_path / "onnx")
    record = json.loads((out / "onnx.json").read_text())
    assert [m["file"] for m in record["members"]] == [f"{i}-m{i}.onnx" for i in range(3)]
    assert [m["weight"] for m in record["members"]] == ensemble_dir.weights
    assert all((out / m["file"]).is_file() for m in record["members"]) and diff < 1e-3


def test_members_must_share_a_validation_split(members, image_set, tmp_path):
    other = save_member(image_set, tmp_path / "other", 9, "data.split_seed=4")
    with pytest.raises(ConfigError, match=r"data.split_seed differ"):
        api.fit_ensemble([members[0], other], tmp_path / "e", progress=False)
    none = save_member(image_set, tmp_path / "none", 9, "data.val_fraction=0")
    with pytest.raises(DataError, match="no validation split"):
        api.fit_ensemble([none], tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="data.val_fraction cannot be overridden"):
        api.fit_ensemble([none], tmp_path / "e", ["data.val_fraction=0.2"], progress=False)
    with pytest.raises(ConfigError, match="not an empty folder"):
        api.fit_ensemble(members[:1], members[1], progress=False)


def test_cli_fits_an_ensemble(members, tmp_path, capsys):
    code = cli.main(
        [
            "ensemble",
            "fit",
            *map(str, members[:2]),
            "--out",
            str(tmp_path / "e"),
            "--maxiter",
            "5",
            "--no-progress",
        ]
    )
    assert code == 0 and (tmp_path / "e" / "ensemble.json").is_file()
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "e"))
    with pytest.raises(ModelDirError, match="an ensemble directory"):
        Predictor.load(tmp_path / "e")
    assert cli.main(["eval", str(tmp_path / "e"), "--format", "json", "--no-progress"]) == 0


# ---- fitting on RunRecords (issue 25: no M x N x C probabilities) -----------------------------
def member_logits(seed: int, members: int, images: int, classes: int):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (images,), generator=gen)
    logits = [torch.randn(images, classes, generator=gen) * 2 for _ in range(members)]
    for lg in logits:  # the label raised by a random amount: members right on different images
        lg[torch.arange(images), labels] += torch.rand(images, generator=gen) * 3
    return logits, labels


@pytest.mark.parametrize("seed", range(3))
def test_records_keeping_every_class_fit_the_dense_weights(seed):
    from lookcloser.records import RunRecord

    logits, labels = member_logits(seed, 3, 50, 6)
    records = [RunRecord.from_logits(lg, labels) for lg in logits]
    assert records[0].k == 6  # K >= C: every class kept
    dense = fit_weights([lg.softmax(dim=1) for lg in logits], labels, seed=seed, maxiter=15)
    fit = fit_weights(records, seed=seed, maxiter=15)
    assert fit.weights == dense.weights
    assert fit.fitted_score == dense.fitted_score and fit.equal_score == dense.equal_score
    assert fit.member_scores == dense.member_scores and fit.images == 50


def test_top_k_records_score_the_mixture_over_the_members_candidates():
    """With K < C: the log-loss is the dense one (the label's probability is stored); top-1 is
    the dense top-1 of the members' probabilities outside their own top-K (and not the
    label) set to 0, the approximation the docstring states."""
    from lookcloser.records import RunRecord

    logits, labels = member_logits(7, 3, 80, 30)
    k = 3
    records = [RunRecord.from_logits(lg, labels, top_k=k) for lg in logits]
    probs = np.stack([lg.softmax(dim=1).numpy().astype(np.float64) for lg in logits])
    y = labels.numpy()
    kept = np.zeros_like(probs)
    rows = np.arange(len(y))
    for m, record in enumerate(records):
        for j in range(k):
            kept[m, rows, record.top_classes[:, j]] = probs[m, rows, record.top_classes[:, j]]
        kept[m, rows, y] = probs[m, rows, y]
    rng = np.random.default_rng(0)
    for w in [np.full(3, 1 / 3), np.eye(3)[0], *rng.dirichlet(np.ones(3), size=20)]:
        got = score(w, records)
        assert got["log_loss"] == pytest.approx(score(w, probs, y)["log_loss"], rel=1e-12)
        assert got["correct"] == score(w, kept, y)["correct"]


def test_records_of_other_images_are_refused():
    from lookcloser.records import RunRecord

    logits, labels = member_logits(1, 2, 20, 4)
    a = RunRecord.from_logits(logits[0], labels)
    b = RunRecord.from_logits(logits[1], labels.flip(0))
    with pytest.raises(ConfigError, match="member 1 was scored on other images"):
        fit_weights([a, b])
