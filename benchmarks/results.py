"""Write the results page (the `results` section at the top of docs/benchmarks.md) from the run
records in benchmarks/records/*.jsonl.

One leaderboard per set: every method, recipe, TTA and ensemble measured there, with the mean
and spread over seeds, the paired difference from the baseline on the same seeds, training and
inference cost ratios (where measured), the test ECE (where known) and the command that makes
the row. Then a short guide: which method for which data, from those figures. The output
depends on the records only (and on the headings of docs/benchmarks.md, for the links), so a
second run changes nothing.

Records (benchmarks/report.py, append_records) are of five kinds:
- `run`: one trained model's test figures (or one ensemble's), written by accuracy.py and
  tta_ensemble.py as each run finishes;
- `summary`: figures over seeds where the per-seed ones were never printed (imported from the
  docs: means of TTA, ECE means);
- `cost`: training / inference ratios against the baseline (method_cost.py, tta_ensemble.py);
- `scale`: wall time and peak RSS of each command against classes and images (scale.py),
  shown in the page's last tables;
- `longtail`: one class head's test figures on a long-tailed set, with the head-versus-tail
  breakdown (longtail.py), shown in that set's section and the guide.
A run is keyed by (dataset, entry, TTA, ensemble, backbone, size, epochs, validation share,
seed); where a key was measured more than once the newest record counts, except records
marked `current: false` (the spine re-check), which are only noted.

    python benchmarks/results.py            # rewrite the section
    python benchmarks/results.py --check    # exit 1 if the section differs from the records
    python benchmarks/results.py --print    # print it, write nothing
"""

from __future__ import annotations

import argparse
import difflib
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DOC, RECORDS, markdown_table, read_records  # noqa: E402
from scale import scale_section  # noqa: E402

SECTION = "results"
LITE0 = "tf_efficientnet_lite0"
COMMON_SIZE, COMMON_EPOCHS = 128, 5
REAL = ("cars66", "flowers12", "butterflies10", "fish23")
# (set, what it is); train / test counts come from the records (fish23: no records yet).
SETS = [
    (
        "cars66",
        "66 car models (a Stanford Cars subset), 17-34 training images a class: the hard set",
    ),
    ("flowers12", "12 flower species (an Oxford 17 Flowers subset): near its ceiling"),
    ("butterflies10", "10 butterfly species (Leeds Butterflies): near its ceiling"),
    (
        "fish23",
        "23 reef-fish species (Fish4Knowledge), strongly long-tailed (600 down to 13 training "
        "images a class)",
    ),
    (
        "synthetic",
        "the built-in set: 8 classes of small part combinations placed anywhere in clutter, "
        "rendered at 128 px",
    ),
]
# Train / test images of sets without records yet (shared/data/README.md).
COUNTS = {"fish23": (4959, 1143)}
# Datasets shown in another set's leaderboard (same images, something added).
VARIANT_OF = {"synthetic-meta": "synthetic"}
VARIANT_TEXT = {"synthetic-meta": "with metadata (latitude, longitude, date)"}
BACKBONE_TEXT = {
    "vit_tiny_lite0_s16": "Lite0 hybrid ViT (Lite0 to stride 16, then 6 ViT-Tiny blocks), "
    "AdamW 5e-4 (new parts 2x), weight decay 0.05, 1 warm-up epoch, clipping 1.0",
}
# The model's own TTA (recipe files with model.tta): a row without this TTA is "TTA off".
DEFAULT_TTA = {"strong": "flip"}
# What a row is compared with, where it is not the baseline at the same settings.
REFERENCE = {
    "ramstrans-hybrid": "hybrid",
    "ramstrans-hybrid-a1": "hybrid",
    "cropfusion-os16": "baseline-os16",
}
ENTRY_TEXT = {
    "baseline": "the plain fine-tune: linear head, cross-entropy (`method.name=baseline`)",
    "strong": "recipe file `configs/<set>/strong-lite0.yaml`: the baseline with an ArcFace head "
    "and mirror TTA as the model's default (`model.tta=flip`)",
    "arcface": "ArcFace margin head, s = 30, m = 0.3 rad (`model.head=arcface`)",
    "dcl": "Destruction and Construction Learning: shuffled 4 x 4 region copies in training; "
    "the baseline's graph at inference (`method.name=dcl`)",
    "tasn": "TASN, squared structure map as in the released code; attention: a second Lite0 at "
    "stride 16 (`method.name=tasn`)",
    "tasn-mean": "TASN with the paper's channel-mean structure map (`method.structure_power=1`)",
    "ramstrans": "RAMS-Trans zoom with CAM importance, Lite0 at output stride 16 "
    "(`method.name=ramstrans method.importance=cam`)",
    "se": "squeeze-and-excitation blocks after Lite0's stages (`model.attention=se`)",
    "sk": "selective-kernel blocks (`model.attention=sk`)",
    "cbam": "CBAM blocks (`model.attention=cbam`)",
    "se-gate1": "SE blocks fully on from step 0 (`model.attention_gate_init=1.0`)",
    "stn": "affine spatial transformer before the backbone (`model.stn=true`)",
    "stn-lr1": "the STN at the backbone's learning rate (`model.stn_lr_scale=1.0`)",
    "stn-pretrained": "STN with a pretrained localisation net predicting a zoom and shift",
    "stn-pretrained-lr001": "stn-pretrained at 0.01x the rate (`model.stn_lr_scale=0.01`)",
    "stn-views": "stn-pretrained taking 128 px views of 256 px inputs (`model.stn_view_size=128`)",
    "dcn": "Dynamic Capacity Networks: 4 of 16 cells through the fine Lite0 (`method.name=dcn`)",
    "racnn": "RA-CNN: two Lite0 scales and an attention proposal network (`method.name=racnn`)",
    "racnn-apn-lr1": "RA-CNN with the proposal networks at the backbone's rate",
    "layerdecay": "layer-wise learning-rate decay 0.85 (`optim.layer_decay=0.85`)",
    "layerdecay-095": "layer-wise decay 0.95",
    "twostage": "4 epochs with frozen norms at 2e-4, then 1 head-only class-balanced epoch "
    "(`optim.stages`)",
    "twostage-bn": "the two stages without frozen norms, stage 1 at the baseline's rates",
    "fusion": "metadata fusion: latitude, longitude, day of year added to the features "
    "(`model.fusion=add`)",
    "arcface-fusion": "ArcFace head and metadata fusion",
    "cropfusion": "the image and the crop of its own attention box through the same Lite0 "
    "(`model.crop_fusion=concat`)",
    "baseline-os16": "the baseline at output stride 16",
    "cropfusion-os16": "cropfusion at output stride 16",
    "hybrid": "the Lite0 hybrid ViT, single scale (`model.backbone=vit_tiny_lite0_s16`)",
    "ramstrans-hybrid": "RAMS-Trans on the hybrid: attention rollout, alpha 1.3, 2 scales",
    "ramstrans-hybrid-a1": "the same with alpha 1.0",
}


