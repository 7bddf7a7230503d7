"""The `lookcloser` command: parse, call the Python API, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import textwrap
from pathlib import Path

from lookcloser import __version__
from lookcloser.errors import LookcloserError, unwrapped


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

    run_demo(args.out, progress=not args.no_progress, overrides=args.overrides)
    return 0


def cmd_train(args) -> int:
    from lookcloser.checks import check_settings
    from lookcloser.config import as_config

    # Keys, types, ranges and method options first: a typo is reported before torch loads.
    check_settings(as_config(args.config, args.overrides))
    from lookcloser import api

    result = api.train(args.config, args.overrides, progress=not args.no_progress)
    if result is not None:  # rank 0 (DDP workers print nothing)
        for split, metrics in result.metrics.items():
            _print_table(f"{split} metrics ({result.run_dir})", _metric_rows(metrics))
        if result.skipped:
            print(
                f"skipped {len(result.skipped)} bad image(s), listed in {result.run_dir}/skipped.txt",
                file=sys.stderr,
            )
        print(result.run_dir)
    return 0


def cmd_config(args) -> int:
    from lookcloser.api import as_config
    from lookcloser.config_help import describe
    from lookcloser.methods.base import method_class

    overrides = [*([f"method.name={args.method}"] if args.method else []), *args.overrides]
    cfg = as_config(args.config, overrides).validate()
    options = method_class(cfg.method.get("name", "baseline"), cfg.method.get("module")).Options
    print(describe(cfg, options), end="")
    return 0


def cmd_eval(args) -> int:
    from lookcloser import api

    metrics = api.evaluate(
        args.model_dir,
        args.overrides,
        progress=not args.no_progress and args.format == "table",
        tta=args.tta,
    )
    if args.format == "json":
        print(json.dumps(metrics, indent=2))
    else:
        _print_table(f"evaluation of {args.model_dir}", _metric_rows(metrics))
    return 0


def cmd_predict(args) -> int:
    from lookcloser import api

    predictor = api.load(args.model_dir, args.device, args.tta)
    meta = None
    if args.meta:
        from lookcloser.data.meta import read_meta_file

        meta = read_meta_file(args.meta)
        if not predictor.meta_keys:
            print(f"note: {args.model_dir} takes no metadata; --meta is ignored", file=sys.stderr)
    boxes = {}
    if args.boxes:
        from lookcloser.data.boxes import read_box_file

        boxes = {"boxes": read_box_file(args.boxes)}
        if not getattr(predictor, "crop_fusion", False):
            print(f"note: {args.model_dir} has no crop fusion; --boxes is ignored", file=sys.stderr)
            boxes = {}
    lookalikes = annotator = None
    if args.neighbours or args.reject_unknown or args.gallery:  # checked before predicting
        from lookcloser.lookalikes.answers import Annotator, open_lookalikes

        lookalikes = open_lookalikes(predictor, args.model_dir, args.gallery)
        annotator = Annotator(
            predictor, lookalikes, args.neighbours, args.reject_unknown, args.batch_size, meta
        )
    # Rows are written and flushed batch by batch as they are predicted (memory flat in the
    # number of images); under --on-bad-image error the rows before the first batch holding a
    # bad image stay written (a JSON array is closed) and the command fails naming them all.
    stream = predictor.predict_stream(
        args.paths,
        top_k=args.top_k,
        batch_size=args.batch_size,
        on_bad_image=args.on_bad_image,
        meta=meta,
        **boxes,
    )
    if stream.without_box:
        print(
            f"note: {len(stream.without_box)} image(s) have no box in {args.boxes}; their crop "
            f"is the whole image (e.g. {stream.without_box[0]})",
            file=sys.stderr,
        )

    def answer(p, extra) -> str:  # the top class, or "unknown" under --reject-unknown
        return "unknown" if args.reject_unknown and extra.get("unknown") else p.classes[0]

    def alike(extra) -> str:
        return "; ".join(
            f"{g['class']}: "
            + ", ".join(f"{n['path']} ({n['similarity']:.3f})" for n in g["neighbours"])
            for g in extra.get("neighbours", [])
        )

    def as_json(p, extra) -> dict:
        row = p.as_dict()
        row.update(extra)
        if args.reject_unknown:
            row["answer"] = answer(p, extra)
        return row

    def csv_text(rows) -> str:  # csv's own line ends, untranslated, as before
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        return buffer.getvalue()

    more = ["answer", "unknown", "neighbours"] if lookalikes is not None else []
    written = 0  # predictions written

    def row_text(p, extra) -> str:
        nonlocal written
        written += 1
        if args.format == "csv":
            tail = [answer(p, extra), extra.get("unknown", ""), alike(extra)] if more else []
            ranked = enumerate(zip(p.classes, p.probs, strict=True), start=1)
            return csv_text(
                [[p.path, rank, name, f"{prob:.6f}", *tail] for rank, (name, prob) in ranked]
            )
        if args.format == "jsonl":
            return json.dumps(as_json(p, extra)) + "\n"
        # json: the same text as json.dumps(rows, indent=2), one element at a time
        element = textwrap.indent(json.dumps(as_json(p, extra), indent=2), "  ")
        return ("\n" if written == 1 else ",\n") + element

    opening = {"csv": csv_text([["path", "rank", "class", "prob", *more]]), "json": "["}
    started = False

    def write(text: str) -> None:  # the header (or bracket) goes out with the first rows
        nonlocal started
        if not started:
            sys.stdout.write(opening.get(args.format, ""))
            started = True
        sys.stdout.write(text)

    reported = 0  # skipped files named on stderr so far

    def report_skipped() -> None:
        nonlocal reported
        if args.on_bad_image == "skip":  # under "error" the error names them
            for path, reason in stream.skipped[reported:]:
                print(f"skipped: {path}: {reason}", file=sys.stderr)
            reported = len(stream.skipped)

    table_rows = []  # the table is shown whole at the end
    try:
        try:
            for batch in stream:
                extras = annotator(batch) if annotator is not None else [{}] * len(batch)
                if args.format == "table":
                    table_rows += zip(batch, extras, strict=True)
                else:
                    write("".join(row_text(p, e) for p, e in zip(batch, extras, strict=True)))
                    sys.stdout.flush()
                report_skipped()
            write("")  # an empty run still gets its header
        finally:
            if started and args.format == "json":
                sys.stdout.write("\n]\n" if written else "]\n")
                sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped (`| head`): stop predicting, quietly
        # Python's recipe: stdout to devnull, so the flush at exit raises nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command stopped by SIGPIPE
    report_skipped()
    if args.format == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"predictions ({args.model_dir})")
        table.add_column("image")
        table.add_column("top classes (probability)")
        if lookalikes is not None:
            table.add_column("answer")
            table.add_column("look-alikes (similarity)")
        for p, extra in table_rows:
            top = ", ".join(f"{c} ({q:.3f})" for c, q in zip(p.classes, p.probs, strict=True))
            more_cells = [answer(p, extra), alike(extra)] if lookalikes is not None else []
            table.add_row(p.path, top, *more_cells)
        Console().print(table)
    return 0


def cmd_explain(args) -> int:
    from lookcloser import api

    out = api.explain(
        args.model_dir, args.image, args.out, args.target, args.map, args.meta, args.part
    )
    for path in out if isinstance(out, list) else [out]:  # an ensemble: one per member
        print(path)
    from lookcloser.lookalikes.gallery import find_gallery

    has_gallery = args.gallery or (args.neighbours and find_gallery(args.model_dir))
    if not isinstance(out, list) and has_gallery:
        from lookcloser.lookalikes.answers import explain_lookalikes

        meta = None
        if args.meta:
            from lookcloser.data.meta import read_meta_file, same_path

            meta = read_meta_file(args.meta).get(same_path(args.image), {})
        shown = explain_lookalikes(
            api.load(args.model_dir),
            args.model_dir,
            args.image,
            out,
            args.neighbours,
            args.gallery,
            args.gallery_root,
            meta,
        )
        if shown is not None:  # a model directory with a gallery
            figure, found = shown
            print(figure)
            for group in found["neighbours"]:
                for n in group["neighbours"]:
                    print(f"  {group['class']}: {n['path']} (similarity {n['similarity']:.3f})")
            if found.get("unknown"):
                print(
                    f"  unknown: {found['score']} {found['value']:.3f} below the calibrated "
                    f"{found['threshold']:.3f}"
                )
    return 0


def cmd_embed(args) -> int:
    from lookcloser import api

    written = api.embed(
        args.model_dir,
        args.paths,
        args.out,
        batch_size=args.batch_size,
        on_bad_image=args.on_bad_image,
        meta=args.meta,
        device=args.device,
    )
    for path, reason in written.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    print(
        f"wrote {written.rows} embeddings ({written.dim} wide) to "
        + " and ".join(str(f) for f in written.files)
    )
    return 0


def cmd_gallery_build(args) -> int:
    from lookcloser import api

    built = api.build_gallery(
        args.model_dir,
        args.data,
        args.out,
        batch_size=args.batch_size,
        on_bad_image=args.on_bad_image,
        keep=args.keep,
    )
    for path, reason in built.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    if built.classes_without_references:
        shown = ", ".join(built.classes_without_references[:5])
        print(
            f"note: {len(built.classes_without_references)} class(es) of the model have no "
            f"reference in {args.data} (e.g. {shown})",
            file=sys.stderr,
        )
    calibration = built.open_set
    rows = [
        ("references", str(built.references)),
        ("size", f"{built.bytes / 2**20:.2f} MiB"),
        ("time", f"{built.seconds:.1f} s"),
        (
            "open set",
            f"{calibration['score']} < {calibration['thresholds'][calibration['score']]:.4f} "
            f"is unknown (keeps {100 * calibration['keep']:.0f} % of {calibration['val_images']} "
            "validation images)"
            if calibration
            else "not calibrated (no validation split)",
        ),
    ]
    _print_table(f"gallery ({built.folder})", rows)
    print(built.folder)
    return 0


def cmd_enroll(args) -> int:
    from lookcloser import api
    from lookcloser.errors import ConfigError

    classes: dict[str, list[str]] = {}
    for item in args.classes or []:
        if len(item) < 2:
            raise ConfigError(f"--class {item[0]}: expected a name and at least one image")
        if item[0] in classes:
            raise ConfigError(f"--class {item[0]!r}: given twice")
        classes[item[0]] = item[1:]
    result = api.enroll(
        args.model_dir,
        classes,
        args.out,
        folder=args.folder,
        batch_size=args.batch_size,
        on_bad_image=args.on_bad_image,
        gallery=not args.no_gallery,
    )
    for path, reason in result.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    if result.gallery_note:
        print(f"note: {args.model_dir}/gallery: {result.gallery_note}", file=sys.stderr)
    rows = [(name, f"{n} image(s)") for name, n in result.classes.items()]
    if result.gallery:
        rows.append(
            ("gallery", f"{result.gallery.references} references ({result.gallery.folder})")
        )
    _print_table(f"enrolled into {result.model_dir}", rows)
    print(result.model_dir)
    return 0


def cmd_tta_default(args) -> int:
    from lookcloser import api

    spec = api.set_tta_default(args.model_dir, args.spec)
    print(f"{args.model_dir}: default test-time augmentation: {spec}")
    return 0


def cmd_ensemble_fit(args) -> int:
    from lookcloser import api

    # key=value items among the directories are data.* overrides.
    dirs = [a for a in args.model_dirs if "=" not in a]
    overrides = [a for a in args.model_dirs if "=" in a] + list(args.overrides)
    result = api.fit_ensemble(
        dirs,
        args.out,
        overrides,
        seed=args.seed,
        maxiter=args.maxiter,
        tta=args.tta,
        weights=args.weights,
        progress=not args.no_progress,
    )
    v = result.validation
    rows = [(f"member {i} val top-1", f"{m['top1']:.4f}") for i, m in enumerate(v["members"])]
    rows += [
        ("equal weights val top-1", f"{v['equal']['top1']:.4f}"),
        ("fitted weights val top-1", f"{v['fitted']['top1']:.4f}"),
        (f"weights used ({args.weights})", ", ".join(f"{w:.3f}" for w in result.weights)),
        ("validation images", str(v["images"])),
    ]
    _print_table(f"ensemble ({result.path})", rows)
    print(result.path)
    return 0


def cmd_export(args) -> int:
    from lookcloser import api

    if args.quantize is None and args.embedding:
        from lookcloser.lookalikes.embed import export_embedding_onnx

        out, diff, emb_diff = export_embedding_onnx(args.model_dir, args.out)
        print(
            f"wrote {out} (outputs logits, embedding); max |difference| ONNX Runtime vs "
            f"PyTorch: logits {diff:.2e}, embedding {emb_diff:.2e}"
        )
        return 0
    if args.quantize is None:
        out, diff = api.export(args.model_dir, args.format, args.out)
        print(f"wrote {out}; max |logit| difference ONNX Runtime vs PyTorch: {diff:.2e}")
        return 0
    result = api.export_int8(
        args.model_dir,
        args.out,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        check_images=args.check_images,
        quant_format=args.quant_format,
        per_channel=not args.per_tensor,
        exclude_ends=not args.quantize_ends,
    )
    print(
        f"wrote {result.path} ({result.bytes_int8 / 2**20:.1f} MiB, fp32 "
        f"{result.bytes_fp32 / 2**20:.1f} MiB) and {result.sidecar}; calibrated on "
        f"{result.calibrated} images"
    )
    if result.checked:
        print(
            f"top-1 agreement with fp32: {100 * result.agreement:.1f} % of {result.checked} "
            f"{result.check_source}; max |logit| difference {result.max_abs_logit_difference:.3f}"
        )
    return 0


def cmd_compare(args) -> int:
    from lookcloser import api
    from lookcloser.compare import leaderboard_rows
    from lookcloser.errors import ConfigError

    run_dirs = [item for item in args.items if "=" not in item or Path(item).is_dir()]
    overrides = [item for item in args.items if item not in run_dirs]
    # key=value right after --methods or --seeds belongs to the overrides.
    methods = [m for m in args.methods or [] if "=" not in m]
    seeds = [s for s in args.seeds if "=" not in s]
    overrides += [x for x in [*(args.methods or []), *args.seeds] if "=" in x]
    if not all(s.lstrip("-").isdigit() for s in seeds):
        raise ConfigError(f"--seeds: expected integers, got {' '.join(seeds)}")
    report = api.compare(
        run_dirs,
        args.out,
        methods=methods,
        seeds=[int(s) for s in seeds],
        data=args.data,
        config=args.config,
        overrides=[*overrides, *getattr(args, "overrides", [])],
        runs_dir=args.runs,
        images=args.images,
        classes_shown=args.classes,
        cost_batch=args.cost_batch,
        progress=not args.no_progress,
        device=args.device,
    )
    header, rows = leaderboard_rows(report.groups)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"leaderboard ({len(report.classes)} classes)")
    for name in header[:6]:
        table.add_column(name)
    for row in rows:
        table.add_row(*row[:6])
    Console(stderr=True).print(table)
    print(report.html)
    return 0


def cmd_serve(args) -> int:
    from lookcloser import api
    from lookcloser.serve.app import ServeSettings

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        token=args.token if args.token is not None else os.environ.get("LOOKCLOSER_TOKEN"),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        timeout_s=args.timeout,
        body_timeout_s=args.body_timeout,
        unsure_below=args.unsure_below,
        allowed_hosts=tuple(args.allowed_host),
        neighbours=args.neighbours,
        gallery_root=args.gallery_root,
    )
    api.serve(args.model_dir, settings, args.backend, args.onnx, args.device)
    return 0


def cmd_data_synth(args) -> int:
    from lookcloser.data.synthetic import generate

    root = generate(
        args.out_dir, args.classes, args.per_class, args.test_per_class, args.size, args.seed
    )
    if args.unlabelled:
        from lookcloser.data.synthetic import UNLABELLED_DIR, generate_unlabelled

        folder = generate_unlabelled(
            root / UNLABELLED_DIR,
            args.classes,
            args.unlabelled,
            args.in_class,
            args.size,
            args.seed,
        )
        print(f"unlabelled: {folder} (ground truth in {folder}/unlabelled.json)", file=sys.stderr)
    print(root)
    return 0


def cmd_data_ood_report(args) -> int:
    from lookcloser import api
    from lookcloser.semi.report import summary_lines

    summaries = api.ood_report(args.run_dir, per_row=args.per_row, groups=args.groups)
    if args.format == "json":
        print(json.dumps(summaries, indent=2))
    else:
        print("\n".join(summary_lines(summaries)))
    return 0


def cmd_data_check(args) -> int:
    from lookcloser.data.images import check_dataset

    report = check_dataset(args.path, max_pixels=args.max_pixels)
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.summary_lines():
            print(line)
    return 1 if report.bad or report.overlaps else 0


def cmd_data_download(args) -> int:
    from lookcloser.data.download import ProgressLines, download_dataset

    root = download_dataset(
        args.name,
        args.dir,
        mirror=args.mirror,
        progress=None if args.no_progress else ProgressLines(),
        deadline_s=args.deadline,
        read_timeout_s=args.read_timeout,
    )
    print(root)
    return 0


def _source_name(name: str) -> str:
    from lookcloser.data.download import DOWNLOADS

    return DOWNLOADS[name].source_name if name in DOWNLOADS else name


def cmd_data_info(args) -> int:
    from lookcloser.data.info import dataset_info, format_info

    if args.name == "shards":
        from lookcloser.data.shards import open_shards, shard_info

        info = shard_info(open_shards(args.dir))
    else:
        from lookcloser.api import as_config
        from lookcloser.data.sources import build_source

        cfg = as_config(
            None,
            [*args.overrides, f"data.source={_source_name(args.name)}", f"data.root={args.dir}"],
        )
        info = dataset_info(build_source(cfg.data))
    print(json.dumps(info, indent=2) if args.format == "json" else format_info(info))
    return 0


def cmd_data_pack(args) -> int:
    from lookcloser.api import as_config
    from lookcloser.data.prepare import with_validation
    from lookcloser.data.shards import pack_shards
    from lookcloser.data.sources import build_source

    cfg = as_config(None, [*args.overrides, f"data.source={_source_name(args.source)}"])
    # The val split training would use (the source's, or carved per data.val_fraction).
    splits, _ = with_validation(build_source(cfg.data), cfg.data)

    def progress(split: str, done: int, total: int) -> None:
        print(f"{split}: {done}/{total} samples packed", file=sys.stderr, flush=True)

    written = pack_shards(
        splits,
        args.out,
        args.shard_size,
        reencode=args.reencode or args.max_side is not None,
        seed=cfg.seed,
        max_side=args.max_side,
        max_pixels=cfg.data.max_image_pixels,
        progress=progress,
        root=cfg.data.root or None,
    )
    print(f"wrote {len(written)} shard(s) and dataset.json to {args.out}")
    print(args.out)
    return 0


# ---- parser -----------------------------------------------------------------------------------
META_HELP = (
    "per-image metadata for models trained with data.meta_keys: a CSV with a `path` column "
    "and one column per key, or a JSON object path -> {key: value}; relative paths are from "
    "the file's folder; missing values are masked"
)


TTA_HELP = (
    "test-time augmentation, probabilities averaged over the views: comma-separated flip, "
    "five_crop, scales=S1+S2 (e.g. flip,five_crop,scales=224+288); none turns a stored "
    "default off (default: the model's, see tta-default)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error here."""

    def error(self, message: str):
        self.exit(2, f"lookcloser: error: {message} (see `{self.prog} --help`)\n")


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _trust_option(p: argparse.ArgumentParser) -> None:
    """--trust-module on a command that loads model directories (docs/usage.md, Security)."""
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="NAME",
        help="let model directories import module NAME (their config.method.module: a method "
        "defined outside lookcloser); a model directory never imports one otherwise. Repeatable",
    )


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(
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
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="demo recipe overrides, e.g. trainer.epochs=3",
    )

    p = command(
        "train",
        "Train a model; prints the run directory. `lookcloser config` lists every key.",
        cmd_train,
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.epochs=5"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = command(
        "config",
        "Print the resolved config: every key with its value, type, default and meaning, as "
        "YAML that --config reads back.",
        cmd_config,
    )
    p.add_argument("--config", help="YAML config file to start from")
    p.add_argument("--method", help="show this method's options (same as method.name=NAME)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    p = command(
        "eval",
        "Evaluate a model or ensemble directory on its test split (or data.* overrides).",
        cmd_eval,
    )
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--tta", metavar="SPEC", help=TTA_HELP)

    p = command("predict", "Top-k classes for image files or folders.", cmd_predict)
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per image")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--format",
        choices=["table", "json", "jsonl", "csv"],
        default="table",
        help="csv, jsonl (one JSON object a line) and json are written batch by batch as "
        "images are predicted; table is shown at the end (default: %(default)s)",
    )
    p.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        default="error",
        help="error: stop predicting at the first unreadable file and fail naming every one "
        "(rows already written stay); skip: list them on stderr and predict the rest "
        "(default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--meta", metavar="FILE", help=META_HELP)
    p.add_argument(
        "--boxes",
        metavar="FILE",
        help="crop-fusion models: a JSON box file (image path -> [x, y, w, h] in pixels of the "
        "original image; relative paths from the file's folder) giving each image's object "
        "crop; without it the model's attention chooses the crops",
    )
    p.add_argument("--tta", metavar="SPEC", help=TTA_HELP)
    p.add_argument(
        "--neighbours",
        type=int,
        default=0,
        metavar="K",
        help="show the K nearest references of the predicted class and of the runner-up from "
        "the model's gallery (lookcloser gallery build); one more pass over the images",
    )
    p.add_argument(
        "--reject-unknown",
        action="store_true",
        help="answer `unknown` for images whose open-set score is below the threshold the "
        "gallery calibrated on the validation split (every answer carries `unknown` with a "
        "calibrated gallery)",
    )
    p.add_argument("--gallery", metavar="DIR", help="gallery folder (default: MODEL_DIR/gallery)")

    p = command("explain", "Write an attention heatmap over an image as a PNG.", cmd_explain)
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("image")
    p.add_argument(
        "--out",
        help="PNG to write (default: MODEL_DIR/explanations/<image name>.png, or "
        "<image name>-<8 hex digits>.png, a hash of the image's resolved path, when that file "
        "already explains another image of the same name, e.g. a/x.png and b/x.png)",
    )
    p.add_argument("--target", help="class to explain (default: the predicted one)")
    p.add_argument("--map", help="which of the method's maps (default: its first, grad-cam)")
    p.add_argument("--meta", metavar="FILE", help=META_HELP)
    p.add_argument(
        "--part",
        type=int,
        metavar="K",
        help="part map K and the image sampled by it (methods with part maps: tasn)",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=3,
        metavar="K",
        help="with a gallery (MODEL_DIR/gallery): also write <png>-lookalikes.png, the K "
        "nearest references of the predicted class and of the runner-up (0: off; default: 3)",
    )
    p.add_argument("--gallery", metavar="DIR", help="gallery folder (default: MODEL_DIR/gallery)")
    p.add_argument(
        "--gallery-root",
        metavar="DIR",
        help="read the references' images under DIR (default: the data root the gallery was "
        "built from)",
    )

    bad_image_help = (
        "error: stop, naming every unreadable file; skip: list them on stderr and go on with "
        "the rest (default: %(default)s)"
    )
    p = command(
        "embed",
        "Write the L2-normalised embedding of every image (the feature the class decision "
        "reads), with its path, predicted class and score.",
        cmd_embed,
    )
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.parquet (columns path, class, class_index, score, embedding), or FILE.npy "
        "(N x D float32) with FILE.csv beside it (row, path, class, score)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--on-bad-image", choices=["error", "skip"], default="error", help=bad_image_help
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--meta", metavar="FILE", help=META_HELP)

    gallery = sub.add_parser(
        "gallery", help="Reference galleries of labelled images.", description="Galleries."
    )
    gallery_sub = gallery.add_subparsers(dest="gallery_command", required=True, metavar="CMD")
    p = gallery_sub.add_parser(
        "build",
        help="Embed the labelled training images of DATA into a gallery of references and "
        "calibrate the open-set threshold on the validation split.",
        description="Embed DATA's training images (less the validation split, carved as the "
        "model's training carved it) into OUT (gallery.safetensors + gallery.json: paths "
        "relative to DATA, never the images), and calibrate the `unknown` threshold on the "
        "validation split. predict --neighbours, explain and serve then show look-alikes.",
    )
    p.set_defaults(fn=cmd_gallery_build)
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument(
        "data", help="an ImageFolder tree (train/<class>/..., optional val/) or a CSV file"
    )
    p.add_argument("--out", help="gallery folder (default: MODEL_DIR/gallery)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--on-bad-image", choices=["error", "skip"], default="error", help=bad_image_help
    )
    p.add_argument(
        "--keep",
        type=float,
        default=0.95,
        metavar="SHARE",
        help="share of the validation images the open-set threshold keeps as known "
        "(default: %(default)s)",
    )

    p = command(
        "enroll",
        "Add classes from a few images each (their mean embedding), without retraining; "
        "writes a new model directory.",
        cmd_enroll,
    )
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument(
        "--class",
        dest="classes",
        nargs="+",
        action="append",
        metavar="NAME IMAGE",
        help="a new class and its images or folders (repeatable)",
    )
    p.add_argument("--folder", metavar="DIR", help="new classes as DIR/<class>/ folders of images")
    p.add_argument("--out", required=True, help="the new model directory (new or empty)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument(
        "--on-bad-image", choices=["error", "skip"], default="error", help=bad_image_help
    )
    p.add_argument(
        "--no-gallery",
        action="store_true",
        help="do not carry MODEL_DIR/gallery over to OUT/gallery (by default it is, with the "
        "new classes' images added as references)",
    )

    p = command(
        "export", "Export the inference graph (ONNX) and check it against PyTorch.", cmd_export
    )
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument(
        "--out",
        help="output file (default: MODEL_DIR/model.onnx, or model.int8.onnx); for an ensemble "
        "a folder of one graph per member plus onnx.json (default: ENSEMBLE_DIR/onnx)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: ONNX Runtime static quantization, calibrated on training images and "
        "checked against fp32 (top-1 agreement, also in the .json written beside the file)",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="calibrate on the images under DIR (default: the model's training images)",
    )
    p.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=64,
        metavar="N",
        help="images to calibrate on (default: %(default)s)",
    )
    p.add_argument(
        "--check-images",
        type=int,
        default=256,
        metavar="N",
        help="other images to check int8 against fp32 on (default: %(default)s)",
    )
    p.add_argument(
        "--quant-format",
        choices=["qdq", "qoperator"],
        default="qdq",
        help="qdq: Quantize/DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels; "
        "qoperator: int8 operators such as QLinearConv (same predictions, speed within a few "
        "%% here: docs/benchmarks.md) (default: %(default)s)",
    )
    p.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor, not per channel"
    )
    p.add_argument(
        "--quantize-ends",
        action="store_true",
        help="quantize the first convolution and the classifier too (kept fp32 by default)",
    )
    p.add_argument(
        "--embedding",
        action="store_true",
        help="add the output `embedding` (N x D, L2-normalised: what lookcloser embed writes) "
        "beside `logits`; checked against PyTorch too",
    )

    p = command(
        "compare",
        "Compare trained runs (or train methods x seeds first): one HTML report with the "
        "leaderboard, cost, per-class differences and explained images, plus CSV and Markdown.",
        cmd_compare,
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="RUN_DIR | key=value",
        help="run directories to compare; key=value: config overrides for training --methods",
    )
    _trust_option(p)
    p.add_argument("--out", required=True, help="report folder (new, empty or an earlier report)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="train these methods first")
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds for --methods (default: 0)")
    p.add_argument(
        "--data",
        metavar="ROOT",
        help="data.root for --methods (an ImageFolder tree unless data.source= says otherwise)",
    )
    p.add_argument("--config", help="YAML recipe for --methods")
    p.add_argument("--runs", help="where --methods runs go (default: OUT/runs)")
    p.add_argument(
        "--images", type=int, default=6, help="test images explained by every method (default: 6)"
    )
    p.add_argument(
        "--classes",
        type=_positive_int,
        default=10,
        help="classes with the largest differences shown (default: 10)",
    )
    p.add_argument(
        "--cost-batch", type=_positive_int, default=8, help="batch size timed (default: 8)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress")
    p.set_defaults(overrides=[])  # key=value after the options land here

    p = command(
        "serve",
        "Serve a model over HTTP: POST /predict, POST /explain, GET /model, a web page at /.",
        cmd_serve,
    )
    p.add_argument("model_dir")
    _trust_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        help="require 'Authorization: Bearer TOKEN' (default: $LOOKCLOSER_TOKEN; none if unset)",
    )
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--onnx", metavar="FILE", help="ONNX graph (default: MODEL_DIR/model.onnx)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    p.add_argument(
        "--max-batch", type=_positive_int, default=8, help="images per forward; 1: no batching"
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill")
    p.add_argument(
        "--max-queue", type=_positive_int, default=64, help="requests in progress; more get 503"
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="body limit (413)")
    p.add_argument(
        "--max-pixels", type=_positive_int, help="decoded image limit (default: the model's)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument(
        "--body-timeout",
        type=float,
        default=10.0,
        help="seconds a request body may take to arrive (408; default: %(default)s)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="accept requests whose Host header is NAME (repeatable; *.domain patterns; '*' any); "
        "by default only 127.0.0.1, localhost, [::1] and --host (DNS-rebinding protection)",
    )
    p.add_argument(
        "--unsure-below",
        type=float,
        help="flag answers whose top probability is below this (default: from the model's "
        "validation metrics, else 0.5)",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=3,
        metavar="K",
        help="with a gallery (MODEL_DIR/gallery): the K nearest references of the predicted "
        "class and of the runner-up beside every answer (0: off; default: %(default)s)",
    )
    p.add_argument(
        "--gallery-root",
        metavar="DIR",
        help="read the references' thumbnails under DIR (default: the data root the gallery "
        "was built from)",
    )

    p = command(
        "tta-default",
        "Store a test-time augmentation spec as a model's (or ensemble's) default.",
        cmd_tta_default,
    )
    p.add_argument("model_dir")
    p.add_argument("spec", help="e.g. flip,five_crop,scales=224+288; none removes the default")

    ensemble = sub.add_parser(
        "ensemble", help="Ensembles of model directories.", description="Ensembles."
    )
    ensemble_sub = ensemble.add_subparsers(dest="ensemble_command", required=True, metavar="CMD")
    p = ensemble_sub.add_parser(
        "fit",
        help="Fit member weights on the validation split; write an ensemble directory.",
        description="Gather the members' validation-split probabilities (never the test "
        "split), search their weights with differential evolution (top-1, log-loss breaking "
        "ties) and write DIR: ensemble.json and a copy of each member. eval, predict, explain "
        "and export take DIR like a model directory.",
    )
    p.set_defaults(fn=cmd_ensemble_fit, overrides=[])
    p.add_argument(
        "model_dirs", nargs="+", metavar="MODEL_DIR", help="members (and data.* overrides)"
    )
    _trust_option(p)
    p.add_argument("--out", required=True, help="new or empty folder for the ensemble")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: %(default)s)")
    p.add_argument("--maxiter", type=_positive_int, default=200, help="search generations")
    p.add_argument("--tta", metavar="SPEC", help="fit on (and default to) these test-time views")
    p.add_argument(
        "--weights",
        choices=["fitted", "equal"],
        default="fitted",
        help="which weights predict (both are recorded); equal suits a small validation split "
        "(default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    data = sub.add_parser(
        "data",
        help="Dataset tools: download, info, pack, synth, check, ood-report.",
        description="Dataset tools.",
    )
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
    p.add_argument(
        "--unlabelled",
        type=int,
        default=0,
        metavar="N",
        help="also write N unlabelled images to OUT_DIR/unlabelled (ground truth in its "
        "unlabelled.json)",
    )
    p.add_argument(
        "--in-class",
        type=float,
        default=0.2,
        metavar="SHARE",
        help="share of the unlabelled images from the labelled classes; the rest are part "
        "combinations no labelled class has (default: %(default)s)",
    )

    p = data_command(
        "ood-report",
        "What each semi-supervised stage of a run kept and why: counts, precision and recall "
        "where the truth is known, and a picture per stage (score histogram, thumbnails).",
        cmd_data_ood_report,
    )
    p.add_argument("run_dir", help="a run trained with semi.strategy=...")
    p.add_argument("--per-row", type=int, default=6, help="thumbnails per row")
    p.add_argument("--groups", type=int, default=8, help="classes or clusters shown per stage")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = data_command(
        "check",
        "Report unreadable, corrupt, duplicate and odd-mode images, and images a dataset's "
        "own train / val / test split shares between splits (exit 1 for unreadable or shared).",
        cmd_data_check,
    )
    p.add_argument(
        "path",
        help="an image file, a folder (searched recursively), an imagefolder root with train/ "
        "and test/ or val/, or a CSV (or folder with train.csv) of data.source=csv",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--max-pixels", type=int, default=89_478_485)

    p = data_command(
        "download",
        "Download, verify and extract a benchmark dataset (or say what to fetch by hand).",
        cmd_data_download,
    )
    p.add_argument("name", help="dataset name, e.g. cub200, aircraft, inat2021_mini")
    p.add_argument("dir", help="folder to prepare the dataset in")
    p.add_argument("--mirror", help="base URL replacing the official scheme and host")
    p.add_argument(
        "--deadline",
        type=_positive_float,
        metavar="SECONDS",
        help="give up (keeping partial files, to resume) after this long in all "
        "(default: 5 min + the time at 256 KiB/s for the dataset's size)",
    )
    p.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="retry a connection that sends nothing for this long (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress lines")

    p = data_command(
        "info", "Classes, split sizes, images per class and annotations.", cmd_data_info
    )
    p.add_argument("name", help="a source or dataset name, or `shards`")
    p.add_argument("dir", help="the dataset folder (or shard folder, index or URL)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="e.g. data.level=family")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = data_command("pack", "Write a source as WebDataset tar shards.", cmd_data_pack)
    p.add_argument("source", help="a source or dataset name (data.source)")
    p.add_argument("out", help="empty folder for the shards and dataset.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--reencode", action="store_true", help="decode and save as JPEG")
    p.add_argument(
        "--max-side", type=int, help="re-encode with the longest side at most this (implies it)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=DIR"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lookcloser` console script."""
    parser = build_parser()
    # key=value overrides may also follow options (`data pack S OUT --shard-size 9 data.root=D`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        trusted = getattr(args, "trust_module", None)
        if not trusted:
            return args.fn(args)
        from lookcloser.modeldir import trusting_modules

        # The user's opt-in: model directories may import these modules (their method's).
        with trusting_modules(trusted):
            return args.fn(args)
    except LookcloserError as err:
        # unwrapped: a DataLoader worker's error reaches here as its whole traceback.
        print(f"lookcloser: error: {unwrapped(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookcloser: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for users; LOOKCLOSER_DEBUG=1 shows the traceback
        if isinstance(unwrapped(err), LookcloserError):
            print(f"lookcloser: error: {unwrapped(err)}", file=sys.stderr)
            return 2
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
