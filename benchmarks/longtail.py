"""The long tail on a real long-tailed set (issue 25): fish23, head-only, frozen Lite0 features.

    python benchmarks/longtail.py --data-root DATA --work WORK [--seeds 0 1 2] [--record]

DATA holds `fish23/{train,test}/<class>/*.jpg`; WORK (outside the repository: the features are
derived from the images) keeps the cached features and the tuning results, so a rerun reuses
them. With `--record` the tables go to the `longtail` section of docs/benchmarks.md and the runs
to benchmarks/records/longtail.jsonl (then `python benchmarks/results.py`).

Protocol:
1. Features, once: the project's ImageNet-pretrained `tf_efficientnet_lite0` backbone (offline
   weights) at its evaluation transform (shorter side to 96 / 0.875, centre crop 96 px), the
   1280-d pooled embedding of every train and test image, and of every train image mirrored
   (the training draws one of the two with probability 0.5: the project's `data.hflip`).
2. Class head only, on the frozen features, with the project's parts: heads from
   `lookcloser.models.heads` (margins through `HeadSpec.training_logits`, as `Method.class_loss`),
   samplers from `lookcloser.data.samplers`, stages and schedules from `lookcloser.engine`
   (AdamW, weight decay 0.01, per-step cosine, batch 32, label smoothing 0.1), metrics from
   `lookcloser.evaluation`.
3. Learning rate and epochs of each variant (and the second stage's, and the margin heads'
   scale and margin in the `-tuned` rows) chosen on a validation split carved from train by
   fish track (a quarter of each class's tracks; frames of one track never straddle it), by
   mean per-class accuracy over seeds 0 and 1; never on test. Then each variant trains on all
   of train with its chosen settings, seeds 0, 1, 2, and is scored on the whole test split.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTION = "longtail"
SECTION_FINETUNED = "longtail-finetuned"
DATASET = "fish23"
BACKBONE = "tf_efficientnet_lite0"
SIZE = 96  # fish23 crops are 50-255 px, most under 130
BATCH = 32
WEIGHT_DECAY = 0.01
LABEL_SMOOTHING = 0.1  # the baseline method's (methods/options.py)
HFLIP = 0.5
# Shot groups by training images per class (the usual many / medium / few split, Liu et al. 2019).
MANY, FEW = 100, 20
# Validation carved from train for tuning: this share of each class's tracks, at least one.
VAL_TRACKS = 0.25
VAL_SEED = 1234
TUNE_SEEDS = (0, 1)
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
EPOCHS = (10, 30)
STAGE2_LR_SHARES = (0.1, 0.3, 1.0)  # the second stage's lr as a share of the first's
STAGE2_EPOCHS = (1, 3, 10)
MARGIN_SCALES = (16.0, 30.0, 64.0)
MARGINS = (0.1, 0.2, 0.5)
TRACK = re.compile(r"fish_(\d+)_\d+$")


@dataclass(frozen=True)
class Variant:
    """One long-tail treatment: head type, training sampler, optional balanced second stage."""

    name: str
    head: str = "linear"
    sampler: str = "uniform"
    two_stage: bool = False  # plain first, then a class-balanced head stage
    tune_margin: bool = False  # scale and margin chosen on val too
    settings_of: str = ""  # not tuned: the settings chosen for this other variant
    text: str = ""


VARIANTS = [
    Variant("plain", text="linear head, uniform sampling (the plain fine-tune's head)"),
    Variant("balanced", sampler="balanced", text="class-balanced sampling (`data.sampler`)"),
    Variant("sqrt", sampler="sqrt", text="square-root sampling"),
    Variant(
        "twostage",
        two_stage=True,
        text="plain, then a class-balanced stage of the head at its own lr (`optim.stages`)",
    ),
    Variant("cosine", head="cosine", text="cosine head, s = 30, no margin (`model.head=cosine`)"),
    Variant("arcface", head="arcface", text="ArcFace head, s = 30, m = 0.3 (`model.head`)"),
    Variant(
        "arcface-tuned",
        head="arcface",
        tune_margin=True,
        text="ArcFace, scale and margin chosen on val",
    ),
    Variant("subcenter", head="subcenter_arcface", text="sub-centre ArcFace, 3 centres a class"),
    Variant(
        "subcenter-tuned",
        head="subcenter_arcface",
        tune_margin=True,
        text="sub-centre ArcFace, scale and margin chosen on val",
    ),
    Variant("prototype", head="prototype", text="prototype head, 3 prototypes a class, s = 16"),
    # The heads with class-balanced sampling: does a normalised head help once sampling does?
    Variant(
        "arcface-balanced",
        head="arcface",
        sampler="balanced",
        text="ArcFace head with class-balanced sampling",
    ),
    Variant(
        "prototype-balanced",
        head="prototype",
        sampler="balanced",
        text="prototype head with class-balanced sampling",
    ),
    # Diagnostics: the sampler alone, at the other's settings (lr and epochs not re-tuned).
    Variant(
        "balanced@plain",
        sampler="balanced",
        settings_of="plain",
        text="class-balanced sampling at plain's lr and epochs",
    ),
    Variant(
        "plain@balanced",
        settings_of="balanced",
        text="uniform sampling at balanced's lr and epochs",
    ),
]


@dataclass(frozen=True)
class Setting:
    """What tuning chooses: lr and epochs (and the second stage's, and a margin head's)."""

    lr: float
    epochs: int
    stage2_lr: float | None = None
    stage2_epochs: int = 0
    scale: float | None = None
    margin: float | None = None

    def text(self) -> str:
        parts = [f"lr {self.lr:g}, {self.epochs} epochs"]
        if self.stage2_epochs:
            parts.append(f"then balanced lr {self.stage2_lr:g}, {self.stage2_epochs} epochs")
        if self.scale is not None:
            parts.append(f"s = {self.scale:g}, m = {self.margin:g}")
        return "; ".join(parts)


# ---- features ------------------------------------------------------------------------------------
@dataclass
class Split:
    """Features of one split (N x D, and mirrored where computed), labels and track ids."""

    features: torch.Tensor
    labels: torch.Tensor
    tracks: list[str]
    flipped: torch.Tensor | None = None

    def subset(self, index: torch.Tensor) -> Split:
        return Split(
            self.features[index],
            self.labels[index],
            [self.tracks[i] for i in index.tolist()],
            None if self.flipped is None else self.flipped[index],
        )


def listing(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names (sorted folder names, as the imagefolder source) and each split's
    (path relative to root, label) pairs."""
    from lookcloser.data.images import list_image_files

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    files = {}
    for split in ("train", "test"):
        files[split] = [
            (str(f.relative_to(root)), label)
            for label, name in enumerate(classes)
            for f in list_image_files(root / split / name)
        ]
    return classes, files


