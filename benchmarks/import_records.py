"""Seed benchmarks/records/ once from the tables of docs/benchmarks.md (run directories of the
sessions that made them are gone; the tables are what is left).

Reads, by their `<!-- name:start -->` markers:
- every accuracy table (`accuracy*` sections: one row per dataset and method, with the per-seed
  figures): one record per run, its test top-1 as correct / test images (the count is recovered
  exactly from the one-decimal percentage, since 0.1 % is finer than one image on every set);
- the spine re-check (`accuracy-spine`): its runs, marked `current: false` (the docs present
  the figures of the table it re-checked as current);
- the TTA / ensemble tables (`tta-ensemble`, `tta-ensemble-val`): means over seeds
  (summaries: the per-seed figures were not printed) and the ensembles' single figures;
- the cost tables (`cost-*`, and the inference cost table of `tta-ensemble*`): the training
  and inference ratios against the baseline as printed;
- and the few figures that only the prose gives (ECE means, the strong models scored without
  TTA, the crop-fusion training times), listed below with where they come from.

Every figure is checked against the table it came from (means and spreads recomputed from the
per-seed figures); a mismatch stops the import. Writes benchmarks/records/imported.jsonl and
refuses to overwrite it unless --force: runs recorded since then go to other files.

    python benchmarks/import_records.py            # once
    python benchmarks/import_records.py --check    # parse and verify only, write nothing
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DOC, RECORDS, VOLATILE  # noqa: E402

OUT = RECORDS / "imported.jsonl"
LITE0 = "tf_efficientnet_lite0"
HYBRID = "vit_tiny_lite0_s16"
# Entries of benchmarks/accuracy.py that run on another backbone (HYBRID there).
BACKBONE = {"hybrid": HYBRID, "ramstrans-hybrid": HYBRID, "ramstrans-hybrid-a1": HYBRID}
CLASSES = {"cars66": 66, "flowers12": 12, "butterflies10": 10, "synthetic": 8, "synthetic-meta": 8}
# Entries whose model predicts with TTA by default (recipe files with model.tta).
DEFAULT_TTA = {"strong": "flip"}
# The order the sections were first committed in (`git log --reverse -S'<!-- NAME:start -->'
# -- docs/benchmarks.md`), with that date: later records win where a run was measured twice.
SECTIONS = [
    ("accuracy", "2026-11-22"),
    ("cost-dcl", "2026-11-22"),
    ("accuracy-spine", "2026-11-23"),
    ("accuracy-tasn", "2026-11-23"),
    ("tta-ensemble", "2026-11-24"),
    ("accuracy-heads", "2026-11-24"),
    ("cost-tasn", "2026-11-24"),
    ("tta-ensemble-val", "2026-11-24"),
    ("accuracy-dcl-real", "2026-11-24"),
    ("cost-ramstrans-cam", "2026-11-24"),
    ("accuracy-cropfusion", "2026-11-24"),
    ("cost-ramstrans-hybrid", "2026-11-24"),
    ("accuracy-cropfusion-os16", "2026-11-24"),
    ("accuracy-ramstrans-hybrid", "2026-11-24"),
    ("cost-ramstrans-cam-s16", "2026-11-24"),
    ("accuracy-ramstrans-cam", "2026-11-24"),
    ("cost-cbam", "2026-11-24"),
    ("cost-dcn", "2026-11-24"),
    ("cost-racnn", "2026-11-24"),
    ("cost-se", "2026-11-24"),
    ("cost-sk", "2026-11-24"),
    ("cost-stn", "2026-11-24"),
    ("accuracy-attention", "2026-11-24"),
    ("accuracy-attention-long", "2026-11-24"),
    ("cost-stn-pretrained", "2026-11-24"),
    ("accuracy-stn-views", "2026-11-24"),
    ("accuracy-arcface-real", "2026-11-24"),
    ("accuracy-finetune", "2026-11-24"),
    ("cost-arcface", "2026-11-24"),
    ("accuracy-strong", "2026-11-24"),
    ("accuracy-finetune-fixes", "2026-11-24"),
]
# Cost sections -> the accuracy.py entry they measured (method_cost.py's --name, or what its
# options make). cost-ramstrans-cam-s16 compares with a baseline at output stride 16, not the
# leaderboards' baseline, and is left out; cost-tasn ran `structure_power=1`: tasn-mean.
COST_ENTRY = {
    "cost-dcl": "dcl",
    "cost-tasn": "tasn-mean",
    "cost-ramstrans-cam": "ramstrans",
    "cost-ramstrans-hybrid": "ramstrans-hybrid",
    "cost-se": "se",
    "cost-sk": "sk",
    "cost-cbam": "cbam",
    "cost-stn": "stn",
    "cost-stn-pretrained": "stn-pretrained",
    "cost-dcn": "dcn",
    "cost-racnn": "racnn",
    "cost-arcface": "arcface",
}
# cost-ramstrans-hybrid's "baseline" is the hybrid ViT itself (--backbone vit_tiny_lite0_s16).
COST_REFERENCE = {"cost-ramstrans-hybrid": "hybrid"}

# Figures only the prose gives: (section or file they are in, record).
PROSE = [
    # Test ECE, mean of the 3 seeds (accuracy-arcface-real's and accuracy-strong's prose).
    *(
        ("accuracy-strong", {"dataset": d, "entry": e, "tta": t, "ece_mean": v})
        for d, e, t, v in [
            ("cars66", "baseline", "none", 0.090),
            ("cars66", "strong", "flip", 0.081),
            ("flowers12", "baseline", "none", 0.112),
            ("flowers12", "strong", "flip", 0.016),
            ("butterflies10", "baseline", "none", 0.110),
            ("butterflies10", "strong", "flip", 0.010),
        ]
    ),
    *(
        ("accuracy-arcface-real", {"dataset": d, "entry": "arcface", "tta": "none", "ece_mean": v})
        for d, v in [("cars66", 0.126), ("flowers12", 0.023), ("synthetic", 0.127)]
    ),
    ("accuracy-arcface-real", {"dataset": "synthetic", "entry": "baseline", "ece_mean": 0.120}),
    # accuracy-heads' prose (64 px, synthetic-meta; two digits there).
    *(
        (
            "accuracy-heads",
            {"dataset": "synthetic-meta", "entry": e, "size": 64, "ece_mean": v, "ece_digits": 2},
        )
        for e, v in [
            ("baseline", 0.16),
            ("arcface", 0.34),
            ("fusion", 0.12),
            ("arcface-fusion", 0.30),
        ]
    ),
    # docs/usage.md, the compare report of accuracy-dcl-real's flowers12 runs.
    ("docs/usage.md", {"dataset": "flowers12", "entry": "dcl", "ece_mean": 0.104}),
    # The strong recipe's models scored with tta=none (accuracy-strong's table, "ArcFace
    # alone"); only means and spreads were printed.
    *(
        (
            "accuracy-strong",
            {
                "dataset": d,
                "entry": "strong",
                "tta": "none",
                "seeds": [0, 1, 2],
                "top1_pct_mean": m,
                "top1_pct_sd": s,
            },
        )
        for d, m, s in [
            ("cars66", 70.5, 0.5),
            ("flowers12", 97.5, 1.1),
            ("butterflies10", 98.5, 0.6),
        ]
    ),
]
# Per-run ECE from docs/usage.md (compare report of accuracy-tasn's flowers12 runs, seed 0).
RUN_ECE = {("flowers12", "tasn-mean", 0): 0.124, ("flowers12", "tasn", 0): 0.120}
# Costs the prose gives.
PROSE_COSTS = [
    # accuracy-strong: training as the ArcFace head (cost-arcface); with TTA off its inference
    # is the ArcFace model's (cost-arcface); with its mirror TTA, tta-ensemble's flip timing.
    ("cost-arcface", {"entry": "strong", "tta": "flip", "training_cost": 1.00}),
    ("cost-arcface", {"entry": "strong", "tta": "none", "training_cost": 1.00}),
    ("cost-arcface", {"entry": "strong", "tta": "none", "inference_speed": 1.066}),
    # accuracy-cropfusion's prose: the runs' training time against the baseline's.
    (
        "accuracy-cropfusion",
        {
            "entry": "cropfusion",
            "dataset": "synthetic",
            "size": 64,
            "training_cost": 1.4,
            "how": "training time of the accuracy runs against the baseline's (shared machine)",
        },
    ),
    (
        "accuracy-cropfusion-os16",
        {
            "entry": "cropfusion-os16",
            "dataset": "synthetic",
            "size": 64,
            "training_cost": 1.7,
            "how": "training time of the accuracy runs against the baseline's (shared machine)",
        },
    ),
]


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- ([a-z0-9-]+):start -->\n(.*?)\n<!-- \1:end -->", text, re.S))


def tables(block: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of a block: (header, rows of cells)."""
    found, lines = [], block.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def command_of(block: str) -> str:
    match = re.search(r"Command: `([^`]*)`", block)
    return match.group(1) if match else ""


