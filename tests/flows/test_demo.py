"""`lookcloser demo`: the README's main job, end to end, offline, within its time budget."""

from __future__ import annotations

import re
import time

from flowkit import run_cli
from PIL import Image


def test_demo_runs_offline_and_reports(tmp_path):
    start = time.perf_counter()
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--no-progress")
    seconds = time.perf_counter() - start
    assert seconds < 300, f"demo took {seconds:.0f} s"
    text = result.stdout
    assert "lookcloser demo: summary" in text
    top1 = float(re.search(r"test top-1\s*│\s*([0-9.]+)", text).group(1))
    assert top1 > 0.5  # 6 classes: chance is 0.167
    assert (tmp_path / "demo" / "model" / "model.json").is_file()
    assert Image.open(tmp_path / "demo" / "heatmap.png").size[0] > 0