def extract(root: Path, work: Path, threads: int) -> tuple[list[str], dict[str, Split]]:
    """Pooled Lite0 features of every image (cached in WORK/features-lite0-96)."""
    classes, files = listing(root)
    cache = work / f"features-lite0-{SIZE}"
    # As JSON gives it back (lists, not tuples), so that an unchanged listing compares equal.
    meta = json.loads(
        json.dumps({"backbone": BACKBONE, "size": SIZE, "classes": classes, "files": files})
    )
    known = cache / "meta.json"
    if not (known.is_file() and json.loads(known.read_text()) == meta):
        compute_features(root, cache, files, threads)
        known.write_text(json.dumps(meta))
    splits = {}
    for split, pairs in files.items():
        flipped = cache / f"{split}_flip.npy"
        splits[split] = Split(
            torch.from_numpy(np.load(cache / f"{split}.npy")),
            torch.tensor([label for _, label in pairs]),
            [TRACK.search(Path(path).stem).group(1) for path, _ in pairs],
            torch.from_numpy(np.load(flipped)) if flipped.is_file() else None,
        )
    return classes, splits


def compute_features(root: Path, cache: Path, files: dict, threads: int) -> None:
    from lookcloser.config import DataConfig
    from lookcloser.data.images import load_image
    from lookcloser.data.transforms import eval_transform
    from lookcloser.models.backbones import Backbone

    torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    backbone = Backbone(BACKBONE, pretrained=True).eval()
    interpolation = backbone.data_config.get("interpolation", "bicubic")
    transform = eval_transform(SIZE, DataConfig().crop_pct, interpolation)
    for split, pairs in files.items():
        start = time.perf_counter()
        plain, mirrored = [], []
        for i in range(0, len(pairs), 64):
            images = torch.stack([transform(load_image(root / p)) for p, _ in pairs[i : i + 64]])
            with torch.inference_mode():
                plain.append(backbone(images))
                if split == "train":
                    mirrored.append(backbone(images.flip(-1)))
        np.save(cache / f"{split}.npy", torch.cat(plain).numpy())
        if mirrored:
            np.save(cache / f"{split}_flip.npy", torch.cat(mirrored).numpy())
        print(f"features of {len(pairs)} {split} images: {time.perf_counter() - start:.0f} s")


