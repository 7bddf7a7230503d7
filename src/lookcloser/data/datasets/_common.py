"""Helpers shared by the benchmark parsers: locating the release, reading its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lookcloser.config import DataConfig
from lookcloser.data.download import check_not_incomplete
from lookcloser.data.samples import require_root
from lookcloser.errors import DataError


def locate(cfg: DataConfig, marker: str, subdirs: tuple[str, ...], download_name: str) -> Path:
    """The release folder: `data.root` itself or one of `subdirs` below it, holding `marker`."""
    root = require_root(cfg)
    check_not_incomplete(root)
    for folder in (root, *(root / s for s in subdirs)):
        if (folder / marker).exists():
            return folder
    where = " or ".join(str(root / s / marker) for s in ("", *subdirs))
    raise DataError(
        f"data.root: {root} is not a {cfg.source} release: expected {where}; "
        f"fetch it with `lookcloser data download {download_name} {root}`"
    )


def require_file(path: Path) -> Path:
    """`path` if it is a file, else a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: missing file of the official release")
    return path


def read_rows(path: Path, min_fields: int, max_split: int = -1) -> list[list[str]]:
    """Whitespace-separated rows of an annotation text file (blank lines skipped).

    `max_split` keeps the rest of the line together as the last field (class names with spaces).
    """
    rows = []
    with require_file(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split(None, max_split) if max_split > 0 else line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise DataError(
                    f"{path}:{line_no}: expected at least {min_fields} fields, got {line.strip()!r}"
                )
            rows.append(fields)
    return rows


def read_map(path: Path) -> dict[str, str]:
    """`<id> <rest of line>` rows as a dict."""
    return {row[0]: row[1].strip() for row in read_rows(path, 2, max_split=1)}


def to_float(value: str, path: Path, what: str) -> float:
    """A float from an annotation field, or a DataError naming the file and the field."""
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}: {what}: expected a number, got {value!r}") from None


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB .mat file as a dict (scipy, squeezed), with a DataError when unreadable."""
    import scipy.io

    try:
        return scipy.io.loadmat(str(require_file(path)), squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        raise DataError(f"{path}: not a readable MATLAB .mat file ({err})") from None


def mat_field(data: dict[str, Any], key: str, path: Path) -> Any:
    """One variable of a loaded .mat file, or a DataError naming the file and variable."""
    if key not in data:
        names = sorted(k for k in data if not k.startswith("__"))
        raise DataError(f"{path}: variable {key!r} missing; has {names}")
    return data[key]


def no_level(cfg: DataConfig) -> None:
    """Refuse `data.level` for datasets that have a single label granularity."""
    if cfg.level not in (None, "", "species", "default"):
        raise DataError(f"data.level: {cfg.source} has a single label level; got {cfg.level!r}")


def train_split(cfg: DataConfig, allowed: tuple[str, ...], default: str) -> str:
    """The `data.train_split` choice (when the config has that key) checked against `allowed`."""
    value = getattr(cfg, "train_split", None) or default
    if value not in allowed:
        raise DataError(
            f"data.train_split: {cfg.source} offers {', '.join(allowed)}; got {value!r}"
        )
    return value


def corner_box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """A corner box (x1, y1, x2, y2) as [x, y, w, h] floats in the release's pixel coordinates."""
    return [float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1)]