# ----------------------------------------------------------------------------- records


def one_decimal(value: float, signed: bool = False) -> str:
    """A percentage to one decimal, as the benchmark tables print it."""
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def norm(record: dict) -> dict:
    """A record with the defaults of fields older records may lack."""
    entry = record.get("entry")
    return {
        "tta": DEFAULT_TTA.get(entry, "none"),
        "ensemble": None,
        "backbone": LITE0,
        "size": COMMON_SIZE,
        "epochs": COMMON_EPOCHS,
        "val_fraction": 0.0,
        **{k: v for k, v in record.items() if v is not None or k == "seed"},
    }


GROUP = ("dataset", "entry", "tta", "ensemble", "backbone", "size", "epochs", "val_fraction")


def group_key(record: dict) -> tuple:
    return tuple(record.get(k) for k in GROUP)


@dataclass
class Row:
    key: tuple
    values: dict  # seed (or None for an ensemble) -> top-1 %
    seeds: list[int]
    mean: float
    sd: float | None
    from_summary: bool = False
    ece: str = ""
    per_class: str = ""
    sections: list[str] = field(default_factory=list)
    script: str = "accuracy.py"
    fitted_on: str | None = None

    def __getattr__(self, name: str):
        if name in GROUP:
            return self.key[GROUP.index(name)]
        raise AttributeError(name)


def build_rows(records: list[dict]) -> tuple[dict[tuple, Row], list[str], dict]:
    """Rows by group key, notes on runs measured twice with different figures, cost records."""
    runs = [norm(r) for r in records if r["kind"] == "run"]
    chosen: dict[tuple, dict] = {}
    every: dict[tuple, list[dict]] = {}
    for r in runs:  # oldest first: later ones replace earlier ones
        key = (*group_key(r), r["seed"])
        every.setdefault(key, []).append(r)
        if r.get("current", True):
            chosen[key] = r
    summaries: dict[tuple, dict] = {}
    for r in (norm(r) for r in records if r["kind"] == "summary"):
        summaries.setdefault(group_key(r), {}).update(r)
    costs = [norm(r) for r in records if r["kind"] == "cost"]

    rows: dict[tuple, Row] = {}
    grouped: dict[tuple, list[dict]] = {}
    for key, r in chosen.items():
        grouped.setdefault(key[:-1], []).append(r)
    for key, rs in grouped.items():
        rs.sort(key=lambda r: -1 if r["seed"] is None else r["seed"])
        values = {r["seed"]: 100 * r["top1"] for r in rs}
        top1 = list(values.values())
        ensemble = rs[0].get("ensemble")
        seeds = rs[0].get("seeds", []) if ensemble else [r["seed"] for r in rs]
        # Where each figure was first measured (the same figure may be in later tables too).
        sections = []
        for r in rs:
            same = [
                o
                for o in every[(*key, r["seed"])]
                if o.get("current", True) and o["top1"] == r["top1"]
            ]
            if same[0]["section"] not in sections:
                sections.append(same[0]["section"])
        row = Row(
            key=key,
            values=values,
            seeds=seeds,
            mean=statistics.mean(top1),
            sd=statistics.stdev(top1) if len(top1) > 1 else None,
            sections=sections,
            script=rs[-1].get("script") or script_of(rs[-1]),
            fitted_on=rs[0].get("fitted_on"),
        )
        eces = [r["ece"] for r in rs if r.get("ece") is not None]
        if eces:
            row.ece = f"{statistics.mean(eces):.3f}" + (
                "" if len(eces) == len(rs) else f" ({len(eces)} of {len(rs)} seeds)"
            )
        per_class = [r["mean_per_class_accuracy"] for r in rs if r.get("mean_per_class_accuracy")]
        if per_class and len(per_class) == len(rs):
            row.per_class = f"{100 * statistics.mean(per_class):.1f}"
        rows[key] = row
    for key, s in summaries.items():
        row = rows.get(key)
        if row is None and "top1_pct_mean" in s:
            row = rows[key] = Row(
                key=key,
                values={},
                seeds=s["seeds"],
                mean=s["top1_pct_mean"],
                sd=s.get("top1_pct_sd"),
                from_summary=True,
                sections=[s["section"]],
                script=s.get("script") or script_of(s),
            )
        if row is not None and not row.ece and "ece_mean" in s:
            row.ece = f"{s['ece_mean']:.{s.get('ece_digits', 3)}f}"

    notes = []
    for key, rs in sorted(every.items(), key=lambda kv: str(kv[0])):
        figures = {round(100 * r["top1"], 2) for r in rs}
        if len(figures) < 2 or key not in chosen:
            continue
        used = chosen[key]
        others = ", ".join(
            f"{one_decimal(100 * r['top1'])} in `{r['section']}`"
            + ("" if r.get("current", True) else f" ({r.get('note', 'not current')})")
            for r in rs
            if r is not used and round(100 * r["top1"], 2) != round(100 * used["top1"], 2)
        )
        seed = "" if key[-1] is None else f", seed {key[-1]}"
        notes.append(
            f"{key[0]} {label(key[:-1])}{seed}: {one_decimal(100 * used['top1'])} "
            f"(`{used['section']}`, used here); also measured {others}."
        )
    return rows, notes, costs


