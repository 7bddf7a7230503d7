"""`lookcloser demo`: the whole flow on the built-in synthetic set, offline, in minutes on a CPU."""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lookcloser.config import Config

DEMO_MAP = "grad-cam"  # every method's attention maps include it


def demo_config(out: Path, overrides: list[str] | None = None) -> Config:
    """The packaged demo recipe plus `key=value` overrides, writing under `out`."""
    recipe = resources.files("lookcloser") / "configs" / "demo.yaml"
    with resources.as_file(recipe) as path:
        cfg = Config.load(path)
    cfg.data.root = str(out / "data")
    cfg.out = str(out / "model")
    cfg.overwrite = True
    return cfg.apply_overrides(overrides or [])


def prediction_rows(
    examples: Sequence[Path], predictions: Sequence, test_dir: Path
) -> list[tuple[str, str, str]]:
    """(image path relative to the test folder, true class, top-k with probabilities) per image."""
    rows = []
    for path, p in zip(examples, predictions, strict=True):
        path = Path(path)
        try:
            shown = path.relative_to(test_dir).as_posix()
        except ValueError:
            shown = str(path)
        top = ", ".join(f"{c} ({q:.2f})" for c, q in zip(p.classes, p.probs, strict=True))
        rows.append((shown, path.parent.name, top))
    return rows


def console_command() -> str:
    """How to run `lookcloser` from a fresh shell: the bare name when PATH finds this very
    script, else the console script's full path (a venv the user has not activated)."""
    script = Path(sys.executable).parent / "lookcloser"
    found = shutil.which("lookcloser")
    if found and (not script.is_file() or Path(found).resolve() == script.resolve()):
        return "lookcloser"
    return shlex.quote(str(script.absolute())) if script.is_file() else "lookcloser"


def try_next_command(run_dir: str | Path, image: str | Path, command: str = "lookcloser") -> str:
    """A shell command predicting one image with the saved model (paths quoted as needed)."""
    return f"{command} predict {shlex.quote(str(run_dir))} {shlex.quote(str(image))}"


def summary_table(rows: Sequence[tuple[str, str]]):
    """The demo's summary: long values (paths, the command) fold onto more lines, never cut."""
    from rich.table import Table
    from rich.text import Text

    summary = Table(title="lookcloser demo: summary", show_header=False)
    summary.add_column(style="bold", overflow="fold")
    summary.add_column(overflow="fold")
    for name, value in rows:
        summary.add_row(Text(name), Text(value))  # Text: no markup read into paths or names
    return summary


def run_demo(
    out: str | Path = "lookcloser-demo", progress: bool = True, overrides: list[str] | None = None
) -> dict:
    """Generate data, fine-tune, evaluate, save, predict, explain; print a summary table."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lookcloser import api
    from lookcloser.data.synthetic import generate
    from lookcloser.explain.overlay import save_explanation

    console = Console()
    out = Path(out)
    cfg = demo_config(out, overrides)
    started = time.perf_counter()
    s = cfg.data.synthetic
    console.print(
        f"[bold]1/5[/] synthetic fine-grained set: {s.classes} classes, {s.per_class}+{s.test_per_class} images each, {s.size}px"
    )
    generate(cfg.data.root, s.classes, s.per_class, s.test_per_class, s.size, s.seed)
    data_seconds = time.perf_counter() - started

    console.print(
        f"[bold]2/5[/] fine-tuning {cfg.model.backbone} (ImageNet weights) for {cfg.trainer.epochs} epochs"
    )
    t = time.perf_counter()
    result = api.train(cfg, progress=progress)
    train_seconds = time.perf_counter() - t

    console.print("[bold]3/5[/] reloading the model directory and predicting test images")
    predictor = api.load(result.run_dir)
    test_dir = Path(cfg.data.root) / "test"
    examples = [next(iter(sorted(d.iterdir()))) for d in sorted(test_dir.iterdir())[:4]]
    predictions = predictor.predict(examples, top_k=3)
    table = Table(title="predictions")
    table.add_column("image (under test/)", overflow="fold")
    table.add_column("true class", overflow="fold")
    table.add_column("top-3 (probability)", overflow="fold")
    for row in prediction_rows(examples, predictions, test_dir):
        table.add_row(*(Text(value) for value in row))
    console.print(table)

    console.print("[bold]4/5[/] explaining one prediction")
    explanation = predictor.explain(examples[0], map_name=DEMO_MAP)
    heatmap = save_explanation(explanation, out / "heatmap.png", map_name=DEMO_MAP)

    total = time.perf_counter() - started
    m = result.metrics["test"]
    rows = [
        (
            "test top-1",
            f"{m['top1']:.3f} on {m['images']} images ({m['classes']} classes; chance {1 / m['classes']:.3f})",
        ),
        ("mean per-class accuracy", f"{m['mean_per_class_accuracy']:.3f}"),
        ("ECE", f"{m['ece']:.3f}"),
        (
            "time",
            f"{total:.0f} s in all (data {data_seconds:.0f} s, training + evaluation {train_seconds:.0f} s)",
        ),
        ("dataset", str(cfg.data.root)),
        ("model directory", str(result.run_dir)),
        ("confusion matrix", str(result.run_dir / "confusion.png")),
        (
            "heatmap",
            f"{heatmap} ({DEMO_MAP} for {explanation.class_name}, p = {explanation.prob:.3f})",
        ),
        ("try next", try_next_command(result.run_dir, examples[0], console_command())),
    ]
    console.print("[bold]5/5[/] done")
    console.print(summary_table(rows))
    # The command once more, unframed and never broken by rich, so that it copy-pastes whole.
    console.print("try next (copy-paste):", style="bold")
    console.print(rows[-1][1], soft_wrap=True, highlight=False, markup=False)
    return {"metrics": m, "seconds": total, "run_dir": result.run_dir, "heatmap": heatmap}
