"""int8 ONNX: ONNX Runtime static quantization, calibrated on images, checked against fp32.

The fp32 graph is the one `export_onnx` writes; ONNX Runtime's `quant_pre_process` folds and
shape-infers it, `quantize_static` calibrates activation ranges on a sample of training
images (through the Predictor's eval transform, so the ranges are those inference sees) and
writes the int8 graph. The result is then run beside the fp32 graph on other images and
their top-1 agreement is recorded in a JSON sidecar next to the `.onnx` file. The file is a
plain ONNX model: `onnxruntime.InferenceSession(path)` loads it, with the same inputs
(`images`, and `meta` / `meta_mask` for metadata models) and output (`logits`) as fp32.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.data.sources import Sample
from lookcloser.errors import ConfigError, DataError, LookcloserError
from lookcloser.export.onnx import export_onnx, input_names
from lookcloser.fileio import atomic_path, atomic_write_text

SCHEMES = ("int8",)
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
SIDECAR_FORMAT = "lookcloser.onnx"


class ExportError(LookcloserError):
    """The model could not be exported or quantized; the message says which step failed."""


@dataclass
class QuantizeSettings:
    """How the graph is quantized (every choice is recorded in the sidecar).

    `quant_format`: `qdq` (QuantizeLinear/DequantizeLinear pairs around fp32 operators, which
    ONNX Runtime fuses into int8 kernels; ONNX Runtime's recommended form, readable by other
    runtimes) or `qoperator` (QLinearConv and friends). On cars66 both give the same
    predictions and QDQ ran 4-9 % faster in the same round-robin (docs/benchmarks.md).
    `per_channel`: one weight scale per output channel (depthwise convolutions need it).
    `exclude_ends`: keep the first convolution and the classifier in fp32 (on cars66 this
    halves the top-1 lost at the same speed, docs/benchmarks.md).
    """

    quant_format: str = "qdq"
    per_channel: bool = True
    exclude_ends: bool = True
    calibrate_method: str = "minmax"
    calibration_images: int = 64
    check_images: int = 256
    batch_size: int = 16
    seed: int = 0
    pre_process: bool = True
    torch_export: bool = True  # False: quantize the TorchScript graph (for comparison)

    def validate(self) -> QuantizeSettings:
        if self.quant_format not in QUANT_FORMATS:
            raise ConfigError(
                f"quant_format: expected one of {', '.join(QUANT_FORMATS)}, got {self.quant_format!r}"
            )
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ConfigError(
                f"calibrate_method: expected one of {', '.join(CALIBRATE_METHODS)}, "
                f"got {self.calibrate_method!r}"
            )
        for name in ("calibration_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.check_images < 0:
            raise ConfigError(f"check_images: expected an integer >= 0, got {self.check_images}")
        return self


@dataclass
class QuantizeResult:
    """The int8 file, its sidecar and how closely it follows the fp32 graph."""

    graph: str  # how the fp32 graph was traced: torch.export, else TorchScript
    path: Path
    sidecar: Path
    agreement: float | None  # share of check images with the fp32 graph's top-1 (None: no check)
    checked: int  # images in that check
    check_source: str  # which images were checked
    calibrated: int  # images the activation ranges came from
    max_abs_logit_difference: float
    bytes_fp32: int
    bytes_int8: int
    settings: QuantizeSettings


def check_scheme(scheme: str) -> str:
    """The quantization scheme, or a ConfigError naming the supported ones."""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"export --quantize: expected one of {', '.join(SCHEMES)}, got {scheme!r}"
        )
    return scheme


def image_samples(
    predictor, calibration: str | Path | None, count: int, check: int, seed: int
) -> tuple[list[Sample], list[Sample], str]:
    """`count` calibration images and, disjoint from them, up to `check` check images.

    From `calibration` (a folder, searched recursively) when given, else from the training
    split of the model's recorded data config. Unreadable images are left out.
    """
    from lookcloser.config import Config
    from lookcloser.data.images import list_image_files, verify_samples

    if calibration is not None:
        pool = [Sample(str(p), -1) for p in list_image_files(calibration)]
        where = f"images under {calibration}"
        if not pool:
            raise DataError(f"--calibration {calibration}: no image files found")
    else:
        from lookcloser.data.prepare import SHARDS
        from lookcloser.data.sources import build_source

        cfg = Config.from_dict(predictor.info.get("config", {}))
        if cfg.data.source == SHARDS:
            raise ConfigError(
                "export --quantize: the model was trained on shards; pass --calibration DIR "
                "(a folder of images like the training ones)"
            )
        try:
            pool = list(build_source(cfg.data).train)
        except DataError as err:
            raise DataError(
                f"calibration images: the model's training data could not be read ({err}); "
                "pass --calibration DIR"
            ) from None
        where = f"training images of {cfg.data.source}:{cfg.data.root}"
        if not pool:
            raise DataError(f"{where}: no training images; pass --calibration DIR")
    rng = random.Random(seed)
    picked = rng.sample(pool, min(len(pool), count + check))
    picked, _ = verify_samples(picked, "skip", predictor.max_pixels)
    if not picked:
        raise DataError(f"calibration: none of the sampled {where} could be read")
    return picked[:count], picked[count : count + check], where


def _feeds(predictor, samples: Sequence[Sample], batch_size: int) -> Iterator[dict]:
    """ONNX Runtime feeds of preprocessed samples, in the graph's input names."""
    import torch

    for batch in predictor._loader(samples, batch_size, 0):
        tensors: list[torch.Tensor] = [batch.images]
        if predictor.meta_keys:
            meta, mask = predictor._meta_inputs(len(batch.images), batch.meta, batch.meta_mask)
            tensors += [meta.cpu(), mask.cpu()]
        yield {
            name: t.numpy() if t.dtype == torch.bool else t.numpy().astype(np.float32)
            for name, t in zip(input_names(predictor), tensors, strict=True)
        }


