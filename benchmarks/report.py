"""Write a benchmark's table into its own section of docs/benchmarks.md, and keep the run
records (benchmarks/records/*.jsonl) that the results page is generated from."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# One JSON object a line, appended as runs finish; benchmarks/results.py reads every file here.
RECORDS = Path(__file__).resolve().parent / "records"


def machine() -> str:
    """A one-line description of where a benchmark ran."""
    import torch  # here, not at the top: results.py reads records without loading torch

    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (or append it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1]
        current = before + block + after
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current)


# Fields that do not tell one measurement from another (a table rewritten later, elsewhere).
VOLATILE = ("recorded", "command", "section", "seconds", "note", "how")


def fingerprint(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, sort_keys=True)


def append_records(name: str, records: list[dict], folder: Path = RECORDS) -> None:
    """Append records to `folder/name.jsonl`, each stamped with the time it was recorded;
    a record already there (the same measurement) is not added again.

    Records hold numbers and names only (what was measured, on which set, with which
    settings and command), never images or anything else read from the dataset's files.
    """
    path = folder / f"{name}.jsonl"
    known = {fingerprint(r) for r in read_records(folder)} if folder.exists() else set()
    new = []
    for record in records:
        if fingerprint(record) not in known:
            known.add(fingerprint(record))
            new.append(record)
    if not new:
        return
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with path.open("a") as f:
        for record in new:
            f.write(json.dumps({**record, "recorded": record.get("recorded", now)}) + "\n")


def read_records(folder: Path = RECORDS) -> list[dict]:
    """Every record of every `*.jsonl` file in `folder`, oldest first: by the time recorded,
    then by file name and line (imported records carry the date of the docs they came from)."""
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line_no, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                records.append((json.loads(line), path.name, line_no))
    records.sort(key=lambda item: (item[0].get("recorded") or "", item[1], item[2]))
    return [record for record, _, _ in records]