def carve_val(train: Split, num_classes: int) -> tuple[Split, Split]:
    """(train part, val part): VAL_TRACKS of each class's fish tracks, at least one (none of a
    class with a single track), held out."""
    rng = np.random.default_rng(VAL_SEED)
    held = set()
    for c in range(num_classes):
        tracks = sorted(
            {t for t, y in zip(train.tracks, train.labels.tolist(), strict=True) if y == c}
        )
        # A class of one track keeps it (nothing to validate on, but nothing lost to train).
        count = max(1, round(VAL_TRACKS * len(tracks))) if len(tracks) > 1 else 0
        held |= {(c, t) for t in rng.choice(tracks, size=count, replace=False).tolist()}
    is_val = torch.tensor(
        [(y, t) in held for y, t in zip(train.labels.tolist(), train.tracks, strict=True)]
    )
    return train.subset(torch.nonzero(~is_val)[:, 0]), train.subset(torch.nonzero(is_val)[:, 0])


# ---- one head's training -----------------------------------------------------------------------------
def train_head(
    variant: Variant, setting: Setting, data: Split, num_classes: int, seed: int
) -> torch.nn.Module:
    """The class head trained on frozen features with the variant's sampler and stages.

    A hand-written loop rather than Lightning's: with the backbone frozen a step is one
    1280 x C matrix product, and the Trainer's per-step machinery would cost many times the
    step. The optimizer, the stages' schedules and the samplers are the project's own.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from lookcloser.config import OptimConfig, StageConfig
    from lookcloser.data.samplers import sample_weights
    from lookcloser.engine.finetune import StagedScheduler, resolve_stages, stage_at
    from lookcloser.models.heads import HeadSpec

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = HeadSpec(variant.head, scale=setting.scale, margin=setting.margin)
    head = spec.build(data.features.shape[1], num_classes)
    configured = [StageConfig(epochs=setting.epochs, sampler=variant.sampler)]
    if setting.stage2_epochs:
        # The second stage of a two-stage fine-tune: backbone frozen (here it always is),
        # class-balanced sampling, its own learning rate and cosine schedule; the head goes on
        # from where the first stage left it.
        configured.append(
            StageConfig(
                epochs=setting.stage2_epochs,
                lr=setting.stage2_lr,
                freeze_backbone=True,
                sampler="balanced",
            )
        )
    optim = OptimConfig(name="adamw", lr=setting.lr, weight_decay=WEIGHT_DECAY, stages=configured)
    total = sum(s.epochs for s in configured)
    stages = resolve_stages(optim, total, freeze_norm=False)
    params = list(head.parameters())
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = create_optimizer_v2([g for g in groups if g["params"]], opt="adamw", lr=setting.lr)
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / BATCH)

    def make(optimizer, stage):  # as FGVCSystem.configure_optimizers, without warm-up
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched="cosine",
            num_epochs=stage.epochs,
            warmup_epochs=stage.warmup_epochs,
            step_on_epochs=False,
            updates_per_epoch=steps_per_epoch,
        )
        return scheduler

    schedule = StagedScheduler(optimizer, stages, make)
    labels = data.labels.tolist()
    weights = {s.sampler: sample_weights(labels, s.sampler) for s in configured}
    step = 0
    head.train()
    for epoch in range(total):
        sampler = configured[stage_at(stages, epoch)].sampler
        if sampler == "uniform":
            order = torch.randperm(n, generator=generator)
        else:  # as WeightedRandomSampler(weights, num_samples=n): n draws with replacement
            order = torch.multinomial(weights[sampler], n, replacement=True, generator=generator)
        mirror = torch.rand(n, generator=generator) < HFLIP
        for b in range(steps_per_epoch):
            index = order[b * BATCH : (b + 1) * BATCH]
            x = data.features[index]
            if data.flipped is not None:
                x = torch.where(mirror[index, None], data.flipped[index], x)
            y = data.labels[index]
            schedule.step_update(step, epoch, steps_per_epoch)
            logits = spec.training_logits(head(x), y)
            loss = F.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


def score(head: torch.nn.Module, data: Split, classes: list[str], shots: list[int]) -> dict:
    """Top-1, mean per-class accuracy, and mean per-class accuracy of each shot group."""
    from torchmetrics.classification import MulticlassAccuracy

    from lookcloser.evaluation import compute_metrics

    with torch.no_grad():
        logits = head(data.features)
    metrics = compute_metrics(logits, data.labels, classes)
    per_class = MulticlassAccuracy(num_classes=len(classes), average=None)(logits, data.labels)
    present = torch.bincount(data.labels, minlength=len(classes)) > 0
    out = {"top1": metrics["top1"], "mean_per_class_accuracy": metrics["mean_per_class_accuracy"]}
    for group, members in shot_groups(shots).items():
        kept = [c for c in members if present[c]]
        out[group] = float(per_class[kept].mean()) if kept else None
    return out


def shot_groups(shots: list[int]) -> dict[str, list[int]]:
    """Class indices with more than MANY, MANY..FEW and fewer than FEW training images."""
    return {
        "many": [c for c, n in enumerate(shots) if n > MANY],
        "medium": [c for c, n in enumerate(shots) if FEW <= n <= MANY],
        "few": [c for c, n in enumerate(shots) if n < FEW],
    }


def group_sizes(splits: dict[str, Split], num_classes: int) -> dict[str, int]:
    """Classes and test images of each shot group, as record fields (`many_classes`, ...)."""
    shots = torch.bincount(splits["train"].labels, minlength=num_classes).tolist()
    tests = torch.bincount(splits["test"].labels, minlength=num_classes).tolist()
    out = {}
    for group, members in shot_groups(shots).items():
        out[f"{group}_classes"] = len(members)
        out[f"{group}_test_images"] = sum(tests[c] for c in members)
    return out


# ---- tuning on val ---------------------------------------------------------------------------------
def candidates(variant: Variant, chosen: dict[str, Setting]) -> list[Setting]:
    """The settings tried for a variant; the two-stage and `-tuned` grids start from the
    settings chosen for their base (plain, the default-margin head)."""
    if variant.settings_of:
        return [chosen[variant.settings_of]]
    if variant.two_stage:
        base = chosen["plain"]
        return [
            replace(base, stage2_lr=base.lr * share, stage2_epochs=e)
            for share in STAGE2_LR_SHARES
            for e in STAGE2_EPOCHS
        ]
    if variant.tune_margin:
        base = chosen[variant.name.removesuffix("-tuned")]
        return [replace(base, scale=s, margin=m) for s in MARGIN_SCALES for m in MARGINS]
    return [Setting(lr, epochs) for lr in LRS for epochs in EPOCHS]


def tune(classes: list[str], train: Split, work: Path) -> dict:
    """Each variant's setting with the best val mean per-class accuracy (cached)."""
    path = work / "tuning.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    fit, val = carve_val(train, len(classes))
    shots = torch.bincount(fit.labels, minlength=len(classes)).tolist()
    chosen: dict[str, Setting] = {}
    for variant in VARIANTS:
        if variant.name not in done:
            start = time.perf_counter()
            tried = []
            for setting in candidates(variant, chosen):
                scores = [
                    score(train_head(variant, setting, fit, len(classes), s), val, classes, shots)
                    for s in TUNE_SEEDS
                ]
                tried.append(
                    {
                        "setting": asdict(setting),
                        "val_mean_per_class": statistics.mean(
                            r["mean_per_class_accuracy"] for r in scores
                        ),
                        "val_top1": statistics.mean(r["top1"] for r in scores),
                    }
                )
            best = max(tried, key=lambda t: (t["val_mean_per_class"], t["val_top1"]))
            done[variant.name] = {
                "best": best,
                "tried": tried,
                "val_images": len(val.labels),
                "fit_images": len(fit.labels),
            }
            path.write_text(json.dumps(done, indent=1) + "\n")
            print(
                f"tuned {variant.name}: {Setting(**best['setting']).text()}, val mean per-class "
                f"{100 * best['val_mean_per_class']:.1f} ({len(tried)} settings, "
                f"{time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        chosen[variant.name] = Setting(**done[variant.name]["best"]["setting"])
    return done


# ---- the fine-tuned comparison ---------------------------------------------------------------------
# The whole network fine-tuned with `lookcloser train` (the project's Lightning loop), one
# short schedule for every variant: too few CPU hours here to tune each on val as the head-only
# protocol does, so every variant runs at the project's common fine-tune settings (docs/
# benchmarks.md) at FT_SIZE px, and the margin heads at the scale and margin the head-only
# protocol chose on val.
FT_EPOCHS = 3
FT_STAGE2 = "{epochs: 1, lr: 0.0004, warmup_epochs: 0, freeze_backbone: true, sampler: balanced}"
FT_COMMON = [
    "data.source=imagefolder",
    f"model.backbone={BACKBONE}",
    "model.pretrained=true",
    f"data.image_size={SIZE}",
    f"data.batch_size={BATCH}",
    "data.num_workers=2",
    "data.val_fraction=0",
    "optim.name=adamw",
    "optim.lr=0.002",
    "optim.head_lr_scale=5",
    "optim.warmup_epochs=0.5",
    "method.name=baseline",
    f"method.label_smoothing={LABEL_SMOOTHING}",
    f"trainer.epochs={FT_EPOCHS}",
    "trainer.val_every_n_epochs=0",
    "trainer.progress=none",
]
MARGIN_ON_VAL = ["model.head_scale=64", "model.head_margin=0.1"]
FINETUNED: dict[str, tuple[list[str], str]] = {
    "plain": ([], "linear head, uniform sampling"),
    "balanced": (["data.sampler=balanced"], "class-balanced sampling (`data.sampler=balanced`)"),
    "twostage": (
        [f"optim.stages=[{{epochs: {FT_EPOCHS}}}, {FT_STAGE2}]", f"trainer.epochs={FT_EPOCHS + 1}"],
        f"plain for {FT_EPOCHS} epochs, then one epoch of the head alone, backbone frozen, "
        "class-balanced, lr 4e-4 (`optim.stages`)",
    ),
    "arcface": (
        ["model.head=arcface", *MARGIN_ON_VAL],
        "ArcFace head, s = 64, m = 0.1 (chosen on val by the head-only protocol)",
    ),
    "subcenter": (
        ["model.head=subcenter_arcface", *MARGIN_ON_VAL],
        "sub-centre ArcFace, 3 centres a class, s = 64, m = 0.1",
    ),
    "prototype": (["model.head=prototype"], "prototype head, 3 prototypes a class, s = 16"),
    # Beyond the list, when time allows: the other sampler, and the head-only winner.
    "sqrt": (["data.sampler=sqrt"], "square-root sampling"),
    "arcface-balanced": (
        ["model.head=arcface", *MARGIN_ON_VAL, "data.sampler=balanced"],
        "ArcFace (s = 64, m = 0.1) with class-balanced sampling",
    ),
}


def per_class_accuracy(confusion: Path, classes: list[str]) -> list[float | None]:
    """Each class's test accuracy from a run's square confusion.csv (rows: true class)."""
    rows = confusion.read_text().splitlines()
    header = rows[0].split(",")[1:]
    if header != classes:
        raise SystemExit(f"{confusion}: classes {header[:3]}... are not fish23's")
    out: list[float | None] = []
    for c, line in enumerate(rows[1:]):
        counts = [int(x) for x in line.split(",")[1:]]
        out.append(counts[c] / sum(counts) if sum(counts) else None)
    return out


def finetune(
    entry: str, seed: int, root: Path, work: Path, threads: int, listed: tuple | None = None
) -> dict:
    """One fine-tuned run's record, trained unless WORK/finetuned holds it with the same
    settings; the figures are read back from the run's files (metrics.json, confusion.csv).
    `listed`: `listing(root)` when the caller has it (one listing for many runs)."""
    from lookcloser import api

    overrides, what = FINETUNED[entry]
    config = [*FT_COMMON, *overrides]
    out = work / "finetuned" / f"{entry}-s{seed}"
    timing = work / "finetuned" / f"{entry}-s{seed}.json"
    if not (timing.is_file() and json.loads(timing.read_text())["config"] == config):
        start = time.perf_counter()
        api.train(
            None,
            overrides=[
                *config,
                f"data.root={root}",
                f"trainer.cpu_threads={threads}",
                f"seed={seed}",
                f"out={out}",
                "overwrite=true",
            ],
            progress=False,
        )
        seconds = round(time.perf_counter() - start, 1)
        timing.write_text(json.dumps({"config": config, "seconds": seconds}))
    test = json.loads((out / "metrics.json").read_text())["test"]
    classes, files = listed or listing(root)
    per_class = per_class_accuracy(out / "confusion.csv", classes)
    shots = np.bincount([y for _, y in files["train"]], minlength=len(classes)).tolist()
    tests = np.bincount([y for _, y in files["test"]], minlength=len(classes)).tolist()
    groups = {}
    for group, members in shot_groups(shots).items():
        groups[group] = statistics.mean(per_class[c] for c in members if tests[c])
        groups[f"{group}_classes"] = len(members)
        groups[f"{group}_test_images"] = sum(tests[c] for c in members)
    record = {
        "kind": "longtail",
        "dataset": DATASET,
        "entry": entry,
        "seed": seed,
        "backbone": BACKBONE,
        "size": SIZE,
        "features": "fine-tuned",
        "epochs": FT_EPOCHS,
        "config": config,
        "top1": test["top1"],
        "mean_per_class_accuracy": test["mean_per_class_accuracy"],
        **groups,
        "ece": test["ece"],
        "train_images": len(files["train"]),
        "test_images": test["images"],
        "what": what,
        "section": SECTION_FINETUNED,
        "seconds": json.loads(timing.read_text())["seconds"],
    }
    print(
        f"fine-tuned {entry} seed {seed}: mean per-class {100 * record['mean_per_class_accuracy']:.1f}"
        f", top-1 {100 * record['top1']:.1f} ({record['seconds']:.0f} s)",
        flush=True,
    )
    return record


# ---- measuring and the report ------------------------------------------------------------------------
def measure(
    classes: list[str], splits: dict[str, Split], tuning: dict, seeds: list[int], work: Path
) -> list:
    """One record per variant and seed: the head trained on all of train, scored on test
    (kept in WORK/measured.json; a record of the same variant, settings and seed is reused)."""
    train, test = splits["train"], splits["test"]
    shots = torch.bincount(train.labels, minlength=len(classes)).tolist()
    path = work / "measured.json"
    kept = json.loads(path.read_text()) if path.is_file() else []
    records = []
    for variant in VARIANTS:
        setting = Setting(**tuning[variant.name]["best"]["setting"])
        for seed in seeds:
            same = [
                r
                for r in kept
                if r["entry"] == variant.name
                and r["seed"] == seed
                and Setting(**{k: r.get(k) for k in asdict(setting) if k in r}) == setting
            ]
            if same:
                records.append(same[-1])
                continue
            start = time.perf_counter()
            head = train_head(variant, setting, train, len(classes), seed)
            seconds = time.perf_counter() - start
            result = score(head, test, classes, shots)
            records.append(
                {
                    "kind": "longtail",
                    "dataset": DATASET,
                    "entry": variant.name,
                    "seed": seed,
                    "backbone": BACKBONE,
                    "size": SIZE,
                    "features": "frozen",
                    "head": variant.head,
                    "sampler": variant.sampler,
                    **{k: v for k, v in asdict(setting).items() if v is not None},
                    **result,
                    "train_images": len(train.labels),
                    "test_images": len(test.labels),
                    "section": SECTION,
                    "seconds": round(seconds, 1),
                }
            )
            kept.append(records[-1])
            path.write_text(json.dumps(kept, indent=1) + "\n")
            print(
                f"{variant.name} seed {seed}: mean per-class {100 * result['mean_per_class_accuracy']:.1f}"
                f", top-1 {100 * result['top1']:.1f} ({seconds:.0f} s)",
                flush=True,
            )
    return records


def pct(values: list[float], bold: bool = False) -> str:
    values = [100 * v for v in values]
    mean = f"**{statistics.mean(values):.1f}**" if bold else f"{statistics.mean(values):.1f}"
    if len(values) == 1:
        return mean
    return f"{mean} ± {statistics.stdev(values):.1f}"


def paired(values: dict[int, float], base: dict[int, float]) -> str:
    shared = [s for s in values if s in base]
    if not shared:
        return ""
    diffs = [100 * (values[s] - base[s]) for s in shared]
    return f"{statistics.mean(diffs):+.1f} ({sum(d > 0 for d in diffs)} of {len(shared)} higher)"


def report(records: list[dict], tuning: dict, classes: list[str], splits: dict[str, Split]) -> str:
    """The markdown section: protocol, the test table, the tuning table."""
    from report import markdown_table

    train, test = splits["train"], splits["test"]
    shots = torch.bincount(train.labels, minlength=len(classes)).tolist()
    tests = torch.bincount(test.labels, minlength=len(classes)).tolist()
    counts = group_sizes(splits, len(classes))
    sizes = {
        g: f"{counts[f'{g}_classes']} classes, {counts[f'{g}_test_images']:,} test images"
        for g in ("many", "medium", "few")
    }
    by_entry: dict[str, dict[int, dict]] = {}
    for r in records:
        by_entry.setdefault(r["entry"], {})[r["seed"]] = r
    base = by_entry["plain"]
    rows = []
    for variant in VARIANTS:
        runs = by_entry[variant.name]
        seeds = sorted(runs)

        def col(key: str, runs: dict = runs, seeds: list = seeds) -> list[float]:
            return [runs[s][key] for s in seeds]

        rows.append(
            [
                f"`{variant.name}`",
                pct(col("mean_per_class_accuracy"), bold=True),
                pct(col("top1")),
                pct(col("many")),
                pct(col("medium")),
                pct(col("few")),
                ""
                if variant.name == "plain"
                else paired(
                    {s: runs[s]["mean_per_class_accuracy"] for s in seeds},
                    {s: r["mean_per_class_accuracy"] for s, r in base.items()},
                ),
                ""
                if variant.name == "plain"
                else paired(
                    {s: runs[s]["top1"] for s in seeds}, {s: r["top1"] for s, r in base.items()}
                ),
                Setting(**tuning[variant.name]["best"]["setting"]).text(),
            ]
        )
    seeds = " ".join(str(s) for s in sorted(base))
    table = markdown_table(
        [
            "variant",
            "mean per-class %",
            "top-1 %",
            f"many-shot % (> {MANY} train images: {sizes['many']})",
            f"medium % ({FEW}-{MANY}: {sizes['medium']})",
            f"few-shot % (< {FEW}: {sizes['few']})",
            "mean per-class vs plain, paired",
            "top-1 vs plain, paired",
            "settings (chosen on val)",
        ],
        rows,
    )
    any_tuning = next(iter(tuning.values()))
    tuning_rows = [
        [
            f"`{v.name}`",
            str(len(tuning[v.name]["tried"])),
            Setting(**tuning[v.name]["best"]["setting"]).text(),
            f"{100 * tuning[v.name]['best']['val_mean_per_class']:.1f}",
            f"{100 * tuning[v.name]['best']['val_top1']:.1f}",
        ]
        for v in VARIANTS
    ]
    lines = [
        "## fish23 long tail: balanced sampling, two-stage, margin and prototype heads (`longtail`)",
        "",
        f"`python benchmarks/longtail.py --data-root DATA --work WORK --seeds {seeds} --record`",
        "",
        f"fish23: {len(classes)} reef-fish species, {len(train.labels):,} train images "
        f"({max(shots)} down to {min(shots)} a class), {len(test.labels):,} test images "
        f"({max(tests)} down to {min(tests)} a class). Protocol: the project's ImageNet-pretrained "
        f"`{BACKBONE}` frozen; the pooled 1280-d features of every image at its evaluation "
        f"transform at {SIZE} px (and of every train image mirrored, drawn with probability "
        f"{HFLIP:g}) computed once; only the class head trains, with the project's heads, "
        f"samplers, stages and metrics: AdamW, weight decay {WEIGHT_DECAY:g}, per-step cosine "
        f"schedule without warm-up, batch {BATCH}, label smoothing {LABEL_SMOOTHING:g}, an epoch "
        "= as many draws as train images. Learning rate and epochs (and the second stage's, and "
        "scale and margin of the `-tuned` rows) chosen per variant on a validation split carved "
        f"from train by fish track ({VAL_TRACKS:.0%} of each class's tracks: "
        f"{any_tuning['val_images']:,} images; train on the other {any_tuning['fit_images']:,}), "
        f"by mean per-class accuracy over seeds {', '.join(map(str, TUNE_SEEDS))}; then each "
        f"variant trained on all of train, seeds {seeds}, scored on all {len(test.labels):,} "
        "test images. Figures: mean ± sd over the seeds; a shot group's figure is the mean of "
        "its classes' accuracies. Seconds per head training on this CPU: "
        f"{statistics.mean(r['seconds'] for r in records):.0f} on average.",
        "",
        table,
        "",
        "Tuning on the validation split (grid: lr "
        + ", ".join(f"{x:g}" for x in LRS)
        + " x epochs "
        + ", ".join(map(str, EPOCHS))
        + "; two-stage: second-stage lr "
        + ", ".join(f"{x:g}" for x in STAGE2_LR_SHARES)
        + " x the first's, epochs "
        + ", ".join(map(str, STAGE2_EPOCHS))
        + "; `-tuned`: scale "
        + ", ".join(f"{x:g}" for x in MARGIN_SCALES)
        + " x margin "
        + ", ".join(f"{x:g}" for x in MARGINS)
        + " rad at the default-margin row's lr and epochs; `x@y`: not tuned, x at y's "
        "settings, to tell the sampler's effect from that of its lr and epochs):",
        "",
        markdown_table(
            ["variant", "settings tried", "chosen", "val mean per-class %", "val top-1 %"],
            tuning_rows,
        ),
        "",
        "Variants: " + "; ".join(f"`{v.name}`: {v.text}" for v in VARIANTS) + ".",
    ]
    return "\n".join(lines)


def report_finetuned(records: list[dict], seeds: list[int]) -> str:
    """The markdown section of the fine-tuned comparison."""
    from report import markdown_table

    by_entry: dict[str, dict[int, dict]] = {}
    for r in records:
        by_entry.setdefault(r["entry"], {})[r["seed"]] = r
    base = by_entry["plain"]
    first = records[0]
    rows = []
    for entry, runs in by_entry.items():
        ordered = [runs[s] for s in sorted(runs)]

        def vs(key: str, runs: dict = runs) -> str:
            return paired(
                {s: r[key] for s, r in runs.items()}, {s: r[key] for s, r in base.items()}
            )

        rows.append(
            [
                f"`{entry}`",
                pct([r["mean_per_class_accuracy"] for r in ordered], bold=True),
                pct([r["top1"] for r in ordered]),
                *(pct([r[g] for r in ordered]) for g in ("many", "medium", "few")),
                "" if entry == "plain" else vs("mean_per_class_accuracy"),
                "" if entry == "plain" else vs("top1"),
                ", ".join(str(s) for s in sorted(runs)),
                f"{statistics.mean(r['seconds'] for r in ordered):.0f}",
            ]
        )
    groups = {
        g: f"{first[f'{g}_classes']} classes, {first[f'{g}_test_images']:,} test images"
        for g in ("many", "medium", "few")
    }
    table = markdown_table(
        [
            "variant",
            "mean per-class %",
            "top-1 %",
            f"many-shot % (> {MANY} train images: {groups['many']})",
            f"medium % ({FEW}-{MANY}: {groups['medium']})",
            f"few-shot % (< {FEW}: {groups['few']})",
            "mean per-class vs plain, paired",
            "top-1 vs plain, paired",
            "seeds",
            "seconds a run (wall; some beside other jobs)",
        ],
        rows,
    )
    entries = " ".join(by_entry)
    return "\n".join(
        [
            "## fish23 long tail, fine-tuned: the same variants with the whole network trained "
            f"(`{SECTION_FINETUNED}`)",
            "",
            f"`python benchmarks/longtail.py --data-root DATA --work WORK --threads 2 --finetune "
            f"{entries} --seeds {' '.join(map(str, seeds))} --record`",
            "",
            f"fish23 as above ({first['train_images']:,} train / {first['test_images']:,} test "
            f"images). Protocol: `lookcloser train` fine-tunes the ImageNet-pretrained "
            f"`{BACKBONE}` at {SIZE} px for {FT_EPOCHS} epochs on all of train (no validation "
            "split) with the common settings of this page (AdamW lr 2e-3, heads 5x, weight decay "
            f"0.01, cosine with half an epoch of warm-up, batch {BATCH}, label smoothing "
            f"{LABEL_SMOOTHING:g}, the default augmentation), 2 torch threads, and is scored on "
            "the whole test split; a shot group's figure is the mean of its classes' accuracies "
            "(read from the run's confusion.csv). Not tuned per variant (the head-only protocol "
            "tunes on val; a fine-tune here costs minutes, not seconds): every variant runs the "
            "plain schedule, the margin heads at the scale and margin the head-only tuning chose "
            "on val. Figures: mean ± sd over the seeds.",
            "",
            table,
            "",
            "Variants: " + "; ".join(f"`{e}`: {FINETUNED[e][1]}" for e in by_entry) + ".",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="holds fish23/")
    parser.add_argument(
        "--work", type=Path, required=True, help="features and tuning (not the repo)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--record", action="store_true", help="write the docs section and the records"
    )
    parser.add_argument(
        "--finetune",
        nargs="*",
        choices=list(FINETUNED),
        help="fine-tune these variants (none named: all) instead of the head-only protocol",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.finetune is not None:
        entries = args.finetune or list(FINETUNED)
        root = args.data_root / DATASET
        listed = listing(root)
        records = [
            finetune(entry, seed, root, args.work, args.threads, listed)
            for seed in args.seeds
            for entry in entries
        ]
        text = report_finetuned(records, args.seeds)
        print(text)
        if args.record:
            from report import append_records, write_section

            command = text.split("`")[1].removesuffix(" --record")  # the section's command
            write_section(SECTION_FINETUNED, text)
            append_records(SECTION, [{**r, "command": command} for r in records])
        return
    classes, splits = extract(args.data_root / DATASET, args.work, args.threads)
    tuning = tune(classes, splits["train"], args.work)
    records = measure(classes, splits, tuning, args.seeds, args.work)
    text = report(records, tuning, classes, splits)
    print(text)
    if args.record:
        from report import append_records, write_section

        command = "python benchmarks/longtail.py --data-root DATA --work WORK --seeds " + " ".join(
            map(str, args.seeds)
        )
        sizes = group_sizes(splits, len(classes))
        write_section(SECTION, text)
        what = {v.name: v.text for v in VARIANTS}
        append_records(
            SECTION,
            [{**r, **sizes, "what": what[r["entry"]], "command": command} for r in records],
        )


if __name__ == "__main__":
    main()
