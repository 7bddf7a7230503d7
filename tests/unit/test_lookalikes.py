"""Look-alikes (issue 26): embeddings, galleries, enrollment, the open-set answer and the
server's additions, on tiny random models (test_efficientnet, 32 px) and synthetic images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from tiny_models import save_tiny_model, tiny_config

from lookcloser.embeddings import embed_tensors, embedding_info
from lookcloser.errors import BadImagesError, ConfigError, DataError, ModelDirError
from lookcloser.lookalikes.embed import onnx_differences, read_embeddings, write_embeddings
from lookcloser.lookalikes.enroll import enroll
from lookcloser.lookalikes.gallery import GALLERY_JSON, build_gallery, load_gallery
from lookcloser.lookalikes.openset import auroc, calibrate
from lookcloser.methods import build_method
from lookcloser.modeldir import file_sha256
from lookcloser.predictor import Predictor

SIZE = 32
CLASSES = ["a", "b", "c"]
LOCAL = "http://127.0.0.1"


def tiny_predictor(*overrides: str, classes: int = 3) -> Predictor:
    torch.manual_seed(0)
    method = build_method(tiny_config(SIZE, *overrides), classes).for_inference().eval()
    method.image_size = SIZE
    return Predictor(method, [f"k{i}" for i in range(classes)], SIZE)


def save_model(path, *overrides: str, seed: int = 0):
    """A tiny model directory whose classes are spread apart (random 2-D weights)."""
    return save_tiny_model(path, CLASSES, SIZE, *overrides, seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder tree (train/<class>, test/<class>) of 32 px images, one colour per class
    plus noise, and a folder of look-alikes for a fourth class."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colours = {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200), "d": (200, 200, 40)}
    for split, n in (("train", 8), ("test", 2), ("new", 3)):
        for name, colour in colours.items():
            if (split == "new") != (name == "d"):
                continue
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 30, (SIZE, SIZE, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "m")


# ---- embeddings ---------------------------------------------------------------------------------
def test_embeddings_equal_the_head_input_features():
    """The embedding is the normalised feature the class head reads, from the same forward
    as the logits: pooled features (baseline), [image, crop] pooled (crop fusion), the top
    layer's mean (DCN), the joined scale features (RA-CNN's fusion head)."""
    x = torch.rand(3, 3, SIZE, SIZE)
    p = tiny_predictor()
    logits, emb = embed_tensors(p, x)
    assert torch.allclose(logits, p.logits(x))
    m = p.method
    assert torch.allclose(
        emb, F.normalize(m.backbone.pool(m.forward_features(x)), dim=1), atol=1e-6
    )

    p = tiny_predictor("model.crop_fusion=concat")
    _, emb = embed_tensors(p, x)
    feats = p.method.backbone.pool(p.method.forward_features(x))
    joined = torch.cat([feats[:3], feats[3:]], dim=1)
    assert torch.allclose(emb, F.normalize(joined, dim=1), atol=1e-5)

    dcn = ["method.name=dcn", "method.patch_size=8", "method.glimpses=2"]
    for overrides, head in ((dcn, "head"), (["method.name=racnn"], "fusion")):
        p = tiny_predictor(*overrides)
        info = embedding_info(p)
        assert info["classifier"] == head and info["exact"]
        logits, emb = embed_tensors(p, x)
        layer = p.method.get_submodule(head)
        # the head applied to the (unnormalised) embedding direction ranks like the logits
        assert torch.allclose(logits, p.logits(x))
        assert emb.shape == (3, layer.in_features)
    # A prediction summing several scales' logits has no single decision input.
    assert not embedding_info(tiny_predictor("method.name=ramstrans"))["exact"]


def test_embed_files_parquet_npy_bad_images_and_empty_folders(data, tmp_path):
    p = tiny_predictor()
    files = sorted((data / "test").rglob("*.png"))
    bad = tmp_path / "imgs" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    good = tmp_path / "imgs" / "good.png"
    good.write_bytes(files[0].read_bytes())

    written = write_embeddings(
        p.embed([data / "test"], batch_size=4), tmp_path / "e.parquet", p.classes
    )
    emb, rows = read_embeddings(tmp_path / "e.parquet")
    assert written.rows == len(files) == len(rows) and emb.shape == (len(files), written.dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    direct = embed_tensors(p, torch.stack([p.preprocess(f) for f in files]))[1].numpy()
    assert np.allclose(emb, direct, atol=1e-5) and rows[0]["path"] == str(files[0])

    # skip: the bad file is listed, the rows hold the good ones only (.npy shrunk, .csv)
    stream = p.embed([tmp_path / "imgs"], on_bad_image="skip")
    written = write_embeddings(stream, tmp_path / "e.npy", p.classes)
    emb, rows = read_embeddings(tmp_path / "e.npy")
    assert emb.shape == (1, written.dim) and [r["path"] for r in rows] == [str(good)]
    assert [s[0] for s in written.skipped] == [str(bad)]

    # error: a BadImagesError naming the file, and no output file at all
    with pytest.raises(BadImagesError, match="broken.png"):
        write_embeddings(p.embed([tmp_path / "imgs"]), tmp_path / "f.npy", p.classes)
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "f.csv").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        p.embed([empty])
    with pytest.raises(ConfigError, match="parquet"):
        write_embeddings(p.embed([good]), tmp_path / "e.txt", p.classes)


# ---- gallery -------------------------------------------------------------------------------------
def test_gallery_build_neighbours_and_binding(model_dir, data, tmp_path):
    p = Predictor.load(model_dir)
    built = build_gallery(p, data, tmp_path / "g")
    # 8 train images per class, a quarter carved off for validation as training would
    assert built.references == 18 and built.val_images == 6 and built.open_set is not None
    g = load_gallery(tmp_path / "g", p)
    assert len(g) == 18 and list(np.bincount(g.labels)) == [6, 6, 6]
    assert all(path.startswith("train/") for path in g.paths)
    query = embed_tensors(p, p.preprocess(data / "test" / "b" / "0.png")[None])[1][0].numpy()
    near = g.neighbours(query, 1, 3)
    assert [n.class_name for n in near] == ["b"] * 3
    assert near[0].similarity >= near[1].similarity >= near[2].similarity
    assert g.file(near[0].row, data) == data / near[0].path

    # another model (weights) or another class list is refused
    other = save_model(tmp_path / "other", seed=1)
    with pytest.raises(ModelDirError, match="built for another model"):
        load_gallery(tmp_path / "g", Predictor.load(other))
    record = json.loads((tmp_path / "g" / GALLERY_JSON).read_text())
    record["model"]["classes"] = ["a", "b", "x"]
    (tmp_path / "g" / GALLERY_JSON).write_text(json.dumps(record))
    with pytest.raises(ModelDirError, match="another class list"):
        load_gallery(tmp_path / "g", p)


def test_gallery_is_untrusted_input(model_dir, data, tmp_path):
    """Paths leaving the data root, tensors of the wrong shape and replaced files are refused."""
    p = Predictor.load(model_dir)
    build_gallery(p, data, tmp_path / "g")
    meta = tmp_path / "g" / GALLERY_JSON
    original = json.loads(meta.read_text())
    for bad in ("../../etc/passwd", "/etc/passwd", "train/../../x.png"):
        record = json.loads(json.dumps(original))
        record["paths"][0] = bad
        meta.write_text(json.dumps(record))
        with pytest.raises(ModelDirError, match="paths\\[0\\]"):
            load_gallery(tmp_path / "g", p)
    for bad in ("data", "../data", 7):
        meta.write_text(json.dumps({**original, "data_root": bad}))
        with pytest.raises(ModelDirError, match="data_root: expected an absolute folder"):
            load_gallery(tmp_path / "g", p)
    record = json.loads(json.dumps(original))
    record["paths"] = record["paths"][:-1]  # 17 paths for 18 rows
    meta.write_text(json.dumps(record))
    with pytest.raises(ModelDirError, match="expected"):
        load_gallery(tmp_path / "g", p)
    meta.write_text(json.dumps(original))
    tensors = tmp_path / "g" / "gallery.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 1
    tensors.write_bytes(bytes(blob))
    with pytest.raises(ModelDirError, match="SHA-256"):
        load_gallery(tmp_path / "g", p)


def test_open_set_calibration_and_auroc():
    val = {"energy": np.linspace(0, 1, 101)}
    record = calibrate(val, keep=0.95)
    assert record["thresholds"]["energy"] == pytest.approx(0.05)
    assert (val["energy"] >= record["thresholds"]["energy"]).mean() >= 0.95
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


# ---- enrollment ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["linear", "cosine", "prototype"])
def test_enroll_adds_a_class_like_the_trained_ones(model_dir, data, tmp_path, head):
    base = model_dir if head == "linear" else save_model(tmp_path / "m", f"model.head={head}")
    before = file_sha256(base / "model.safetensors")
    new = enroll(base, {"d": [data / "new" / "d"]}, tmp_path / "enrolled")
    assert new.classes == {"d": 3}
    assert file_sha256(base / "model.safetensors") == before  # the old model is untouched
    record = json.loads((tmp_path / "enrolled" / "model.json").read_text())
    assert record["classes"] == ["a", "b", "c", "d"]
    assert record["enrolled"]["classes"] == [{"name": "d", "images": 3}]
    old, p = Predictor.load(base), Predictor.load(tmp_path / "enrolled")
    images = torch.stack([p.preprocess(f) for f in sorted((data / "new" / "d").glob("*.png"))])
    _, emb = embed_tensors(p, images)
    mean = F.normalize(emb.mean(0), dim=0)
    layer, trained = p.method.head, old.method.head
    if head == "linear":  # the trained rows' common part plus the class's direction
        w, trained_w = layer.weight.detach(), trained.weight.detach()
        common = trained_w.mean(0)
        assert torch.allclose(F.normalize(w[3] - common, dim=0), mean, atol=1e-5)
        spread = (trained_w - common).norm(dim=1).mean()
        assert float((w[3] - common).norm()) == pytest.approx(float(spread), rel=1e-5)
        assert float(layer.bias.detach()[3]) == pytest.approx(
            float(trained.bias.detach().mean()), abs=1e-6
        )
    else:  # the new class's logit is the scaled cosine to its mean embedding
        rows = (layer.prototypes if head == "prototype" else layer.weight).detach()
        per = rows.shape[0] // 4
        for r in rows[3 * per :]:
            assert torch.allclose(F.normalize(r, dim=0), mean, atol=1e-5)
        mean_image = p.logits(images).argmax(1)
        assert (mean_image == 3).all()
    # the trained classes' logits do not move
    assert torch.allclose(p.logits(images)[:, :3], old.logits(images), atol=1e-5)


def test_enroll_refuses_existing_classes_and_keeps_parity_through_onnx(model_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="'b'.*already has a class of that name"):
        enroll(model_dir, {"b": [data / "new" / "d"]}, tmp_path / "x")
    assert not (tmp_path / "x" / "model.json").exists()
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DataError, match="none: no image files"):
        enroll(model_dir, {"d": [empty]}, tmp_path / "y")
    enroll(model_dir, {"d": [data / "new" / "d"]}, tmp_path / "e")
    with pytest.raises(ConfigError, match="not an empty folder"):
        enroll(model_dir, {"e": [data / "new" / "d"]}, tmp_path / "e")
    from lookcloser.export.onnx import export_onnx

    p = Predictor.load(tmp_path / "e")
    onnx_file = export_onnx(p, tmp_path / "e" / "model.onnx", embedding=True)
    images = torch.stack([p.preprocess(f) for f in sorted((data / "test").rglob("*.png"))])
    logits_diff, emb_diff = onnx_differences(p, onnx_file, (images,))
    assert logits_diff < 1e-4 and emb_diff < 1e-5


# ---- the server ----------------------------------------------------------------------------------
def test_server_answers_with_neighbours_unknown_and_thumbnails(model_dir, data, tmp_path):
    from lookcloser.serve.app import ServeSettings, create_app

    p = Predictor.load(model_dir)
    with TestClient(create_app(p), base_url=LOCAL) as client:  # no gallery: as before
        image = (data / "test" / "a" / "0.png").read_bytes()
        answer = client.post("/predict", files={"file": ("x.png", image)}).json()
        assert "neighbours" not in answer and "unknown" not in answer
        assert client.get("/gallery/0").status_code == 404
    build_gallery(p, data, tmp_path / "g")
    settings = ServeSettings(neighbours=2, gallery=str(tmp_path / "g"))
    with TestClient(create_app(p, settings), base_url=LOCAL) as client:
        answer = client.post("/predict?k=3", files={"file": ("x.png", image)}).json()
        groups = answer["neighbours"]
        assert [g["class"] for g in groups] == [t["class"] for t in answer["top"][:2]]
        assert all(len(g["neighbours"]) == 2 for g in groups)
        assert isinstance(answer["unknown"], bool) and answer["open_set"]["score"]
        thumb = client.get(f"/gallery/{groups[0]['neighbours'][0]['row']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert client.get("/gallery/100000").status_code == 404
        assert client.get("/model").json()["gallery"]["references"] == 18


def test_enrolled_linear_rows_are_centred(model_dir, data, tmp_path):
    """With two classes or more (or a gallery), a linear row is the class mean less the common
    mean: the plain mean of mostly positive pooled features would outscore every trained
    class on every image."""
    halves = sorted((data / "new" / "d").glob("*.png"))
    train_a = sorted((data / "train" / "a").glob("*.png"))[:2]
    enroll(model_dir, {"d": halves, "e": train_a}, tmp_path / "two")
    p = Predictor.load(tmp_path / "two")
    means = []
    for files in (halves, train_a):
        emb = embed_tensors(p, torch.stack([p.preprocess(f) for f in files]))[1]
        means.append(emb.mean(0))
    centre = (means[0] + means[1]) / 2
    w = p.method.head.weight.detach()
    common = w[:3].mean(0)  # the trained rows are unchanged
    assert p.classes == ["a", "b", "c", "d", "e"]
    direction = F.normalize(w[3] - common, dim=0)
    assert torch.allclose(direction, F.normalize(means[0] - centre, dim=0), atol=1e-5)
    record = json.loads((tmp_path / "two" / "model.json").read_text())
    assert "enrolled classes" in record["enrolled"]["linear_rows_centred_on"]
    build_gallery(Predictor.load(model_dir), data, model_dir / "gallery")
    try:
        enroll(model_dir, {"d": halves}, tmp_path / "one")
        record = json.loads((tmp_path / "one" / "model.json").read_text())
        assert record["enrolled"]["linear_rows_centred_on"] == "the gallery's mean embedding"
    finally:
        import shutil

        shutil.rmtree(model_dir / "gallery")


def test_enroll_carries_the_gallery_over_with_the_new_images(model_dir, data, tmp_path):
    """The enrolled model's gallery is the base gallery (same rows: the backbone is
    unchanged) plus the enrollment images as references of their classes, bound to the new
    model; the calibration keeps only the scores enrollment can never lower."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    p = Predictor.load(base)
    build_gallery(p, data, base / "gallery")
    old = load_gallery(base / "gallery", p)
    elsewhere = tmp_path / "shots" / "d"  # outside the gallery's data root
    shutil.copytree(data / "new" / "d", elsewhere)

    result = enroll(base, {"d": [elsewhere]}, tmp_path / "e")
    assert result.gallery is not None and result.gallery.references == 18 + 3
    enrolled = Predictor.load(tmp_path / "e")
    g = load_gallery(tmp_path / "e" / "gallery", enrolled)
    assert list(np.bincount(g.labels)) == [6, 6, 6, 3]
    assert np.array_equal(g.embeddings[:18], old.embeddings)
    assert g.data_root == os.path.commonpath([str(data), str(elsewhere)])
    for row in range(len(g)):  # every reference still names its image
        assert g.file(row).is_file()
    assert {g.file(row).parent for row in range(18, 21)} == {elsewhere}
    assert [g.file(r) for r in range(18)] == [old.file(r) for r in range(18)]
    query = embed_tensors(enrolled, enrolled.preprocess(elsewhere / "0.png")[None])[1][0]
    near = g.neighbours(query.numpy(), 3, 1)
    assert near[0].class_name == "d" and near[0].similarity == pytest.approx(1, abs=1e-5)
    carried = g.calibration
    assert carried["carried_over"] and carried["score"] == old.calibration["score"]
    assert "max_softmax" not in carried["thresholds"]
    assert all(
        carried["thresholds"][k] == v
        for k, v in old.calibration["thresholds"].items()
        if k != "max_softmax"
    )

    # why the thresholds still hold: on any image, those scores are at least the base's
    from lookcloser.lookalikes.gallery import Lookalikes
    from lookcloser.lookalikes.openset import open_set_scores

    images = torch.stack([p.preprocess(f) for f in sorted(data.rglob("*.png"))])
    scores = []
    for model, gallery in ((p, old), (enrolled, g)):
        logits, emb = embed_tensors(model, images)
        look = Lookalikes(gallery, model)
        scores.append(
            open_set_scores(
                logits.numpy(), emb.numpy(), look.class_rows, look.prototypes, gallery.embeddings
            )
        )
    for name in carried["thresholds"]:
        assert (scores[1][name] >= scores[0][name] - 1e-5).all(), name
    assert (scores[1]["max_softmax"] < scores[0]["max_softmax"]).any()

    # the base gallery refuses the enrolled model; no gallery when asked, or none to carry
    with pytest.raises(ModelDirError, match="built for another model"):
        load_gallery(base / "gallery", enrolled)
    plain = enroll(base, {"d": [elsewhere]}, tmp_path / "plain", gallery=False)
    assert plain.gallery is None and not (tmp_path / "plain" / "gallery").exists()
    shutil.copytree(base / "gallery", tmp_path / "e" / "gallery", dirs_exist_ok=True)
    stale = enroll(tmp_path / "e", {"f": [elsewhere]}, tmp_path / "stale")
    assert stale.gallery is None and "built for another model" in stale.gallery_note
