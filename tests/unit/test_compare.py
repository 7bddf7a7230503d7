"""`compare`: tiny runs trained through api.train, then one report (HTML, Markdown, CSV)."""

from __future__ import annotations

import csv
import json
import re
import statistics

import numpy as np
import pytest

from lookcloser import api
from lookcloser.cli import main
from lookcloser.compare import Group, Run, pick_images
from lookcloser.errors import ConfigError

TINY = [
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "data.image_size=32",
    "data.crop_pct=1.0",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_fraction=0",
    "trainer.epochs=1",
    "trainer.val_every_n_epochs=0",
    "trainer.progress=none",
    "trainer.cpu_threads=1",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from lookcloser.data.synthetic import generate

    return generate(
        tmp_path_factory.mktemp("synthetic"), classes=3, per_class=8, test_per_class=4, size=32
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """Baseline seeds 0 and 1 and DCL seed 0, trained by two compare calls into one folder
    (the second keeps baseline seed 0), and the second call's report."""
    base = tmp_path_factory.mktemp("compare")
    runs = base / "runs"
    first = api.compare(
        out=base / "first",
        methods=["baseline"],
        seeds=[0, 1],
        data=synthetic,
        overrides=TINY,
        runs_dir=runs,
        cost_rounds=1,
        images=2,
        progress=False,
    )
    stamp = (runs / "baseline-s0" / "model.json").stat().st_mtime_ns
    report = api.compare(
        [runs / "baseline-s1"],
        base / "report",
        methods=["baseline", "dcl"],
        seeds=[0],
        data=synthetic,
        overrides=TINY,
        runs_dir=runs,
        cost_rounds=1,
        images=4,
        progress=False,
    )
    return {"first": first, "report": report, "runs": runs, "stamp": stamp, "base": base}


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["test"]


def test_training_mode_trains_once_and_keeps_done_runs(trained):
    runs = trained["runs"]
    assert sorted(p.name for p in runs.iterdir()) == ["baseline-s0", "baseline-s1", "dcl-s0"]
    # The second call found baseline-s0 finished with the same config and kept it.
    assert (runs / "baseline-s0" / "model.json").stat().st_mtime_ns == trained["stamp"]
    labels = [g.label for g in trained["report"].groups]
    assert labels == ["baseline", "dcl"]  # the baseline is the reference, first
    assert [len(g.runs) for g in trained["report"].groups] == [2, 1]


def test_leaderboard_numbers_are_the_runs_metrics(trained):
    """Mean and sample standard deviation over seeds of each run's metrics.json, in the CSV,
    the HTML and the Markdown."""
    report, runs = trained["report"], trained["runs"]
    seeds = [_metrics(runs / "baseline-s0"), _metrics(runs / "baseline-s1")]
    dcl = _metrics(runs / "dcl-s0")
    with report.csv["leaderboard"].open() as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    for metric in ("top1", "mean_per_class_accuracy", "ece"):
        values = [m[metric] for m in seeds]
        assert float(rows["baseline"][f"{metric}_mean"]) == pytest.approx(np.mean(values))
        assert float(rows["baseline"][f"{metric}_sd"]) == pytest.approx(np.std(values, ddof=1))
        assert float(rows["dcl"][f"{metric}_mean"]) == pytest.approx(dcl[metric])
        assert rows["dcl"][f"{metric}_sd"] == ""  # one run: no spread, not a 0
    assert rows["baseline"]["runs"] == "2" and rows["baseline"]["seeds"] == "0 1"
    assert rows["baseline"]["test_images"] == str(seeds[0]["images"]) == "12"

    html = report.html.read_text()
    markdown = report.markdown.read_text()
    top1 = [100 * m["top1"] for m in seeds]
    shown = f"{np.mean(top1):.2f} ± {np.std(top1, ddof=1):.2f}"
    assert shown in html and shown in markdown
    assert f"{100 * dcl['top1']:.2f} (1 run)" in html
    assert f"{dcl['ece']:.4f} (1 run)" in markdown
    with report.csv["runs"].open() as f:
        per_run = {r["run_dir"]: r for r in csv.DictReader(f)}
    for name in ("baseline-s0", "baseline-s1", "dcl-s0"):
        row = per_run[str(runs / name)]
        assert float(row["top1"]) == _metrics(runs / name)["top1"]
        # The report re-evaluates each model: the same figure as training wrote.
        assert float(row["top1_reevaluated"]) == pytest.approx(float(row["top1"]), abs=1e-6)


def test_html_is_self_contained_with_every_section(trained):
    report = trained["report"]
    html = report.html.read_text()
    for heading in (
        "Leaderboard",
        "Cost",
        "Per-class accuracy",
        "The same test images, explained by each method",
        "Runs",
    ):
        assert heading in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in html and "https://" not in html
    # 4 images x (input + 2 methods) + the plot.
    assert len(sources) == 4 * 3 + 1
    assert (report.out / "plot.png").is_file()
    assert len(list((report.out / "images").glob("*.png"))) == 4 * 3
    for name in re.findall(r"\]\((images/[^)]+|plot\.png)\)", report.markdown.read_text()):
        assert (report.out / name).is_file()


def test_cost_and_per_class_files(trained):
    report = trained["report"]
    with report.csv["cost"].open() as f:
        cost = {r["method"]: r for r in csv.DictReader(f)}
    assert float(cost["baseline"]["params_ratio"]) == 1.0
    assert float(cost["baseline"]["speed_ratio"]) == 1.0
    # DCL classifies with the baseline's network (same FLOPs); its saved model also keeps
    # the small alignment conv that explain draws its map from.
    assert float(cost["dcl"]["flops_ratio"]) == pytest.approx(1.0)
    assert 1.0 < float(cost["dcl"]["params_ratio"]) < 1.05
    assert int(cost["baseline"]["flops"]) > 0 and float(cost["dcl"]["images_per_s"]) > 0

    with report.csv["per_class"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == report.classes
    base, dcl = report.groups
    for i, row in enumerate(rows):
        assert float(row["baseline"]) == pytest.approx(base.per_class[i])
        assert float(row["dcl - baseline"]) == pytest.approx(dcl.per_class[i] - base.per_class[i])
    # Group per-class accuracy is the mean of its runs'.
    np.testing.assert_allclose(base.per_class, np.mean([r.per_class for r in base.runs], axis=0))
    with report.csv["predictions"].open() as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 12
    assert set(predictions[0]) == {"path", "true", "baseline s0", "baseline s1", "dcl s0"}


def test_second_report_uses_the_cache(trained, monkeypatch):
    """Predictions are cached in the report folder; a rerun does not evaluate again."""
    import lookcloser.scoring

    def fail(*args, **kwargs):
        raise AssertionError("evaluated again despite the cache")

    # compare imports them from scoring at call time: patched there, a second evaluation fails
    monkeypatch.setattr(lookcloser.scoring, "stream_on_test", fail)
    monkeypatch.setattr(lookcloser.scoring, "outputs_on_test", fail)
    runs = trained["runs"]
    again = api.compare(
        [runs / "baseline-s0", runs / "dcl-s0"],
        trained["report"].out,
        cost_rounds=1,
        images=0,
        progress=False,
    )
    assert [g.label for g in again.groups] == ["baseline", "dcl"]


def test_report_figures_are_the_dense_outputs(trained):
    """Per-class accuracy and predictions, now from each run's RunRecord, are those of its
    model's whole logits (argmax, per-class counts) on the same images."""
    from lookcloser.scoring import outputs_on_test

    report = trained["report"]
    for group in report.groups:
        for run in group.runs:
            _, out = outputs_on_test(run.path, progress=False)
            dense = dict(zip(out.paths, out.logits.argmax(dim=1).tolist(), strict=True))
            assert [dense[p] for p in run.paths] == run.predictions.tolist()
            labels = out.labels.numpy()
            right = out.logits.argmax(dim=1).numpy() == labels
            counts = np.bincount(labels, minlength=len(report.classes))
            expected = np.bincount(labels[right], minlength=len(report.classes)) / counts
            np.testing.assert_allclose(run.per_class, expected)


def test_a_tampered_cache_file_is_ignored_and_rebuilt(trained, tmp_path, caplog):
    import logging

    from lookcloser.records import RunRecord

    run = trained["runs"] / "baseline-s0"
    out = tmp_path / "again"
    first = api.compare([run], out, cost_rounds=1, images=0, progress=False)
    (cached,) = (out / "cache").glob("*.npz")
    per_class = first.csv["per_class"].read_text()
    cached.write_bytes(cached.read_bytes()[:200])  # cut short
    with caplog.at_level(logging.WARNING):
        again = api.compare([run], out, cost_rounds=1, images=0, progress=False)
    assert f"{cached}: ignored, rebuilt" in caplog.text
    assert again.csv["per_class"].read_text() == per_class
    assert RunRecord.load(cached).images == 12  # written again, whole


def test_pick_images_is_linear_in_images():
    """100,000 test images and three methods: the choice takes a fraction of a second (a
    list scan per image took hours)."""
    import time

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, size=100_000)
    predictions = [np.where(rng.random(100_000) < 0.7, labels, (labels + 1) % 1000)]
    predictions += [np.where(rng.random(100_000) < 0.8, labels, rng.integers(0, 1000, 100_000))]
    predictions += [labels.copy()]
    start = time.perf_counter()
    chosen = pick_images(labels, predictions, 6, "baseline")
    assert time.perf_counter() - start < 2.0
    assert len({i for i, _ in chosen}) == 6
    assert [why for _, why in chosen[:2]] == [
        "methods disagree; baseline wrong",
        "methods disagree; baseline right",
    ]
    # Successive images of one kind come from different classes.
    right = [i for i, why in chosen if why == "every method right"]
    assert len({int(labels[i]) for i in right}) == len(right)


def test_not_a_run_dir_is_named(trained, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=f"{plain} is not a finished run directory"):
        api.compare([trained["runs"] / "baseline-s0", plain], tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        api.compare([tmp_path / "missing"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the runs were checked
    code = main(["compare", str(plain), "--out", str(tmp_path / "out2"), "--no-progress"])
    assert code == 2
    assert str(plain) in capsys.readouterr().err


def test_cli_compare_prints_the_report(trained, tmp_path, capsys):
    runs = trained["runs"]
    out = tmp_path / "cli"
    args = ["compare", str(runs / "dcl-s0"), str(runs / "baseline-s0"), "--out", str(out)]
    code = main([*args, "--images", "2", "--no-progress"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert "dcl" in (out / "report.md").read_text()
    with (out / "leaderboard.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["baseline", "dcl"]
    assert main(["compare", "--methods", "baseline", "--seeds", "one", "--out", str(out)]) == 2
    assert "--seeds: expected integers" in capsys.readouterr().err


def test_changed_config_for_a_kept_run_is_refused(trained, synthetic, tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        api.compare(
            out=tmp_path / "r",
            methods=["baseline"],
            seeds=[0],
            data=synthetic,
            overrides=[*TINY, "optim.lr=0.5"],
            runs_dir=trained["runs"],
            progress=False,
        )


def test_out_folder_of_other_files_is_refused(trained, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        api.compare([trained["runs"] / "dcl-s0"], tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _run(seed: int, top1: float) -> Run:
    metrics = {"top1": top1, "mean_per_class_accuracy": top1, "ece": 0.1, "images": 10}
    return Run(None, {}, metrics, seed, "baseline", "k", {})


def test_spread_is_the_sample_standard_deviation():
    group = Group("baseline", "baseline", [_run(0, 0.80), _run(1, 0.90), _run(2, 0.97)])
    assert group.mean("top1") == pytest.approx(0.89)
    assert group.spread("top1") == pytest.approx(statistics.stdev([0.80, 0.90, 0.97]))
    assert group.spread("top1") == pytest.approx(0.0854400374531753)
    assert Group("one", "baseline", [_run(0, 0.5)]).spread("top1") is None


def test_pick_images_prefers_disagreements_then_agreements():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    reference = np.array([0, 1, 2, 1, 1, 0, 0, 2])  # wrong on 3, 5, 7
    other = np.array([0, 1, 2, 0, 2, 0, 0, 1])  # right on 3 and 7, wrong on 4 (ref right)
    chosen = pick_images(labels, [reference, other], 6, "baseline")
    indices = [i for i, _ in chosen]
    assert len(indices) == len(set(indices)) == 6
    disagree = {3, 4, 7}
    assert set(indices[:3]) == disagree  # 4 of 6 allowed, 3 exist
    assert chosen[0][1] == "methods disagree; baseline wrong"
    assert any(why == "methods disagree; baseline right" for _, why in chosen)
    assert all(why == "every method right" for _, why in chosen[3:5])
    assert chosen[5] == (5, "every method wrong")


def test_image_key_is_the_class_and_the_path_below_its_folder(tmp_path):
    """The key that matches a test image across a folder, a CSV of its files and shards."""
    from lookcloser.data.samples import image_key

    assert image_key("/data/synth/test/c01/0005.png", "c01") == "c01/0005.png"
    assert image_key("test/c01/sub/0005.png", "c01", "") == "c01/sub/0005.png"
    assert image_key("../x/c01/a/c01/0005.png", "c01", "/x") == "c01/0005.png"  # the last one
    # No class folder: relative to the data root, else the file name.
    assert image_key(str(tmp_path / "imgs" / "a.jpg"), "bird", str(tmp_path)) == "bird/imgs/a.jpg"
    assert image_key("imgs/a.jpg", "bird", "") == "bird/imgs/a.jpg"
    assert image_key("/elsewhere/a.jpg", "bird", str(tmp_path)) == "bird/a.jpg"
    assert image_key("/elsewhere/a.jpg", "bird") == "bird/a.jpg"
