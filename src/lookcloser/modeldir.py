"""The model directory: model.safetensors + model.json, written so a crash never looks done.

model.json is written last, atomically, and records the weights' SHA-256: a directory
without it (or whose weights do not match it) is not a model. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lookcloser.errors import ModelDirError
from lookcloser.fileio import atomic_write_text  # noqa: F401  (re-exported)

FORMAT = "lookcloser.model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
ENSEMBLE_JSON = "ensemble.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a saved model."""
    import lightning
    import timm
    import torch

    from lookcloser import __version__

    return {
        "lookcloser": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
    }


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` holds a complete model (its model.json exists)."""
    return (Path(path) / MODEL_JSON).is_file()


def is_ensemble_dir(path: str | Path) -> bool:
    """Whether `path` holds an ensemble (its ensemble.json exists; see lookcloser.ensemble)."""
    return (Path(path) / ENSEMBLE_JSON).is_file()


def set_default_tta(path: str | Path, spec: str | None) -> dict[str, Any]:
    """Record a test-time augmentation spec as the default of a model or ensemble directory
    (`tta` in model.json or ensemble.json; None or "none" removes it); returns the record."""
    from lookcloser.tta import TTA

    tta = TTA.parse(spec)
    path = Path(path)
    if is_ensemble_dir(path):
        target = path / ENSEMBLE_JSON
        record = json.loads(target.read_text())
    else:
        target = path / MODEL_JSON
        record = read_model_json(path)
    record.pop("tta", None)
    if tta is not None:
        record["tta"] = tta.spec()
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    return record


def invalidate(path: str | Path) -> None:
    """Mark a model directory incomplete before rewriting it."""
    (Path(path) / MODEL_JSON).unlink(missing_ok=True)


def save_model_dir(path: str | Path, state_dict: dict, info: dict[str, Any]) -> Path:
    """Write weights then model.json (last, atomically) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    invalidate(path)
    weights = path / WEIGHTS
    tmp = path / f".{WEIGHTS}.tmp"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **info,
        "weights": {
            "file": WEIGHTS,
            "sha256": file_sha256(weights),
            "bytes": weights.stat().st_size,
        },
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(path / MODEL_JSON, json.dumps(record, indent=2) + "\n")
    return path


def read_model_json(path: str | Path) -> dict[str, Any]:
    """The parsed model.json of a model directory, checked for format."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory")
    if not meta_path.is_file():
        raise ModelDirError(
            f"{path}: no {MODEL_JSON}; not a model directory, or its training did not finish"
        )
    try:
        record = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{meta_path}: not valid JSON ({err})") from None
    if record.get("format") != FORMAT:
        raise ModelDirError(f"{meta_path}: format is {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise ModelDirError(
            f"{meta_path}: format_version {record['format_version']} is newer than this "
            f"lookcloser reads ({FORMAT_VERSION}); upgrade lookcloser"
        )
    for key in ("method", "classes", "preprocessing", "config", "weights"):
        if key not in record:
            raise ModelDirError(f"{meta_path}: missing field {key!r}")
    return record


def read_weights(path: str | Path, record: dict[str, Any]) -> dict:
    """The weights of a model directory, after checking them against model.json."""
    weights = Path(path) / record["weights"]["file"]
    if not weights.is_file():
        raise ModelDirError(f"{weights}: missing")
    if file_sha256(weights) != record["weights"]["sha256"]:
        raise ModelDirError(f"{weights}: SHA-256 does not match model.json (corrupt or replaced)")
    return load_file(str(weights))
