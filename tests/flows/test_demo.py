"""`lookcloser demo`: the README's main job, end to end, offline (its time is measured by
benchmarks/demo_time.py, not asserted here: a shared CI machine's speed says nothing)."""

from __future__ import annotations

import re

from flowkit import run_cli
from PIL import Image


def test_demo_runs_offline_and_reports(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--no-progress")
    text = result.stdout
    assert "lookcloser demo: summary" in text
    top1 = float(re.search(r"test top-1\s*│\s*([0-9.]+)", text).group(1))
    assert top1 > 0.5  # 6 classes: chance is 0.167
    assert (tmp_path / "demo" / "model" / "model.json").is_file()
    assert Image.open(tmp_path / "demo" / "heatmap.png").size[0] > 0
