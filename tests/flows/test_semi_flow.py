"""Semi-supervised training end to end on the tiny synthetic set with an unlabelled set of
known truth: each strategy trains and records what it kept, `data ood-report` draws it, and
a run killed mid-way resumes without losing the unlabelled bookkeeping."""

from __future__ import annotations

import json

import lightning as L
import pytest
from flowkit import SCRATCH

from lookcloser import api, cli
from lookcloser.data.synthetic import generate_unlabelled
from lookcloser.errors import ConfigError
from lookcloser.semi.records import read_stages

FAST = [
    *SCRATCH,
    "data.val_fraction=0.25",
    "trainer.deterministic=true",
    "data.unlabelled_batch_size=8",
    "semi.threshold=0.0",  # a random tiny model is never confident; keep the filter's OOD part
]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """16 unlabelled images, 4 of them from the 3 labelled classes."""
    folder = tmp_path_factory.mktemp("unlabelled") / "u"
    return generate_unlabelled(folder, classes=3, count=16, in_class=0.25, size=48, seed=3)


def _settings(root, unlabelled, out, strategy: str, *extra: str) -> list[str]:
    return [
        "data.source=imagefolder",
        f"data.root={root}",
        f"data.unlabelled={unlabelled}",
        f"semi.strategy={strategy}",
        *FAST,
        f"out={out}",
        *extra,
    ]


class _FailAt(L.Callback):
    """Raises at the start of an epoch (after the previous epoch's checkpoint), once."""

    def __init__(self, epoch: int, where: str = ""):
        self.epoch, self.where, self.fired = epoch, where, False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if (
            not self.fired
            and trainer.current_epoch == self.epoch
            and self.where in str(trainer.default_root_dir)
        ):
            self.fired = True
            raise RuntimeError("killed for the test")


@pytest.fixture(scope="module")
def pseudo_label_run(synthetic_root, unlabelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("semi") / "pseudo"
    api.train(None, _settings(synthetic_root, unlabelled, out, "pseudo_label"), progress=False)
    return out


@pytest.mark.parametrize("strategy", ["pseudo_label", "fixmatch"])
def test_online_strategy_trains_and_records_what_it_kept(
    strategy, synthetic_root, unlabelled, pseudo_label_run, tmp_path, capsys
):
    out = pseudo_label_run
    if strategy == "fixmatch":
        out = tmp_path / "fixmatch"
        api.train(None, _settings(synthetic_root, unlabelled, out, strategy), progress=False)
    training, final = read_stages(out)
    assert training["strategy"] == strategy and training["ood_score"] == "prototype"
    epochs = training["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    # No threshold before the first validation: the first epoch keeps nothing.
    assert epochs[0]["kept"] == 0 and epochs[0]["threshold"] is not None
    assert epochs[1]["seen"] == epochs[0]["seen"] > 0
    assert training["kept"] == sum(e["kept"] for e in epochs)
    # The final model's filter, scored against the recorded truth.
    assert final["kind"] == "filter" and final["total"] == 16
    quality = final["quality"]["filter"]
    assert quality["in_class"] == 4 and quality["kept"] == final["kept"]
    logged = (out / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/semi_kept" in logged and "train/semi_loss" in logged
    # The saved model is the method's own: it loads and predicts like any other.
    assert api.load(out).info["method"] == "baseline"

    assert cli.main(["data", "ood-report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final-model (filter): kept" in text and "precision" in text
    assert (out / "semi" / "report-final-model.png").stat().st_size > 10_000
    assert (out / "semi" / "report-training.png").is_file()


def test_killed_online_run_resumes_with_its_bookkeeping(
    synthetic_root, unlabelled, pseudo_label_run, tmp_path
):
    out = tmp_path / "killed"
    settings = _settings(synthetic_root, unlabelled, out, "pseudo_label")
    with pytest.raises(RuntimeError, match="killed for the test"):
        api.train(None, settings, progress=False, callbacks=[_FailAt(1)])
    api.train(None, [*settings, "trainer.resume=last"], progress=False)
    resumed, uninterrupted = read_stages(out)[0], read_stages(pseudo_label_run)[0]
    assert resumed["epochs"] == uninterrupted["epochs"]
    assert resumed["pseudo_labels_per_class"] == uninterrupted["pseudo_labels_per_class"]


def test_cluster_pretrain_runs_its_stages_and_resumes(synthetic_root, unlabelled, tmp_path):
    out = tmp_path / "cluster"
    settings = _settings(
        synthetic_root,
        unlabelled,
        out,
        "cluster_pretrain",
        "trainer.epochs=1",
        "semi.rounds=2",
        "semi.min_cluster_size=2",
    )
    # Killed in round 2's fine-tuning, after its pretraining finished.
    with pytest.raises(RuntimeError, match="killed for the test"):
        api.train(None, settings, progress=False, callbacks=[_FailAt(0, "round2/finetune")])
    round1 = out / "semi" / "round1"
    kept = {
        path: path.stat().st_mtime_ns
        for path in (
            round1 / "embeddings.safetensors",
            round1 / "pretrain" / "model.json",
            round1 / "finetune" / "model.json",
            out / "semi" / "round2" / "embeddings.safetensors",
            out / "semi" / "round2" / "pretrain" / "model.json",
        )
    }
    with pytest.raises(ConfigError, match="unfinished cluster_pretrain run"):
        api.train(None, settings, progress=False)
    result = api.train(None, [*settings, "trainer.resume=last"], progress=False)

    # Finished stages and cached embeddings were reused, not redone.
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    names = [s["name"] for s in read_stages(out)]
    assert names == ["round1-cluster", "round2-select", "round2-cluster"]
    cluster_stage = read_stages(out)[0]
    assert cluster_stage["total"] == 16 and cluster_stage["k"] >= 2
    assert sum(c["size"] for c in cluster_stage["clusters"]) == 16
    summary = json.loads((out / "semi" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    chosen = summary["rounds"][summary["chosen_round"] - 1]
    assert chosen["val_top1"] == max(r["val_top1"] for r in summary["rounds"])
    # The chosen round's model is the run's model.
    assert result.metrics["val"]["top1"] == pytest.approx(chosen["val_top1"])
    assert api.load(out).classes == api.load(chosen["model_dir"]).classes
    summaries = api.ood_report(out)
    assert [s["stage"] for s in summaries] == names
    assert all((out / "semi" / f"report-{name}.png").stat().st_size > 10_000 for name in names)
