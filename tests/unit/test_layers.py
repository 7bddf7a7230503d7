"""The flow goes one way: data/ and the Predictor never import the training engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_predictor_and_data_do_not_import_the_engine():
    code = (
        "import sys, pkgutil, importlib, lookcloser.data as d, lookcloser.predictor\n"
        "for m in pkgutil.walk_packages(d.__path__, 'lookcloser.data.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('lookcloser.engine') or m == 'lightning'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(SRC), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "[]"
