"""Dataset summaries for `lookcloser data info`: classes, split sizes, images per class."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from lookcloser.data.sources import DatasetSplits

_SHOWN_CLASSES = 5


def dataset_info(splits: DatasetSplits) -> dict[str, Any]:
    """Classes, split sizes, images per class (min, median, max) per split, and annotations."""
    per_split = {}
    parts = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    for split, samples in [(name, samples) for name, samples in parts if samples or name != "val"]:
        counts = Counter(s.label for s in samples)
        per_split[split] = count_summary(len(samples), counts, len(splits.classes))
    return {
        "name": splits.name,
        "num_classes": len(splits.classes),
        "classes": list(splits.classes),
        "splits": per_split,
        "annotations": list(splits.annotations),
    }


def count_summary(total: int, counts: Counter | dict[int, int], num_classes: int) -> dict:
    """Size of one split and its images per class (classes without images count as 0)."""
    per_class = [counts.get(i, 0) for i in range(num_classes)]
    if not per_class:
        return {"images": total, "per_class": {"min": 0, "median": 0, "max": 0}, "empty": 0}
    return {
        "images": total,
        "per_class": {
            "min": min(per_class),
            "median": statistics.median(per_class),
            "max": max(per_class),
        },
        "empty": sum(1 for c in per_class if c == 0),
    }


def format_info(info: dict[str, Any]) -> str:
    """`dataset_info` output as the lines `lookcloser data info` prints."""
    classes = info["classes"]
    shown = ", ".join(classes[:_SHOWN_CLASSES]) + (", ..." if len(classes) > _SHOWN_CLASSES else "")
    lines = [
        f"dataset: {info['name'] or '(unnamed)'}",
        f"classes: {info['num_classes']} ({shown})",
    ]
    for split, summary in info["splits"].items():
        pc = summary["per_class"]
        median = pc["median"]
        median_text = f"{median:g}" if isinstance(median, float) else str(median)
        line = (
            f"{split}: {summary['images']} images; per class min {pc['min']}, "
            f"median {median_text}, max {pc['max']}"
        )
        if summary["empty"]:
            line += f"; {summary['empty']} class(es) without images"
        lines.append(line)
    lines.append(f"annotations: {', '.join(info['annotations']) or 'labels only'}")
    return "\n".join(lines)
