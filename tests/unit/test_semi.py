"""Semi-supervised pieces on tiny tensors and images: clustering, the OOD filter and its
val-chosen threshold, FixMatch's mask and loss, the bookkeeping in checkpoints, the two-view
unlabelled stream, the synthetic unlabelled sets, the prototype head, the embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from lookcloser.api import check_config
from lookcloser.config import Config, DataConfig, SemiConfig
from lookcloser.data.batch import Batch
from lookcloser.data.sources import Sample
from lookcloser.data.synthetic import (
    UNLABELLED_DIR,
    class_names,
    class_parts,
    generate,
    generate_unlabelled,
    unlabelled_truth,
)
from lookcloser.data.transforms import TwoViews, strong_transform, train_transform
from lookcloser.engine.datamodule import FGVCDataModule
from lookcloser.errors import ConfigError, DataError
from lookcloser.methods import build_method
from lookcloser.models.heads import HeadSpec, build_head
from lookcloser.semi import check_validation
from lookcloser.semi.clustering import cluster
from lookcloser.semi.embeddings import cache_key, cached_embeddings
from lookcloser.semi.online import UnlabelledObjective, fixmatch_mask
from lookcloser.semi.scores import (
    class_prototypes,
    filter_quality,
    ood_scores,
    val_threshold,
)


# ---- clustering -----------------------------------------------------------------------------
def _blobs(sizes, spreads, dim=32, seed=0):
    """Gaussian groups around random unit directions (labels = group index)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(sizes)]  # orthonormal
    points = [
        c + rng.normal(scale=s, size=(n, dim))
        for c, n, s in zip(centres, sizes, spreads, strict=True)
    ]
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return np.concatenate(points), labels


def test_clustering_recovers_well_separated_groups():
    x, truth = _blobs([30, 25, 40, 20], [0.05] * 4)
    result = cluster(x, k=None, min_size=5, keep=1.0, seed=0)
    assert result.k == 4  # chosen by silhouette from the grid
    assert max(result.silhouettes, key=result.silhouettes.get) == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.kept.all() and result.image_kept().all()


def test_small_and_loose_clusters_are_dropped_with_their_reason():
    # Two tight groups, one loose group, one group of 3 images.
    x, truth = _blobs([30, 30, 30, 3], [0.03, 0.03, 0.3, 0.03])
    result = cluster(x, k=4, min_size=5, keep=0.6, seed=0)  # 2 of the 3 large
    assert adjusted_rand_score(truth, result.labels) == 1.0
    by_group = {g: result.labels[truth == g][0] for g in range(4)}
    assert [bool(result.kept[by_group[g]]) for g in range(4)] == [True, True, False, False]
    reasons = np.array(result.reasons(5))
    assert set(reasons[truth == 2]) == {"loose cluster"}
    assert set(reasons[truth == 3]) == {"small cluster"}
    assert set(reasons[truth < 2]) == {"kept"}


# ---- the OOD filter ---------------------------------------------------------------------------
def test_val_threshold_keeps_the_asked_share_of_val():
    scores = torch.arange(10, dtype=torch.float)  # 0 .. 9
    assert val_threshold(scores, 0.9) == 1.0  # keeps 1..9: 9 of 10 (0.9 * 10 is not 9.0000001)
    assert val_threshold(scores, 1.0) == 0.0
    assert val_threshold(scores, 0.01) == 9.0  # at least one image is kept
    assert (scores >= val_threshold(scores, 0.5)).sum() == 5
    with pytest.raises(ConfigError, match="val split"):
        val_threshold(torch.empty(0), 0.9)


def test_filter_quality_counts():
    kept = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    actual = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    quality = filter_quality(kept, actual)
    assert (quality.kept, quality.in_class, quality.kept_in_class) == (3, 3, 2)
    assert quality.precision == pytest.approx(2 / 3) and quality.recall == pytest.approx(2 / 3)


