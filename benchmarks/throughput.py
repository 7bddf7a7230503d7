"""Throughput of lookcloser's training step and Predictor against a bare timm model.

Each figure is a ratio measured in the same run, same backbone, batch, image size and
threads, with the two sides interleaved (A B A B ...) so that machine noise hits both:
  training step:  FGVCSystem-equivalent (method.training_losses + AdamW) / bare timm + CE + AdamW
  inference:      Predictor.logits / bare timm model forward (eval, inference_mode)
  ONNX Runtime:   onnxruntime session on the exported Predictor graph / Predictor.logits

    python benchmarks/throughput.py [--backbone tf_efficientnet_lite0] [--batch 32] [--sizes 224 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from lookcloser.config import Config  # noqa: E402
from lookcloser.data.batch import Batch  # noqa: E402
from lookcloser.methods import build_method  # noqa: E402
from lookcloser.predictor import Predictor  # noqa: E402


def rate(fn, batch: int, iters: int) -> float:
    """Images per second of `fn` over `iters` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - start)


def interleaved(a, b, batch: int, iters: int, rounds: int) -> tuple[float, float]:
    """Median images/s of a and b, measured alternately."""
    a(), b()  # warm-up
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(rate(a, batch, iters))
        rb.append(rate(b, batch, iters))
    return statistics.median(ra), statistics.median(rb)


def measure(
    backbone: str, batch: int, size: int, classes: int, iters: int, rounds: int
) -> list[list[str]]:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    labels = torch.randint(0, classes, (batch,))

    cfg = Config()
    cfg.model.backbone = backbone
    cfg.model.pretrained = False  # speed does not depend on the weights
    method = build_method(cfg, classes)
    bare = timm.create_model(backbone, pretrained=False, num_classes=classes)

    # ---- training step ------------------------------------------------------------------------
    method.train(), bare.train()
    opt_m = torch.optim.AdamW(method.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(bare.parameters(), lr=1e-4)

    def step_lookcloser():
        opt_m.zero_grad(set_to_none=True)
        method.training_losses(Batch(images, labels))["loss"].backward()
        opt_m.step()

    def step_bare():
        opt_b.zero_grad(set_to_none=True)
        F.cross_entropy(bare(images), labels, label_smoothing=0.1).backward()
        opt_b.step()

    train_l, train_b = interleaved(step_lookcloser, step_bare, batch, max(1, iters // 3), rounds)

    # ---- inference ----------------------------------------------------------------------------
    predictor = Predictor(method, [str(i) for i in range(classes)], size, device="cpu")
    bare.eval()

    def infer_bare():
        with torch.inference_mode():
            bare(images)

    infer_p, infer_b = interleaved(
        lambda: predictor.logits(images), infer_bare, batch, iters, rounds
    )

    # ---- ONNX Runtime -------------------------------------------------------------------------
    import onnxruntime as ort

    from lookcloser.export.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(predictor, Path(tmp) / "m.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy().astype(np.float32)}
        onnx_r, torch_r = interleaved(
            lambda: session.run(None, feed), lambda: predictor.logits(images), batch, iters, rounds
        )

    where = f"{backbone}, batch {batch}, {size} px"
    return [
        [
            where,
            "training step: lookcloser / bare timm",
            f"{train_l:.1f} / {train_b:.1f}",
            f"**{train_l / train_b:.3f}**",
        ],
        [
            where,
            "inference: Predictor / bare timm forward",
            f"{infer_p:.1f} / {infer_b:.1f}",
            f"**{infer_p / infer_b:.3f}**",
        ],
        [
            where,
            "inference: ONNX Runtime / Predictor (PyTorch)",
            f"{onnx_r:.1f} / {torch_r:.1f}",
            f"**{onnx_r / torch_r:.3f}**",
        ],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        rows += measure(args.backbone, args.batch, size, args.classes, args.iters, args.rounds)
    table = markdown_table(["setting", "ratio of", "images/s (this run)", "ratio"], rows)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    text = (
        "## Throughput: lookcloser vs bare timm, same run\n\n"
        f"Command: `{command.strip()}`. Machine: {machine()}. Medians of {args.rounds} interleaved "
        "rounds; the images/s columns are only for scale (this machine is noisy), the ratios are the result.\n\n"
        + table
    )
    print(text)
    if not args.no_write:
        write_section("throughput", text)


if __name__ == "__main__":
    main()
