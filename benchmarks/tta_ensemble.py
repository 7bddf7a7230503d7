"""Test-time augmentation and ensembles of 3 seeds against one plain model, on trained runs.

For each set, the three seeds' model directories (`<runs>/<set>-baseline-s<seed>`) are run
on their test split: plain, and with each `--tta` spec, through the Predictor (the inference
path every command uses). Probabilities are cached under `--out` (safetensors + JSON), so an
interrupted benchmark keeps what it measured and `--table-only` rewrites the table.

Ensembles combine the seeds' plain probabilities. Weights must be fitted on images the
members did not train on; when the runs were trained without a validation split
(data.val_fraction=0, as the recorded baseline runs were), the test split is cross-fitted
instead: split in two stratified halves, weights fitted on one half with the same search as
`lookcloser ensemble fit` (ensemble.fit_weights) and scored on the other, then the halves
swapped; every test image is scored by weights that never saw it. "Best single" is the seed
with the best top-1 on the fitting half, scored on the other half the same way. Runs with a
validation split are fitted on it, as `lookcloser ensemble fit` does.

Costs: CPU seconds of the Predictor (one thread, image decoding included; wall time on a
shared machine measures the other jobs) on the first `--cost-images` test
images of each of `--cost-sets`, plain, with each TTA spec and as the equal-weight ensemble,
in interleaved rounds; the medians as ratios to the plain model.

When it writes its section it also appends records to benchmarks/records/tta.jsonl (each
seed's top-1 with each TTA spec, the ensembles' top-1, the inference cost ratios per set; the
plain members' own figures only when they were trained here, with a validation split:
accuracy.py recorded the others), which benchmarks/results.py puts in the leaderboards.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tta_ensemble.py --runs /work/bench-tasn \\
        --sets synthetic flowers12 butterflies10 cars66 --tta flip
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from report import append_records, machine, markdown_table, write_section  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lookcloser.config import Config  # noqa: E402
from lookcloser.data.prepare import prepare_data  # noqa: E402
from lookcloser.ensemble import fit_weights, score  # noqa: E402
from lookcloser.predictor import Predictor  # noqa: E402

PLAIN = "none"


def slug(spec: str) -> str:
    return spec.replace(",", "_").replace("=", "-").replace("+", "-")


def member_outputs(
    run: Path, split: str, spec: str, cache: Path, samples_of
) -> tuple[np.ndarray, np.ndarray, float]:
    """(N x C probabilities, N labels, seconds) of one run on one split with one TTA spec."""
    key = cache / f"{run.name}-{split}-{slug(spec)}"
    if key.with_suffix(".json").exists():
        tensors = load_file(str(key.with_suffix(".safetensors")))
        seconds = json.loads(key.with_suffix(".json").read_text())["seconds"]
        return tensors["probs"].numpy(), tensors["labels"].numpy(), seconds
    predictor = Predictor.load(run, tta=spec)
    samples = samples_of(run, split)
    start = time.perf_counter()
    out = predictor.run_samples(samples, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    probs = out.logits.float().softmax(dim=1)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"probs": probs, "labels": out.labels}, str(key.with_suffix(".safetensors")))
    record = {
        "run": str(run),
        "split": split,
        "tta": spec,
        "seconds": seconds,
        "images": len(samples),
    }
    key.with_suffix(".json").write_text(json.dumps(record) + "\n")
    print(f"{run.name} {split} tta={spec}: {seconds:.1f} s, {len(samples)} images", flush=True)
    return probs.numpy(), out.labels.numpy(), seconds


def cost_ratios(runs: list[Path], samples, specs: list[str], rounds: int = 3) -> dict[str, float]:
    """CPU seconds per image of one plain model, and each TTA spec's and the 3-seed
    ensemble's CPU time as a ratio to it: medians of `rounds` interleaved passes over the same
    images."""
    from lookcloser.ensemble import EnsemblePredictor

    variants = {PLAIN: Predictor.load(runs[0], tta=PLAIN)}
    variants.update({spec: Predictor.load(runs[0], tta=spec) for spec in specs})
    members = [Predictor.load(r, tta=PLAIN) for r in runs]
    variants["ensemble"] = EnsemblePredictor(members, [1 / len(runs)] * len(runs))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, predictor in variants.items():
            # CPU time of this (single-threaded) process: what the work costs, whatever else
            # the machine runs meanwhile (wall time on a shared machine measures the others).
            start = time.process_time()
            predictor.run_samples(samples, batch_size=32, progress=False)
            times[name].append(time.process_time() - start)
    plain = statistics.median(times[PLAIN])
    ratios = {name: statistics.median(t) / plain for name, t in times.items()}
    return {**ratios, "plain_seconds_per_image": plain / len(samples)}


class Splits:
    """The val and test samples of a run, from its saved config (the split it trained beside)."""

    def __init__(self) -> None:
        self.cache: dict[str, object] = {}

    def __call__(self, run: Path, split: str):
        cfg = Config.from_dict(json.loads((run / "model.json").read_text())["config"])
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in self.cache:
            # Not decoded again: the run verified every image when it trained (the splits are
            # the same when none is bad, and a bad one would fail the pass below).
            data = replace(cfg.data, unlabelled=None, verify_images=False)
            self.cache[key] = prepare_data(data)
        return getattr(self.cache[key], split)


def halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two stratified halves of the indices (each class split as evenly as it can be)."""
    rng = np.random.default_rng(seed)
    first = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first += members[: (len(members) + rng.integers(0, 2)) // 2].tolist()
    a = np.zeros(len(labels), dtype=bool)
    a[first] = True
    return np.flatnonzero(a), np.flatnonzero(~a)


def cross_fitted(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Test top-1 of fitted weights and of the best single member, each half of the test split
    scored with what was chosen on the other half."""
    correct = {"fitted": 0, "best_single": 0}
    weights = []
    for fit_on, score_on in (halves(labels, seed), halves(labels, seed)[::-1]):
        fit = fit_weights(probs[:, fit_on], labels[fit_on], seed=seed)
        weights.append(fit.weights)
        correct["fitted"] += score(np.array(fit.weights), probs[:, score_on], labels[score_on])[
            "correct"
        ]
        best = max(
            range(len(probs)),
            key=lambda i: (fit.member_scores[i]["correct"], -fit.member_scores[i]["log_loss"]),
        )
        correct["best_single"] += score(
            np.eye(len(probs))[best], probs[:, score_on], labels[score_on]
        )["correct"]
    return {
        **{k: v / len(labels) for k, v in correct.items()},
        "weights": weights,
    }


def val_fitted(runs: list[Path], out: Path, test: np.ndarray, test_labels) -> dict[str, float]:
    """Test top-1 of the weights `lookcloser ensemble fit` finds on the members' validation
    split, and of the seed best on that split."""
    from lookcloser import api

    target = out / "ensembles" / runs[0].name.rsplit("-s", 1)[0]
    if target.exists():
        shutil.rmtree(target)
    result = api.fit_ensemble(runs, target, progress=False)
    members = result.validation["members"]
    best = max(range(len(runs)), key=lambda i: (members[i]["correct"], -members[i]["log_loss"]))
    return {
        "fitted": score(np.array(result.weights), test, test_labels)["top1"],
        "best_single": score(np.eye(len(runs))[best], test, test_labels)["top1"],
        "weights": [result.weights],
    }


def train_missing(args) -> None:
    """Train the runs that are missing with the accuracy benchmark's baseline recipe, carving
    `--val-fraction` of train for validation (the split ensemble weights are fitted on)."""
    from accuracy import COMMON, DATASETS, METHODS

    from lookcloser import api

    for name in args.sets:
        for seed in args.seeds:
            out = args.runs / f"{name}-baseline-s{seed}"
            if (out / "model.json").is_file():
                continue
            root = args.runs / "synthetic-data" if name == "synthetic" else args.data_root / name
            overrides = [
                *COMMON,
                *DATASETS[name],
                *METHODS["baseline"],
                f"data.val_fraction={args.val_fraction}",
                "data.image_size=128",
                "trainer.epochs=5",
                f"seed={seed}",
                f"data.root={root}",
                f"out={out}",
                "overwrite=true",
            ]
            start = time.perf_counter()
            api.train(overrides=overrides, progress=False)
            print(f"trained {out} in {time.perf_counter() - start:.0f} s", flush=True)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} (one seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def measure(args) -> list[dict]:
    splits = Splits()
    rows = []
    for name in args.sets:
        runs = [args.runs / f"{name}-baseline-s{seed}" for seed in args.seeds]
        missing = [str(r) for r in runs if not (r / "model.json").is_file()]
        if missing:
            print(f"{name}: skipped, no model directory at {', '.join(missing)}", file=sys.stderr)
            continue
        has_val = all(len(splits(r, "val")) > 0 for r in runs)
        info = json.loads((runs[0] / "model.json").read_text())
        config = info["config"]
        row: dict = {"set": name, "seeds": list(args.seeds), "tta": {}, "seconds": {}}
        row["settings"] = {
            "backbone": config["model"]["backbone"],
            "size": config["data"]["image_size"],
            "epochs": config["trainer"]["epochs"],
            "val_fraction": config["data"]["val_fraction"],
            "train_images": info["data"]["train_images"],
        }
        plain = [member_outputs(r, "test", PLAIN, args.out / "cache", splits) for r in runs]
        labels = plain[0][1]
        row["images"] = len(labels)
        row["classes"] = plain[0][0].shape[1]
        row["single"] = [score(np.ones(1), p[None], labels)["top1"] for p, _, _ in plain]
        row["seconds"][PLAIN] = [s for _, _, s in plain]
        for spec in args.tta:
            # Computed for --tta-seeds of sets not in --tta-skip; read wherever cached.
            chosen = [
                (seed, r)
                for seed, r in zip(args.seeds, runs, strict=True)
                if (args.out / "cache" / f"{r.name}-test-{slug(spec)}.json").exists()
                or (name not in args.tta_skip and (not args.tta_seeds or seed in args.tta_seeds))
            ]
            if not chosen:
                continue
            outs = [member_outputs(r, "test", spec, args.out / "cache", splits) for _, r in chosen]
            row["tta"][spec] = [score(np.ones(1), p[None], labels)["top1"] for p, _, _ in outs]
            row["tta_seeds"] = {**row.get("tta_seeds", {}), spec: [seed for seed, _ in chosen]}
            row["seconds"][spec] = [s for _, _, s in outs]
        if name in (args.cost_sets or args.sets):
            test = splits(runs[0], "test")[: args.cost_images]
            row["cost"] = cost_ratios(runs, test, args.tta)
        probs = np.stack([p for p, _, _ in plain])
        row["ensemble_equal"] = score(np.full(len(runs), 1 / len(runs)), probs, labels)["top1"]
        if has_val:
            fitted = val_fitted(runs, args.out, probs, labels)
            row["fitted_on"] = f"validation split ({len(splits(runs[0], 'val'))} images)"
        else:
            fitted = cross_fitted(probs, labels)
            row["fitted_on"] = "test halves, cross-fitted"
        row.update(
            ensemble_fitted=fitted["fitted"],
            best_single=fitted["best_single"],
            weights=fitted["weights"],
        )
        rows.append(row)
    return rows


def tables(rows: list[dict], specs: list[str]) -> str:
    header = ["set", "test images", "single (3 seeds)"]
    header += [f"+TTA `{s}`" for s in specs]
    header += ["ensemble, equal", "ensemble, fitted", "best single", "fitted on"]
    accuracy = []
    for r in rows:
        line = [r["set"], str(r["images"]), mean_sd([100 * t for t in r["single"]])]
        for s in specs:
            if s not in r["tta"]:
                line.append("not run")
            elif len(r["tta"][s]) == 1:
                seed = r["tta_seeds"][s][0]
                single = 100 * r["single"][r["seeds"].index(seed)]
                line.append(f"{100 * r['tta'][s][0]:.1f} (seed {seed} only; plain {single:.1f})")
            else:
                line.append(mean_sd([100 * t for t in r["tta"][s]]))
        line += [
            f"{100 * r['ensemble_equal']:.1f}",
            f"{100 * r['ensemble_fitted']:.1f}",
            f"{100 * r['best_single']:.1f}",
            r["fitted_on"],
        ]
        accuracy.append(line)
    cost_header = ["set", "one plain model (CPU s / image)"]
    cost_header += [f"TTA `{s}`" for s in specs] + ["ensemble of 3"]
    cost = []
    for r in rows:
        c = r.get("cost")
        if c is None:
            continue
        line = [r["set"], f"{c['plain_seconds_per_image']:.3f}"]
        line += [f"{c[s]:.1f}x" if s in c else "not run" for s in specs]
        line.append(f"{c['ensemble']:.1f}x")
        cost.append(line)
    return (
        "Test top-1 % (mean ± sd over the seeds where a column has one per seed):\n\n"
        + markdown_table(header, accuracy)
        + "\n\nInference cost as a ratio to one plain model: CPU time of the process (one "
        "torch thread), medians of 3 interleaved passes over the same test images (seed 0; "
        "image decoding included; the ensemble runs its "
        "members one after another; a TTA spec is timed even where its accuracy was not "
        "measured):\n\n" + markdown_table(cost_header, cost)
    )


def run_records(rows: list[dict], section: str, command: str) -> list[dict]:
    """The records of a measurement for benchmarks/records/ (results.py's input): numbers and
    names only. Rows measured before `settings` was kept give none."""
    records = []
    for r in rows:
        if "settings" not in r:
            print(f"{r['set']}: no settings in this measurement, not recorded", file=sys.stderr)
            continue
        common = {
            "script": "tta_ensemble.py",
            "dataset": r["set"],
            "entry": "baseline",
            "test_images": r["images"],
            "classes": r["classes"],
            **r["settings"],
            "section": section,
            "command": command,
        }
        run = {"kind": "run", **common}
        if r["settings"]["val_fraction"]:  # members trained here (--train): new runs
            records += [
                {**run, "tta": "none", "seed": seed, "top1": top1}
                for seed, top1 in zip(r["seeds"], r["single"], strict=True)
            ]
        for spec, values in r["tta"].items():
            records += [
                {**run, "tta": spec, "seed": seed, "top1": top1}
                for seed, top1 in zip(r["tta_seeds"][spec], values, strict=True)
            ]
        for weights, top1 in (("equal", r["ensemble_equal"]), ("fitted", r["ensemble_fitted"])):
            records.append(
                {
                    **run,
                    "tta": "none",
                    "ensemble": weights,
                    "seed": None,
                    "seeds": r["seeds"],
                    "top1": top1,
                    "fitted_on": r["fitted_on"] if weights == "fitted" else None,
                }
            )
        cost = {
            "kind": "cost",
            **{k: v for k, v in common.items() if k not in ("test_images", "classes")},
        }
        cost.pop("train_images", None)
        # Training, by construction: TTA reuses the models, an ensemble trains three.
        general = {**cost, "dataset": None}
        records += [
            {**general, "tta": spec, "training_cost": 1.0, "how": "the same models"}
            for spec in r["tta"]
        ]
        records += [
            {
                **general,
                "tta": "none",
                "ensemble": weights,
                "training_cost": float(len(r["seeds"])),
                "how": f"{len(r['seeds'])} trainings",
            }
            for weights in ("equal", "fitted")
        ]
        how = "CPU time per test image against one plain model (one torch thread)"
        for spec, ratio in (r.get("cost") or {}).items():
            if spec in ("plain_seconds_per_image", PLAIN):
                continue
            if spec == "ensemble":
                records += [
                    {
                        **cost,
                        "tta": "none",
                        "ensemble": weights,
                        "inference_cost": ratio,
                        "how": how + "; timed with equal weights",
                    }
                    for weights in ("equal", "fitted")
                ]
            else:
                records.append({**cost, "tta": spec, "inference_cost": ratio, "how": how})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of <set>-baseline-s<seed>")
    parser.add_argument("--sets", nargs="+", default=["synthetic", "flowers12", "butterflies10"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tta", nargs="*", default=["flip"], help="TTA specs to measure")
    parser.add_argument("--tta-skip", nargs="*", default=[], help="sets to leave TTA out for")
    parser.add_argument(
        "--tta-seeds", nargs="*", type=int, default=[], help="seeds TTA is run for (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tta-ensemble"))
    parser.add_argument("--section", default="tta-ensemble")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--cost-images", type=int, default=48, help="test images timed")
    parser.add_argument("--cost-sets", nargs="*", default=[], help="sets timed (default: all)")
    parser.add_argument(
        "--train",
        action="store_true",
        help="train missing runs first (accuracy.py's baseline recipe with a validation split)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="with --train")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=os.environ.get("LOOKCLOSER_DATA"),
        help="with --train: folder of the real sets (default: $LOOKCLOSER_DATA)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="write the section from <out>/results.json (the last measurement); run nothing",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    command = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tta_ensemble.py " + " ".join(
        a for a in sys.argv[1:] if a not in ("--table-only", "--no-write")
    )
    if args.table_only:
        saved = json.loads(results.read_text())
        rows, command, args.tta = saved["rows"], saved["command"], saved["tta"]
    else:
        if args.train:
            train_missing(args)
        rows = measure(args)
        record = {"command": command, "tta": args.tta, "rows": rows}
        results.write_text(json.dumps(record, indent=2) + "\n")
    text = (
        "## Test-time augmentation and ensembles (EfficientNet-Lite0 baselines, 128 px)\n\n"
        f"Command: `{command}`. Machine: {machine()}, shared with other jobs. Members: the three seeds of a set's baseline runs. "
        "Ensemble weights (scipy differential evolution, top-1 then log-loss: "
        "`lookcloser ensemble fit`'s search) are fitted on the members' validation split "
        "where they have one; runs trained on all of train (the recorded baselines, "
        "data.val_fraction=0) have none, and there the test split is cross-fitted: two "
        "stratified halves, each scored with weights fitted on the other. `best single`: the "
        "seed best on the fitting data, scored on the test images it was not chosen on. TTA averages softmax "
        "probabilities over the views (`flip`: the image and its mirror; `five_crop`: corners "
        "and centre of the image resized to size / crop_pct; `scales`: the pipeline at each "
        "input size).\n\n" + tables(rows, args.tta)
    )
    print(text)
    if not args.no_write:
        write_section(args.section, text)
        append_records("tta", run_records(rows, args.section, command))


if __name__ == "__main__":
    main()
