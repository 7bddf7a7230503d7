"""Compare trained runs: one report with the leaderboard, cost, per-class differences and the
same test images explained by every method.

Runs are grouped into methods by their saved config (everything but the seed, the output
folder and settings that do not change the model, such as threads or progress bars); a
method's figures are the mean and the sample standard deviation over its runs (seeds). The
leaderboard's numbers are the runs' own `metrics.json`; per-class accuracy, disagreements
and the explained images come from each model's predictions on its test split, made through
the Predictor and cached in the report folder. Cost (parameters, FLOPs, images/s) is
measured here, in the same process, on one run of each method, the methods interleaved.

The report is `report.html` (images embedded, so it opens from file:// with no server),
`report.md` (the same tables, images beside it) and CSV files.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import re
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lookcloser.errors import ConfigError, DataError
from lookcloser.explain.overlay import literal_text
from lookcloser.fileio import atomic_write_bytes, atomic_write_text
from lookcloser.modeldir import is_model_dir, read_model_json
from lookcloser.records import RunRecord

log = logging.getLogger(__name__)

MARKER = ".lookcloser-compare"
# Config keys that do not change what a run learns: runs differing only in these are seeds
# of one method. (The seed itself is what varies within a method.)
NOT_METHOD_KEYS = (
    "seed",
    "out",
    "overwrite",
    "data.num_workers",
    "data.verify_images",
    "data.on_bad_image",
    "trainer.resume",
    "trainer.progress",
    "trainer.cpu_threads",
    "trainer.devices",
    "trainer.accelerator",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps",
    "trainer.deterministic",
)
METRICS = ("top1", "mean_per_class_accuracy", "ece")
METRIC_NAMES = {"top1": "top-1", "mean_per_class_accuracy": "mean per-class acc.", "ece": "ECE"}


@dataclass
class Run:
    """One trained run directory and what the report needs of it."""

    path: Path
    record: dict[str, Any]  # model.json
    recorded: dict[str, Any] | None  # metrics.json's test section, if any
    seed: int
    method: str
    key: str  # the group key: the config that defines the method
    flat_config: dict[str, str]
    group: str = ""
    # Filled by `evaluate_runs`: the run's record of its test split (top-K classes per image,
    # per-class counts: never its images x classes outputs), and its metrics computed here.
    outputs: RunRecord | None = None
    computed: dict[str, Any] = field(default_factory=dict)
    # Filled by `align_runs`: each test image's key (data.samples.image_key), and whether
    # the outputs are in the first run's image order (False: old shards matched by counts).
    keys: list[str] = field(default_factory=list)
    aligned: bool = True

    @property
    def name(self) -> str:
        return f"{self.group} s{self.seed}"

    @property
    def metrics(self) -> dict[str, Any]:
        """The run's own metrics.json figures, else the ones computed here."""
        return self.recorded if self.recorded is not None else self.computed

    @property
    def labels(self) -> np.ndarray:
        """Each test image's class."""
        return self._outputs.labels

    @property
    def paths(self) -> list[str]:
        """Each test image's path (or shard sample name)."""
        return self._outputs.paths

    @property
    def predictions(self) -> np.ndarray:
        """Each test image's top-1 class."""
        return self._outputs.predictions

    @property
    def per_class(self) -> np.ndarray:
        """Accuracy per class on the test split (NaN for a class with no test image)."""
        return self._outputs.per_class_accuracy

    @property
    def _outputs(self) -> RunRecord:
        if self.outputs is None:
            raise ValueError(f"{self.path}: not evaluated yet (evaluate_runs)")
        return self.outputs


@dataclass
class Group:
    """The runs of one method (same config, different seeds)."""

    label: str
    method: str
    runs: list[Run]
    cost: dict[str, float] = field(default_factory=dict)

    def values(self, metric: str) -> list[float]:
        return [float(r.metrics[metric]) for r in self.runs]

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values(metric))

    def spread(self, metric: str) -> float | None:
        """Sample standard deviation over the runs (None for a single run)."""
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def representative(self) -> Run:
        """The run whose model is timed and explained: the lowest seed."""
        return min(self.runs, key=lambda r: (r.seed, str(r.path)))

    @cached_property
    def per_class(self) -> np.ndarray:
        """Accuracy per class, mean over the runs (computed once: the runs are evaluated and
        aligned before they are grouped)."""
        with warnings.catch_warnings():  # a class without test images is NaN, as it should
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack([r.per_class for r in self.runs]), axis=0)


@dataclass
class CompareReport:
    """What `compare` wrote, and the groups it compared (reference first)."""

    out: Path
    html: Path
    markdown: Path
    csv: dict[str, Path]
    groups: list[Group]
    classes: list[str]
    notes: list[str]


# ---- reading runs ----------------------------------------------------------------------------
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return flat


def _method_config(record: dict[str, Any]) -> dict[str, str]:
    """The saved config, defaults filled in, with the method's full recorded options."""
    from lookcloser.config import Config

    try:
        config = Config.from_dict(record["config"]).to_dict()
    except Exception:  # a config from another lookcloser version: compare it as written
        config = dict(record["config"])
    method = {"name": record.get("trained_with") or record["method"]}
    config["method"] = {**method, **record.get("method_options", {})}
    return _flatten(config)