def script_of(record: dict) -> str:
    section = record.get("section", "")
    return "tta_ensemble.py" if section.startswith("tta-ensemble") else "accuracy.py"


# ----------------------------------------------------------------------------- rows


def label(key: tuple) -> str:
    _, entry, tta, ensemble, *_ = key
    if ensemble:
        return f"ensemble of 3 `{entry}` models ({ensemble} weights)"
    default = DEFAULT_TTA.get(entry, "none")
    if tta == default:
        return f"`{entry}`"
    if tta == "none":
        return f"`{entry}`, TTA off"
    return f"`{entry}` + TTA `{tta}`"


def is_common(row: Row) -> bool:
    return (
        row.dataset not in VARIANT_OF
        and row.backbone == LITE0
        and row.size == COMMON_SIZE
        and row.epochs == COMMON_EPOCHS
        and not row.val_fraction
    )


def training_settings(row: Row) -> str:
    """How the row's training differs from the common settings ('' when it does not)."""
    parts = []
    if row.dataset in VARIANT_TEXT:
        parts.append(VARIANT_TEXT[row.dataset])
    if row.size != COMMON_SIZE:
        parts.append(f"{row.size} px")
    if row.epochs != COMMON_EPOCHS:
        parts.append(f"{row.epochs} epochs")
    if row.backbone != LITE0:
        parts.append(BACKBONE_TEXT.get(row.backbone, f"backbone {row.backbone}"))
    if row.val_fraction:
        parts.append(f"{100 * row.val_fraction:.0f} % of train held out for validation")
    return ", ".join(parts)


def settings_text(row: Row) -> str:
    parts = [training_settings(row)] if training_settings(row) else []
    if row.ensemble:
        parts.append(
            "3 models at inference"
            + (f", weights fitted on {row.fitted_on}" if row.ensemble == "fitted" else "")
        )
    if row.tta != "none":
        default = " (the recipe's default)" if DEFAULT_TTA.get(row.entry) == row.tta else ""
        parts.append(f"TTA `{row.tta}` at inference{default}")
    return "; ".join(parts)


def reference_of(row: Row, rows: dict[tuple, Row]) -> tuple[Row | None, str]:
    """The row this one is compared with, and how to name it ('' for the usual baseline)."""
    if row.entry == "baseline" and row.tta == "none" and not row.ensemble:
        return None, ""
    entry = REFERENCE.get(row.entry, "baseline")
    backbone = row.backbone if entry != "baseline" else LITE0
    same = (row.dataset, entry, "none", None, backbone, row.size, row.epochs, row.val_fraction)
    common = (row.dataset, "baseline", "none", None, LITE0, COMMON_SIZE, COMMON_EPOCHS, 0.0)
    ref = rows.get(same) or rows.get(common)
    if ref is None:
        return None, ""
    if training_settings(ref) == training_settings(row):
        return ref, f"`{ref.entry}`, same settings"
    if is_common(ref):
        return ref, f"`{ref.entry}`, common settings"
    return ref, f"`{ref.entry}`, {training_settings(ref)}"


def versus(row: Row, ref: Row | None) -> str:
    """Mean over the shared seeds of (row - reference), and how many seeds are higher."""
    if ref is None:
        return ""
    if row.ensemble:
        base = [ref.values[s] for s in row.seeds if s in ref.values]
        base_mean = statistics.mean(base) if base and len(base) == len(row.seeds) else ref.mean
        return f"{one_decimal(row.mean - base_mean, True)} (against the members' mean)"
    if row.from_summary or ref.from_summary:
        base = [ref.values[s] for s in row.seeds if s in ref.values]
        base_mean = statistics.mean(base) if len(base) == len(row.seeds) else ref.mean
        return f"{one_decimal(row.mean - base_mean, True)} (means; per-seed figures not recorded)"
    shared = [s for s in row.values if s in ref.values]
    if not shared:
        return ""
    diffs = [row.values[s] - ref.values[s] for s in shared]
    mean = one_decimal(statistics.mean(diffs), True)
    if len(shared) == 1:
        return f"{mean} (one seed)"
    return f"{mean} (higher on {sum(d > 0 for d in diffs)} of {len(shared)} seeds)"


def ratio(value: float) -> str:
    text = f"{value:.3g}"
    return (text if "." in text or value >= 100 else text + ".0") + "x"


def cost_cells(row: Row, costs: list[dict], anchors: dict[str, str]) -> tuple[str, str, list]:
    """(training, inference) cost cells and the footnotes they need."""
    if row.entry == "baseline" and row.tta == "none" and not row.ensemble:
        return "1x", "1x", []
    reference = REFERENCE.get(row.entry, "baseline")
    match = [
        c
        for c in costs
        if (c["entry"], c["tta"], c.get("ensemble"), c["backbone"], c["size"])
        == (row.entry, row.tta, row.ensemble, row.backbone, row.size)
        and c.get("reference", "baseline") == reference
        and c.get("val_fraction", 0.0) == row.val_fraction
    ]
    cells, notes = [], []
    for measure in ("training", "inference"):

        def value(c: dict, measure: str = measure) -> float | None:
            if measure == "training":
                return c.get("training_cost")
            if "inference_cost" in c:
                return c["inference_cost"]
            return 1 / c["inference_speed"] if "inference_speed" in c else None

        here = [c for c in match if c.get("dataset") in (row.dataset, None) and value(c)]
        if here:
            # dataset-specific before general, newest last
            c = sorted(here, key=lambda c: c.get("dataset") is not None)[-1]
            cells.append(link(ratio(value(c)), c.get("section"), anchors))
            continue
        elsewhere = {c["dataset"]: value(c) for c in match if value(c) and c.get("dataset")}
        if elsewhere:
            low, high = min(elsewhere.values()), max(elsewhere.values())
            text = ratio(low) if low == high else f"{ratio(low)[:-1]}-{ratio(high)}"
            cells.append(text + "†")
            notes += sorted(elsewhere)
        else:
            cells.append("")
    return cells[0], cells[1], notes