def test_ood_filter_precision_and_recall_on_a_known_mix():
    """Embeddings of 4 labelled classes and of 6 other classes (80 % of the unlabelled images):
    thresholds chosen to keep 90 % of val keep about 90 % of the in-class unlabelled images and
    almost nothing else, for the prototype and the logit-based scores."""
    dim, per = 32, 60
    x, groups = _blobs([per] * 10, [0.12] * 10, dim=dim, seed=1)
    labelled = groups < 4
    rng = np.random.default_rng(2)
    order = rng.permutation(len(x))
    x, groups, labelled = x[order], groups[order], labelled[order]
    x, groups = torch.tensor(x, dtype=torch.float), torch.tensor(groups)
    train_idx = torch.nonzero(torch.tensor(labelled)).flatten()
    train, val, unl_in = train_idx[:80], train_idx[80:160], train_idx[160:]
    out = torch.nonzero(~torch.tensor(labelled)).flatten()
    unlabelled = torch.cat([unl_in, out])  # 80 in-class, 360 out-of-class
    truth = torch.cat([torch.ones(len(unl_in)), torch.zeros(len(out))]).bool()

    prototypes = class_prototypes(x[train], groups[train], 4)
    logits = 8 * F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T  # a cosine classifier
    for score in ("prototype", "energy", "max_softmax"):
        val_scores = ood_scores(score, logits[val], x[val], prototypes)
        threshold = val_threshold(val_scores, 0.9)
        kept = ood_scores(score, logits[unlabelled], x[unlabelled], prototypes) >= threshold
        quality = filter_quality(kept, truth)
        assert quality.in_class == 80 and quality.total == 440
        assert 0.75 <= quality.recall <= 1.0, (score, quality)
        assert quality.precision >= 0.95, (score, quality)


def test_prototype_score_ignores_classes_never_seen():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # class 1 has no images yet
    scores = ood_scores(
        "prototype", torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [1, 0]]), prototypes
    )
    assert scores.tolist() == pytest.approx([0.0, 1.0])


# ---- the online objective ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_method():
    cfg = Config.load(
        None, ["model.backbone=resnet18", "model.pretrained=false", "data.image_size=32"]
    )
    torch.manual_seed(0)
    return build_method(cfg, 3)


def test_fixmatch_mask_follows_the_threshold():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.1, 0.85, 0.05]])
    for threshold, expected in ((0.95, [1, 0, 0]), (0.8, [1, 0, 1]), (0.5, [1, 1, 1])):
        mask, labels = fixmatch_mask(probs, threshold)
        assert mask.tolist() == [bool(e) for e in expected]
        assert labels.tolist() == [0, 0, 1]


def _batch(unlabelled: int = 6, strong: bool = True) -> Batch:
    g = torch.Generator().manual_seed(1)
    weak = torch.rand(unlabelled, 3, 32, 32, generator=g)
    return Batch(
        torch.rand(4, 3, 32, 32, generator=g),
        torch.tensor([0, 1, 2, 0]),
        unlabelled=weak,
        unlabelled_strong=weak.flip(3) if strong else None,
    )


def test_fixmatch_loss_is_the_masked_cross_entropy_on_the_strong_view(tiny_method):
    batch = _batch()
    with torch.no_grad():
        tiny_method.eval()
        teacher_probs = tiny_method(batch.unlabelled).softmax(dim=1)
    confidence = teacher_probs.max(dim=1).values.sort().values
    threshold = float((confidence[2] + confidence[3]) / 2)  # keeps the 3 most confident
    cfg = SemiConfig(strategy="fixmatch", ood_score="none", threshold=threshold, weight=2.0)
    objective = UnlabelledObjective(cfg, 3, tiny_method.backbone.num_features)
    tiny_method.train()
    torch.manual_seed(0)
    losses = objective.losses(tiny_method, tiny_method, batch)

    mask, labels = fixmatch_mask(teacher_probs, threshold)
    assert int(mask.sum()) == 3 and losses["kept"].item() == pytest.approx(0.5)
    torch.manual_seed(0)
    student = tiny_method(batch.unlabelled_strong[mask])
    expected = 2.0 * F.cross_entropy(student, labels[mask], reduction="sum") / 6
    torch.testing.assert_close(losses["unlabelled"], expected)
    losses["unlabelled"].backward()
    assert tiny_method.head.weight.grad is not None
    tiny_method.zero_grad()

    # Nothing confident enough: no loss and no student pass.
    strict = UnlabelledObjective(
        SemiConfig(strategy="fixmatch", ood_score="none", threshold=1.0), 3, 512
    )
    assert strict.losses(tiny_method, tiny_method, batch)["unlabelled"].item() == 0.0
    assert strict.counts.tolist() == [6, 0, 6, 0]  # seen, confident, passed_ood, kept


