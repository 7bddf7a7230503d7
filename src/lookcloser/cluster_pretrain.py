"""`semi.strategy=cluster_pretrain`: stages in sub-runs of one run directory.

Round r (1 .. semi.rounds), under RUN_DIR/semi/round<r>/:

1. **select** (rounds after the first): the previous round's fine-tuned model scores every
   unlabelled image (confidence + OOD filter, thresholds from the val split; scoring.py);
   the kept ones, close to the labelled classes, are this round's candidates. Round 1 takes
   every unlabelled image.
2. **embed**: the candidates' pooled embeddings from the round's model (round 1: the
   configured backbone, e.g. ImageNet weights; later: the previous fine-tuned model), cached
   in `embeddings.safetensors` under a key of model, transform and paths (embeddings.py).
3. **cluster**: k-means with k chosen by silhouette, at least the number of labelled classes
   (the unlabelled images hold those classes and others), and twice that from round 2 on
   (finer than the classes), clusters kept by size and compactness (clustering.py); the
   kept images and their cluster ids go to `clusters.csv`.
4. **pretrain**: a sub-run `pretrain/` trains the configured method on the cluster ids as
   labels (`data.source=csv`), starting from the round's model's backbone.
5. **fine-tune**: a sub-run `finetune/` trains on the labelled set from the pretrained
   backbone (the method's main `backbone`; its heads start afresh).

The round whose fine-tuned model has the best val top-1 (the val split, never test) becomes
the run's model: its files are copied into RUN_DIR, and `semi/summary.json` lists every round.
Each stage prints a header and shows progress (embedding passes, the k search, training).
With `trainer.resume=last` a killed run continues: finished sub-runs (model directories) and
recorded stages are kept, a sub-run with a checkpoint resumes from it, cached embeddings are
reused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from lookcloser.checks import check_config
from lookcloser.config import Config
from lookcloser.data.sources import Sample
from lookcloser.errors import ConfigError, DataError
from lookcloser.fileio import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text
from lookcloser.modeldir import WEIGHTS, is_model_dir, read_model_json
from lookcloser.rundir import RunDir, has_checkpoint
from lookcloser.semi.records import ground_truth, iter_rows, read_stages, semi_dir, truth_columns
from lookcloser.semi.records import write_stage as _write_stage
from lookcloser.training import TrainResult, run_dir_for, train

PIPELINE_FILE = "pipeline.json"
MODEL_FILES = (WEIGHTS, "metrics.json", "confusion.png", "confusion.csv", "model.json")
BACKBONE_PREFIX = "backbone.model."  # the method's main network inside a saved state dict


def run_cluster_pretrain(cfg: Config, progress: bool = True, callbacks: list | None = None):
    """Run every round's stages; the best round's fine-tuned model becomes the run's model.
    A second start with the same `out=` is refused while this one holds the run."""
    from lookcloser.rundir import RunLock

    with RunLock(run_dir_for(cfg, True)) if cfg.out else contextlib.nullcontext():
        return _run_cluster_pretrain(cfg, progress, callbacks)


def _run_cluster_pretrain(cfg: Config, progress: bool, callbacks: list | None):
    from lookcloser.data.prepare import prepare_data
    from lookcloser.semi import check_validation

    _check_devices(cfg)
    run_dir = run_dir_for(cfg, True)
    resume = cfg.trainer.resume
    if resume not in (None, "last"):
        raise ConfigError(
            "trainer.resume: semi.strategy=cluster_pretrain resumes with `last` (every stage "
            f"continues from its own checkpoint), got {resume!r}"
        )
    if resume == "last" and not (semi_dir(run_dir) / PIPELINE_FILE).is_file():
        raise ConfigError(
            f"trainer.resume=last: {run_dir} holds no cluster_pretrain run to resume "
            "(start without trainer.resume)"
        )
    unfinished = (semi_dir(run_dir) / PIPELINE_FILE).is_file() and not is_model_dir(run_dir)
    if not resume and not cfg.overwrite and unfinished:
        raise ConfigError(
            f"out: {run_dir} holds an unfinished cluster_pretrain run; resume it with "
            "trainer.resume=last, or pass overwrite=true to start again"
        )
    plan = None if resume else RunDir.plan(run_dir, resume=None, overwrite=cfg.overwrite)
    data = prepare_data(cfg.data)
    if data.index is not None:
        raise ConfigError(
            "semi.strategy=cluster_pretrain: the labelled data must be a sample list "
            "(a folder, CSV or dataset source), not shards"
        )
    check_validation(cfg, data.count("val"))
    if plan is not None:
        plan.claim(cfg.to_yaml(), data.skipped)
        semi_dir(run_dir).mkdir(parents=True, exist_ok=True)
        state = {"rounds": cfg.semi.rounds, "unlabelled_images": len(data.unlabelled)}
        atomic_write_text(semi_dir(run_dir) / PIPELINE_FILE, json.dumps(state) + "\n")
    try:
        rounds = _run_rounds(cfg, run_dir, data, progress, callbacks)
    except BaseException:
        if plan is not None and not any(is_model_dir(r["model_dir"]) for r in _done(run_dir)):
            plan.abandon()
        raise
    best = _choose(rounds)
    _copy_model(Path(best["model_dir"]), run_dir)
    summary = {"chosen_round": best["round"], "chosen_by": "val top1", "rounds": rounds}
    atomic_write_text(semi_dir(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return TrainResult(run_dir, metrics, data.classes, data.skipped)


# ---- the rounds ---------------------------------------------------------------------------------
def _run_rounds(cfg: Config, run_dir: Path, data, progress: bool, callbacks) -> list[dict]:
    semi = cfg.semi
    say = _Say(progress)
    rounds: list[dict] = []
    previous: Path | None = None  # the previous round's fine-tuned model directory
    for r in range(1, semi.rounds + 1):
        folder = semi_dir(run_dir) / f"round{r}"
        folder.mkdir(parents=True, exist_ok=True)
        model = _round_model(cfg, previous, len(data.classes))

        if previous is None:
            candidates = list(data.unlabelled)
        else:
            say(f"round {r}: select unlabelled images close to the labelled classes")
            candidates = _select(cfg, run_dir, f"round{r}-select", model, data, progress)
        if len(candidates) < 2 * semi.min_cluster_size:
            say(
                f"round {r}: {len(candidates)} candidate image(s), fewer than two clusters of "
                f"semi.min_cluster_size={semi.min_cluster_size}; no further rounds"
            )
            break

        say(f"round {r}: embed {len(candidates)} unlabelled images")
        embeddings = _embeddings(cfg, folder, model, previous, candidates, progress)

        say(f"round {r}: cluster")
        clusters_csv = _cluster(
            cfg,
            run_dir,
            f"round{r}-cluster",
            folder,
            candidates,
            embeddings,
            k_min=len(data.classes) * (1 if previous is None else 2),
            progress=progress,
        )
        if clusters_csv is None:
            say(f"round {r}: fewer than two clusters kept; no further rounds")
            break

        say(f"round {r}: pretrain on cluster ids")
        start = None if previous is None else _backbone_file(previous, folder / "start.safetensors")
        pretrain = _sub_run(
            cfg,
            folder / "pretrain",
            progress,
            callbacks,
            start,
            data={"source": "csv", "root": str(clusters_csv), "meta_keys": []},
            epochs=semi.pretrain_epochs or cfg.trainer.epochs,
        )
        say(f"round {r}: fine-tune on the labelled images")
        pretrained = _backbone_file(pretrain, folder / "pretrained.safetensors")
        finetune = _sub_run(cfg, folder / "finetune", progress, callbacks, pretrained)
        metrics = json.loads((finetune / "metrics.json").read_text())
        rounds.append(
            {
                "round": r,
                "candidates": len(candidates),
                "model_dir": str(finetune),
                "pretrain_dir": str(pretrain),
                "val_top1": metrics.get("val", {}).get("top1"),
                "test_top1": metrics.get("test", {}).get("top1"),
            }
        )
        previous = finetune
        del model
    if not rounds:
        raise DataError(
            f"semi.strategy=cluster_pretrain: nothing to pretrain on ({len(data.unlabelled)} "
            f"unlabelled images gave no two kept clusters of at least "
            f"semi.min_cluster_size={semi.min_cluster_size})"
        )
    return rounds


def _round_model(cfg: Config, previous: Path | None, num_classes: int):
    """The model a round embeds with: the configured backbone first, then the last fine-tune."""
    if previous is None:
        from lookcloser.methods import build_method

        return build_method(cfg, num_classes)
    from lookcloser.predictor import Predictor

    # The previous stage is this run's own model: its method's module is the user's own.
    own = [cfg.method["module"]] if cfg.method.get("module") else []
    return Predictor.load(previous, trust_modules=own).method


def _device(cfg: Config) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"


def _transform(cfg: Config, model):
    from lookcloser.data.transforms import eval_transform

    interpolation = model.backbone.data_config.get("interpolation", "bicubic")
    size = model.input_size or cfg.data.image_size
    return eval_transform(size, cfg.data.crop_pct, interpolation), size


def _select(cfg: Config, run_dir: Path, name: str, model, data, progress: bool) -> list[Sample]:
    """The unlabelled images the model keeps (recorded once; a resumed run reads them back)."""
    from lookcloser.semi.scoring import filter_stage

    done = {s["name"]: s for s in read_stages(run_dir, missing_ok=True)}
    if name in done:
        kept = {r["path"] for r in iter_rows(run_dir, done[name]) if r["kept"] == "True"}
        return [s for s in data.unlabelled if s.path in kept]
    transform, _ = _transform(cfg, model)
    record, rows, kept = filter_stage(
        name,
        model,
        cfg,
        data.train,
        data.val,
        data.unlabelled,
        data.classes,
        transform,
        progress,
        _device(cfg),
    )
    _write_stage(run_dir, record, rows)
    return [s for s, k in zip(data.unlabelled, kept.tolist(), strict=True) if k]


def _embeddings(
    cfg: Config, folder: Path, model, previous: Path | None, samples: list[Sample], progress: bool
) -> np.ndarray:
    from lookcloser.semi.embeddings import cache_key, cached_embeddings
    from lookcloser.semi.scoring import embed

    transform, size = _transform(cfg, model)
    if previous is None:
        identity = {"model": cfg.to_dict()["model"], "method": cfg.method}
    else:
        identity = {"weights": read_model_json(previous)["weights"]["sha256"]}
    key = cache_key(**identity, size=size, crop=cfg.data.crop_pct, paths=[s.path for s in samples])

    def compute() -> torch.Tensor:
        return embed(
            model,
            samples,
            transform,
            cfg.data.batch_size,
            cfg.data.num_workers,
            cfg.data.max_image_pixels,
            progress,
            "embed",
            _device(cfg),
        )

    return cached_embeddings(
        folder / "embeddings.safetensors", key, compute, _Say(progress)
    ).numpy()


def _cluster(
    cfg: Config,
    run_dir: Path,
    name: str,
    folder: Path,
    samples: list[Sample],
    embeddings: np.ndarray,
    k_min: int,
    progress: bool,
) -> Path | None:
    """Cluster, record the stage, write the kept images' cluster ids as a training CSV."""
    from lookcloser.semi.clustering import cluster

    semi = cfg.semi
    out = folder / "clusters.csv"
    done = {s["name"] for s in read_stages(run_dir, missing_ok=True)}
    if name in done and out.is_file():
        return out
    result = cluster(
        embeddings,
        semi.clusters,
        k_min,
        semi.min_cluster_size,
        semi.cluster_keep,
        cfg.seed,
        progress=progress,
    )
    reasons = result.reasons(semi.min_cluster_size)
    truth = ground_truth(cfg.data.unlabelled)
    rows = [
        {
            "path": s.path,
            "cluster": int(result.labels[i]),
            "distance": f"{float(result.distances[i]):.5f}",
            "kept": str(reasons[i] == "kept"),
            "reason": reasons[i],
            **truth_columns(s.path, truth),
        }
        for i, s in enumerate(samples)
    ]
    kept_images = int(result.image_kept().sum())
    record = {
        "name": name,
        "kind": "cluster",
        "total": len(samples),
        "kept": kept_images,
        "reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "k": result.k,
        "k_chosen_by": "semi.clusters" if semi.clusters else "silhouette",
        "silhouettes": {str(k): round(v, 4) for k, v in result.silhouettes.items()},
        "clusters_kept": int(result.kept.sum()),
        "min_cluster_size": semi.min_cluster_size,
        "cluster_keep": semi.cluster_keep,
        "clusters": [
            {
                "id": c,
                "size": int(result.sizes[c]),
                "compactness": round(float(result.compactness[c]), 5),
                "kept": bool(result.kept[c]),
            }
            for c in range(result.k)
        ],
    }
    if truth and all(r["in_class"] for r in rows):
        kept_rows = [r for r in rows if r["kept"] == "True"]
        in_class = sum(r["in_class"] == "True" for r in kept_rows)
        record["kept_in_class_share"] = round(in_class / len(kept_rows), 4) if kept_rows else None
    _write_stage(run_dir, record, rows)
    if result.kept.sum() < 2:
        return None
    ids = {int(c): i for i, c in enumerate(np.flatnonzero(result.kept))}  # dense class names
    with atomic_open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for s, label in zip(samples, result.labels.tolist(), strict=True):
            if label in ids:
                writer.writerow([str(Path(s.path).resolve()), f"cluster{ids[label]:03d}", "train"])
    return out


