"""Mixed precision goes through Lightning: bf16 autocast trains on the CPU too."""

from __future__ import annotations

import json
import math

from flowkit import TINY

from lookcloser import api


def test_bf16_mixed_precision_trains_and_saves_fp32_weights(synthetic_root, tmp_path):
    out = tmp_path / "bf16"
    overrides = [
        *TINY,
        "data.source=imagefolder",
        f"data.root={synthetic_root}",
        "trainer.precision=bf16-mixed",
        f"out={out}",
    ]
    result = api.train(overrides=overrides, progress=False)
    record = json.loads((out / "model.json").read_text())
    assert record["training"]["precision"] == "bf16-mixed"
    assert math.isfinite(result.metrics["test"]["top1"]) and result.metrics["test"]["images"] == 12
    predictor = api.load(out)
    assert all(
        p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in predictor.method.parameters()
    )
