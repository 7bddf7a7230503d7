"""What each semi-supervised stage kept and why, on disk under RUN_DIR/semi/.

`stages.json` lists the stages in order; each names a CSV with one row per unlabelled image
(path, the stage's score, kept or not, the reason, and the ground truth where the unlabelled
folder records it, as the synthetic generator's `unlabelled.json` does). `lookcloser data
ood-report RUN_DIR` reads them back.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lookcloser.data.meta import same_path
from lookcloser.errors import DataError
from lookcloser.fileio import atomic_open, atomic_write_text

SEMI_DIR = "semi"
STAGES_FILE = "stages.json"


def semi_dir(run_dir: str | Path) -> Path:
    """RUN_DIR/semi, where the stage records and (cluster_pretrain) the stage runs live."""
    return Path(run_dir) / SEMI_DIR


def write_stage(
    run_dir: str | Path, record: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> None:
    """Write a stage's rows as `<name>.csv` and put its record into stages.json (replacing a
    record of the same name). The rows are written as they are iterated (scoring.FilterRows
    makes each one then)."""
    folder = semi_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = record["name"]
    record = {**record, "csv": f"{name}.csv" if rows else None}
    if rows:
        with atomic_open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    stages = [s for s in read_stages(run_dir, missing_ok=True) if s["name"] != name]
    atomic_write_text(folder / STAGES_FILE, json.dumps([*stages, record], indent=2) + "\n")


def read_stages(run_dir: str | Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The stage records of a run, in order."""
    path = semi_dir(run_dir) / STAGES_FILE
    if not path.is_file():
        if missing_ok:
            return []
        raise DataError(
            f"{run_dir}: no semi-supervised records ({path} is missing); train with "
            "semi.strategy=pseudo_label|fixmatch|cluster_pretrain and data.unlabelled=FOLDER"
        )
    return json.loads(path.read_text())


def read_rows(run_dir: str | Path, record: dict[str, Any]) -> list[dict[str, str]]:
    """The per-image rows of a stage (none for a stage that only counts)."""
    return list(iter_rows(run_dir, record))


def iter_rows(run_dir: str | Path, record: dict[str, Any]) -> Iterator[dict[str, str]]:
    """The per-image rows of a stage, one at a time as the CSV is read (a missing file is
    reported here, before the first row)."""
    if not record.get("csv"):
        return iter(())
    path = semi_dir(run_dir) / record["csv"]
    if not path.is_file():
        raise DataError(f"{path}: the rows of stage {record['name']!r} are missing")
    return _csv_rows(path)


def _csv_rows(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


def ground_truth(spec: str | None) -> dict[str, dict] | None:
    """The ground truth of the unlabelled images, if their folder records it (unlabelled.json)."""
    if not spec or not Path(spec).expanduser().is_dir():
        return None
    from lookcloser.data.synthetic import unlabelled_truth

    return unlabelled_truth(spec)


def truth_columns(path: str, truth: dict[str, dict] | None) -> dict[str, str]:
    """`in_class` and `true_class` columns for a row ('' where unknown)."""
    known = truth.get(same_path(path)) if truth else None
    if known is None:
        return {"in_class": "", "true_class": ""}
    true_class = known.get("class") or f"out-of-class {known.get('parts', '')}".strip()
    return {"in_class": str(bool(known["in_class"])), "true_class": true_class}