def link(text: str, section: str | None, anchors: dict[str, str]) -> str:
    if section and section in anchors:
        return f"[{text}](#{anchors[section]})"
    return text


def command(row: Row) -> str:
    seeds = " ".join(str(s) for s in row.seeds)
    data_root = " --data-root DATA" if row.dataset in REAL else ""
    if row.script == "tta_ensemble.py":
        train = (
            f" --train --val-fraction {row.val_fraction:g}{data_root}" if row.val_fraction else ""
        )
        tta = f" --tta {row.tta}" if row.tta != "none" else ""
        return (
            f"python benchmarks/tta_ensemble.py{train} --runs RUNS --sets {row.dataset}"
            f" --seeds {seeds}{tta}"
        )
    size = f" --size {row.size}" if row.size != COMMON_SIZE else ""
    epochs = f" --epochs {row.epochs}" if row.epochs != COMMON_EPOCHS else ""
    return (
        f"python benchmarks/accuracy.py --methods {row.entry} --datasets {row.dataset}"
        f" --seeds {seeds}{size}{epochs}{data_root}"
    )


def accuracy_text(row: Row) -> str:
    if row.sd is None:
        return f"**{one_decimal(row.mean)}**"
    return f"**{one_decimal(row.mean)}** ± {one_decimal(row.sd)}"


def seeds_text(row: Row) -> str:
    seeds = ", ".join(str(s) for s in row.seeds)
    if row.ensemble:
        return f"1 ensemble of seeds {seeds}"
    return f"{len(row.seeds)} ({seeds})"


def leaderboard(rows: list[Row], every: dict, costs: list[dict], anchors) -> tuple[str, list]:
    with_per_class = any(r.per_class for r in rows)
    header = ["", "method or recipe", "test top-1 %", "seeds", "vs baseline, paired"]
    if not all(is_common(r) for r in rows):
        header.insert(4, "against")
    header += ["training cost", "inference cost", "test ECE"]
    header += ["mean per-class %"] if with_per_class else []
    header += ["settings that differ", "from", "command"]
    lines, timed_on = [], set()
    for rank, row in enumerate(rows, 1):
        ref, against = reference_of(row, every)
        train, infer, elsewhere = cost_cells(row, costs, anchors)
        timed_on.update(elsewhere)
        cells = [str(rank), label(row.key), accuracy_text(row), seeds_text(row)]
        if "against" in header:
            cells.append(against or "(reference)")
        cells += [versus(row, ref), train, infer, row.ece]
        cells += [row.per_class] if with_per_class else []
        cells += [
            settings_text(row),
            ", ".join(link(f"`{s}`", s, anchors) for s in row.sections),
            f"`{command(row)}`",
        ]
        lines.append(cells)
    notes = []
    if timed_on:
        notes.append(
            f"† Not timed on {rows[0].dataset}: the range of what was timed on "
            f"{' and '.join(sorted(timed_on))} (CPU time per test image at 128 px)."
        )
    return markdown_table(header, lines), notes


def longtail_runs(
    records: list[dict], dataset: str, features: str = "frozen"
) -> dict[str, dict[int, dict]]:
    """longtail.py's records of a set, head-only ("frozen") or "fine-tuned": entry -> seed ->
    the newest record."""
    runs: dict[str, dict[int, dict]] = {}
    for r in records:  # oldest first: later ones replace earlier ones
        if (
            r["kind"] == "longtail"
            and r["dataset"] == dataset
            and r.get("features", "frozen") == features
        ):
            runs.setdefault(r["entry"], {})[r["seed"]] = r
    return runs


def mean_sd(values: list[float], bold: bool = False) -> str:
    """Percentages from fractions: mean ± sample sd (the mean alone for one value)."""
    values = [100 * v for v in values]
    mean = one_decimal(statistics.mean(values))
    mean = f"**{mean}**" if bold else mean
    if len(values) == 1:
        return mean
    return f"{mean} ± {one_decimal(statistics.stdev(values))}"


def paired_text(runs: dict[int, dict], base: dict[int, dict], key: str) -> str:
    """Mean over shared seeds of (runs - base) in points, and how many seeds are higher."""
    diffs = [100 * (runs[s][key] - base[s][key]) for s in runs if s in base]
    if not diffs:
        return ""
    higher = sum(d > 0 for d in diffs)
    return f"{one_decimal(statistics.mean(diffs), True)} (higher on {higher} of {len(diffs)} seeds)"


def longtail_lines(records: list[dict], dataset: str, anchors: dict[str, str]) -> list[str]:
    """The long-tail tables of a set (benchmarks/longtail.py): the fine-tuned variants, then the
    class-head variants on frozen features, each against its `plain`, best mean per-class
    accuracy first; [] without records."""
    out = []
    for features in ("fine-tuned", "frozen"):
        runs = longtail_runs(records, dataset, features)
        if "plain" not in runs:
            continue
        first = next(iter(runs["plain"].values()))
        section = link(f"`{first['section']}`", first["section"], anchors)
        if features == "frozen":
            title = (
                f"**The long tail, class head only** (`{first['command']} --record`; the "
                f"protocol and each variant's settings are in {section}): ImageNet "
                f"`{first['backbone']}` frozen, its pooled features at {first['size']} px, only "
                "the class head trained, each variant's learning rate and epochs chosen on a "
                "validation split carved from train."
            )
        else:
            title = (
                f"**The long tail, fine-tuned** (`{first['command']} --record`; the protocol is "
                f"in {section}): ImageNet `{first['backbone']}` fine-tuned at {first['size']} px "
                f"for {first['epochs']} epochs with the common settings, every variant on the "
                "plain schedule (not tuned per variant)."
            )
        out += longtail_table(runs, title, section, settings=features == "frozen")
    return out


