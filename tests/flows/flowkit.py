"""Shared helpers of the flow tests: the tiny training settings and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Small enough for seconds per epoch on a 2-core CPU, real enough to learn something.
TINY = [
    "data.num_workers=0",
    "data.image_size=64",
    "data.batch_size=8",
    "data.crop_pct=1.0",
    "model.backbone=tf_efficientnet_lite0",
    "model.pretrained=true",
    "trainer.epochs=1",
    "trainer.val_every_n_epochs=0",
]

# Seconds per run: a tiny random backbone on 32 px images, for flows that test plumbing, not
# learning. Extend with the flow's own options (later overrides win).
SCRATCH = [
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=8",
    "data.crop_pct=1.0",
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "trainer.epochs=2",
    "trainer.progress=none",
]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True):
    """Run `python -m lookcloser.cli ARGS` in a fresh process; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "lookcloser.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lookcloser {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result
