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

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.explain.overlay import literal_text
from lookcloser.fileio import atomic_path, safe_name
from lookcloser.semi.records import iter_rows, read_stages, semi_dir

KEPT_COLOUR, DROPPED_COLOUR = "#2e7d32", "#c62828"
THUMB = 64


def ood_report(run_dir: str | Path, per_row: int = 6, groups: int = 8) -> list[dict[str, Any]]:
    """Write a picture per stage; return each stage's summary (with its picture's path)."""
    run_dir = Path(run_dir)
    summaries = []
    for record in read_stages(run_dir):
        picture = semi_dir(run_dir) / f"report-{safe_name(record['name'])}.png"
        if record["kind"] == "online":
            _online_figure(record, picture)
        else:
            stage = stage_rows(record, iter_rows(run_dir, record), per_row, groups)
            _stage_figure(stage, picture, per_row)
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


@dataclass
class StageRows:
    """What a stage's picture draws, read from its rows in one pass: every row's score, kept
    flag and (where every row records it) ground truth for the histogram, and the thumbnail
    lines, so memory follows the images drawn, not the rows (N rows as dicts: ~1 KB each)."""

    score: str
    threshold: float | None
    title: str
    values: np.ndarray
    kept: np.ndarray
    in_class: np.ndarray | None  # None unless every row records its truth
    lines: list[tuple[str, list[dict[str, str]]]]


def stage_rows(
    record: dict[str, Any], rows: Iterable[dict[str, str]], per_row: int, groups: int
) -> StageRows:
    """The histogram values and thumbnail lines of a filter or cluster stage: per predicted
    class (the first `groups` by name) a line of its first kept and one of its first dropped
    images; per cluster (the `groups` largest) one line, kept images first."""
    if record["kind"] == "filter":
        score = record["ood_score"] if record["ood_score"] != "none" else "confidence"
        threshold = (
            record["thresholds"][score] if score != "confidence" else record["confidence_threshold"]
        )
        column, group_column, order = score, "predicted", None
        title = f"{record['name']}: {score} score (higher = more like the labelled classes)"
    else:
        score, threshold = "distance to cluster centre", None
        info = {str(c["id"]): c for c in record["clusters"]}
        column, group_column = "distance", "cluster"
        order = sorted(info, key=lambda c: -info[c]["size"])[:groups]
        title = f"{record['name']}: k = {record['k']}, distance of each image to its centre"

    values, kept, in_class = array("d"), array("b"), array("b")
    truth = True
    # The first per_row kept and dropped rows of each group that can be drawn. Filter: the
    # `groups` smallest class names seen so far (one more is dropped as soon as it falls out,
    # so 10,000 classes hold `groups` at a time); clusters: the largest, known from the record.
    drawn: dict[str, dict[bool, list[dict[str, str]]]] = {
        g: {True: [], False: []} for g in order or ()
    }
    for row in rows:
        values.append(float(row[column]))
        is_kept = row["kept"] == "True"
        kept.append(is_kept)
        if truth and row.get("in_class", ""):
            in_class.append(row["in_class"] == "True")
        else:
            truth = False
        group = row[group_column]
        if order is None and group not in drawn:
            drawn[group] = {True: [], False: []}
            if len(drawn) > groups:
                del drawn[max(drawn)]
        chosen = drawn.get(group)
        if chosen is not None and len(chosen[is_kept]) < per_row:
            chosen[is_kept].append(row)

    lines: list[tuple[str, list[dict[str, str]]]] = []
    if order is None:  # filter: per class a kept and a dropped line
        for g in sorted(drawn):
            lines += [
                (f"predicted {g} - {'kept' if k else 'dropped'}", drawn[g][k])
                for k in (True, False)
                if drawn[g][k]
            ]
    else:  # clusters: one line each (all its images)
        for c in order:
            label = (
                f"cluster {c}: {info[c]['size']} images, compactness {info[c]['compactness']:.3f}"
                + ("" if info[c]["kept"] else " (dropped)")
            )
            lines.append((label, drawn[c][True] + drawn[c][False]))
    return StageRows(
        score,
        threshold,
        title,
        np.asarray(values, dtype=float),
        np.asarray(kept, dtype=bool),
        np.asarray(in_class, dtype=bool) if truth and len(kept) else None,
        lines,
    )


@literal_text
def _stage_figure(stage: StageRows, out: Path, per_row: int) -> None:
    lines = stage.lines
    fig = _figure(max(8.0, 1.1 * per_row), 2.8 + 1.15 * len(lines))
    grid = fig.add_gridspec(1 + len(lines), per_row, height_ratios=[2.6] + [1.0] * len(lines))
    _histogram(fig.add_subplot(grid[0, :]), stage)
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


def _histogram(ax, stage: StageRows) -> None:
    values, threshold = stage.values, stage.threshold
    bins = np.histogram_bin_edges(values, bins=30) if len(values) else 10
    if stage.in_class is not None:
        split = stage.in_class
        names = ("in-class (ground truth)", "out-of-class (ground truth)")
    else:
        split = stage.kept
        names = ("kept", "dropped")
    ax.hist(values[split], bins=bins, alpha=0.6, color=KEPT_COLOUR, label=names[0])
    ax.hist(values[~split], bins=bins, alpha=0.6, color=DROPPED_COLOUR, label=names[1])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_title(stage.title, fontsize=9)
    ax.set_xlabel(stage.score, fontsize=8)
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
