"""The `lookcloser` command: parse, call the Python API, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from lookcloser import __version__
from lookcloser.errors import LookcloserError


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        if key == "most_confused":
            text = "; ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in value[:5])
            rows.append(("most confused", text or "none"))
        elif isinstance(value, float):
            rows.append((key, f"{value:.4f}"))
        else:
            rows.append((key, str(value)))
    return rows


# ---- commands ---------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from lookcloser.demo import run_demo

    run_demo(args.out, progress=not args.no_progress)
    return 0


def cmd_train(args) -> int:
    from lookcloser import api

    result = api.train(args.config, args.overrides, progress=not args.no_progress)
    if result is not None:  # rank 0 (DDP workers print nothing)
        _print_table(f"test metrics ({result.run_dir})", _metric_rows(result.metrics))
        if result.skipped:
            print(
                f"skipped {len(result.skipped)} bad image(s), listed in {result.run_dir}/skipped.txt",
                file=sys.stderr,
            )
        print(result.run_dir)
    return 0


def cmd_eval(args) -> int:
    from lookcloser import api

    metrics = api.evaluate(
        args.model_dir, args.overrides, progress=not args.no_progress and args.format == "table"
    )
    if args.format == "json":
        print(json.dumps(metrics, indent=2))
    else:
        _print_table(f"evaluation of {args.model_dir}", _metric_rows(metrics))
    return 0


def cmd_predict(args) -> int:
    from lookcloser import api

    predictor = api.load(args.model_dir, args.device)
    predictions = predictor.predict(args.paths, top_k=args.top_k, batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps([p.as_dict() for p in predictions], indent=2))
    elif args.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "rank", "class", "prob"])
        for p in predictions:
            for rank, (name, prob) in enumerate(zip(p.classes, p.probs, strict=True), start=1):
                writer.writerow([p.path, rank, name, f"{prob:.6f}"])
        print(buffer.getvalue(), end="")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"predictions ({args.model_dir})")
        table.add_column("image")
        table.add_column("top classes (probability)")
        for p in predictions:
            top = ", ".join(f"{c} ({q:.3f})" for c, q in zip(p.classes, p.probs, strict=True))
            table.add_row(p.path, top)
        Console().print(table)
    return 0


def cmd_explain(args) -> int:
    from lookcloser import api

    out = api.explain(args.model_dir, args.image, args.out, args.target, args.map)
    print(out)
    return 0


def cmd_export(args) -> int:
    from lookcloser import api

    out, diff = api.export(args.model_dir, args.format, args.out)
    print(f"wrote {out}; max |logit| difference ONNX Runtime vs PyTorch: {diff:.2e}")
    return 0


def cmd_data_synth(args) -> int:
    from lookcloser.data.synthetic import generate

    root = generate(
        args.out_dir, args.classes, args.per_class, args.test_per_class, args.size, args.seed
    )
    print(root)
    return 0


def cmd_data_check(args) -> int:
    from lookcloser.data.images import check_images, list_image_files
    from lookcloser.errors import DataError

    path = Path(args.path)
    if not path.exists():
        raise DataError(f"{path}: does not exist")
    report = check_images(list_image_files(path), max_pixels=args.max_pixels)
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.summary_lines():
            print(line)
    return 1 if report.bad else 0


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="lookcloser",
        description="Fine-grained visual categorization: train, evaluate, predict, explain, export.",
    )
    parser.add_argument("--version", action="version", version=f"lookcloser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command(
        "demo",
        "Train, evaluate, predict and explain on the synthetic set (offline, CPU, < 5 min).",
        cmd_demo,
    )
    p.add_argument(
        "--out", default="lookcloser-demo", help="output directory (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = command("train", "Train a model; prints the run directory.", cmd_train)
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.epochs=5"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = command(
        "eval", "Evaluate a model directory on its test split (or data.* overrides).", cmd_eval
    )
    p.add_argument("model_dir")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = command("predict", "Top-k classes for image files or folders.", cmd_predict)
    p.add_argument("model_dir")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")

    p = command("explain", "Write an attention heatmap over an image as a PNG.", cmd_explain)
    p.add_argument("model_dir")
    p.add_argument("image")
    p.add_argument("--out", help="PNG to write (default: <image name>.heatmap.png here)")
    p.add_argument("--target", help="class to explain (default: the predicted one)")
    p.add_argument("--map", help="which of the method's maps (default: its first, grad-cam)")

    p = command(
        "export", "Export the inference graph (ONNX) and check it against PyTorch.", cmd_export
    )
    p.add_argument("model_dir")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default: MODEL_DIR/model.onnx)")

    data = sub.add_parser("data", help="Dataset tools: synth, check.", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    def data_command(name: str, help: str, fn) -> argparse.ArgumentParser:
        p = data_sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = data_command(
        "synth", "Write the synthetic fine-grained set as an ImageFolder tree.", cmd_data_synth
    )
    p.add_argument("out_dir")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)

    p = data_command(
        "check", "Report unreadable, corrupt, duplicate and odd-mode images.", cmd_data_check
    )
    p.add_argument("path", help="an image file or a folder (searched recursively)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--max-pixels", type=int, default=89_478_485)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lookcloser` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except LookcloserError as err:
        print(f"lookcloser: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookcloser: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for users; LOOKCLOSER_DEBUG=1 shows the traceback
        if os.environ.get("LOOKCLOSER_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"lookcloser: error: {type(err).__name__}: {message} (LOOKCLOSER_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
