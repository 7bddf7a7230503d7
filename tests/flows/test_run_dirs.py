"""Run directories are written only by the run that owns them, and never left half-made."""

from __future__ import annotations

import json

import lightning as L
import pytest
from flowkit import TINY, run_cli

from lookcloser import api
from lookcloser.errors import ConfigError, DataError
from lookcloser.modeldir import file_sha256
from lookcloser.rundir import MARKER, backup_path


class Crash(L.Callback):
    """Fails at the first optimizer step, before any checkpoint is written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("simulated crash")


def settings(root, out) -> list[str]:
    return [*TINY, "data.source=imagefolder", f"data.root={root}", f"out={out}"]


@pytest.fixture
def finished_run(synthetic_root, tmp_path):
    """A finished run and a snapshot of its files (name -> SHA-256)."""
    out = tmp_path / "run"
    api.train(overrides=settings(synthetic_root, out), progress=False)
    return out, _snapshot(out)


def _snapshot(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_out_refuses_a_folder_lookcloser_did_not_make(synthetic_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own notes\n")
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ConfigError, match=f"{out} is not empty and was not made by lookcloser"):
            api.train(overrides=[*settings(synthetic_root, out), *extra], progress=False)
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "my own notes\n"


def test_an_empty_folder_is_used_and_marked(synthetic_root, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    api.train(overrides=settings(synthetic_root, out), progress=False)
    assert (out / MARKER).is_file() and (out / "model.json").is_file()


def test_failed_overwrite_leaves_the_old_run_intact(finished_run, synthetic_root, tmp_path):
    out, before = finished_run
    # Bad data: refused by the image check, before anything is written.
    messy = tmp_path / "messy"
    (messy / "train" / "a").mkdir(parents=True)
    (messy / "train" / "b").mkdir(parents=True)
    for cls in "ab":
        for i in range(3):
            (messy / "train" / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="unreadable"):
        api.train(
            overrides=[
                *TINY,
                "data.source=imagefolder",
                f"data.root={messy}",
                f"out={out}",
                "overwrite=true",
            ],
            progress=False,
        )
    assert _snapshot(out) == before
    # A crash after the new run started but before its first checkpoint: the old run comes back.
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.train(
            overrides=[*settings(synthetic_root, out), "overwrite=true"],
            progress=False,
            callbacks=[Crash()],
        )
    assert _snapshot(out) == before
    assert not backup_path(out).exists()


def test_successful_overwrite_replaces_the_old_run(finished_run, synthetic_root):
    out, before = finished_run
    api.train(
        overrides=[*settings(synthetic_root, out), "overwrite=true", "seed=1"], progress=False
    )
    record = json.loads((out / "model.json").read_text())
    assert record["config"]["seed"] == 1
    assert file_sha256(out / "model.safetensors") != before["model.safetensors"]
    assert not backup_path(out).exists()


def test_a_failed_start_leaves_no_directory(synthetic_root, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.train(overrides=settings(synthetic_root, out), progress=False, callbacks=[Crash()])
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=-4", "data.batch_size: expected a value >= 1, got -4"),
        ("data.image_size=0", "data.image_size: expected a value in [16, 4096], got 0"),
        ("trainer.epochs=0", "trainer.epochs: expected a value >= 1, got 0"),
        ("optim.lr=-1", "optim.lr: expected a value > 0, got -1.0"),
        ("method.label_smoothing=2", "method.label_smoothing"),
    ],
)
def test_bad_values_exit_2_with_one_line_and_no_run_dir(
    override, message, synthetic_root, tmp_path
):
    out = tmp_path / "run"
    result = run_cli("train", *settings(synthetic_root, out), override, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lookcloser: error:") and message in line
    assert not out.exists()


def test_one_class_dataset_is_refused_before_anything_is_built(tmp_path):
    from lookcloser.data.synthetic import generate

    root = generate(tmp_path / "one", classes=2, per_class=2, test_per_class=1, size=48)
    import shutil

    for split in ("train", "test"):
        shutil.rmtree(sorted((root / split).iterdir())[1])
    out = tmp_path / "run"
    result = run_cli("train", *settings(root, out), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "a classifier needs at least 2 classes, found only" in line
    assert not out.exists()


def test_cli_range_errors_are_one_line(trained_model, synthetic_root):
    image = next((synthetic_root / "test").rglob("*.png"))
    top_k = run_cli("predict", str(trained_model), str(image), "--top-k", "-2", check=False)
    assert top_k.returncode == 2
    (line,) = top_k.stderr.strip().splitlines()
    assert "--top-k" in line and "expected an integer >= 1, got -2" in line
    target = run_cli("explain", str(trained_model), str(image), "--target", "nosuch", check=False)
    assert target.returncode == 2
    (line,) = target.stderr.strip().splitlines()
    assert "unknown class 'nosuch'" in line
    classes = json.loads((trained_model / "model.json").read_text())["classes"]
    assert all(name in line for name in classes)
