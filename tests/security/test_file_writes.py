"""Red-team cases for files lookcloser writes: never through a link, never half-written, never
outside the chosen folder, the user's umask, escaped reports, a named error on a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lookcloser import api
from lookcloser.cli import main

EVIL_CLASS = "<img src=x onerror=alert(1)>"

TINY = [
    "data.source=imagefolder",
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


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def writes_run(tmp_path_factory) -> Path:
    """A tiny run trained under umask 022 on 3 classes, one named like an HTML tag."""
    from lookcloser.data.synthetic import generate

    data = generate(
        tmp_path_factory.mktemp("writes-data"), classes=3, per_class=6, test_per_class=3, size=32
    )
    for split in ("train", "test"):
        first = sorted((data / split).iterdir())[0]
        first.rename(first.with_name(EVIL_CLASS))
    (data / "synthetic.json").unlink()  # no longer the generator's tree
    out = tmp_path_factory.mktemp("writes-run") / "run"
    with _umask(0o022):
        api.train(None, [*TINY, f"data.root={data}", f"out={out}"], progress=False)
    return out


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "imgs" / "rgb.png"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


# ---- fileio itself ---------------------------------------------------------------------------
def test_fileio_replaces_a_link_and_leaves_its_target(tmp_path):
    from lookcloser.fileio import atomic_path, atomic_write_text

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    link = tmp_path / "out" / "file.txt"
    link.parent.mkdir()
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert target.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"
    # Libraries writing by file name (savefig, onnx, PIL) get a path beside the destination.
    link.unlink()
    link.symlink_to(target)
    with atomic_path(link) as tmp:
        assert tmp.parent == link.parent and not tmp.is_symlink()
        tmp.write_bytes(b"png")
    assert target.read_text() == "precious" and link.read_bytes() == b"png"


def test_fileio_exception_keeps_the_old_file_and_no_temporary(tmp_path):
    from lookcloser.fileio import atomic_open

    dest = tmp_path / "report.csv"
    dest.write_text("old,complete\n")
    with pytest.raises(RuntimeError), atomic_open(dest, "w") as f:
        f.write("new,half")
        raise RuntimeError("killed halfway")
    assert dest.read_text() == "old,complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_fileio_mode_follows_the_umask(tmp_path, mask, mode):
    from lookcloser.fileio import atomic_write_bytes

    with _umask(mask):
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == mode


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_safe_name_stays_one_file_name_inside_its_folder(text):
    from lookcloser.fileio import safe_name

    name = safe_name(text)
    folder = Path("/x/explanations")
    assert "/" not in name and "\x00" not in name and name not in ("", ".", "..")
    assert len(name.encode("utf-8")) <= 64
    assert os.path.normpath(folder / f"a-{name}.png").startswith(f"{folder}/")
    assert os.path.normpath(folder / name).startswith(f"{folder}/")


# ---- failure 2: explain writes through symlinks -----------------------------------------------
def test_explain_replaces_a_link_at_its_output_and_leaves_the_target(
    writes_run, image_file, tmp_path, capsys
):
    target = tmp_path / "victim.txt"
    target.write_text("do not overwrite")
    folder = writes_run / "explanations"
    folder.mkdir(exist_ok=True)
    link = folder / "rgb.png"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    assert main(["explain", str(writes_run), str(image_file)]) == 0
    assert capsys.readouterr().out.strip() == str(link)
    assert target.read_text() == "do not overwrite"
    assert not link.is_symlink()
    assert Image.open(link).format == "PNG"


def test_explain_refuses_a_linked_default_folder_in_the_model_dir(
    writes_run, image_file, tmp_path, capsys
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = tmp_path / "model"
    shutil.copytree(writes_run, model, ignore=shutil.ignore_patterns("explanations"))
    (model / "explanations").symlink_to(elsewhere)
    assert main(["explain", str(model), str(image_file)]) == 2
    err = capsys.readouterr().err
    assert "explanations" in err and "link" in err and len(err.strip().splitlines()) == 1
    assert list(elsewhere.iterdir()) == []
    # The user's own choice of folder may be a link.
    out = tmp_path / "mine"
    out.symlink_to(elsewhere)
    assert main(["explain", str(model), str(image_file), "--out", str(out / "x.png")]) == 0
    assert (elsewhere / "x.png").is_file()


def test_ensemble_member_names_never_leave_the_output_folder(writes_run, image_file, tmp_path):
    from lookcloser.ensemble import FORMAT, FORMAT_VERSION

    ensemble = tmp_path / "ens" / "deep"
    shutil.copytree(writes_run, ensemble / "m", ignore=shutil.ignore_patterns("explanations"))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": [{"name": "../../../escaped", "path": "m"}],
        "weights": [1.0],
    }
    (ensemble / "ensemble.json").write_text(json.dumps(record))
    written = api.explain(ensemble, image_file)
    assert len(written) == 1
    assert written[0].parent == ensemble / "explanations"
    assert sorted(p.name for p in (ensemble / "explanations").iterdir()) == [written[0].name]
    onnx_dir, _ = api.export(ensemble, out=tmp_path / "onnx")
    graphs = list(tmp_path.rglob("*.onnx"))
    assert len(graphs) == 1 and graphs[0].parent == onnx_dir == tmp_path / "onnx"
    escaped = [
        p for p in tmp_path.rglob("*escaped*") if p.parent not in (onnx_dir, written[0].parent)
    ]
    assert escaped == []


# ---- weak answer: explain's default names collide ---------------------------------------------
def test_explain_default_names_are_unique_and_stable(writes_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(writes_run, model, ignore=shutil.ignore_patterns("explanations"))
    images = []
    for i, folder in enumerate(("a", "b")):
        path = tmp_path / folder / "x.png"
        path.parent.mkdir()
        Image.new("RGB", (32, 32), (40 + 100 * i, 90, 20)).save(path)
        images.append(path)
    first = api.explain(model, images[0])
    second = api.explain(model, images[1])
    assert first == model / "explanations" / "x.png"
    assert second != first and second.parent == first.parent
    assert second.name.startswith("x-") and second.suffix == ".png"
    # Stable: the same input gets the same file again, and the other one is left alone.
    untouched = second.stat().st_ino
    assert api.explain(model, images[0]) == first
    assert api.explain(model, tmp_path / "a" / ".." / "a" / "x.png") == first
    assert second.stat().st_ino == untouched
    assert api.explain(model, images[1]) == second
    assert len(list(first.parent.iterdir())) == 2


# ---- weak answer: modes (model.json / config.yaml / metrics.json were 0600) -------------------
def test_every_file_of_a_fresh_run_follows_the_umask(writes_run):
    files = [p for p in writes_run.rglob("*") if p.is_file() and "explanations" not in p.parts]
    names = {p.name for p in files}
    assert {"model.json", "config.yaml", "metrics.json", "model.safetensors"} <= names
    wrong = {
        str(p.relative_to(writes_run)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in files
        if stat.S_IMODE(p.stat().st_mode) != 0o644
    }
    assert wrong == {}


# ---- weak answer: report.md embeds class names as raw HTML ------------------------------------
def test_compare_reports_escape_class_names(writes_run, tmp_path):
    report = api.compare([writes_run], tmp_path / "report", images=3, cost_rounds=1, progress=False)
    assert EVIL_CLASS in report.classes
    for path in (report.markdown, report.html):
        text = path.read_text()
        assert "<img src=x" not in text, path.name
    assert "&lt;img src=x onerror=alert(1)&gt;" in report.markdown.read_text()
    # The CSV files hold the name as it is (data, not markup).
    assert EVIL_CLASS in (tmp_path / "report" / "per_class.csv").read_text()


def test_compare_replaces_a_linked_images_folder(writes_run, tmp_path):
    out = tmp_path / "report"
    api.compare([writes_run], out, images=1, cost_rounds=1, progress=False)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    shutil.rmtree(out / "images")
    (out / "images").symlink_to(victim)
    api.compare([writes_run], out, images=1, cost_rounds=1, progress=False)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert not (out / "images").is_symlink() and any((out / "images").iterdir())


# ---- weak answer: disk full -------------------------------------------------------------------
def _fill(folder: Path, leave: int) -> None:
    """Fill a filesystem until about `leave` bytes are free."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_full_disk_saving_a_model_dir_names_the_file_and_keeps_the_old(tmp_path, tmpfs):
    import torch

    from lookcloser.fileio import WriteError
    from lookcloser.modeldir import WEIGHTS, save_model_dir

    with tmpfs(tmp_path / "small") as small:
        model = small / "model"
        save_model_dir(model, {"w": torch.zeros(4)}, {"classes": ["a"]})
        old = (model / WEIGHTS).read_bytes()
        with pytest.raises(WriteError) as caught:
            save_model_dir(model, {"w": torch.zeros(64 * 1024)}, {"classes": ["a"]})
        message = str(caught.value)
        assert str(model / WEIGHTS) in message and f"folder {model}" in message
        assert "no space left" in message and "\n" not in message
        assert (model / WEIGHTS).read_bytes() == old
        assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == []


def test_full_disk_explain_is_one_line_naming_the_file(
    writes_run, image_file, tmp_path, capsys, tmpfs
):
    with tmpfs(tmp_path / "small") as small:
        out = small / "x.png"
        out.write_bytes(b"previous picture")
        _fill(small, 2048)
        code = main(["explain", str(writes_run), str(image_file), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert str(out) in err and "no space left" in err
        assert out.read_bytes() == b"previous picture"
        assert sorted(p.name for p in small.iterdir()) == ["filler", "x.png"]


def test_int8_sidecar_never_replaces_the_model_json(writes_run):
    from lookcloser.errors import ConfigError

    before = (writes_run / "model.json").read_bytes()
    with pytest.raises(ConfigError, match="model.json"):
        api.export_int8(writes_run, writes_run / "model.onnx")
    assert (writes_run / "model.json").read_bytes() == before


def test_a_dollar_in_a_class_name_is_text_not_mathtext(tmp_path):
    """`$x^{$` as a class name made every figure naming it fail (mathtext parse error)."""
    from lookcloser.evaluation import write_confusion
    from lookcloser.explain.overlay import save_explanation
    from lookcloser.predictor import Explanation

    classes = ["$x^{$", "b"]
    csv_path, png_path = write_confusion([[2, 1], [0, 3]], classes, tmp_path)
    assert Image.open(png_path).format == "PNG" and classes[0] in csv_path.read_text()
    view = Image.new("RGB", (32, 32), (90, 120, 30))
    explanation = Explanation(view, np.random.default_rng(0).random((4, 4)), classes[0], 0.7)
    assert Image.open(save_explanation(explanation, tmp_path / "e.png")).format == "PNG"