def test_ood_filtered_objective_waits_for_the_first_validation(tiny_method):
    cfg = SemiConfig(strategy="pseudo_label", ood_score="energy", threshold=0.0, val_keep=0.5)
    objective = UnlabelledObjective(cfg, 3, tiny_method.backbone.num_features)
    batch = _batch(strong=False)
    tiny_method.train()
    assert objective.losses(tiny_method, tiny_method, batch)["kept"].item() == 0.0
    # A validation pass chooses the threshold that keeps half of the val images.
    objective.start_validation()
    val = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tiny_method.eval()
        val_logits = tiny_method(val)
    objective.observe_validation(tiny_method, val, val_logits)
    objective.end_validation()
    energies = torch.logsumexp(val_logits, dim=1)
    assert int((energies >= objective.threshold).sum()) == 4
    tiny_method.train()
    with torch.no_grad():
        tiny_method.eval()
        unl_energy = torch.logsumexp(tiny_method(batch.unlabelled), dim=1)
    tiny_method.train()
    kept = objective.losses(tiny_method, tiny_method, batch)["kept"].item()
    assert kept == pytest.approx(float((unl_energy >= objective.threshold).float().mean()))


def test_bookkeeping_survives_a_checkpoint(tiny_method):
    cfg = SemiConfig(strategy="pseudo_label", ood_score="prototype", threshold=0.0)
    objective = UnlabelledObjective(cfg, 3, tiny_method.backbone.num_features)
    tiny_method.train()
    objective.losses(tiny_method, tiny_method, _batch(strong=False))
    objective.start_validation()  # prototypes from the labelled images seen so far
    objective.threshold.fill_(0.25)
    objective.end_epoch(0)
    objective.losses(tiny_method, tiny_method, _batch(strong=False))  # mid-epoch counts
    assert objective.prototypes.abs().sum() > 0

    restored = UnlabelledObjective(cfg, 3, tiny_method.backbone.num_features)
    restored.load_state_dict(objective.state_dict())
    assert restored.history == objective.history and len(restored.history) == 1
    for name in ("threshold", "prototypes", "counts", "class_counts", "prototype_sums"):
        torch.testing.assert_close(getattr(restored, name), getattr(objective, name))
    assert restored.summary() == objective.summary()


# ---- config ------------------------------------------------------------------------------------
def test_semi_config_rules():
    with pytest.raises(ConfigError, match="data.unlabelled"):
        check_config(Config.load(None, ["semi.strategy=fixmatch"]))
    with pytest.raises(ConfigError, match="val_every_n_epochs"):
        check_config(
            Config.load(
                None,
                ["semi.strategy=pseudo_label", "data.unlabelled=x", "trainer.val_every_n_epochs=0"],
            )
        )
    cfg = Config.load(None, ["semi.strategy=cluster_pretrain", "data.unlabelled=x"])
    with pytest.raises(ConfigError, match="val split"):
        check_validation(cfg, 0)
    check_validation(Config.load(None, ["semi.strategy=fixmatch", "semi.ood_score=none"]), 0)
    with pytest.raises(ConfigError, match="semi.ood_score"):
        Config.load(None, ["semi.ood_score=entropy"])


# ---- data ---------------------------------------------------------------------------------------
def test_synthetic_unlabelled_set_has_the_asked_mix_and_its_truth(tmp_path):
    folder = generate_unlabelled(tmp_path / "u", classes=3, count=20, in_class=0.3, size=32, seed=1)
    truth = unlabelled_truth(folder)
    images = sorted(p.name for p in folder.glob("*.png"))
    assert len(images) == 20 and len(truth) == 20
    inside = [v for v in truth.values() if v["in_class"]]
    assert len(inside) == 6  # exactly round(20 * 0.3)
    labelled_parts = {"-".join(class_parts(i)) for i in range(3)}
    assert {v["class"] for v in inside} <= set(class_names(3))
    assert all(v["parts"] in labelled_parts for v in inside)
    # Out-of-class: part combinations no labelled class has.
    assert all(v["parts"] not in labelled_parts for v in truth.values() if not v["in_class"])
    # Reused when complete, byte for byte; regenerated for other parameters.
    before = (folder / images[0]).read_bytes()
    mtime = (folder / images[0]).stat().st_mtime_ns
    generate_unlabelled(folder, classes=3, count=20, in_class=0.3, size=32, seed=1)
    assert (folder / images[0]).stat().st_mtime_ns == mtime
    generate_unlabelled(folder, classes=3, count=10, in_class=0.5, size=32, seed=1)
    assert len(list(folder.glob("*.png"))) == 10
    assert sum(v["in_class"] for v in unlabelled_truth(folder).values()) == 5
    assert before  # a real image
    with pytest.raises(DataError, match="out-of-class"):
        generate_unlabelled(tmp_path / "all", classes=125, count=4, in_class=0.5, size=32)