def longtail_table(
    runs: dict[str, dict[int, dict]], title: str, section: str, settings: bool
) -> list[str]:
    """One long-tail table with its title and the variants' descriptions (section: the link
    to the history section each row is from)."""
    base = runs["plain"]
    first = next(iter(base.values()))
    groups = {
        g: f"{first[f'{g}_classes']} classes, {first[f'{g}_test_images']:,} test images"
        for g in ("many", "medium", "few")
    }
    order = sorted(
        runs,
        key=lambda e: (
            -round(statistics.mean(r["mean_per_class_accuracy"] for r in runs[e].values()), 5)
        ),
    )
    header = [
        "",
        "variant",
        "mean per-class %",
        "top-1 %",
        f"many-shot % ({groups['many']})",
        f"medium % ({groups['medium']})",
        f"few-shot % ({groups['few']})",
        "mean per-class vs plain, paired",
        "top-1 vs plain, paired",
        "seeds",
        *(["settings (chosen on val)"] if settings else []),
        "from",
    ]
    described = [
        f"`{e}`: {runs[e][max(runs[e])]['what']}" for e in order if "what" in runs[e][max(runs[e])]
    ]
    lines = []
    for rank, entry in enumerate(order, 1):
        these = runs[entry]
        seeds = sorted(these)

        def figure(key: str, bold: bool = False, these: dict = these, seeds: list = seeds) -> str:
            return mean_sd([these[s][key] for s in seeds], bold)

        versus_plain = entry != "plain"
        lines.append(
            [
                str(rank),
                f"`{entry}`",
                figure("mean_per_class_accuracy", bold=True),
                figure("top1"),
                figure("many"),
                figure("medium"),
                figure("few"),
                paired_text(these, base, "mean_per_class_accuracy") if versus_plain else "",
                paired_text(these, base, "top1") if versus_plain else "",
                f"{len(seeds)} ({', '.join(map(str, seeds))})",
                *([longtail_settings(these[seeds[-1]])] if settings else []),
                section,
            ]
        )
    return [
        f"{title} Mean per-class accuracy is the figure to read: top-1 is mostly the many-shot "
        f"classes' ({first['many_test_images']:,} of {first['test_images']:,} test images). A "
        "shot group's figure is the mean of its classes' accuracies; the few-shot one rests on "
        f"{first['few_test_images']} test images.",
        "",
        markdown_table(header, lines),
        "",
        *([f"Variants: {'; '.join(described)}.", ""] if described else []),
    ]


def longtail_advice(records: list[dict], anchors: dict[str, str]) -> str:
    """The guide's line on long-tailed sets from fish23's long-tail records: the fine-tuned
    comparison when it has every variant it names, then the head-only one ('' without the
    variants either names)."""
    tuned = longtail_runs(records, "fish23", "fine-tuned")
    frozen = longtail_runs(records, "fish23")
    parts = [_finetuned_advice(tuned, anchors), _frozen_advice(frozen, anchors, bool(tuned))]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return "- **Long-tailed sets (fish23): judge by mean per-class accuracy.** " + " ".join(parts)


def _vs(runs: dict, entry: str, key: str = "mean_per_class_accuracy") -> str:
    """A variant's paired difference from `plain`, in points (signed)."""
    return paired_text(runs[entry], runs["plain"], key).split(" ", 1)[0]


def _acc(runs: dict, entry: str, key: str = "mean_per_class_accuracy") -> str:
    return mean_sd([r[key] for r in runs[entry].values()])


def _finetuned_advice(runs: dict, anchors: dict[str, str]) -> str:
    named = ("plain", "balanced", "twostage", "arcface", "subcenter", "prototype")
    if any(e not in runs for e in named):
        return ""
    first = next(iter(runs["plain"].values()))
    seeds = min(len(runs[e]) for e in named)
    best = max(
        named[1:],
        key=lambda e: statistics.mean(r["mean_per_class_accuracy"] for r in runs[e].values()),
    )
    return (
        f"Fine-tuned ({link('`' + first['section'] + '`', first['section'], anchors)}: Lite0 "
        f"at {first['size']} px, {first['epochs']} epochs, {seeds} seeds, mean per-class "
        f"accuracy; plain {_acc(runs, 'plain')}, top-1 {_acc(runs, 'plain', 'top1')}): "
        f"class-balanced sampling {_vs(runs, 'balanced')} points (top-1 "
        f"{_vs(runs, 'balanced', 'top1')}), the two-stage schedule {_vs(runs, 'twostage')} "
        f"(top-1 {_vs(runs, 'twostage', 'top1')}), ArcFace {_vs(runs, 'arcface')} (top-1 "
        f"{_vs(runs, 'arcface', 'top1')}), sub-centre ArcFace {_vs(runs, 'subcenter')}, the "
        f"prototype head {_vs(runs, 'prototype')} (top-1 {_vs(runs, 'prototype', 'top1')}); "
        f"highest mean per-class: `{best}`."
    )


def _frozen_advice(runs: dict, anchors: dict[str, str], after_finetuned: bool) -> str:
    named = ("plain", "balanced", "sqrt", "twostage", "arcface", "arcface-tuned", "prototype")
    named += ("arcface-balanced", "prototype-balanced", "balanced@plain")
    if any(e not in runs for e in named):
        return ""

    def vs(entry: str, key: str = "mean_per_class_accuracy") -> str:
        return _vs(runs, entry, key)

    first = next(iter(runs["plain"].values()))
    section = link("`" + first["section"] + "`", first["section"], anchors)
    lead = (
        f"The class head alone on frozen features ({section}), for comparison."
        if after_finetuned
        else f"Measured so far with the class head alone on frozen ImageNet Lite0 features at "
        f"{first['size']} px ({section}; no fine-tune yet)."
    )
    return (
        f"{lead} Mean per-class accuracy, plain head {_acc(runs, 'plain')}: class-balanced sampling "
        f"{vs('balanced')} points (top-1 {vs('balanced', 'top1')}; {vs('balanced@plain')} at "
        f"plain's lr and epochs), square-root sampling {vs('sqrt')}. ArcFace at its defaults "
        f"(s = 30, m = 0.3) costs the tail ({vs('arcface')}) while raising top-1 "
        f"({vs('arcface', 'top1')}); with s = 64, m = 0.1 it gains both ({vs('arcface-tuned')}, "
        f"{vs('arcface-tuned', 'top1')}). The prototype head gives the best top-1 "
        f"({vs('prototype', 'top1')}) but nothing to the tail ({vs('prototype')}) unless sampled "
        f"evenly (`prototype-balanced` {vs('prototype-balanced')}, top-1 "
        f"{vs('prototype-balanced', 'top1')}); `arcface-balanced` is the tail's best "
        f"({vs('arcface-balanced')}) at {vs('arcface-balanced', 'top1')} top-1. The two-stage "
        f"schedule adds {vs('twostage')}: on frozen features its first stage learns no "
        "representation, so it is only a short balanced touch-up of the plain head."
    )