def read_run(path: str | Path) -> Run:
    """A finished run directory (model.json; metrics.json when it has one)."""
    from lookcloser.modeldir import backup_note
    from lookcloser.rundir import has_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"compare: {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"compare: {path} is not a folder; expected a run directory")
    if not is_model_dir(path):
        hint = (
            " (it has a checkpoint: finish it with `lookcloser train ... trainer.resume=last`)"
            if has_checkpoint(path)
            else ""
        )
        raise ConfigError(
            f"compare: {path} is not a finished run directory (no model.json); expected a "
            f"folder written by `lookcloser train`{hint}{backup_note(path)}"
        )
    record = read_model_json(path)
    recorded = None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            recorded = json.loads(metrics_file.read_text()).get("test")
        except json.JSONDecodeError as err:
            raise DataError(f"{metrics_file}: not valid JSON ({err})") from None
    if recorded is not None and not all(k in recorded for k in (*METRICS, "images")):
        missing = [k for k in (*METRICS, "images") if k not in recorded]
        raise DataError(f"{metrics_file}: the test section lacks {', '.join(missing)}")
    flat = _method_config(record)
    key = json.dumps({k: v for k, v in flat.items() if k not in NOT_METHOD_KEYS}, sort_keys=True)
    return Run(
        path=path,
        record=record,
        recorded=recorded,
        seed=int(record["config"].get("seed", 0)),
        method=json.loads(flat["method.name"]),
        key=key,
        flat_config=flat,
    )


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped into methods (reference first: the baseline, else the first given).

    Groups sharing a method name are told apart by the config keys whose values differ.
    """
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    groups = [Group("", members[0].method, members) for members in by_key.values()]
    for group in groups:
        same_name = [g for g in groups if g.method == group.method]
        label = group.method
        if len(same_name) > 1:
            mine = group.runs[0].flat_config
            keys = sorted(
                k
                for k in mine
                if k not in NOT_METHOD_KEYS
                and any(g.runs[0].flat_config.get(k) != mine[k] for g in same_name)
            )
            shown = [f"{k.removeprefix('method.')}={json.loads(mine[k])}" for k in keys[:3]]
            label += " (" + ", ".join(shown) + (", ..." if len(keys) > 3 else "") + ")"
        group.label = label
        for run in group.runs:
            run.group = label
    reference = next((g for g in groups if g.method == "baseline"), groups[0])
    return [reference, *[g for g in groups if g is not reference]]


# ---- predictions on the test split -----------------------------------------------------------
# 2: shard outputs carry their samples' names; 3: a RunRecord (top-K classes per image and
# the metrics of the same pass), no longer every logit (4 GB a run at 100k x 10k).
CACHE_VERSION = 3


def _cache_file(run: Run, cache: Path) -> Path:
    data = json.dumps(run.record["config"].get("data", {}), sort_keys=True)
    text = f"{run.record['weights']['sha256']}\n{data}\n{CACHE_VERSION}"
    digest = hashlib.sha256(text.encode()).hexdigest()
    return cache / f"{digest[:24]}.npz"


def _cached(run: Run, file: Path, max_images: int | None) -> RunRecord | None:
    """The run's cached record, if the file holds one that fits the run (else None)."""
    record = RunRecord.load(file, max_images)
    if record is None:
        return None
    wanted = ("images", *METRICS)
    if record.num_classes != len(run.record["classes"]) or not all(
        isinstance(record.metrics.get(k), int | float) for k in wanted
    ):
        log.warning("%s: ignored, rebuilt (a record of another run, or without its metrics)", file)
        return None
    return record


def evaluate_runs(
    runs: Sequence[Run],
    cache: Path,
    progress: bool,
    device: str = "cpu",
    tests: Sequence[TestSet] | None = None,
) -> list[str]:
    """Each run's record of its test split (from the cache, else one streamed pass through
    the Predictor: top-K classes per image and the metrics); `tests` (each run's listing)
    bounds what a cache file may hold. Returns notes on runs whose re-evaluation differs
    from their metrics.json."""
    from lookcloser.evaluation import StreamingMetrics, summary
    from lookcloser.scoring import stream_on_test

    cache.mkdir(parents=True, exist_ok=True)
    notes = []
    for i, run in enumerate(runs):
        file = _cache_file(run, cache)
        bound = len(tests[i].keys) if tests is not None else None
        record = _cached(run, file, bound)
        if record is None:
            _say(progress, f"evaluating {run.path} on its test split")
            predictor, stream = stream_on_test(run.path, progress=progress, device=device)
            counts = StreamingMetrics(predictor.classes)
            record = RunRecord.from_stream(stream, len(predictor.classes), observe=counts.update)
            record.metrics = summary(counts.compute())
            record.save(file)
        run.outputs, run.computed = record, dict(record.metrics)
        if run.recorded is not None:
            diff = abs(run.computed["top1"] - run.recorded["top1"])
            if run.computed["images"] != run.recorded["images"] or diff > 1e-6:
                notes.append(
                    f"{run.path}: re-evaluated here, top-1 {100 * run.computed['top1']:.2f} % on "
                    f"{run.computed['images']} images; its metrics.json says "
                    f"{100 * run.recorded['top1']:.2f} % on {run.recorded['images']} (the "
                    "leaderboard shows metrics.json; the rest of the report the re-evaluation)"
                )
    return notes


# ---- what each run was tested on: decided before anything is evaluated ------------------------
@dataclass
class TestSet:
    """A run's test split as its data lists it, read without a model: each image's key
    (`data.samples.image_key`: its class and its path below the class folder), in split order.
    """

    keys: list[str]
    by_name: dict[str, str]  # sample name (a file path, or a shard sample's name) -> key
    files: dict[str, str]  # key -> the image file (folders, CSVs)
    digests: dict[str, str]  # key -> sha256 of the packed bytes (shards not re-encoded)
    shards: dict[str, tuple[str, str]]  # key -> (shard, sample key) (shards)
    # Shards packed before records kept their relative path: keys from the source file name.
    legacy: bool = False

    def key(self, name: str, class_name: str) -> str:
        from lookcloser.data.samples import image_key

        return self.by_name.get(name) or image_key(name, class_name)