def float32(value: float) -> float:
    """The value as the benchmark stored it: torchmetrics' float32 top-1, read into Python."""
    return struct.unpack("f", struct.pack("f", value))[0]


def correct_count(pct: float, images: int, where: str) -> int:
    """The number of right answers a one-decimal percentage of `images` stands for."""
    count = round(pct / 100 * images)
    # Within half a unit of the last digit (ties went either way: the figures were float32).
    if abs(100 * count / images - pct) > 0.05 + 1e-6:
        raise SystemExit(f"{where}: {pct} % is no whole number of {images} images")
    return count


def check_same(value: float, printed: str, where: str, signed: bool = False) -> None:
    if (f"{value:+.1f}" if signed else f"{value:.1f}") != printed:
        raise SystemExit(f"{where}: recomputed {value:.2f}, the table says {printed}")


def accuracy_records(name: str, block: str, date: str) -> list[dict]:
    command = command_of(block)
    records = []
    versus: dict[tuple, tuple[dict, str]] = {}
    for header, rows in tables(block):
        if header[:3] != ["dataset", "method", "train / test images"]:
            continue
        for row in rows:
            dataset, entry, sizes, chance, schedule, seeds, mean, per_seed = row[:8]
            train, test = (int(x) for x in sizes.split(" / "))
            size, epochs = (int(x) for x in re.fullmatch(r"(\d+) px, (\d+) ep", schedule).groups())
            if f"{100 / CLASSES[dataset]:.1f}" != chance:
                raise SystemExit(f"{name}: {dataset} chance {chance} %")
            seed_list = [int(s) for s in seeds.split(", ")]
            pcts = [float(p) for p in per_seed.split(" / ")]
            where = f"{name}: {dataset} {entry}"
            counts = [correct_count(p, test, where) for p in pcts]
            top1 = [100 * float32(c / test) for c in counts]
            printed = re.fullmatch(r"\*\*([\d.]+)\*\* (?:± ([\d.]+)|\(one seed\))", mean)
            check_same(statistics.mean(top1), printed.group(1), where)
            if len(top1) > 1:
                check_same(statistics.stdev(top1), printed.group(2), where + " sd")
            for pct, value in zip(pcts, top1, strict=True):
                check_same(value, f"{pct:.1f}", where + " per seed")
            if len(row) > 8 and row[8]:
                versus[(dataset, entry, size, epochs)] = (
                    dict(zip(seed_list, top1, strict=True)),
                    row[8],
                )
            for seed, count in zip(seed_list, counts, strict=True):
                records.append(
                    {
                        "kind": "run",
                        "dataset": dataset,
                        "entry": entry,
                        "seed": seed,
                        "top1": float32(count / test),
                        "correct": count,
                        "test_images": test,
                        "train_images": train,
                        "classes": CLASSES[dataset],
                        "mean_per_class_accuracy": None,
                        "ece": RUN_ECE.get((dataset, entry, seed)),
                        "epochs": epochs,
                        "size": size,
                        "backbone": BACKBONE.get(entry, LITE0),
                        "tta": DEFAULT_TTA.get(entry, "none"),
                        "val_fraction": 0.0,
                        "section": name,
                        "command": command,
                        "recorded": date,
                    }
                )
    # The `vs baseline` column: the paired difference, recomputed from the recovered counts.
    for (dataset, entry, size, epochs), (top1, printed) in versus.items():
        base = {
            r["seed"]: 100 * r["top1"]
            for r in records
            if (r["dataset"], r["entry"], r["size"], r["epochs"])
            == (dataset, "baseline", size, epochs)
        }
        diffs = [top1[s] - base[s] for s in top1 if s in base]
        check_same(statistics.mean(diffs), printed, f"{name}: {dataset} {entry} vs baseline", True)
    return records


