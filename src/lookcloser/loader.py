"""The one loader of trained models: a model directory as a Predictor, an ensemble directory
as an EnsemblePredictor (the same interface). It sits above both, so neither imports the
other to tell them apart."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lookcloser.ensemble import EnsemblePredictor, read_ensemble_json
from lookcloser.fileio import atomic_write_text
from lookcloser.modeldir import ENSEMBLE_JSON, MODEL_JSON, is_ensemble_dir, read_model_json
from lookcloser.predictor import Predictor
from lookcloser.tta import TTA


def load_model(
    path: str | Path,
    device: str | torch.device | None = "cpu",
    tta: TTA | str | None = None,
    trust_modules: Iterable[str] = (),
) -> Predictor | EnsemblePredictor:
    """A Predictor for a model directory, or an EnsemblePredictor for an ensemble directory.
    `tta`, `trust_modules`: as for Predictor.load (tta None: the directory's default)."""
    if is_ensemble_dir(path):
        return EnsemblePredictor.load(path, device, tta, trust_modules)
    return Predictor.load(path, device, tta, trust_modules)


def set_default_tta(path: str | Path, spec: str | None) -> dict[str, Any]:
    """Record a test-time augmentation spec as the default of a model or ensemble directory
    (`tta` in model.json or ensemble.json; None or "none" removes it); returns the record."""
    tta = TTA.parse(spec)
    path = Path(path)
    if is_ensemble_dir(path):
        target = path / ENSEMBLE_JSON
        record = read_ensemble_json(path)
    else:
        target = path / MODEL_JSON
        record = read_model_json(path)
    record.pop("tta", None)
    if tta is not None:
        record["tta"] = tta.spec()
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    return record
