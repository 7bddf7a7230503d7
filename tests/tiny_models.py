"""Tiny model directories for the tests that need one saved as training saves it (predict
streams, look-alikes, model-directory trust): test_efficientnet, untrained, small images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lookcloser.config import Config
from lookcloser.data.prepare import TrainingData
from lookcloser.methods import build_method
from lookcloser.training import save_run_model


def tiny_config(size: int, *overrides: str) -> Config:
    """test_efficientnet at `size` px, no resize crop, a quarter of train carved for val."""
    return Config.load(
        None,
        [
            "model.backbone=test_efficientnet",
            "model.pretrained=false",
            f"data.image_size={size}",
            "data.crop_pct=1.0",
            "data.val_fraction=0.25",
            *overrides,
        ],
    )


def save_tiny_model(
    path: Path,
    classes: Sequence[str],
    size: int,
    *overrides: str,
    seed: int = 0,
    spread: bool = True,
    metrics: dict | None = None,
) -> Path:
    """A tiny model directory at `path`. `spread`: its 2-D weights drawn from N(0, 1), so
    that classes are far apart and predictions differ between images."""
    torch.manual_seed(seed)
    cfg = tiny_config(size, *overrides)
    method = build_method(cfg, len(classes)).for_inference().eval()
    if spread:
        with torch.no_grad():
            for p in method.parameters():
                if p.dim() == 2:
                    p.normal_(0, 1)
    save_run_model(path, method, TrainingData(list(classes)), cfg, metrics or {}, "bicubic")
    return path