def test_unlabelled_set_beside_a_synthetic_tree_goes_with_it(tmp_path):
    root = generate(tmp_path / "s", classes=2, per_class=1, test_per_class=1, size=32)
    generate_unlabelled(root / UNLABELLED_DIR, classes=2, count=4, in_class=0.5, size=32)
    generate(root, classes=2, per_class=2, test_per_class=1, size=32)  # other parameters
    assert not (root / UNLABELLED_DIR).exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not an unlabelled set"):
        generate_unlabelled(tmp_path / "mine", classes=2, count=4, size=32)


def test_fixmatch_stream_delivers_a_weak_and_a_strong_view(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(
            np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        ).save(path)
        paths.append(str(path))
    data = DataConfig(image_size=32, hflip=0.0)
    weak = train_transform(data)
    views = TwoViews(weak, strong_transform(data, SemiConfig().strong_augment, 1.0))
    module = FGVCDataModule(
        [Sample(p, i % 2) for i, p in enumerate(paths[:4])],
        [],
        weak,
        weak,
        batch_size=2,
        num_workers=0,
        seed=0,
        max_pixels=10**8,
        unlabelled=[Sample(p, -1) for p in paths],
        unlabelled_batch_size=3,
        unlabelled_transform=views,
    )
    loader = iter(module.train_dataloader())
    batch = module.on_before_batch_transfer(next(loader)[0], 0)
    assert batch.unlabelled.shape == batch.unlabelled_strong.shape == (3, 3, 32, 32)
    assert not torch.equal(batch.unlabelled, batch.unlabelled_strong)
    # The views are drawn from the image's own seed: the same batch again is identical.
    again = module.on_before_batch_transfer(next(iter(module.train_dataloader()))[0], 0)
    torch.testing.assert_close(again.unlabelled_strong, batch.unlabelled_strong)


# ---- prototype head and embedding cache ------------------------------------------------------------
def test_prototype_head_scores_by_cosine_to_class_prototypes():
    head = build_head("prototype", 8, 4)
    embeddings = torch.randn(5, 8, requires_grad=True)
    logits = head(embeddings)
    assert logits.shape == (5, 4)
    assert logits.abs().max() <= head.scale + 1e-4
    # Scale-free in the embedding: a long vector scores like a short one.
    torch.testing.assert_close(head(embeddings * 7), logits)
    # One prototype per class is exactly scale * cosine.
    single = build_head("prototype", 8, 4, subcenters=1)
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(single.prototypes, dim=1).T
    torch.testing.assert_close(single(embeddings), single.scale * cosine)
    logits.sum().backward()
    assert head.prototypes.grad is not None and embeddings.grad is not None
    with pytest.raises(ConfigError):
        build_head("prototype", 8, 4, subcenters=0)
    # model.head_subcenters and model.head_scale reach it like any cosine head's options.
    spec = HeadSpec("prototype", scale=8.0, subcenters=2)
    assert (spec.build(8, 4).per_class, spec.build(8, 4).scale) == (2, 8.0)


def test_embeddings_are_cached_under_their_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6, dtype=torch.float).view(3, 2)

    path = tmp_path / "round1" / "embeddings.safetensors"
    key = cache_key(model="m", paths=["a", "b", "c"])
    first = cached_embeddings(path, key, compute, log=lambda _: None)
    second = cached_embeddings(path, key, compute, log=lambda _: None)
    torch.testing.assert_close(first, second)
    assert len(calls) == 1
    assert json.loads(path.with_suffix(".json").read_text())["key"] == key
    cached_embeddings(path, cache_key(model="other", paths=["a"]), compute, log=lambda _: None)
    assert len(calls) == 2


def test_ood_report_of_a_run_without_semi_records_says_what_is_missing(tmp_path):
    from lookcloser import api

    with pytest.raises(DataError, match="semi.strategy=pseudo_label"):
        api.ood_report(tmp_path)
