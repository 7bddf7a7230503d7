"""Time from `lookcloser train <a config mistake>` to its one-line error, against the time the
same interpreter takes just to import torch, timm and Lightning (the cost the early check
avoids), both measured in the same run, interleaved.

    python benchmarks/config_error_time.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import machine, markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
MISTAKES = {
    "unknown key": ["data.sorce=x"],
    "out of range": ["data.image_size=0"],
    "method option type": ["method.name=dcl", "method.alpha=x"],
    "unknown method": ["method.name=dlc"],
    "TTA spec": ["model.tta=flop"],
}
HEAVY = "import torch, timm, lightning"


def _seconds(argv: list[str], expect: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != expect:
        raise SystemExit(f"{argv}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--section", default="config-error-time")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in [*MISTAKES, HEAVY]}
    for _ in range(args.rounds):  # interleaved: load changes hit every row alike
        for name, overrides in MISTAKES.items():
            argv = [sys.executable, "-m", "lookcloser.cli", "train", *overrides]
            times[name].append(_seconds(argv, 2))
        times[HEAVY].append(_seconds([sys.executable, "-c", HEAVY], 0))
    load = os.getloadavg()[0]
    heavy = statistics.median(times[HEAVY])
    rows = [
        [
            name,
            f"`lookcloser train {' '.join(overrides)}`",
            f"{statistics.median(times[name]):.2f}",
            f"{max(times[name]):.2f}",
            f"{statistics.median(times[name]) / heavy:.2f}",
        ]
        for name, overrides in MISTAKES.items()
    ]
    rows.append(
        [f"baseline: `python -c '{HEAVY}'`", "", f"{heavy:.2f}", f"{max(times[HEAVY]):.2f}", "1.00"]
    )
    text = (
        "## Time to a config error (`lookcloser train` with a mistake)\n\n"
        f"Command: `python benchmarks/config_error_time.py --rounds {args.rounds}`. Machine: "
        f"{machine()}; load average {load:.1f} when it finished. Median and worst of "
        f"{args.rounds} interleaved rounds, each a fresh process; the ratio is against "
        "importing torch, timm and Lightning in the same run, which the check avoids.\n\n"
        + markdown_table(["mistake", "command", "median s", "worst s", "vs importing torch"], rows)
    )
    print(text)
    write_section(args.section, text)


if __name__ == "__main__":
    main()