def read_test_set(run: Run) -> TestSet:
    """The test split `run`'s model.json names, listed as cheaply as the source allows: a
    folder scan or a CSV read; for shards, one pass over the test shards' records."""
    from lookcloser.config import Config
    from lookcloser.data.prepare import SHARDS
    from lookcloser.data.samples import image_key, root_folder

    cfg = Config.from_dict(run.record["config"], where=str(run.path / "model.json"))
    test = TestSet([], {}, {}, {}, {})
    if cfg.data.source == SHARDS:
        from lookcloser.data.shards import open_shards, shard_records

        index = open_shards(cfg.data.root)
        for record in shard_records(index, "test"):
            if record.label is None or record.label >= len(index.classes):
                raise DataError(f"{record.url}: sample {record.key}: no valid class index (.cls)")
            name, class_name = record.name, index.classes[record.label]
            key = image_key(name, class_name, "" if record.recorded else None)
            test.legacy = test.legacy or not record.recorded
            key = _add_key(test, key, name)
            test.shards[key] = (record.url, record.key)
            if index.reencoded is False and record.digest:
                test.digests[key] = record.digest
        return test
    from lookcloser.data.sources import build_source

    splits = build_source(cfg.data)
    paths = [s.path for s in splits.test]
    base = root_folder(cfg.data.root) if cfg.data.root else _common_folder(paths)
    for sample in splits.test:
        key = image_key(sample.path, splits.classes[sample.label], base)
        key = _add_key(test, key, sample.path)
        test.files[key] = sample.path
    return test


def _add_key(test: TestSet, key: str, name: str) -> str:
    # A second image of one key (the same name under two folders of one class): numbered.
    if key in test.files or key in test.shards:
        n = 2
        while f"{key}#{n}" in test.files or f"{key}#{n}" in test.shards:
            n += 1
        key = f"{key}#{n}"
    test.keys.append(key)
    test.by_name[name] = key
    return key


def _common_folder(paths: list[str]) -> str:
    import os

    try:
        common = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    except ValueError:
        return ""
    return os.path.dirname(common) if len(paths) == 1 else common


def check_comparable(runs: Sequence[Run]) -> tuple[list[TestSet], list[str]]:
    """Each run's test set and notes; a DataError naming what differs unless every run has
    the classes and the test images of the first (classes in another order are matched by
    name; images by class and path below the class folder, whatever the source: folder, CSV
    or shards). Classes are checked from model.json alone, before any data is listed."""
    first = runs[0]
    for run in runs[1:]:
        _check_classes(first, run)
    tests = []
    for run in runs:
        try:
            tests.append(read_test_set(run))
        except DataError as err:
            raise DataError(f"compare: {run.path}: its test split: {err}") from None
    notes: list[str] = []
    for run, other in zip(runs[1:], tests[1:], strict=True):
        notes += _check_images(first, tests[0], run, other)
    return tests, notes


def _check_classes(a: Run, b: Run) -> None:
    mine, theirs = list(a.record["classes"]), list(b.record["classes"])
    for have, lack, has, not_has in ((b, a, theirs, mine), (a, b, mine, theirs)):
        known = set(not_has)  # a set: at 10k classes a list scan per class is 10^8 steps
        extra = [c for c in has if c not in known]
        if extra:
            raise DataError(
                f"compare: {b.path} and {a.path} have different classes: {have.path} has "
                f"{extra[0]} ({len(has)} classes), {lack.path} does not ({len(not_has)} "
                "classes); compare runs trained on the same data"
            )