def longtail_settings(record: dict) -> str:
    """A long-tail record's training settings: lr and epochs, and what else it has."""
    parts = [f"lr {record['lr']:g}, {record['epochs']} epochs"]
    if record.get("stage2_epochs"):
        parts.append(f"then balanced lr {record['stage2_lr']:g}, {record['stage2_epochs']} epochs")
    if record.get("scale") is not None:
        parts.append(f"s = {record['scale']:g}, m = {record['margin']:g}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- page


def render(records: list[dict], anchors: dict[str, str]) -> str:
    rows, measured_twice, costs = build_rows(records)
    out = [
        "## Results: which method to use",
        "",
        "Generated by `python benchmarks/results.py` from the run records in "
        "`benchmarks/records/` (do not edit by hand; the history of experiments below has "
        "each table's full command and the reasoning).",
        "",
        "**Common settings** (every row unless its `settings that differ` cell says otherwise): "
        f"EfficientNet-Lite0 (timm `{LITE0}`, ImageNet weights) fine-tuned at "
        f"{COMMON_SIZE} px for {COMMON_EPOCHS} epochs, AdamW lr 2e-3 (heads 5x, weight decay "
        "0.01), cosine schedule with half an epoch of warm-up, batch 32, label smoothing 0.1, "
        "the project's default augmentation (synthetic: no mirror, crops of 0.7-1), all of "
        "train (no validation split), scored on the set's whole test split (centre crop, no "
        "TTA); the project's 2-core development machine, CPU only (1-2 torch threads), no GPU. "
        "Seeds 0, 1, 2 unless the `seeds` cell says otherwise.",
        "",
        "**How to read the columns.** `test top-1 %`: mean ± sample standard deviation over "
        "the seeds. `vs baseline, paired`: the mean over the seeds both have of (row - "
        "baseline), each seed against the baseline run of the same seed, and how many seeds "
        "are higher; with one image of the test split worth 0.1 (cars66) to 0.6 (synthetic) "
        "points, a difference inside the seeds' spread is not a result. `training cost`: a "
        "training step's time against the baseline's (`method_cost.py`: random 128 px batches "
        "of 32, one CPU thread), or three trainings for an ensemble. `inference cost`: the "
        "saved model's time per image against the baseline's (`method_cost.py`), or CPU time "
        "per test image with TTA or an ensemble (`tta_ensemble.py`). Blank: not measured. "
        "`test ECE`: expected calibration error on the test split (15 bins), mean over the "
        "seeds, where recorded. `command`: makes the row (`DATA`: the folder of the real sets; "
        "`RUNS`: accuracy.py's `--out` holding the baseline runs).",
        "",
    ]
    for name, text in SETS:
        members = [r for r in rows.values() if VARIANT_OF.get(r.dataset, r.dataset) == name]
        counts = next(
            (
                (r["train_images"], r["test_images"])
                for r in records
                if r.get("dataset") == name
                and r.get("train_images")
                and r.get("val_fraction", 0) == 0
            ),
            COUNTS.get(name),
        )
        size = f" {counts[0]:,} train / {counts[1]:,} test images." if counts else ""
        out += [f"### {name}", "", f"{text[0].upper()}{text[1:]}.{size}", ""]
        tail = longtail_lines(records, name, anchors)
        if not members:
            finetuned = bool(longtail_runs(records, name, "fine-tuned"))
            out += [
                f"No {'`accuracy.py` ' if finetuned else 'fine-tuning ' if tail else ''}runs "
                "yet. The first one: "
                f"`python benchmarks/accuracy.py --methods baseline --datasets {name} --seeds "
                "0 1 2 --data-root DATA` (it records mean per-class accuracy too, the figure to "
                "read on a long-tailed set).",
                "",
                *tail,
            ]
            continue
        # Best mean first (to 0.001, under float32 noise); at the same mean, more seeds first.
        main = sorted(
            (r for r in members if is_common(r)),
            key=lambda r: (-round(r.mean, 3), -len(r.seeds), label(r.key)),
        )
        other = sorted(
            (r for r in members if not is_common(r)),
            key=lambda r: (training_settings(r), -r.mean, label(r.key)),
        )
        notes: list[str] = []
        if main:
            table, cost_notes = leaderboard(main, rows, costs, anchors)
            out += [table, ""]
            notes += cost_notes
        if other:
            table, cost_notes = leaderboard(other, rows, costs, anchors)
            out += [
                f"Other training settings on {name} (each row against the baseline at its own "
                "settings where there is one, else the common one; grouped by settings):",
                "",
                table,
                "",
            ]
            notes += [n for n in cost_notes if n not in notes]
        twice = [n for n in measured_twice if VARIANT_OF.get(n.split()[0], n.split()[0]) == name]
        if twice:
            notes += ["Measured twice with different figures: " + " ".join(twice)]
        out += [n + "\n" for n in notes]
        out += tail
    out += guide(rows, costs, anchors, longtail_advice(records, anchors))
    out += glossary(rows)
    out += ["", *scale_section(records)]
    return "\n".join(out).rstrip() + "\n"


def glossary(rows: dict[tuple, Row]) -> list[str]:
    entries = sorted({r.entry for r in rows.values()})
    lines = ["### What the entries are", ""]
    lines += [f"- `{e}`: {ENTRY_TEXT[e]}." if e in ENTRY_TEXT else f"- `{e}`." for e in entries]
    lines += [
        "",
        "Details of each method, its options and what explain shows: `docs/methods.md`.",
    ]
    return lines


def guide(
    rows: dict[tuple, Row], costs: list[dict], anchors: dict[str, str], longtail: str = ""
) -> list[str]:
    """Which method for which data, every figure taken from the rows above (`longtail`: the
    long-tailed sets' line, from longtail.py's records)."""

    def row(dataset, entry, tta=None, ensemble=None, size=COMMON_SIZE, epochs=COMMON_EPOCHS,
            backbone=LITE0):  # fmt: skip
        tta = tta or DEFAULT_TTA.get(entry, "none")
        key = (dataset, entry, tta, ensemble, backbone, size, epochs, 0.0)
        if key not in rows:
            raise SystemExit(f"results.py guide: no records for {key}; update the guide")
        return rows[key]

    def acc(r: Row) -> str:
        return one_decimal(r.mean) + (f" ± {one_decimal(r.sd)}" if r.sd is not None else "")

    def vs(r: Row) -> str:
        ref, _ = reference_of(r, rows)
        return versus(r, ref).split(" ", 1)[0]

    def cost(r: Row, which: int) -> str:
        cell = cost_cells(r, costs, {})[which]
        return cell.rstrip("†")

    def see(*sections: str) -> str:
        return " (" + ", ".join(link(f"`{s}`", s, anchors) for s in sections) + ")"

    def best(dataset: str, exclude=("baseline",)) -> Row:
        candidates = [
            r
            for r in rows.values()
            if r.dataset == dataset and is_common(r) and r.entry not in exclude
            and len(r.seeds) >= 3 and not r.ensemble and r.tta == DEFAULT_TTA.get(r.entry, "none")
        ]  # fmt: skip
        return max(candidates, key=lambda r: r.mean)

    base = {s: row(s, "baseline") for s in ("cars66", "flowers12", "butterflies10", "synthetic")}
    strong = {s: row(s, "strong") for s in ("cars66", "flowers12", "butterflies10")}
    full_tta = row("cars66", "baseline", tta="flip,five_crop,scales=128+160")
    ensemble = row("cars66", "baseline", ensemble="equal")
    arcface = row("cars66", "arcface")
    ramstrans_cars = row("cars66", "ramstrans")
    near = {s: best(s) for s in ("flowers12", "butterflies10")}
    synth = [row("synthetic", e) for e in ("ramstrans", "tasn-mean", "dcl", "stn")]
    meta = row("synthetic-meta", "fusion", size=64)
    sets = ("cars66", "flowers12", "butterflies10")
    lines = [
        "### Which method for which data",
        "",
        "- **Default for a real set: the strong recipe** (`configs/<set>/strong-lite0.yaml`; "
        "copy one for a new set). It trains at the baseline's cost "
        f"({cost(strong['cars66'], 0)}), predicts at {cost(strong['cars66'], 1)} (two views a "
        "test image), and was never below the baseline by more than the seeds' spread: "
        + ", ".join(f"{s} {vs(strong[s])}" for s in sets)
        + ".",
        "- **Many close classes, far from the ceiling (cars66):** the strong recipe gains most "
        f"there: {acc(strong['cars66'])} against the baseline's {acc(base['cars66'])}, "
        f"{versus(strong['cars66'], base['cars66'])}; the ArcFace head alone gives "
        f"{vs(arcface)}. More accuracy for more inference: the full TTA "
        f"`flip,five_crop,scales=128+160` on the baseline reaches {acc(full_tta)} at "
        f"{cost(full_tta, 1)} the inference; an equal-weight ensemble of three seeds "
        f"{acc(ensemble)} at 3x the training and {cost(ensemble, 1)} the inference. "
        f"`ramstrans` (CAM zoom) gave {acc(ramstrans_cars)} on {len(ramstrans_cars.seeds)} "
        f"seeds at {cost(ramstrans_cars, 0)} the training: worth a third seed, not yet a result.",
        f"- **Near the ceiling (flowers12 {acc(base['flowers12'])}, butterflies10 "
        f"{acc(base['butterflies10'])} for the baseline): little to gain.** The best "
        f"three-seed methods are `{near['flowers12'].entry}` on flowers12 "
        f"({vs(near['flowers12'])}) and `{near['butterflies10'].entry}` on butterflies10 "
        f"({vs(near['butterflies10'])}), a few test images either way. The strong recipe's "
        "probabilities are better calibrated: test ECE "
        f"{strong['flowers12'].ece} against {base['flowers12'].ece} (flowers12), "
        f"{strong['butterflies10'].ece} against {base['butterflies10'].ece} (butterflies10).",
        "- **Small parts anywhere in clutter (synthetic): zoom and part methods win.** "
        + ", ".join(f"`{r.entry}` {acc(r)} ({vs(r)})" for r in synth)
        + f" against the baseline's {acc(base['synthetic'])}, at "
        + ", ".join(f"{cost(r, 0)}" for r in synth)
        + " the baseline's training cost. Most do not carry over to cars66 "
        f"(`tasn-mean` {vs(row('cars66', 'tasn-mean'))}, `stn` {vs(row('cars66', 'stn'))}; "
        "`dcl` was not run there); `ramstrans` is the one to check (above).",
        "- **Images with a place and a date:** metadata fusion. On synthetic at 64 px "
        f"`fusion` gives {acc(meta)}, {vs(meta)} over the image-only model"
        + see("accuracy-heads")
        + ".",
        longtail
        or "- **Long-tailed sets (fish23): not measured yet.** Start with the baseline and read "
        "mean per-class accuracy beside top-1.",
        "- **Few labels and many unlabelled images:** see the semi-supervised strategies"
        + see("semi")
        + " (5 labels a class: a different task from these leaderboards).",
        "",
        "What lost, and why (one line each; the history has the detail):",
        "",
        f"- `dcn` (cars66 {vs(row('cars66', 'dcn'))}): underfits in 5 epochs, and at 15"
        + see("accuracy-attention", "accuracy-attention-long")
        + ".",
        f"- `racnn` (cars66 {vs(row('cars66', 'racnn'))}): its attention proposal lands on a "
        "bound, the whole image or a corner square, the same for every image"
        + see("accuracy-attention", "learned-views")
        + ".",
        f"- `twostage` (cars66 {vs(row('cars66', 'twostage'))}): with frozen norms AdamW does "
        "not learn at 2e-3 and learns slowly at 2e-4; without them (`twostage-bn`, "
        f"{vs(row('cars66', 'twostage-bn'))} on seed 0) the head-only epoch still costs more "
        "than class-balanced sampling returns on these balanced sets"
        + see("accuracy-finetune", "accuracy-finetune-fixes")
        + ".",
        f"- `layerdecay` (cars66 {vs(row('cars66', 'layerdecay'))}; 0.95: "
        f"{vs(row('cars66', 'layerdecay-095'))}): in 5 epochs the lower layers' adaptation "
        "is worth more than keeping their ImageNet features"
        + see("accuracy-finetune", "accuracy-finetune-fixes")
        + ".",
        f"- `tasn` with the squared structure map (cars66 {vs(row('cars66', 'tasn'))}, seed 0): "
        "warps a car too hard at 128 px without zoom headroom"
        + see("accuracy-tasn", "tasn-test-sampler")
        + ".",
        f"- `stn-pretrained-lr001` (cars66 {vs(row('cars66', 'stn-pretrained-lr001'))}) and "
        f"`stn-views` (cars66 {acc(row('cars66', 'stn-views', size=256))} at 256 px): the "
        "views change with the image but do not help; with 256 px inputs they wandered "
        "rather than zoomed in" + see("learned-views", "accuracy-stn-views") + ".",
        f"- `se`, `sk`, `cbam`, `stn` (cars66 {vs(row('cars66', 'se'))}, "
        f"{vs(row('cars66', 'sk'))}, {vs(row('cars66', 'cbam'))}, {vs(row('cars66', 'stn'))}): "
        "inside the seeds' spread on every real set; the blocks' gates stay near zero and the "
        "STN's warp near the identity" + see("accuracy-attention", "learned-views") + ".",
        f"- `cropfusion` (synthetic, 64 px, seed 0: "
        f"{vs(row('synthetic', 'cropfusion', size=64))}): the crop is resampled from the "
        "64 px input, so it adds no pixels, and its box comes from a head trained 5 epochs"
        + see("accuracy-cropfusion", "accuracy-cropfusion-os16")
        + ".",
        f"- `ramstrans-hybrid` with alpha 1.3 "
        f"({vs(row('synthetic', 'ramstrans-hybrid', backbone='vit_tiny_lite0_s16'))} against "
        "`hybrid`): its crops are one or two attention cells; alpha 1.0 "
        f"({vs(row('synthetic', 'ramstrans-hybrid-a1', backbone='vit_tiny_lite0_s16'))}) "
        "fixes it" + see("accuracy-ramstrans-hybrid") + ".",
        "",
    ]
    return lines


# ----------------------------------------------------------------------------- the doc


def github_anchors(text: str) -> dict[str, str]:
    """Each `<!-- name:start -->` section's anchor: its first heading, as GitHub slugs it."""
    anchors, seen, fenced = {}, {}, False
    pending = None
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        marker = re.fullmatch(r"<!-- ([a-z0-9-]+):start -->", line.strip())
        heading = None if fenced or marker else re.match(r"#{1,6} (.*)", line)
        if marker:
            pending = marker.group(1)
        elif heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            slug = slug if count == 0 else f"{slug}-{count}"
            if pending:
                anchors[pending] = slug
            pending = None
        elif line.strip():
            pending = None
    return anchors


def splice(doc: str, text: str) -> str:
    """The doc with its results section replaced (or put before the first section)."""
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    cut = min(i for i in (doc.find("\n## "), doc.find("\n<!-- "), len(doc)) if i >= 0)
    return doc[:cut].rstrip() + "\n\n" + block + "\n" + doc[cut:]


def current_block(doc: str) -> str | None:
    match = re.search(rf"<!-- {SECTION}:start -->\n(.*?)\n<!-- {SECTION}:end -->", doc, re.S)
    return match.group(1) if match else None


def generate(doc: str, records: list[dict]) -> str:
    """The whole doc with the results section as the records give it."""
    draft = splice(doc, render(records, {}))  # headings first, then the links to them
    return splice(doc, render(records, github_anchors(draft)))


def check(doc_path: Path = DOC, records_dir: Path = RECORDS) -> list[str]:
    """Differences between the doc's results section and what the records give (none: [])."""
    doc = doc_path.read_text()
    want = current_block(generate(doc, read_records(records_dir)))
    have = current_block(doc) or ""
    return list(
        difflib.unified_diff(
            have.splitlines(), want.splitlines(), "docs (results)", "records", lineterm=""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the section is stale")
    parser.add_argument("--print", action="store_true", help="print the section; write nothing")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--records", type=Path, default=RECORDS)
    args = parser.parse_args()
    if args.check:
        diff = check(args.doc, args.records)
        if diff:
            print("\n".join(diff))
            raise SystemExit(
                f"{args.doc}: the results section differs from {args.records}; "
                "run python benchmarks/results.py"
            )
        print(f"{args.doc}: the results section matches {args.records}")
        return
    doc = args.doc.read_text()
    new = generate(doc, read_records(args.records))
    if args.print:
        print(current_block(new))
    elif new != doc:
        args.doc.write_text(new)
        print(f"wrote the results section of {args.doc}")
    else:
        print(f"{args.doc}: the results section is up to date")


if __name__ == "__main__":
    main()
