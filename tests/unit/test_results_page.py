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


def test_fine_tuned_long_tail_runs_get_their_own_table():
    """longtail.py's fine-tuned records form a table of their own, each variant against the
    fine-tuned plain run of the same seed, never mixed into the head-only table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import results
    finally:
        sys.path.pop(0)
    groups = {"many": 0.9, "medium": 0.7, "few": 0.5}
    sizes = {f"{g}_classes": 1 for g in groups} | {f"{g}_test_images": 10 for g in groups}

    def record(entry: str, seed: int, mean: float, features: str) -> dict:
        return {
            "kind": "longtail",
            "dataset": "fish23",
            "entry": entry,
            "seed": seed,
            "features": features,
            "backbone": "tf_efficientnet_lite0",
            "size": 96,
            "epochs": 3,
            "lr": 0.001,
            "top1": 0.9,
            "mean_per_class_accuracy": mean,
            **groups,
            **sizes,
            "test_images": 30,
            "section": "longtail-finetuned" if features == "fine-tuned" else "longtail",
            "command": "python benchmarks/longtail.py",
        }

    records = [record("plain", s, 0.60, "frozen") for s in (0, 1)]
    records += [record("plain", s, 0.80, "fine-tuned") for s in (0, 1)]
    records += [record("balanced", s, 0.85 + s / 100, "fine-tuned") for s in (0, 1)]
    text = "\n".join(results.longtail_lines(records, "fish23", {}))
    tuned, frozen = text.split("**The long tail, class head only**")
    assert "**The long tail, fine-tuned**" in tuned
    assert "| `balanced` | **85.5** ± 0.7 |" in tuned
    assert "+5.5 (higher on 2 of 2 seeds)" in tuned  # against the fine-tuned plain, not 60 %
    assert "`balanced`" not in frozen
    assert "| `plain` | **60.0** ± 0.0 |" in frozen