def spine_records(block: str, date: str) -> list[dict]:
    """The re-check after the spine: same settings as the `accuracy` table, other thread
    counts; kept as records, not used for the leaderboards (`current: false`)."""
    ((header, rows),) = tables(block)
    assert header[:6] == ["dataset", "method", "seed", "test images", "before (per seed)", "after"]
    train = {"synthetic": 480, "flowers12": 720, "butterflies10": 577}
    records = []
    for dataset, entry, seed, test, _before, after, threads in rows:
        pct = float(re.match(r"\**([\d.]+)", after).group(1))
        test = int(test)
        count = correct_count(pct, test, f"accuracy-spine: {dataset} {entry} {seed}")
        records.append(
            {
                "kind": "run",
                "dataset": dataset,
                "entry": entry,
                "seed": int(seed),
                "top1": float32(count / test),
                "correct": count,
                "test_images": test,
                "train_images": train[dataset],
                "classes": CLASSES[dataset],
                "mean_per_class_accuracy": None,
                "ece": None,
                "epochs": 5,
                "size": 128,
                "backbone": LITE0,
                "tta": "none",
                "val_fraction": 0.0,
                "section": "accuracy-spine",
                "command": "python benchmarks/accuracy.py --data-root ../shared/data"
                f" (re-check of the `accuracy` table; CPU threads: {threads})",
                "current": False,
                "note": f"re-check after the spine, CPU threads {threads}; the docs keep the "
                "`accuracy` table's figure as current",
                "recorded": date,
            }
        )
    return records


