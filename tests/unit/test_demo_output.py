"""What `lookcloser demo` prints: image paths under test/, and a summary that never cuts values."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from lookcloser.demo import prediction_rows, summary_table, try_next_command
from lookcloser.predictor import Prediction


def test_prediction_rows_show_class_folder_and_file(tmp_path):
    test_dir = tmp_path / "data" / "test"
    examples = [test_dir / "class_00" / "0000.png", test_dir / "class_02" / "0000.png"]
    predictions = [
        Prediction(str(examples[0]), ["class_00", "class_01"], [0.9, 0.05], [0, 1]),
        Prediction(str(examples[1]), ["class_01", "class_02"], [0.6, 0.3], [1, 2]),
    ]
    rows = prediction_rows(examples, predictions, test_dir)
    assert rows == [
        ("class_00/0000.png", "class_00", "class_00 (0.90), class_01 (0.05)"),
        ("class_02/0000.png", "class_02", "class_01 (0.60), class_02 (0.30)"),
    ]
    assert len({image for image, _, _ in rows}) == len(rows)  # no two images shown alike


def test_prediction_rows_outside_test_dir_keep_the_path(tmp_path):
    image = tmp_path / "elsewhere" / "bird.png"
    rows = prediction_rows([image], [Prediction(str(image), ["a"], [1.0], [0])], tmp_path / "test")
    assert rows[0][0] == str(image)


def test_try_next_command_quotes_paths():
    command = try_next_command(Path("/tmp/my runs/model"), Path("/data/test/class_00/0000.png"))
    assert command == "lookcloser predict '/tmp/my runs/model' /data/test/class_00/0000.png"


def _second_column(text: str, name: str) -> str:
    """The value of row `name` in a rendered two-column table, its folded lines joined."""
    parts, inside = [], False
    for line in text.splitlines():
        cells = line.split("│")
        if len(cells) < 4:  # a border line
            if inside:
                break
            continue
        label, value = cells[1].strip(), cells[2].strip()
        if label == name:
            inside = True
        elif label and inside:
            break
        if inside:
            parts.append(value)
    return "".join(parts)


def test_narrow_summary_keeps_the_whole_try_next_command():
    run_dir = (
        "/tmp/pytest-of-someone/pytest-12/test_demo0/demo/model/baseline-tf_efficientnet_lite0"
    )
    image = "/tmp/pytest-of-someone/pytest-12/test_demo0/demo/data/test/class_00/0000.png"
    command = try_next_command(run_dir, image)
    rows = [
        ("test top-1", "0.967 on 120 images (6 classes; chance 0.167)"),
        ("model directory", run_dir),
        ("heatmap", "/tmp/x/demo/heatmap.png (grad-cam for class_00, p = 0.912)"),
        ("try next", command),
    ]
    console = Console(width=60, record=True, color_system=None, file=io.StringIO())
    console.print(summary_table(rows))
    text = console.export_text()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= 60
    # Folded lines lose only the spaces rich broke at; every character is there, in order.
    assert _second_column(text, "try next").replace(" ", "") == command.replace(" ", "")
    assert _second_column(text, "model directory") == run_dir
    # tests/flows/test_demo.py reads top-1 with r"test top-1\s*│\s*([0-9.]+)"
    assert re.search(r"test top-1\s*│\s*0\.967", text)


def test_try_next_command_runs_from_a_shell_without_the_venv_on_path(tmp_path, monkeypatch):
    from lookcloser import demo

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "lookcloser"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(demo.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a fresh shell: the venv is not activated
    assert demo.console_command() == str(script)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")  # activated: the bare name works
    assert demo.console_command() == "lookcloser"
