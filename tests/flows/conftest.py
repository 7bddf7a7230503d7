"""Fixtures for end-to-end flows: a tiny synthetic set and a model trained by the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowkit import TINY, run_cli

FLOWS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Every flow trains real models through the CLI: marked slow, so that
    `pytest -m "not slow"` is the contributors' fast loop (CI runs everything)."""
    for item in items:
        if FLOWS in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A 3-class synthetic ImageFolder tree (16 train + 4 test images per class, 64 px)."""
    from lookcloser.data.synthetic import generate

    return generate(
        tmp_path_factory.mktemp("synthetic"), classes=3, per_class=16, test_per_class=4, size=64
    )


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, synthetic_root) -> Path:
    """A model directory trained by the CLI on the tiny synthetic set."""
    out = tmp_path_factory.mktemp("run") / "model"
    result = run_cli(
        "train",
        "--no-progress",
        "data.source=imagefolder",
        f"data.root={synthetic_root}",
        *TINY,
        f"out={out}",
    )
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out
