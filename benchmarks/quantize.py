"""int8 against fp32 ONNX on a real test split: top-1 of each, and speed in the same run.

Exports the model directory's fp32 graph and int8 graphs (ONNX Runtime static quantization,
one per setting asked for), evaluates every graph on the whole test split of the model's
recorded data config, and times fp32 and int8 sessions alternately (A B A B ...) at batch 1
and batch 32 with one intra-op thread. Nothing is written into the model directory.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quantize.py MODEL_DIR \
        --variants qoperator-pc qdq-pc
Variant names: `qoperator` or `qdq`, then any of `-pc` (per-channel weights), `-ends`
(first and last layers kept in fp32), `-cN` (N calibration images, default 64), `-pct` /
`-ent` (percentile / entropy calibration instead of min-max), `-script` (quantize the
TorchScript graph instead of the torch.export one). A variant starts from
per-tensor weights with every layer quantized; `lookcloser export --quantize int8` is
`qdq-pc-ends`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

from lookcloser.config import Config  # noqa: E402
from lookcloser.data.sources import build_source  # noqa: E402
from lookcloser.export.onnx import export_onnx  # noqa: E402
from lookcloser.export.quantize import ExportError, QuantizeSettings, quantize_int8  # noqa: E402
from lookcloser.predictor import Predictor  # noqa: E402


def parse_variant(name: str) -> QuantizeSettings:
    """`qdq-pc-ends-c128-pct` -> QuantizeSettings."""
    fmt, *flags = name.split("-")
    settings = QuantizeSettings(quant_format=fmt, per_channel=False, exclude_ends=False)
    for flag in flags:
        if flag == "pc":
            settings.per_channel = True
        elif flag == "ends":
            settings.exclude_ends = True
        elif flag == "script":
            settings.torch_export = False
        elif flag == "nopre":
            settings.pre_process = False
        elif flag == "pct":
            settings.calibrate_method = "percentile"
        elif flag == "ent":
            settings.calibrate_method = "entropy"
        elif flag.startswith("c") and flag[1:].isdigit():
            settings.calibration_images = int(flag[1:])
        else:
            raise SystemExit(f"unknown variant flag {flag!r} in {name!r}")
    return settings.validate()


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def top1(
    sess: ort.InferenceSession, images: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    preds = np.concatenate(
        [
            sess.run(["logits"], {"images": images[i : i + 64]})[0].argmax(1)
            for i in range(0, len(images), 64)
        ]
    )
    return float((preds == labels).mean()), preds


def interleaved_rates(sessions: list, batch: np.ndarray, iters: int, rounds: int) -> list[float]:
    """Median images/s of each session, measured alternately."""
    for s in sessions:
        s.run(["logits"], {"images": batch})  # warm-up
    rates: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(iters):
                s.run(["logits"], {"images": batch})
            rates[i].append(len(batch) * iters / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--variants", nargs="+", default=["qoperator-pc", "qdq-pc"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", help="what the model is, for the table (default: its folder)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    predictor = Predictor.load(args.model_dir)
    cfg = Config.from_dict(predictor.info["config"])
    test = build_source(cfg.data).test
    print(f"preprocessing {len(test)} test images", file=sys.stderr)
    batches = list(predictor._loader(test, 64, 0))
    images = torch.cat([b.images for b in batches]).numpy().astype(np.float32)
    labels = torch.cat([b.targets for b in batches]).numpy()

    graphs = []  # (name, session, top-1, predictions, extra cells)
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, dynamo in (
            ("fp32, torch.export graph (what int8 starts from)", "fp32.onnx", True),
            ("fp32, TorchScript graph (plain `lookcloser export`)", "script.onnx", False),
        ):
            path = export_onnx(predictor, Path(tmp) / file, dynamo=dynamo)
            fp32 = session(path, args.threads)
            mib = f"{path.stat().st_size / 2**20:.1f}"
            graphs.append((name, fp32, *top1(fp32, images, labels), ["", mib, ""]))
        reference = graphs[0][3]
        for variant in args.variants:
            settings = parse_variant(variant)
            start = time.process_time()
            try:
                result = quantize_int8(predictor, Path(tmp) / f"{variant}.onnx", settings=settings)
            except ExportError as err:  # reported, not fatal: the other variants still count
                failed.append(f"`{variant}`: {err}")
                continue
            seconds = time.process_time() - start  # CPU time: the machine may be shared
            int8 = session(result.path, args.threads)
            extra = [
                f"{100 * result.agreement:.1f} ({result.checked})",
                f"{result.bytes_int8 / 2**20:.1f}",
                f"{seconds:.0f}",
            ]
            graphs.append((f"int8 {variant}", int8, *top1(int8, images, labels), extra))
            print(f"{variant}: top-1 {graphs[-1][2]:.4f}", file=sys.stderr, flush=True)
        # Every graph timed in one round-robin per batch size, so all ratios share the noise.
        sessions = [g[1] for g in graphs]
        speed = {
            batch: interleaved_rates(sessions, images[:batch], iters, args.rounds)
            for batch, iters in ((1, 40), (32, 3))
        }
    acc_fp32 = graphs[0][2]
    rows = []
    for k, (name, _, acc, preds, extra) in enumerate(graphs):
        rows.append(
            [
                name,
                f"{100 * acc:.2f}",
                f"{100 * (acc - acc_fp32):+.2f}" if k else "",
                f"{100 * float((preds == reference).mean()):.1f}" if k else "",
                extra[0],
                f"{speed[1][k]:.0f} (**{speed[1][k] / speed[1][0]:.2f}x**)",
                f"{speed[32][k]:.0f} (**{speed[32][k] / speed[32][0]:.2f}x**)",
                extra[1],
                extra[2],
            ]
        )

    name = args.name or Path(args.model_dir).name
    command = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quantize.py " + " ".join(sys.argv[1:])
    text = (
        f"## int8 against fp32 ONNX: {name}\n\n"
        f"Command: `{command.strip()}`. {predictor.info.get('backbone')} "
        f"({predictor.info.get('method')}), {predictor.image_size} px, "
        f"test split: {len(labels)} images, {len(predictor.classes)} classes. "
        f"ONNX Runtime {ort.__version__}, CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} intra-op thread(s), under `nice -n 10` on a shared machine. Speeds: "
        f"images/s, median of {args.rounds} rounds in which every graph runs in turn; x: "
        "against the first row. Calibration (64 images unless `-cN`) and the export-time "
        "check (256 images) are disjoint samples of the training split.\n\n"
        + markdown_table(
            [
                "graph",
                "test top-1 %",
                "change (points)",
                "same top-1 as fp32 on test %",
                "agreement at export % (images)",
                "batch 1 images/s",
                "batch 32 images/s",
                "MiB",
                "export CPU s",
            ],
            rows,
        )
        + "".join(f"\n\nFailed: {line}" for line in failed)
    )
    print(text)
    if not args.no_write:
        write_section("int8-onnx", text)


if __name__ == "__main__":
    main()
