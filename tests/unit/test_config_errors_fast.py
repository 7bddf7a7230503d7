"""A config mistake is reported before torch, timm or Lightning is imported (well under a
second), with the same one-line message the full check gives."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from lookcloser.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "timm", "lightning", "torchvision") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.sorce=x"], "unknown key 'data.sorce'; did you mean 'data.source'?"),
        (["data.image_size=0"], "data.image_size: expected a value in [16, 4096]"),
        (["method.name=dcl", "method.alpha=x"], "method.alpha: expected float"),
        (["method.name=dlc"], "unknown method 'dlc'; available: baseline, dcl"),
        (["method.name=tasn", "method.no_such=1"], "method.no_such"),
        (["model.tta=flop"], "model.tta='flop'"),
        (["semi.strategy=nope"], "semi.strategy"),
    ],
)
def test_train_reports_a_config_mistake_before_importing_torch(overrides, message):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "train", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout
