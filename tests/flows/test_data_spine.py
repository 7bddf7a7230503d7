"""The data spine end to end on the tiny synthetic set: validation never reads the test split,
metrics for both, declared metadata through train / predict / eval / explain / ONNX, the
unlabelled stream reaching a method, and data.max_image_pixels in the final evaluation."""

from __future__ import annotations

import csv
import json
import shutil

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import torch
from flowkit import SCRATCH
from meta_method import META_METHOD
from PIL import Image

from lookcloser import api, cli
from lookcloser.data import loading
from lookcloser.data.prepare import prepare_data
from lookcloser.errors import BadImageError, ConfigError
from lookcloser.methods.base import register_method
from lookcloser.methods.baseline import Baseline

FAST = [*SCRATCH, "trainer.epochs=1"]


def _folder(root) -> list[str]:
    return ["data.source=imagefolder", f"data.root={root}"]


# ---- the validation split -------------------------------------------------------------------
class _Phase(L.Callback):
    """Tells the image reader whether Lightning's fit is running."""

    def __init__(self, state: dict):
        self.state = state

    def on_fit_start(self, trainer, pl_module) -> None:
        self.state["phase"] = "fit"

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state["phase"] = "after"


def test_validation_reads_the_val_split_and_never_the_test_split(
    synthetic_root, tmp_path, monkeypatch
):
    state = {"phase": "setup", "reads": []}
    original = loading.load_image

    def recording(path, max_pixels):
        state["reads"].append((state["phase"], str(path)))
        return original(path, max_pixels)

    monkeypatch.setattr(loading, "load_image", recording)
    out = tmp_path / "run"
    overrides = [*_folder(synthetic_root), *FAST, "trainer.epochs=2", "data.val_fraction=0.25"]
    result = api.train(None, [*overrides, f"out={out}"], progress=False, callbacks=[_Phase(state)])

    data = prepare_data(api.as_config(None, overrides).data)
    test = {s.path for s in data.test}
    during = [path for phase, path in state["reads"] if phase == "fit"]
    after = [path for phase, path in state["reads"] if phase == "after"]
    assert not set(during) & test  # checkpoints and val/top1 never see the test split
    assert {s.path for s in data.val} <= set(during)  # validation ran on the val split
    # Per epoch: 36 training images in whole batches of 8 (32 read), then the 12 val images.
    assert len(during) == 2 * (32 + 12)
    assert test <= set(after)  # the test split is read once, for the final report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics and set(metrics) == {"val", "test"}
    assert metrics["val"]["images"] == 12 and metrics["test"]["images"] == 12
    record = json.loads((out / "model.json").read_text())
    assert record["data"]["val_split"] == "carved" and record["data"]["train_images"] == 36
    rows = list(csv.DictReader((out / "logs" / "csv" / "metrics.csv").open()))
    scores = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    assert len(scores) == 2
    # best.ckpt holds the epoch with the highest validation top-1 (never chosen on test).
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in best["callbacks"].items() if k.startswith("RunCheckpoints")]
    assert state["best"] == pytest.approx(max(scores))
    assert best["epoch"] == scores.index(max(scores))


# ---- the unlabelled stream ------------------------------------------------------------------
SEEN: list[tuple[tuple[int, ...], tuple[int, ...]]] = []


@register_method
class UnlabelledProbe(Baseline):
    """A test method: records batch shapes and adds an entropy term on the unlabelled images."""

    name = "test-unlabelled-probe"

    def training_losses(self, batch):
        """Cross-entropy plus the mean prediction entropy on the unlabelled images."""
        SEEN.append((tuple(batch.images.shape), tuple(batch.unlabelled.shape)))
        losses = super().training_losses(batch)
        probs = self(batch.unlabelled).softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
        return {**losses, "loss": losses["loss"] + entropy, "entropy": entropy}


def test_unlabelled_stream_reaches_the_method(synthetic_root, tmp_path):
    from lookcloser.data.synthetic import generate

    wild = generate(tmp_path / "wild", 2, 4, 1, 48, seed=3)  # 10 images in class-like folders
    SEEN.clear()
    out = tmp_path / "run"
    api.train(
        None,
        [
            *_folder(synthetic_root),
            *FAST,
            "data.val_fraction=0",
            "method.name=test-unlabelled-probe",
            f"data.unlabelled={wild}",
            "data.unlabelled_batch_size=5",
            f"out={out}",
        ],
        progress=False,
    )
    assert SEEN == [((8, 3, 32, 32), (5, 3, 32, 32))] * 6  # 48 images / 8: one per batch
    assert json.loads((out / "model.json").read_text())["data"]["unlabelled_images"] == 10
    logged = (out / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/entropy" in logged


# ---- metadata -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_csv(synthetic_root, tmp_path_factory):
    """The synthetic set as a CSV source with lat (tied to the class) and lon (on half the rows)."""
    folder = tmp_path_factory.mktemp("meta")
    rows = []
    for split in ("train", "test"):
        for n, path in enumerate(sorted((synthetic_root / split).rglob("*.png"))):
            label = path.parent.name
            lat = 10.0 * sorted(p.name for p in (synthetic_root / "train").iterdir()).index(label)
            lon = str(n % 5) if n % 2 else ""
            rows.append([str(path), label, split, lat, lon, n])
    with (folder / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "lat", "lon", "image_id"])
        writer.writerows(rows)
    return folder / "data.csv"


