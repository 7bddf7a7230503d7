"""The results page at the top of docs/benchmarks.md is what the run records give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_results_section_matches_the_run_records():
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "results.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_new_record_changes_the_leaderboard(tmp_path):
    """The page is generated: a better run appended to the records moves to the top."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import results
    finally:
        sys.path.pop(0)
    records = tmp_path / "records"
    records.mkdir()
    for source in (ROOT / "benchmarks" / "records").glob("*.jsonl"):
        (records / source.name).write_text(source.read_text())
    doc = tmp_path / "benchmarks.md"
    doc.write_text((ROOT / "docs" / "benchmarks.md").read_text())
    assert results.check(doc, records) == []
    baseline = [
        json.loads(line)
        for line in (records / "imported.jsonl").read_text().splitlines()
        if '"cars66"' in line and '"entry": "baseline"' in line and '"kind": "run"' in line
    ]
    seeds = {
        run["seed"]: run
        for run in baseline
        if run.get("seed") is not None and run.get("tta", "none") == "none"
    }
    assert sorted(seeds) == [0, 1, 2], "the cars66 baseline's three seeds are among the records"
    perfect = [
        {**run, "entry": "made-up-winner", "top1": 1.0, "correct": run["test_images"]}
        for run in seeds.values()
    ]
    (records / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in perfect))
    assert results.check(doc, records) != []
    page = results.current_block(results.generate(doc.read_text(), results.read_records(records)))
    cars = page.split("### cars66", 1)[1]
    first_row = next(line for line in cars.splitlines() if line.startswith("| 1 |"))
    assert "made-up-winner" in first_row and "**100.0**" in first_row