def tta_records(name: str, block: str, date: str) -> list[dict]:
    """tta-ensemble(-val): TTA means over the seeds (summaries), the ensembles' figures (one
    record each, over the 3 seeds' models) and the inference cost ratios (per set)."""
    command = command_of(block)
    val = 0.1 if name == "tta-ensemble-val" else 0.0
    (acc_header, acc_rows), (cost_header, cost_rows) = tables(block)
    specs = [re.fullmatch(r"\+TTA `(.+)`", h).group(1) for h in acc_header if h.startswith("+TTA")]
    records = []
    for row in acc_rows:
        cells = dict(zip(acc_header, row, strict=True))
        dataset, test = cells["set"], int(cells["test images"])
        common = {
            "dataset": dataset,
            "entry": "baseline",
            "test_images": test,
            "classes": CLASSES[dataset],
            "epochs": 5,
            "size": 128,
            "backbone": LITE0,
            "val_fraction": val,
            "section": name,
            "command": command,
            "recorded": date,
        }
        if val:  # the members were trained for this table: their plain figures are new
            mean, sd = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells["single (3 seeds)"]).groups()
            records.append(
                {
                    "kind": "summary",
                    **common,
                    "tta": "none",
                    "seeds": [0, 1, 2],
                    "top1_pct_mean": float(mean),
                    "top1_pct_sd": float(sd),
                }
            )
        for spec in specs:
            mean, sd = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells[f"+TTA `{spec}`"]).groups()
            records.append(
                {
                    "kind": "summary",
                    **common,
                    "tta": spec,
                    "seeds": [0, 1, 2],
                    "top1_pct_mean": float(mean),
                    "top1_pct_sd": float(sd),
                }
            )
        for weights, column in (("equal", "ensemble, equal"), ("fitted", "ensemble, fitted")):
            pct = float(cells[column])
            count = correct_count(pct, test, f"{name}: {dataset} {column}")
            records.append(
                {
                    "kind": "run",
                    **common,
                    "tta": "none",
                    "ensemble": weights,
                    "seed": None,
                    "seeds": [0, 1, 2],
                    "top1": count / test,
                    "correct": count,
                    "fitted_on": cells["fitted on"] if weights == "fitted" else None,
                }
            )
    for row in cost_rows:
        cells = dict(zip(cost_header, row, strict=True))
        dataset = cells["set"]
        base = {
            "kind": "cost",
            "dataset": dataset,
            "entry": "baseline",
            "backbone": LITE0,
            "size": 128,
            "val_fraction": val,
            "section": name,
            "command": command,
            "recorded": date,
            "how": "CPU time per test image against one plain model (one torch thread)",
        }
        for spec in specs:
            ratio = float(cells[f"TTA `{spec}`"].rstrip("x"))
            records.append({**base, "tta": spec, "inference_cost": ratio})
            if spec == "flip" and not val:  # the strong recipe's default TTA (accuracy-strong)
                records.append(
                    {
                        **base,
                        "entry": "strong",
                        "tta": "flip",
                        "inference_cost": ratio,
                        "how": base["how"] + "; mirror TTA timed on the baseline's models",
                    }
                )
        ratio = float(cells["ensemble of 3"].rstrip("x"))
        for weights in ("equal", "fitted"):
            records.append(
                {
                    **base,
                    "tta": "none",
                    "ensemble": weights,
                    "inference_cost": ratio,
                    "how": base["how"] + "; timed with equal weights (fitted weights run the "
                    "same three models)",
                }
            )
    # Training, by construction: TTA reuses the baseline's models, an ensemble trains three.
    by_construction = {
        "kind": "cost",
        "dataset": None,
        "entry": "baseline",
        "backbone": LITE0,
        "size": 128,
        "val_fraction": val,
        "section": name,
        "command": command,
        "recorded": date,
    }
    for spec in specs:
        records.append(
            {**by_construction, "tta": spec, "training_cost": 1.0, "how": "the same models"}
        )
    for weights in ("equal", "fitted"):
        records.append(
            {
                **by_construction,
                "tta": "none",
                "ensemble": weights,
                "training_cost": 3.0,
                "how": "three trainings",
            }
        )
    return records