@pytest.fixture(scope="module")
def meta_model(meta_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta-run") / "model"
    overrides = [
        "data.source=csv",
        f"data.root={meta_csv}",
        *FAST,
        "trainer.epochs=3",
        "optim.lr=0.01",
        f"method.name={META_METHOD}",
        "data.meta_keys=[lat, lon]",
        f"out={out}",
    ]
    api.train(None, overrides, progress=False)
    return out


def test_identifier_meta_keys_are_refused_before_training(meta_csv, tmp_path):
    base = ["data.source=csv", f"data.root={meta_csv}", *FAST, f"method.name={META_METHOD}"]
    with pytest.raises(ConfigError, match="'image_id' identifies the image"):
        api.train(
            None, [*base, "data.meta_keys=[lat, image_id]", f"out={tmp_path / 'a'}"], progress=False
        )
    with pytest.raises(ConfigError, match="'elevation' in no training sample"):
        api.train(
            None, [*base, "data.meta_keys=[elevation]", f"out={tmp_path / 'b'}"], progress=False
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_meta_model_predicts_with_and_without_meta(meta_model, meta_csv, synthetic_root, capsys):
    record = json.loads((meta_model / "model.json").read_text())
    assert record["meta_keys"] == ["lat", "lon"]
    predictor = api.load(meta_model)
    assert predictor.meta_keys == ["lat", "lon"]
    test_dir = synthetic_root / "test"
    rows = {r["path"]: r for r in csv.DictReader(meta_csv.open()) if r["split"] == "test"}
    plain = predictor.predict([test_dir], top_k=3)
    informed = predictor.predict([test_dir], top_k=3, meta=rows)
    assert [p.path for p in plain] == [p.path for p in informed] and len(plain) == 12
    assert any(a.probs != b.probs for a, b in zip(plain, informed, strict=True))
    one_by_one = predictor.predict([test_dir], top_k=3, meta=[rows[p.path] for p in plain])
    assert [p.probs for p in one_by_one] == [p.probs for p in informed]

    # The CLI reads the same metadata from a file (a CSV with a path column).
    argv = ["predict", str(meta_model), str(test_dir), "--format", "json", "--top-k", "3"]
    assert cli.main([*argv, "--meta", str(meta_csv)]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert [[t["prob"] for t in p["top"]] for p in from_cli] == [
        [round(x, 6) for x in p.probs] for p in informed
    ]
    assert cli.main(argv) == 0  # without --meta every value is masked
    without = json.loads(capsys.readouterr().out)
    assert [[t["prob"] for t in p["top"]] for p in without] == [
        [round(x, 6) for x in p.probs] for p in plain
    ]


def test_meta_model_evaluates_explains_and_exports(meta_model, meta_csv, tmp_path):
    metrics = json.loads((meta_model / "metrics.json").read_text())
    assert api.evaluate(meta_model, progress=False)["top1"] == pytest.approx(
        metrics["test"]["top1"]
    )
    image = next(r["path"] for r in csv.DictReader(meta_csv.open()) if r["split"] == "test")
    png = api.explain(meta_model, image, tmp_path / "cam.png", meta=meta_csv)
    assert Image.open(png).size[0] > 0

    onnx_path, diff = api.export(meta_model, out=tmp_path / "m.onnx")
    assert diff < 1e-3
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "meta", "meta_mask"]
    predictor = api.load(meta_model)
    images = torch.stack([predictor.preprocess(image)] * 2)
    meta, mask = predictor.meta_rows([{"lat": 20.0, "lon": 3}, {}])
    feed = {"images": images.numpy(), "meta": meta.numpy(), "meta_mask": mask.numpy()}
    (logits,) = session.run(["logits"], feed)
    expected = predictor.logits(images, meta, mask).numpy()
    assert np.abs(logits - expected).max() < 1e-3


# ---- data.max_image_pixels in the final evaluation ----------------------------------------
@pytest.fixture(scope="module")
def big_test_image_root(synthetic_root, tmp_path_factory):
    """The synthetic set plus one 100 x 100 test image (10,000 pixels; the others have 4,096)."""
    root = tmp_path_factory.mktemp("big")
    shutil.copytree(synthetic_root / "train", root / "train")
    shutil.copytree(synthetic_root / "test", root / "test")
    first = sorted((root / "test").iterdir())[0]
    Image.new("RGB", (100, 100), (200, 30, 30)).save(first / "big.png")
    return root


def test_max_image_pixels_is_honoured_by_the_evaluation_after_training(
    big_test_image_root, tmp_path
):
    out = tmp_path / "folder"
    overrides = [*_folder(big_test_image_root), *FAST, "data.verify_images=false"]
    with pytest.raises(BadImageError, match="exceeds data.max_image_pixels=5000"):
        api.train(None, [*overrides, "data.max_image_pixels=5000", f"out={out}"], progress=False)
    assert (out / "checkpoints" / "last.ckpt").is_file()  # training ran; the report refused

    shards = tmp_path / "shards"
    pack = ["data", "pack", "imagefolder", str(shards), f"data.root={big_test_image_root}"]
    assert cli.main(pack) == 0
    trained = tmp_path / "from-shards"
    small = ["data.max_image_pixels=5000", "data.on_bad_image=skip"]
    api.train(
        None,
        ["data.source=shards", f"data.root={shards}", *FAST, *small, f"out={trained}"],
        progress=False,
    )
    assert json.loads((trained / "metrics.json").read_text())["test"]["images"] == 12
    # A saved model evaluates with its own limit, or with the one an override sets.
    assert api.evaluate(trained, progress=False)["images"] == 12
    raised = api.evaluate(trained, ["data.max_image_pixels=100000"], progress=False)
    assert raised["images"] == 13


# ---- a method defined outside the package -----------------------------------------------------
PLUGIN = '''
"""A method outside lookcloser: two networks, a training-only head, metadata, unlabelled images."""
import torch
import torch.nn.functional as F
from torch import nn

from lookcloser.methods.base import Method, register_method


@register_method
class TwoNetworks(Method):
    name = "plugin-two-networks"
    accepts_meta = True
    training_only = ("aux_head",)

    def __init__(self, backbone, num_classes, options=None, second=None, **kwargs):
        super().__init__(backbone, num_classes, options, **kwargs)
        self.second = second
        self.head = self.make_head(backbone.num_features + second.num_features)
        self.meta_head = nn.Linear(2 * len(self.meta_keys), num_classes)
        self.aux_head = nn.Linear(second.num_features, num_classes)

    @classmethod
    def build(cls, make_backbone, num_classes, options, **kwargs):
        return cls(make_backbone(), num_classes, options, second=make_backbone("test_resnet"), **kwargs)

    def forward(self, images, meta=None, meta_mask=None):
        logits = self.head(torch.cat([self.backbone(images), self.second(images)], dim=1))
        if meta is not None:
            mask = meta_mask.float()
            logits = logits + self.meta_head(torch.cat([meta * mask, mask], dim=1))
        return logits

    def training_losses(self, batch):
        loss = F.cross_entropy(self(batch.images, batch.meta, batch.meta_mask), batch.targets)
        aux = F.cross_entropy(self.aux_head(self.second(batch.images)), batch.targets)
        probs = self(batch.unlabelled).softmax(dim=1)  # unlabelled: no metadata
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
        return {"loss": loss + aux + 0.1 * entropy, "aux": aux, "entropy": entropy}

    def new_modules(self):
        return [self.head, self.meta_head, self.aux_head]
'''


def test_a_plugin_method_trains_through_the_cli_with_method_module(
    meta_csv, synthetic_root, tmp_path
):
    from flowkit import SRC, run_cli

    from lookcloser.data.synthetic import generate

    (tmp_path / "my_methods.py").write_text(PLUGIN)
    env = {"PYTHONPATH": f"{SRC}:{tmp_path}"}
    unlabelled = generate(tmp_path / "unlabelled", 2, 4, 1, 48, seed=5) / "train"
    out = tmp_path / "run"
    run_cli(
        "train",
        "--no-progress",
        "data.source=csv",
        f"data.root={meta_csv}",
        *FAST,
        "trainer.max_steps=1",
        "data.meta_keys=[lat, lon]",
        f"data.unlabelled={unlabelled}",
        "method.module=my_methods",
        "method.name=plugin-two-networks",
        f"out={out}",
        env=env,
    )
    record = json.loads((out / "model.json").read_text())
    assert record["method"] == "plugin-two-networks" and record["meta_keys"] == ["lat", "lon"]
    assert record["config"]["method"]["module"] == "my_methods"
    assert record["training"]["global_step"] == 1
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("second.") for k in weights)  # both networks are saved
    assert not any(k.startswith("aux_head.") for k in weights)  # the training-only head is not
    image = next((synthetic_root / "test").rglob("*.png"))
    meta = tmp_path / "meta.csv"
    meta.write_text(f"path,lat,lon\n{image},10,\n")
    refused = run_cli("predict", str(out), str(image), env=env, check=False)
    assert refused.returncode != 0 and "--trust-module my_methods" in refused.stderr
    predicted = run_cli(
        "predict",
        str(out),
        str(image),
        "--meta",
        str(meta),
        "--format",
        "json",
        "--trust-module",
        "my_methods",
        env=env,
    )
    assert len(json.loads(predicted.stdout)) == 1
