"""`lookcloser data ood-report RUN_DIR`: what each semi-supervised stage kept and why.

For every recorded stage (records.py) it gives the counts (kept, and each reason for
dropping), the filter's precision and recall where the unlabelled folder records the ground
truth, and one picture, `RUN_DIR/semi/report-<stage>.png`:

* filter stages: the histogram of the deciding score (in-class vs out-of-class images where
  the truth is known, else kept vs dropped) with the val-chosen threshold, then per predicted
  class a row of kept and a row of dropped thumbnails;
* cluster stages: the histogram of distances to the cluster centre, then per cluster (the
  largest first) its kept or dropped thumbnails, with the cluster's size and compactness;
* online training: the images kept per epoch and the threshold after each validation.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.explain.overlay import literal_text
from lookcloser.fileio import atomic_path, safe_name
from lookcloser.semi.records import read_rows, read_stages, semi_dir

KEPT_COLOUR, DROPPED_COLOUR = "#2e7d32", "#c62828"
THUMB = 64


def ood_report(run_dir: str | Path, per_row: int = 6, groups: int = 8) -> list[dict[str, Any]]:
    """Write a picture per stage; return each stage's summary (with its picture's path)."""
    run_dir = Path(run_dir)
    summaries = []
    for record in read_stages(run_dir):
        rows = read_rows(run_dir, record)
        picture = semi_dir(run_dir) / f"report-{safe_name(record['name'])}.png"
        if record["kind"] == "online":
            _online_figure(record, picture)
        else:
            _stage_figure(record, rows, picture, per_row, groups)
        summaries.append(_summary(record, picture))
    return summaries


def summary_lines(summaries: list[dict[str, Any]]) -> list[str]:
    """The summaries as text lines, one block per stage."""
    lines = []
    for s in summaries:
        lines.append(f"{s['stage']} ({s['kind']}): kept {s['kept']} of {s['total']}")
        lines += [f"  {reason}: {count}" for reason, count in s["reasons"].items()]
        for name, q in s.get("quality", {}).items():
            lines.append(
                f"  {name}: precision {q['precision']:.3f}, recall {q['recall']:.3f} "
                f"({q['kept_in_class']} in-class of {q['kept']} kept; {q['in_class']} in-class in all)"
            )
        if s.get("note"):
            lines.append(f"  {s['note']}")
        lines.append(f"  picture: {s['picture']}")
    return lines


def _summary(record: dict[str, Any], picture: Path) -> dict[str, Any]:
    out = {
        "stage": record["name"],
        "kind": record["kind"],
        "total": record["total"],
        "kept": record["kept"],
        "reasons": record.get("reasons", {}),
        "picture": str(picture),
    }
    if "quality" in record:
        out["quality"] = record["quality"]
    if record["kind"] == "filter":
        score = record["ood_score"]
        threshold = record["thresholds"].get(score) if score != "none" else None
        out["note"] = (
            f"kept: confidence >= {record['confidence_threshold']}"
            + (f" and {score} >= {threshold:.4f}" if threshold is not None else "")
            + f" (threshold keeps {record['val_keep']:.0%} of {record['val_images']} val images)"
        )
        if record.get("pseudo_label_accuracy") is not None:
            out["note"] += (
                f"; pseudo-label accuracy on kept in-class: {record['pseudo_label_accuracy']:.3f}"
            )
    elif record["kind"] == "cluster":
        out["note"] = (
            f"k = {record['k']} ({record['k_chosen_by']}); {record['clusters_kept']} clusters kept "
            f"(>= {record['min_cluster_size']} images, the most compact {record['cluster_keep']:.0%})"
        )
        if record.get("kept_in_class_share") is not None:
            out["note"] += f"; in-class share of kept images: {record['kept_in_class_share']:.3f}"
    elif record["kind"] == "online":
        out["note"] = f"final threshold ({record['ood_score']}): {record.get('threshold')}"
    return out


# ---- pictures -------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _thumbnail(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB, THUMB))
            canvas = Image.new("RGB", (THUMB, THUMB), "white")
            canvas.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
            return np.asarray(canvas)
    except OSError:  # moved or unreadable since training: a grey square
        return np.full((THUMB, THUMB, 3), 200, dtype=np.uint8)


@literal_text
def _stage_figure(
    record: dict[str, Any], rows: list[dict[str, str]], out: Path, per_row: int, groups: int
) -> None:
    if record["kind"] == "filter":
        score = record["ood_score"] if record["ood_score"] != "none" else "confidence"
        threshold = (
            record["thresholds"][score] if score != "confidence" else record["confidence_threshold"]
        )
        values = np.array([float(r[score]) for r in rows])
        group_of = [r["predicted"] for r in rows]
        title = f"{record['name']}: {score} score (higher = more like the labelled classes)"
        order = sorted(set(group_of))
        labels = {g: f"predicted {g}" for g in order}
    else:
        score, threshold = "distance to cluster centre", None
        values = np.array([float(r["distance"]) for r in rows])
        group_of = [r["cluster"] for r in rows]
        info = {str(c["id"]): c for c in record["clusters"]}
        order = sorted(info, key=lambda c: -info[c]["size"])
        labels = {
            c: f"cluster {c}: {info[c]['size']} images, compactness {info[c]['compactness']:.3f}"
            + ("" if info[c]["kept"] else " (dropped)")
            for c in order
        }
        title = f"{record['name']}: k = {record['k']}, distance of each image to its centre"
    by_group: dict[str, dict[bool, list[dict]]] = defaultdict(lambda: {True: [], False: []})
    for row, group in zip(rows, group_of, strict=True):
        by_group[group][row["kept"] == "True"].append(row)
    # Thumbnail lines: per class a kept and a dropped line; per cluster one (all its images).
    lines: list[tuple[str, list[dict]]] = []
    for g in order[:groups]:
        if record["kind"] == "filter":
            lines += [
                (f"{labels[g]} - {'kept' if kept else 'dropped'}", by_group[g][kept])
                for kept in (True, False)
                if by_group[g][kept]
            ]
        else:
            lines.append((labels[g], by_group[g][True] + by_group[g][False]))

    fig = _figure(max(8.0, 1.1 * per_row), 2.8 + 1.15 * len(lines))
    grid = fig.add_gridspec(1 + len(lines), per_row, height_ratios=[2.6] + [1.0] * len(lines))
    _histogram(fig.add_subplot(grid[0, :]), rows, values, threshold, score, title)
    for i, (label, chosen) in enumerate(lines, start=1):
        for j in range(per_row):
            ax = fig.add_subplot(grid[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(label, fontsize=7, loc="left")
            if j >= len(chosen):
                ax.set_axis_off()
                continue
            row = chosen[j]
            ax.imshow(_thumbnail(row["path"]))
            colour = KEPT_COLOUR if row["kept"] == "True" else DROPPED_COLOUR
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
            if row.get("in_class"):
                truth = "in-class" if row["in_class"] == "True" else "out-of-class"
                ax.set_xlabel(truth, fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def _histogram(ax, rows, values, threshold, score: str, title: str) -> None:
    bins = np.histogram_bin_edges(values, bins=30) if len(values) else 10
    truth = [r.get("in_class", "") for r in rows]
    if truth and all(truth):
        split = np.array([t == "True" for t in truth])
        names = ("in-class (ground truth)", "out-of-class (ground truth)")
    else:
        split = np.array([r["kept"] == "True" for r in rows])
        names = ("kept", "dropped")
    ax.hist(values[split], bins=bins, alpha=0.6, color=KEPT_COLOUR, label=names[0])
    ax.hist(values[~split], bins=bins, alpha=0.6, color=DROPPED_COLOUR, label=names[1])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(score, fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.legend(fontsize=7)


@literal_text
def _online_figure(record: dict[str, Any], out: Path) -> None:
    epochs = record.get("epochs", [])
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = [e["epoch"] for e in epochs]
    for key, colour in (
        ("seen", "grey"),
        ("confident", "tab:blue"),
        ("passed_ood", "tab:orange"),
        ("kept", KEPT_COLOUR),
    ):
        ax.plot(x, [e[key] for e in epochs], marker="o", color=colour, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("unlabelled images")
    ax.set_title(
        f"{record['name']}: {record['strategy']}, kept per epoch ({record['ood_score']} threshold "
        "from the previous validation)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