def _check_images(a: Run, test_a: TestSet, b: Run, test_b: TestSet) -> list[str]:
    """DataError naming one image that only one of two runs was tested on, or one image whose
    content differs; notes where old shards could be matched by counts only."""
    counts = f"({len(test_b.keys)} vs {len(test_a.keys)} test images)"
    where = f"compare: {b.path} and {a.path} were tested on different images"
    ka, kb = Counter(test_a.keys), Counter(test_b.keys)
    if ka != kb:
        if test_a.legacy or test_b.legacy:
            note = _match_by_counts(a, test_a, b, test_b)
            if note is not None:
                return [note]
        for have, lack, keys, other in ((b, a, test_b.keys, ka), (a, b, test_a.keys, kb)):
            extra = next((k for k in keys if k not in other), None)
            if extra is not None:
                raise DataError(
                    f"{where}: {have.path} has {extra}, {lack.path} does not {counts}; "
                    "compare runs with the same test split"
                )
    # The same names: check that a few are the same pictures (reading a handful of files).
    common = test_a.keys
    for key in common[:: max(1, len(common) // 8)][:8]:
        digests = {str(run.path): _digest(t, key) for run, t in ((a, test_a), (b, test_b))}
        known = {d for d in digests.values() if d}
        if len(known) > 1:
            raise DataError(
                f"{where}: {key} is another picture in {b.path} than in {a.path} (same names, "
                f"other contents) {counts}; compare runs with the same test split"
            )
    return []


def _digest(test: TestSet, key: str) -> str:
    """sha256 of one test image's bytes where they are at hand (a file; unaltered shards)."""
    if key in test.digests:
        return test.digests[key]
    path = test.files.get(key)
    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"{path}: cannot read a test image ({err.strerror or err})") from None


def _match_by_counts(a: Run, test_a: TestSet, b: Run, test_b: TestSet) -> str | None:
    """Old shards (no relative paths recorded) against another run: the same number of test
    images per class is all that can be checked. A note saying so, or None if they differ."""

    def per_class(test: TestSet) -> Counter:
        return Counter(k.split("/", 1)[0] for k in test.keys)

    if per_class(test_a) != per_class(test_b):
        return None
    b.aligned = False
    old = a if test_a.legacy else b
    return (
        f"{old.path}: its shards were packed before `data pack` recorded each image's relative "
        f"path (pack them again to compare image by image), so {b.path} was matched to "
        f"{a.path} by the number of test images per class only; the per-image parts of this "
        f"report (which pictures are shown, predictions.csv) leave {b.path}'s predictions out"
    )


def align_runs(runs: Sequence[Run], tests: Sequence[TestSet]) -> list[str]:
    """Put every run's outputs in the first run's class order and image order (by image key,
    not position: shards and folders list images in other orders); returns notes."""
    first_classes = list(runs[0].record["classes"])
    for run, test in zip(runs, tests, strict=True):
        classes = list(run.record["classes"])
        run.keys = [
            test.key(name, classes[int(label)])
            for name, label in zip(run.paths, run.labels, strict=True)
        ]
        if classes != first_classes:  # the same classes in another order: by name
            position = {name: i for i, name in enumerate(first_classes)}
            run.outputs = run._outputs.renumber(np.array([position[c] for c in classes]))
    aligned = [r for r in runs if r.aligned]
    if not runs[0].paths or any(not r.keys for r in aligned):
        return []
    shared = set(runs[0].keys).intersection(*(r.keys for r in aligned))
    notes = []
    left_out = [k for r in aligned for k in r.keys if k not in shared]
    if left_out:
        notes.append(
            f"{len(set(left_out))} test image(s) evaluated by only some of the runs (skipped "
            f"as unreadable by the others), e.g. {left_out[0]}, are left out of the per-image "
            "comparisons"
        )
    wanted = [k for k in runs[0].keys if k in shared]
    for run in aligned:
        position = {k: i for i, k in enumerate(run.keys)}
        order = np.array([position[k] for k in wanted], dtype=np.int64)
        run.outputs = run._outputs.take(order)
        run.keys = list(wanted)
    return notes


def picture_of(tests: Sequence[TestSet], key: str):
    """A test image by key, for explaining: a file of any run, else its bytes from shards."""
    for test in tests:
        if key in test.files and Path(test.files[key]).is_file():
            return test.files[key]
    for test in tests:
        if key in test.shards:
            from lookcloser.data.images import decode_bytes
            from lookcloser.data.shards import IMAGE_EXTS, iter_tar_samples

            url, sample_key = test.shards[key]
            for sample in iter_tar_samples(url):
                if sample["__key__"] == sample_key:
                    ext = next(e for e in IMAGE_EXTS if e in sample)
                    return decode_bytes(f"{url} ({sample_key}.{ext})", sample[ext])[0]
    raise DataError(f"compare: test image {key} not found in any run's data")


# ---- cost ------------------------------------------------------------------------------------
def measure_cost(
    predictors: Sequence, batch: int = 8, rounds: int = 3, seconds: float = 0.5
) -> list[dict[str, float]]:
    """Parameters, FLOPs per image and images/s of each Predictor, timed alternately.

    FLOPs are torch's FlopCounterMode count (convolutions and matrix products) of one image.
    images/s: `batch` random images at each model's input size, median of `rounds`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(batch, 3, p.image_size, p.image_size, generator=gen) for p in predictors]
    costs = []
    for predictor, images in zip(predictors, inputs, strict=True):
        counter = FlopCounterMode(display=False)
        with counter:
            predictor.logits(images[:1])
        costs.append(
            {
                "params": float(sum(p.numel() for p in predictor.method.parameters())),
                "flops": float(counter.get_total_flops()),
            }
        )
    iters = []
    for predictor, images in zip(predictors, inputs, strict=True):
        predictor.logits(images)  # warm-up
        start = time.perf_counter()
        predictor.logits(images)
        iters.append(max(1, round(seconds / max(time.perf_counter() - start, 1e-6))))
    rates: list[list[float]] = [[] for _ in predictors]
    for _ in range(rounds):
        for i, (predictor, images) in enumerate(zip(predictors, inputs, strict=True)):
            start = time.perf_counter()
            for _ in range(iters[i]):
                predictor.logits(images)
            rates[i].append(batch * iters[i] / (time.perf_counter() - start))
    for cost, rate in zip(costs, rates, strict=True):
        cost["images_per_s"] = statistics.median(rate)
    return costs


# ---- choosing and explaining images ------------------------------------------------------------
def _spread_classes(indices: list[int], labels: np.ndarray) -> list[int]:
    """The indices reordered so that successive ones come from different classes: each
    class's first image (in index order), then each class's second, and so on."""
    index = np.asarray(indices, dtype=np.int64)
    if not len(index):
        return []
    classes = np.asarray(labels)[index]
    by_class = np.argsort(classes, kind="stable")
    sorted_classes = classes[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
    # An image's rank among the images of its class before it.
    rank = np.empty(len(index), dtype=np.int64)
    rank[by_class] = np.arange(len(index)) - np.repeat(starts, np.diff(np.r_[starts, len(index)]))
    return index[np.lexsort((index, rank))].tolist()


def pick_images(
    labels: np.ndarray, predictions: Sequence[np.ndarray], count: int, reference: str
) -> list[tuple[int, str]]:
    """Test images to explain: about two thirds where the methods disagree (the reference
    wrong first, then the reference right), the rest right for every method."""
    others = predictions[1:]
    # Masks over the images (linear in images x methods; a list scan per image was quadratic).
    stacked = np.stack([np.asarray(p) for p in predictions])
    ref_is_right = stacked[0] == labels
    disagree = (stacked != stacked[0]).any(axis=0)
    ref_wrong = np.flatnonzero(disagree & ~ref_is_right).tolist()
    ref_right = np.flatnonzero(disagree & ref_is_right).tolist()
    all_right = np.flatnonzero((stacked == labels).all(axis=0)).tolist()
    all_wrong = np.flatnonzero(~disagree & ~ref_is_right).tolist()
    quota = count - count // 3 if others else 0
    chosen: list[tuple[int, str]] = []
    pools = [deque(_spread_classes(ref_wrong, labels)), deque(_spread_classes(ref_right, labels))]
    whys = [f"methods disagree; {reference} wrong", f"methods disagree; {reference} right"]
    while len(chosen) < quota and any(pools):
        for pool, why in zip(pools, whys, strict=True):
            if pool and len(chosen) < quota:
                chosen.append((pool.popleft(), why))
    # The rest: images every method gets right, and one that every method gets wrong.
    right = _spread_classes(all_right, labels)
    wrong = _spread_classes(all_wrong, labels)
    room = count - len(chosen)
    take_right = right[: max(room - 1, 0)] if wrong and room >= 2 else right[:room]
    chosen += [(i, "every method right") for i in take_right]
    chosen += [(i, "every method wrong") for i in wrong[: count - len(chosen)]]
    # Still short (few images of a kind): whatever disagreements or agreements are left.
    leftovers = [(i, why) for pool, why in zip(pools, whys, strict=True) for i in pool]
    leftovers += [(i, "every method right") for i in right[len(take_right) :]]
    return chosen + leftovers[: count - len(chosen)]


@dataclass
class Explained:
    """One image explained by one method."""

    png: bytes  # the heatmap over the model's input view
    input_png: bytes  # the model's input view alone
    predicted: str
    prob: float
    map_name: str
    right: bool


def _aligned_representative(group: Group) -> Run:
    """The group's lowest-seed run among those in the first run's image order."""
    return min((r for r in group.runs if r.aligned), key=lambda r: (r.seed, str(r.path)))


def explain_images(
    groups: Sequence[Group],
    chosen: Sequence[tuple[int, str]],
    classes: list[str],
    labels: np.ndarray,
    pictures: Sequence[Any],
) -> list[list[Explained]]:
    """Predictor.explain of each chosen image (`pictures`: a file or a PIL image each, the
    truth in `labels`) by each group's representative model."""
    from lookcloser.explain.overlay import overlay
    from lookcloser.loader import load_model as load

    rows: list[list[Explained]] = [[] for _ in chosen]
    for group in groups:
        run = group.representative
        predictor = load(run.path)
        for row, (index, _), picture in zip(rows, chosen, pictures, strict=True):
            explanation = predictor.explain(picture)
            row.append(
                Explained(
                    _png(overlay(explanation.image, explanation.heatmap)),
                    _png(explanation.image),
                    explanation.class_name,
                    explanation.prob,
                    explanation.map_name,
                    explanation.class_name == classes[int(labels[index])],
                )
            )
    return rows


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the plot ----------------------------------------------------------------------------------
@literal_text
def plot_accuracy_cost(groups: Sequence[Group]) -> bytes:
    """Top-1 (mean, error bar: standard deviation over seeds) against GFLOPs and images/s."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2 + 0.3 * math.ceil(len(groups) / 3)))
    axes = fig.subplots(1, 2)
    cost_axes = [
        ("flops", 1e-9, "inference GFLOPs per image (lower is cheaper)"),
        ("images_per_s", 1.0, "measured images/s (higher is faster)"),
    ]
    for ax, (key, scale, title) in zip(axes, cost_axes, strict=True):
        for i, group in enumerate(groups):
            x = group.cost[key] * scale
            y = 100 * group.mean("top1")
            sd = group.spread("top1")
            ax.errorbar(
                x,
                y,
                yerr=100 * sd if sd is not None else None,
                fmt="os^Dvp<>"[i % 8],
                color=f"C{i % 10}",
                capsize=4,
                markersize=7,
                label=group.label,
            )
        ax.set_xlabel(title)
        ax.set_ylabel("test top-1 % (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.25)
    # A legend rather than labels at the points: close points would overlap their labels.
    handles, labels = axes[0].get_legend_handles_labels()
    rows = math.ceil(len(groups) / 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(groups)), fontsize=9)
    fig.suptitle("accuracy against cost (error bars: standard deviation over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="white")
    fig.clear()
    return buffer.getvalue()


# ---- the report --------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _mean_sd(group: Group, metric: str) -> str:
    scale = 1 if metric == "ece" else 100
    digits = 4 if metric == "ece" else 2
    mean = f"{scale * group.mean(metric):.{digits}f}"
    sd = group.spread(metric)
    return f"{mean} ± {scale * sd:.{digits}f}" if sd is not None else f"{mean} (1 run)"


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def leaderboard_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "runs (seeds)",
        "test images",
        "top-1 %",
        "mean per-class acc. %",
        "ECE",
        "top-1 % per run",
    ]
    rows = []
    for group in groups:
        seeds = ", ".join(str(r.seed) for r in sorted(group.runs, key=lambda r: r.seed))
        rows.append(
            [
                group.label,
                f"{len(group.runs)} ({seeds})",
                str(int(group.runs[0].metrics["images"])),
                _mean_sd(group, "top1"),
                _mean_sd(group, "mean_per_class_accuracy"),
                _mean_sd(group, "ece"),
                ", ".join(
                    _pct(r.metrics["top1"]) for r in sorted(group.runs, key=lambda r: r.seed)
                ),
            ]
        )
    return header, rows


def cost_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    ref = groups[0].cost
    header = ["method", "parameters", "x", "FLOPs / image", "x", "images/s", "x"]
    rows = []
    for group in groups:
        c = group.cost
        rows.append(
            [
                group.label,
                _si(c["params"]),
                f"{c['params'] / ref['params']:.2f}",
                _si(c["flops"]),
                f"{c['flops'] / ref['flops']:.2f}" if ref["flops"] else "",
                f"{c['images_per_s']:.1f}",
                f"{c['images_per_s'] / ref['images_per_s']:.2f}",
            ]
        )
    return header, rows


def class_difference_rows(
    reference: Group, other: Group, classes: list[str], counts: np.ndarray, shown: int
) -> tuple[list[str], list[list[str]]]:
    """The classes whose accuracy differs most between two methods (largest first)."""
    diff = other.per_class - reference.per_class
    order = sorted(
        (i for i in range(len(classes)) if not math.isnan(diff[i]) and diff[i] != 0),
        key=lambda i: (-abs(diff[i]), classes[i]),
    )[:shown]
    header = ["class", "test images", f"{reference.label} %", f"{other.label} %", "difference"]
    rows = [
        [
            classes[i],
            str(int(counts[i])),
            _pct(reference.per_class[i]),
            _pct(other.per_class[i]),
            f"{100 * diff[i]:+.2f}",
        ]
        for i in order
    ]
    return header, rows


def _md(text: Any) -> str:
    """Text for Markdown: HTML (which Markdown passes through) escaped, link brackets and
    backslashes escaped, one line. Class names, labels and paths come from model files."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"([\\`\[\]])", r"\\\1", text)
    return re.sub(r"[\r\n]+", " ", text)


def _md_table(header: list[str], rows: list[list[str]], escaped: bool = False) -> str:
    """A Markdown table; the header is escaped with `_md`, the rows too unless `escaped`
    (cells with markup of their own, their text escaped already)."""

    def cell(text: str, done: bool) -> str:
        return (str(text) if done else _md(text)).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h, False) for h in header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cell(c, escaped) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    def css(j: int, text: str) -> str:
        if j < numeric_from:
            return ""
        # Signed differences: gains green, losses red.
        return "num up" if text.startswith("+") else "num down" if text.startswith("-") else "num"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{css(j, str(c))}">{html.escape(str(c))}</td>' for j, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(data: bytes, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" class="{css}">'


STYLE = """
body { font-family: system-ui, -apple-system, 'DejaVu Sans', sans-serif; margin: 24px auto;
       max-width: 1150px; color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.85em; max-width: 60em; }
.plot { max-width: 100%; border: 1px solid #eee; }
.grid td { text-align: center; font-size: 0.8em; }
.grid img { width: 150px; height: auto; image-rendering: auto; display: block; margin: 0 auto; }
.right { color: #137333; font-weight: 600; } .wrong { color: #b3261e; font-weight: 600; }
.why { color: #555; }
td.up { color: #137333; } td.down { color: #b3261e; }
.legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
  background: linear-gradient(to right, #00007f, #0000ff, #00ffff, #7fff7f, #ffff00, #ff0000, #7f0000); }
"""


def write_report(
    out: Path,
    groups: list[Group],
    classes: list[str],
    notes: list[str],
    explained: list[list[Explained]],
    chosen: list[tuple[int, str]],
    plot: bytes,
    settings: dict[str, Any],
    shown_classes: int = 10,
) -> CompareReport:
    """report.html, report.md, the CSV files and the PNGs beside them."""
    from lookcloser import __version__

    images_dir = out / "images"
    # An earlier report's pictures; a link there is removed, never followed.
    if images_dir.is_symlink() or images_dir.is_file():
        images_dir.unlink()
    shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True)
    atomic_write_bytes(out / "plot.png", plot)
    reference = groups[0]
    first = _rows_run(groups)
    counts = np.bincount(first.labels, minlength=len(classes))
    data = first.record.get("data", {})
    dataset = f"{data.get('source', '?')}:{data.get('root', '?')}"
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    runs_total = sum(len(g.runs) for g in groups)
    summary_line = (
        f"{runs_total} runs of {len(groups)} methods on {dataset}: {len(first.labels)} test "
        f"images, {len(classes)} classes. Reference for ratios and differences: "
        f"{reference.label}. lookcloser {__version__}, {stamp}."
    )
    spread_note = (
        "± is the sample standard deviation over a method's runs (seeds); '(1 run)' has none. "
        "Top-1, mean per-class accuracy and ECE (15 bins) are the runs' own metrics.json."
    )
    cost_note = (
        f"Measured in this compare run on one model per method (its lowest seed): parameters of "
        f"the inference model, FLOPs of one image at its input size (torch FlopCounterMode: "
        f"convolutions and matrix products), images/s of Predictor.logits on a batch of "
        f"{settings['cost_batch']} random images, {settings['threads']} torch thread(s), "
        f"median of {settings['cost_rounds']} rounds with the methods interleaved. x: ratio to "
        f"{reference.label}."
    )

    lb_header, lb_rows = leaderboard_rows(groups)
    cost_header, cost_table = cost_rows(groups)
    class_tables = [
        (g, *class_difference_rows(reference, g, classes, counts, shown_classes))
        for g in groups[1:]
    ]
    run_header = ["run", "method", "seed", "test images", "top-1 %", "mean per-class acc. %", "ECE"]
    run_rows = [
        [
            str(r.path),
            g.label,
            str(r.seed),
            str(int(r.metrics["images"])),
            _pct(r.metrics["top1"]),
            _pct(r.metrics["mean_per_class_accuracy"]),
            f"{r.metrics['ece']:.4f}",
        ]
        for g in groups
        for r in sorted(g.runs, key=lambda r: r.seed)
    ]

    # Pictures: files beside the report (for report.md) and embedded in report.html.
    grid_files: list[list[str]] = []
    for n, row in enumerate(explained):
        names = [f"images/{n:02d}-input.png"]
        atomic_write_bytes(out / names[0], row[0].input_png)
        for g, item in enumerate(row):
            name = f"images/{n:02d}-m{g}.png"
            atomic_write_bytes(out / name, item.png)
            names.append(name)
        grid_files.append(names)

    # ---- HTML
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lookcloser compare: {html.escape(dataset)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Method comparison: {html.escape(dataset)}</h1>",
        f"<p class='meta'>{html.escape(summary_line)}</p>",
        "<h2>Leaderboard (test split)</h2>",
        _html_table(lb_header, lb_rows),
        f"<p class='note'>{html.escape(spread_note)}</p>",
        "<h2>Cost</h2>",
        _html_table(cost_header, cost_table),
        f"<p class='note'>{html.escape(cost_note)}</p>",
        _img(plot, "accuracy against cost", "plot"),
        "<h2>Per-class accuracy: largest differences</h2>",
    ]
    if not class_tables:
        parts.append("<p class='note'>One method only: nothing to compare per class.</p>")
    for group, header, rows in class_tables:
        parts.append(f"<h3>{html.escape(group.label)} against {html.escape(reference.label)}</h3>")
        parts.append(
            _html_table(header, rows)
            if rows
            else "<p class='note'>Same accuracy on every class.</p>"
        )
    parts.append(
        f"<p class='note'>Accuracy per class on the test split, mean over each method's runs; "
        f"up to {shown_classes} classes with the largest differences. Every class: "
        "per_class.csv.</p>"
    )
    parts.append("<h2>The same test images, explained by each method</h2>")
    if explained:
        head = "<th>image</th>" + "".join(f"<th>{html.escape(g.label)}</th>" for g in groups)
        body = []
        for (index, why), row in zip(chosen, explained, strict=True):
            truth = classes[int(first.labels[index])]
            cells = [
                f"<td>{_img(row[0].input_png, 'input')}<b>true: {html.escape(truth)}</b>"
                f"<br><span class='why'>{html.escape(why)}</span>"
                f"<br><span class='why'>{html.escape(Path(first.paths[index]).name)}</span></td>"
            ]
            for item in row:
                mark = ("right", "✓") if item.right else ("wrong", "✗")
                cells.append(
                    f"<td>{_img(item.png, item.map_name)}<span class='{mark[0]}'>{mark[1]} "
                    f"{html.escape(item.predicted)}</span> ({item.prob:.2f})"
                    f"<br><span class='why'>map: {html.escape(item.map_name)}</span></td>"
                )
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>")
        parts += body
        parts.append("</tbody></table>")
        parts.append(
            "<p class='note'>Each method's first map (Predictor.explain: Grad-CAM unless the "
            "method has its own) for its predicted class, over the model's input view, from "
            "its lowest-seed run; ✓/✗: the prediction is right/wrong, with its probability. "
            "Colours: low <span class='legend'></span> high (each map scaled to 0-1).</p>"
        )
    else:
        parts.append("<p class='note'>No images to show (a test split without image files).</p>")
    parts.append("<h2>Runs</h2>")
    parts.append(_html_table(run_header, run_rows, numeric_from=2))
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts.append(
        "<p class='note'>Files beside this report: report.md, leaderboard.csv, cost.csv, "
        "runs.csv, per_class.csv, predictions.csv, plot.png, images/.</p></body></html>"
    )
    html_path = out / "report.html"
    atomic_write_text(html_path, "\n".join(parts) + "\n")

    # ---- Markdown
    md = [
        f"# Method comparison: {_md(dataset)}",
        "",
        _md(summary_line),
        "",
        "## Leaderboard (test split)",
        "",
        _md_table(lb_header, lb_rows),
        "",
        _md(spread_note),
        "",
        "## Cost",
        "",
        _md_table(cost_header, cost_table),
        "",
        _md(cost_note),
        "",
        "![accuracy against cost](plot.png)",
        "",
        "## Per-class accuracy: largest differences",
        "",
    ]
    for group, header, rows in class_tables:
        md += [f"### {_md(group.label)} against {_md(reference.label)}", ""]
        md += [_md_table(header, rows) if rows else "Same accuracy on every class.", ""]
    md += ["## The same test images, explained by each method", ""]
    if explained:
        header = ["image", *[g.label for g in groups]]
        rows = []
        for (index, why), row, files in zip(chosen, explained, grid_files, strict=True):
            truth = classes[int(first.labels[index])]
            cells = [f"![input]({files[0]})<br>true: {_md(truth)}<br>{_md(why)}"]
            for item, file in zip(row, files[1:], strict=True):
                mark = "✓" if item.right else "✗"
                cells.append(
                    f"![{_md(item.map_name)}]({file})<br>{mark} {_md(item.predicted)} "
                    f"({item.prob:.2f})"
                )
            rows.append(cells)
        md += [_md_table(header, rows, escaped=True), ""]
    md += ["## Runs", "", _md_table(run_header, run_rows), ""]
    if notes:
        md += ["## Notes", "", *[f"- {_md(n)}" for n in notes], ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md))

    # ---- CSV
    csv_files = {
        "leaderboard": _write_csv(out / "leaderboard.csv", *_leaderboard_csv(groups)),
        "cost": _write_csv(out / "cost.csv", *_cost_csv(groups)),
        "runs": _write_csv(out / "runs.csv", *_runs_csv(groups)),
        "per_class": _write_csv(out / "per_class.csv", *_per_class_csv(groups, classes, counts)),
        "predictions": _write_csv(out / "predictions.csv", *_predictions_csv(groups, classes)),
    }
    return CompareReport(out, html_path, md_path, csv_files, groups, classes, notes)


def _number(value: float) -> str:
    """A float for CSV: full precision, empty for NaN (a class without test images)."""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def _leaderboard_csv(groups: Sequence[Group]) -> tuple[list[str], list[list[Any]]]:
    header = ["method", "runs", "seeds", "test_images"]
    for metric in METRICS:
        header += [f"{metric}_mean", f"{metric}_sd"]
    rows = []
    for g in groups:
        row: list[Any] = [
            g.label,
            len(g.runs),
            " ".join(str(r.seed) for r in sorted(g.runs, key=lambda r: r.seed)),
            int(g.runs[0].metrics["images"]),
        ]
        for metric in METRICS:
            sd = g.spread(metric)
            row += [_number(g.mean(metric)), "" if sd is None else _number(sd)]
        rows.append(row)
    return header, rows


def _cost_csv(groups: Sequence[Group]) -> tuple[list[str], list[list[Any]]]:
    ref = groups[0].cost
    header = [
        "method",
        "params",
        "params_ratio",
        "flops",
        "flops_ratio",
        "images_per_s",
        "speed_ratio",
    ]
    rows = [
        [
            g.label,
            int(g.cost["params"]),
            g.cost["params"] / ref["params"],
            int(g.cost["flops"]),
            g.cost["flops"] / ref["flops"] if ref["flops"] else "",
            g.cost["images_per_s"],
            g.cost["images_per_s"] / ref["images_per_s"],
        ]
        for g in groups
    ]
    return header, rows


def _runs_csv(groups: Sequence[Group]) -> tuple[list[str], list[list[Any]]]:
    header = ["run_dir", "method", "seed", "test_images", *METRICS, "top1_reevaluated"]
    rows = [
        [
            str(r.path),
            g.label,
            r.seed,
            int(r.metrics["images"]),
            *[_number(r.metrics[m]) for m in METRICS],
            _number(r.computed["top1"]),
        ]
        for g in groups
        for r in sorted(g.runs, key=lambda r: r.seed)
    ]
    return header, rows


def _per_class_csv(
    groups: Sequence[Group], classes: list[str], counts: np.ndarray
) -> tuple[list[str], list[list[Any]]]:
    header = ["class", "test_images", *[g.label for g in groups]]
    header += [f"{g.label} - {groups[0].label}" for g in groups[1:]]
    rows = []
    for i, name in enumerate(classes):
        values = [g.per_class[i] for g in groups]
        rows.append(
            [
                name,
                int(counts[i]),
                *map(_number, values),
                *[_number(v - values[0]) for v in values[1:]],
            ]
        )
    return header, rows


def _predictions_csv(
    groups: Sequence[Group], classes: list[str]
) -> tuple[list[str], list[list[Any]]]:
    runs = [r for g in groups for r in sorted(g.runs, key=lambda r: r.seed)]
    first = _rows_run(groups)
    header = ["path", "true", *[r.name for r in runs]]
    # A run matched by counts only (old shards) has no column of its own order: left empty.
    predictions = [r.predictions if r.aligned else None for r in runs]
    rows = [
        [first.paths[i] if first.paths else i, classes[int(first.labels[i])]]
        + ["" if p is None else classes[int(p[i])] for p in predictions]
        for i in range(len(first.labels))
    ]
    return header, rows


def _rows_run(groups: Sequence[Group]) -> Run:
    """The run whose image order the per-image parts follow: the reference's first run in
    the common order."""
    return next(r for g in groups for r in g.runs if r.aligned)


# ---- the whole command -------------------------------------------------------------------------
def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def prepare_out(out: Path) -> None:
    """A new or empty folder, or an earlier report (its files are replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"compare --out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(
            f"compare --out: {out} is not empty and holds no earlier compare report; "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"created": datetime.now().isoformat()}) + "\n")


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    images: int = 6,
    classes_shown: int = 10,
    cost_batch: int = 8,
    cost_rounds: int = 3,
    progress: bool = True,
    device: str = "cpu",
) -> CompareReport:
    """Read, evaluate, time and explain the runs; write the report into `out`."""
    import torch

    from lookcloser.loader import load_model as load

    if not run_dirs:
        raise ConfigError("compare: no runs; give run directories or --methods to train")
    if images < 0 or classes_shown < 1 or cost_batch < 1 or cost_rounds < 1:
        raise ConfigError(
            "compare: --images must be >= 0 and --classes, --cost-batch, --cost-rounds >= 1"
        )
    runs = [read_run(p) for p in dict.fromkeys(Path(p) for p in run_dirs)]
    # Whether the runs compare at all, from their records and data listings: no model is
    # loaded, nothing evaluated and nothing written before this.
    tests, notes = check_comparable(runs)
    out = Path(out)
    prepare_out(out)
    notes += evaluate_runs(runs, out / "cache", progress, device, tests)
    notes += align_runs(runs, tests)
    groups = group_runs(runs)
    classes = list(runs[0].record["classes"])
    _say(progress, "measuring cost (parameters, FLOPs, images/s)")
    predictors = [load(g.representative.path, device) for g in groups]
    for group, cost in zip(groups, measure_cost(predictors, cost_batch, cost_rounds), strict=True):
        group.cost = cost
    del predictors
    chosen: list[tuple[int, str]] = []
    explained: list[list[Explained]] = []
    if runs[0].keys and images:
        # Per image: the runs whose outputs are in the first run's image order.
        shown = [g for g in groups if any(r.aligned for r in g.runs)]
        chosen = pick_images(
            runs[0].labels,
            [_aligned_representative(g).predictions for g in shown],
            images,
            shown[0].label,
        )
        _say(progress, f"explaining {len(chosen)} test images with each method")
        pictures = [picture_of(tests, runs[0].keys[i]) for i, _ in chosen]
        explained = explain_images(groups, chosen, classes, runs[0].labels, pictures)
    settings = {
        "cost_batch": cost_batch,
        "cost_rounds": cost_rounds,
        "threads": torch.get_num_threads(),
    }
    return write_report(
        out,
        groups,
        classes,
        notes,
        explained,
        chosen,
        plot_accuracy_cost(groups),
        settings,
        classes_shown,
    )


def train_missing(
    train: Callable[..., Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    runs_dir: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: str | Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train every method x seed into `runs_dir/<method>-s<seed>` with `train(config,
    overrides, progress=...)` (`api.train`, handed down so that this workflow never imports
    the API above it); finished runs with the same config are kept, unfinished ones resumed."""
    from lookcloser.checks import check_config
    from lookcloser.config import Config, as_config
    from lookcloser.rundir import has_checkpoint

    common = list(overrides)
    if data is not None:
        common.append(f"data.root={data}")
        base = as_config(config, [o for o in overrides if o.startswith("data.source=")])
        if base.data.source == Config().data.source:  # not chosen: an ImageFolder tree
            common.append("data.source=imagefolder")
    paths = []
    for method in methods:
        for seed in seeds:
            run_dir = Path(runs_dir) / f"{method}-s{seed}"
            wanted = [*common, f"method.name={method}", f"seed={seed}", f"out={run_dir}"]
            cfg = check_config(as_config(config, wanted))
            if is_model_dir(run_dir):
                _check_same_config(run_dir, cfg)
                _say(progress, f"{run_dir}: already trained, kept")
            else:
                resume = ["trainer.resume=last"] if has_checkpoint(run_dir) else []
                _say(progress, f"training {method} seed {seed} into {run_dir}")
                train(config, [*wanted, *resume], progress=progress)
            paths.append(run_dir)
    return paths


def _check_same_config(run_dir: Path, cfg) -> None:
    """A kept run must have been trained with the config asked for now."""
    from lookcloser.config import Config

    saved = _flatten(Config.from_dict(read_model_json(run_dir)["config"]).to_dict())
    wanted = _flatten(cfg.to_dict())
    differ = sorted(
        k
        for k in set(saved) | set(wanted)
        if k not in NOT_METHOD_KEYS and saved.get(k) != wanted.get(k)
    )
    if differ:
        shown = "; ".join(
            f"{k}: {saved.get(k, 'unset')} there, {wanted.get(k, 'unset')} now" for k in differ[:3]
        )
        raise ConfigError(
            f"compare: {run_dir} was trained with another config ({shown}); "
            "choose another --runs folder or remove it"
        )