def _sub_run(
    cfg: Config,
    out: Path,
    progress: bool,
    callbacks,
    weights: Path | None,
    data: dict | None = None,
    epochs: int | None = None,
) -> Path:
    """Train a stage in `out` (skipped when it already holds a model; resumed from its
    checkpoint if it has one); returns its model directory."""
    if is_model_dir(out):
        return out
    sub = Config.from_dict(cfg.to_dict())
    sub.semi.strategy = "none"
    sub.data.unlabelled = None
    for key, value in (data or {}).items():
        setattr(sub.data, key, value)
    if epochs is not None:
        sub.trainer.epochs = epochs
    if weights is not None:
        sub.model.pretrained = True
        sub.model.weights = str(weights)
        sub.model.weights_key_map = "none"
    if sub.trainer.devices == "auto":
        sub.trainer.devices = 1
    sub.out = str(out)
    resuming = has_checkpoint(out)
    sub.trainer.resume = "last" if resuming else None
    sub.overwrite = not resuming
    train(check_config(sub), progress=progress, callbacks=callbacks)
    return out


def _backbone_file(model_dir: Path, out: Path) -> Path:
    """The main backbone's weights of a model directory as a timm state dict (safetensors)."""
    from safetensors.torch import load_file, save

    state = load_file(str(Path(model_dir) / WEIGHTS))
    backbone = {
        k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)
    }
    if not backbone:
        raise DataError(f"{model_dir}: no {BACKBONE_PREFIX}* tensors to start the next stage from")
    atomic_write_bytes(out, save({k: v.contiguous() for k, v in backbone.items()}))
    return out