def _end_nodes(model_path: Path) -> list[str]:
    """Names of the first and the last weight-carrying node (convolution or matrix product)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    weighted = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return list(dict.fromkeys([weighted[0], weighted[-1]])) if weighted else []


def _export_fp32(predictor, path: Path, torch_export: bool = True) -> tuple[Path, str]:
    """The fp32 graph to quantize: torch.export's (static sizes but the batch), else the
    TorchScript tracer's for a method torch.export cannot trace."""
    import logging

    if not torch_export:
        return export_onnx(predictor, path), "torchscript"
    try:
        return export_onnx(predictor, path, dynamo=True), "torch.export"
    except Exception as err:  # torch.export refuses some Python control flow
        logging.getLogger(__name__).warning(
            "torch.export could not trace the model (%s: %s); quantizing the TorchScript graph",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return export_onnx(predictor, path), "torchscript"


def quantize_int8(
    predictor,
    out: str | Path,
    calibration: str | Path | None = None,
    settings: QuantizeSettings | None = None,
) -> QuantizeResult:
    """Write an int8 ONNX model of the Predictor to `out`, plus `out` with `.json` (sidecar)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lookcloser.modeldir import MODEL_JSON, is_model_dir

    settings = (settings or QuantizeSettings()).validate()
    out = Path(out)
    if out.with_suffix(".json").name == MODEL_JSON and is_model_dir(out.parent):
        raise ConfigError(
            f"int8 --out {out}: its sidecar would replace {out.with_suffix('.json')}, the "
            "model directory's own; choose another file name"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    calib, check, where = image_samples(
        predictor, calibration, settings.calibration_images, settings.check_images, settings.seed
    )
    check_source = f"held-out {where}"
    if not check and settings.check_images:  # every image went to calibration: check on those
        check = calib[: settings.check_images]
        check_source = f"the calibration images ({where}; too few for a held-out set)"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = _feeds(predictor, calib, settings.batch_size)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        fp32, graph = _export_fp32(predictor, Path(tmp) / "fp32.onnx", settings.torch_export)
        prepared = fp32
        # ONNX Runtime's pre-processing breaks the TorchScript graph's Shape -> Pad subgraphs
        # (its quantizer then fails: "Graph is not a DAG"); the torch.export graph has none.
        if settings.pre_process and graph == "torch.export":
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        int8 = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                str(prepared),
                str(int8),
                Reader(),
                quant_format=QuantFormat.QDQ
                if settings.quant_format == "qdq"
                else QuantFormat.QOperator,
                per_channel=settings.per_channel,
                # u8 activations x s8 weights: the combination x86 VNNI kernels are made for.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=_end_nodes(prepared) if settings.exclude_ends else None,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[settings.calibrate_method],
            )
        except LookcloserError:
            raise
        except Exception as err:  # ONNX Runtime's quantizer has no error type of its own
            raise ExportError(
                f"int8: ONNX Runtime could not quantize the {graph} graph of this model "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        sessions = [
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for path in (fp32, int8)
        ]
        agree, diff = 0, 0.0
        for feed in _feeds(predictor, check, settings.batch_size):
            a, b = (s.run(["logits"], feed)[0] for s in sessions)
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            diff = max(diff, float(np.abs(a - b).max()))
        bytes_fp32 = fp32.stat().st_size
        with atomic_path(out) as final:  # fsynced, the user's umask, never through a link
            int8.replace(final)
    result = QuantizeResult(
        graph=graph,
        path=out,
        sidecar=out.with_suffix(".json"),
        agreement=agree / len(check) if check else None,
        checked=len(check),
        check_source=check_source,
        calibrated=len(calib),
        max_abs_logit_difference=diff,
        bytes_fp32=bytes_fp32,
        bytes_int8=out.stat().st_size,
        settings=settings,
    )
    _write_sidecar(predictor, result)
    return result


def _write_sidecar(predictor, result: QuantizeResult) -> None:
    from lookcloser.modeldir import file_sha256

    info: dict[str, Any] = predictor.info
    record = {
        "format": SIDECAR_FORMAT,
        "file": result.path.name,
        "sha256": file_sha256(result.path),
        "precision": "int8",
        "inputs": input_names(predictor),
        "outputs": ["logits"],
        "method": info.get("method"),
        "backbone": info.get("backbone"),
        "classes": predictor.classes,
        "preprocessing": info.get("preprocessing"),
        "meta_keys": predictor.meta_keys,
        "graph": result.graph,
        "quantization": {
            "tool": "onnxruntime.quantization.quantize_static",
            "activations": "uint8",
            "weights": "int8",
            **asdict(result.settings),
            "calibrated_on": result.calibrated,
        },
        "check_against_fp32": {
            "images": result.checked,
            "which": result.check_source,
            "top1_agreement": result.agreement,
            "max_abs_logit_difference": result.max_abs_logit_difference,
        },
        "bytes": {"fp32": result.bytes_fp32, "int8": result.bytes_int8},
    }
    atomic_write_text(result.sidecar, json.dumps(record, indent=2) + "\n")
