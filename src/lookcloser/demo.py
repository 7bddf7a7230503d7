"""`lookcloser demo`: the whole flow on the built-in synthetic set, offline, in minutes on a CPU."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from lookcloser.config import Config


def demo_config(out: Path) -> Config:
    """The packaged demo recipe, writing under `out`."""
    recipe = resources.files("lookcloser") / "configs" / "demo.yaml"
    with resources.as_file(recipe) as path:
        cfg = Config.load(path)
    cfg.data.root = str(out / "data")
    cfg.out = str(out / "model")
    cfg.overwrite = True
    return cfg


def run_demo(out: str | Path = "lookcloser-demo", progress: bool = True) -> dict:
    """Generate data, fine-tune, evaluate, save, predict, explain; print a summary table."""
    from rich.console import Console
    from rich.table import Table

    from lookcloser import api
    from lookcloser.data.synthetic import generate
    from lookcloser.explain.overlay import save_explanation

    console = Console()
    out = Path(out)
    cfg = demo_config(out)
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
    table.add_column("image")
    table.add_column("true class")
    table.add_column("top-3 (probability)")
    for path, p in zip(examples, predictions, strict=True):
        top = ", ".join(f"{c} ({q:.2f})" for c, q in zip(p.classes, p.probs, strict=True))
        table.add_row(path.name, path.parent.name, top)
    console.print(table)

    console.print("[bold]4/5[/] explaining one prediction")
    heatmap = save_explanation(predictor.explain(examples[0]), out / "heatmap.png")

    total = time.perf_counter() - started
    m = result.metrics
    summary = Table(title="lookcloser demo: summary", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
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
        ("heatmap", str(heatmap)),
        ("try next", f"lookcloser predict {result.run_dir} {examples[0]}"),
    ]
    for row in rows:
        summary.add_row(*row)
    console.print("[bold]5/5[/] done")
    console.print(summary)
    return {"metrics": m, "seconds": total, "run_dir": result.run_dir, "heatmap": heatmap}