def _choose(rounds: list[dict]) -> dict:
    """The round with the best val top-1 (the last one when there is no val split)."""
    if any(r["val_top1"] is None for r in rounds):
        return rounds[-1]
    return max(rounds, key=lambda r: (r["val_top1"], r["round"]))


def _copy_model(model_dir: Path, run_dir: Path) -> None:
    """Copy the chosen model directory's files into the run directory (model.json last)."""
    for name in MODEL_FILES:
        source = model_dir / name
        if source.is_file():
            with atomic_path(run_dir / name) as tmp:
                shutil.copyfile(source, tmp)


def _done(run_dir: Path) -> list[dict]:
    folder = semi_dir(run_dir)
    return [{"model_dir": p} for p in folder.glob("round*/finetune")] if folder.is_dir() else []


def _check_devices(cfg: Config) -> None:
    devices = cfg.trainer.devices
    if (isinstance(devices, int) and devices not in (1,)) or cfg.trainer.num_nodes > 1:
        raise ConfigError(
            "semi.strategy=cluster_pretrain runs its stages one after the other in one process; "
            f"use trainer.devices=1 (got {devices}, num_nodes={cfg.trainer.num_nodes})"
        )


class _Say:
    """Stage headers on stderr (silent without progress)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[cluster_pretrain] {text}", file=sys.stderr, flush=True)