def cost_records(name: str, block: str, date: str) -> list[dict]:
    ((header, rows),) = tables(block)
    measures = {row[1]: row for row in rows}
    setting = rows[0][0]
    backbone, size = re.fullmatch(r"(\S+), batch \d+, (\d+) px", setting).groups()
    entry = COST_ENTRY[name]
    training = next(v for k, v in measures.items() if k.endswith("(same originals)"))
    inference = next(v for k, v in measures.items() if k.startswith("inference, saved"))
    flops = measures["inference FLOPs per image (saved model / baseline)"][2]
    params = measures["parameters used by the inference graph"][2]
    return [
        {
            "kind": "cost",
            "dataset": None,
            "entry": entry,
            "reference": COST_REFERENCE.get(name, "baseline"),
            "tta": DEFAULT_TTA.get(entry, "none"),
            "backbone": backbone,
            "size": int(size),
            "training_cost": float(re.search(r"\*\*([\d.]+)x\*\*", training[3]).group(1)),
            "inference_speed": float(re.search(r"\*\*([\d.]+)\*\*", inference[3]).group(1)),
            "inference_flops": [int(x.replace(",", "")) for x in flops.split(" / ")],
            "inference_parameters": [int(x.replace(",", "")) for x in params.split(" / ")],
            "how": "method_cost.py: training step time and images/s of the saved model against "
            "the baseline's, random batches of 32",
            "section": name,
            "command": command_of(block),
            "recorded": date,
        }
    ]


def prose_records(dates: dict[str, str]) -> list[dict]:
    records = []
    for source, figures in PROSE:
        record = {
            "kind": "summary",
            "tta": "none",
            "epochs": 5,
            "size": 128,
            "backbone": LITE0,
            "val_fraction": 0.0,
            **figures,
            "section": source,
            "recorded": dates.get(source, "2026-11-24"),
        }
        record["tta"] = figures.get("tta", DEFAULT_TTA.get(record["entry"], "none"))
        records.append(record)
    for source, figures in PROSE_COSTS:
        records.append(
            {
                "kind": "cost",
                "dataset": None,
                "reference": "baseline",
                "backbone": LITE0,
                "size": 128,
                "how": "method_cost.py (cost-arcface: the ArcFace head against the linear one)",
                **figures,
                "section": source,
                "recorded": dates[source],
            }
        )
    return records


def collect(text: str) -> list[dict]:
    found = sections(text)
    dates = dict(SECTIONS)
    records = []
    for name, date in SECTIONS:
        block = found.get(name)
        if block is None:
            raise SystemExit(f"{DOC}: no section {name}")
        if name == "accuracy-spine":
            records += spine_records(block, date)
        elif name.startswith("accuracy"):
            records += accuracy_records(name, block, date)
        elif name.startswith("tta-ensemble"):
            records += tta_records(name, block, date)
        elif name in COST_ENTRY:
            records += cost_records(name, block, date)
    # A run reprinted in later tables (accuracy.py reuses the runs in its results.jsonl, e.g.
    # the baselines) is one run: keep its first record, from the table that first showed it.
    seen, unique = set(), []
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True)
        if r["kind"] != "run" or key not in seen:
            unique.append(r)
        seen.add(key)
    return unique + prose_records(dates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument("--check", action="store_true", help="parse and verify; write nothing")
    args = parser.parse_args()
    records = collect(args.doc.read_text())
    kinds = {k: sum(r["kind"] == k for r in records) for k in ("run", "summary", "cost")}
    print(f"{len(records)} records: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    if args.check:
        return
    if args.out.exists() and not args.force:
        raise SystemExit(f"{args.out} exists (the import is done once); --force replaces it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
