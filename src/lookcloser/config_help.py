"""`lookcloser config`: the resolved config tree, every key with its default, type and meaning.

The output is YAML that `--config` reads back: values as set, the rest in trailing comments.
Meanings of the core keys live in HELP below (a test checks every key has one); a method's
options carry theirs in its Options dataclass as `HELP`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from lookcloser.config import Config, Range, _leaves, _type_name

HELP: dict[str, str] = {
    "data.source": "where images come from: synthetic, imagefolder, csv, a benchmark dataset, shards",
    "data.root": "dataset folder, CSV file or shard folder (synthetic: where to write it)",
    "data.image_size": "input side in pixels",
    "data.batch_size": "images per training step (per device)",
    "data.num_workers": "DataLoader worker processes",
    "data.on_bad_image": "error: stop before training, listing unreadable images; skip: leave them out",
    "data.verify_images": "decode every image once before training",
    "data.max_image_pixels": "decompression-bomb limit: larger images are refused",
    "data.test_fraction": "share held out as test when a source has no test split",
    "data.val_fraction": "share of train carved (stratified) for validation when a source has no val split; 0 = none",
    "data.split_seed": "seed of the carved test and validation splits",
    "data.boxes": "crop fusion's training boxes: attention (the model's own), dataset (the "
    "source's bbox annotations) or a JSON box file (image path -> [x, y, w, h] pixels)",
    "data.test_boxes": "crop fusion's boxes for validation and the test report: attention, "
    "dataset or a JSON box file",
    "data.meta_keys": "metadata the model takes (e.g. [lat, lon]); identifiers are refused",
    "data.unlabelled": "unlabelled images beside each batch: a folder, or source:root",
    "data.unlabelled_batch_size": "unlabelled images per step (default: data.batch_size)",
    "data.level": "label granularity where a dataset has several (aircraft: variant|family|manufacturer)",
    "data.train_split": "which official training split (aircraft, flowers102: trainval|train; inat: train|train_mini)",
    "data.shuffle_buffer": "samples held for shuffling streamed shards",
    "data.crop_pct": "evaluation: resize to image_size / crop_pct, then centre-crop",
    "data.train_scale": "training: random-resized-crop area range",
    "data.hflip": "training: horizontal flip probability",
    "data.rotation": "training: random rotation up to this many degrees",
    "data.color_jitter": "training: colour jitter strength",
    "data.auto_augment": "training: timm auto-augment policy (e.g. rand-m9-mstd0.5)",
    "data.random_erasing": "training: random erasing probability",
    "data.erasing_fill": "training: what an erased box holds: zero, noise, or the image's per-channel mean",
    "data.preset": "augmentation preset: none, or inat21 (flip, rotation 15, jitter 0.4, "
    "erasing 0.25 filled with the mean); explicit keys win",
    "data.sampler": "training order: uniform shuffling, class-balanced or sqrt-frequency weights",
    "data.mixup": "mixup alpha (0 = off)",
    "data.cutmix": "cutmix alpha (0 = off)",
    "data.synthetic.classes": "synthetic set: classes",
    "data.synthetic.per_class": "synthetic set: training images per class",
    "data.synthetic.test_per_class": "synthetic set: test images per class",
    "data.synthetic.size": "synthetic set: image side in pixels",
    "data.synthetic.seed": "synthetic set: generator seed",
    "data.synthetic.meta": "synthetic set: per-image latitude, longitude and date around a "
    "home region and season of each class (noisy, 10% missing each; the metadata alone guesses about 57% of 8 classes)",
    "model.backbone": "any timm model name",
    "model.pretrained": "start from pretrained weights (model.weights, an offline package, or timm's hub)",
    "model.weights": "a local safetensors or state-dict checkpoint to start from",
    "model.weights_key_map": "how checkpoint keys map onto the model: none, position, strip:<prefix>",
    "model.drop_rate": "dropout before the classifier",
    "model.drop_path_rate": "stochastic depth rate",
    "model.kwargs": "extra timm.create_model arguments, e.g. model.kwargs.img_size=448",
    "model.head": "class head type: linear, cosine, arcface, subcenter_arcface, prototype "
    "(registry: models/heads.py)",
    "model.head_scale": "cosine heads: logits = scale x cosine (null = 30)",
    "model.head_margin": "arcface heads: additive angular margin in radians on the target "
    "class, training only (null = 0.3)",
    "model.head_subcenters": "subcenter_arcface and prototype: centres per class (null = 3)",
    "model.fusion": "metadata fusion before every class head: none, add, concat or gate "
    "(needs data.meta_keys; latitude/longitude and day_of_year get their own encodings)",
    "model.crop_fusion": "object-crop fusion: none, concat or add; the image and a crop of its "
    "object (data.boxes) through the same backbone, pooled features joined before the class head",
    "model.crop_alpha": "crop fusion's attention boxes: the largest connected region of cells "
    "whose importance exceeds this many times the mean",
    "model.meta_hidden": "metadata fusion: width of the embedding MLP",
    "model.meta_dropout": "metadata fusion: share of training samples whose metadata is "
    "masked whole",
    "model.attention": "attention blocks after the CNN's stages: none, se, sk or cbam "
    "(timm's layers; each starts as the identity)",
    "model.attention_stages": "stages (feature levels, as Backbone.intermediates counts them) "
    "that get a block; [] = every level from stride 4 on",
    "model.attention_reduction": "channel reduction r of the blocks' bottleneck (SE paper: 16)",
    "model.attention_gate_init": "the blocks' gate gamma at step 0 (x + gamma (block(x) - x)): "
    "0 = identity, 1 = the block as published",
    "model.stn": "a spatial transformer warps the input in front of the backbone (starts as "
    "the identity)",
    "model.freeze_norm": "freeze pretrained BatchNorm / LayerNorm layers: statistics and affine "
    "parameters stay as loaded",
    "model.tta": "test-time augmentation the trained model defaults to (none, flip, five_crop, "
    "scales=S1+S2, comma-separated); also used by the run's val / test report",
    "model.stn_mode": "the transform the STN learns: affine, similarity (scale, rotation, "
    "shift) or translation_scale",
    "model.stn_lr_scale": "the STN's learning rate as a multiple of optim.lr (a warp that "
    "leaves the image gets no gradient back, so it moves slowly)",
    "model.stn_localisation": "the STN's localisation net: scratch (a small CNN) or backbone (a "
    "copy of model.backbone with its pretrained weights)",
    "model.stn_size": "the side in pixels of the image the localisation net reads",
    "model.stn_view_size": "the side of the STN's output, the view the backbone classifies "
    "(0 = the input's); below data.image_size a zoom shows real pixels, not resampled ones",
    "optim.name": "any timm optimizer name",
    "optim.lr": "base learning rate",
    "optim.weight_decay": "weight decay (not on biases and norms)",
    "optim.momentum": "momentum for SGD-like optimizers",
    "optim.head_lr_scale": "new modules learn this many times faster than the pretrained backbone",
    "optim.layer_decay": "layer-wise learning-rate decay for pretrained blocks (timm)",
    "optim.scheduler": "learning-rate schedule",
    "optim.warmup_epochs": "linear warm-up length in epochs",
    "optim.min_lr": "lowest learning rate of the schedule",
    "optim.step_epochs": "step schedule: epochs between decays",
    "optim.step_gamma": "step schedule: decay factor",
    "optim.stages": "train in stages, each a mapping of epochs, lr, warmup_epochs, freeze_norm, "
    "freeze_backbone, sampler (e.g. the two-stage fine-tune); [] = one stage",
    "trainer.epochs": "training epochs",
    "trainer.accelerator": "Lightning accelerator: auto, cpu, gpu",
    "trainer.devices": "devices per node: auto, a count, or -1 for all",
    "trainer.strategy": "Lightning strategy: auto, ddp, ...",
    "trainer.num_nodes": "machines taking part (DDP)",
    "trainer.precision": "32-true, bf16-mixed, 16-mixed",
    "trainer.deterministic": "deterministic kernels (bit-identical resumes)",
    "trainer.accumulate_grad_batches": "batches per optimizer step",
    "trainer.gradient_clip_val": "clip gradients to this norm",
    "trainer.val_every_n_epochs": "validate every N epochs (0 = never)",
    "trainer.log_every_n_steps": "log training losses every N steps",
    "trainer.checkpoint_every_n_steps": "also checkpoint every N optimizer steps (an epoch's end always is)",
    "trainer.resume": "last: continue this run from its last checkpoint; or a checkpoint path",
    "trainer.progress": "progress bars: rich, tqdm or none",
    "trainer.cpu_threads": "torch CPU threads: auto follows the cores other processes leave free (fixed when deterministic)",
    "trainer.max_steps": "stop after this many optimizer steps (-1 = by epochs)",
    "trainer.ema_decay": "keep an exponential moving average of the weights (timm ModelEmaV3)",
    "semi.strategy": "semi-supervised learning from data.unlabelled: none, pseudo_label, "
    "fixmatch (online) or cluster_pretrain (stages in sub-runs)",
    "semi.weight": "weight of the unlabelled loss",
    "semi.threshold": "confidence filter: the teacher's largest class probability must reach this",
    "semi.ood_score": "out-of-class filter: none, max_softmax, energy or prototype (cosine to "
    "the nearest class mean); its threshold is chosen on the val split",
    "semi.val_keep": "the OOD threshold keeps this share of the val images (all in-class)",
    "semi.strong_augment": "fixmatch: timm auto-augment policy of the strong view",
    "semi.strong_erasing": "fixmatch: random-erasing probability of the strong view",
    "semi.rounds": "cluster_pretrain: rounds of (select, embed, cluster, pretrain, fine-tune)",
    "semi.clusters": "cluster_pretrain: k of k-means (null: chosen by silhouette)",
    "semi.min_cluster_size": "cluster_pretrain: clusters with fewer images are dropped",
    "semi.cluster_keep": "cluster_pretrain: share of the large-enough clusters kept, most compact first",
    "semi.pretrain_epochs": "cluster_pretrain: epochs of each pretraining on cluster ids "
    "(null: trainer.epochs)",
    "seed": "random seed of the run",
    "out": "run directory (default runs/<time>-<method>-<backbone>)",
    "overwrite": "replace an earlier run in out (kept until the new run's first checkpoint)",
    "method.name": "the training method",
    "method.module": "a module to import first, for methods defined outside lookcloser",
}


def describe(cfg: Config, options_type: type | None = None) -> str:
    """The config as commented YAML: every key, its value, and (in comments) type, default, meaning."""
    defaults = Config()
    lines: list[str] = []
    group: tuple[str, ...] = ()
    for key, node, name in _leaves(cfg):
        if key == "method":
            continue
        *parents, leaf = key.split(".")
        if tuple(parents) != group:
            for depth, part in enumerate(parents):
                if depth >= len(group) or group[depth] != part:
                    lines.append(f"{'  ' * depth}{part}:")
            group = tuple(parents)
        field = next(f for f in dataclasses.fields(node) if f.name == name)
        hint = typing.get_type_hints(type(node))[name]
        default = _get(defaults, key)
        lines.append(
            _line(len(parents), leaf, getattr(node, name), hint, default, field, HELP.get(key, ""))
        )
    lines += _method_lines(cfg, options_type)
    return "\n".join(lines) + "\n"


def _method_lines(cfg: Config, options_type: type | None) -> list[str]:
    lines = ["method:"]
    name = cfg.method.get("name", "baseline")
    lines.append(_line(1, "name", name, str, "baseline", None, HELP["method.name"]))
    if cfg.method.get("module"):
        lines.append(
            _line(1, "module", cfg.method["module"], str, None, None, HELP["method.module"])
        )
    if options_type is None:
        return lines
    helps = getattr(options_type, "HELP", {})
    hints = typing.get_type_hints(options_type)
    for field in dataclasses.fields(options_type):
        value = cfg.method.get(field.name, field.default)
        lines.append(
            _line(
                1,
                field.name,
                value,
                hints[field.name],
                field.default,
                field,
                helps.get(field.name, ""),
            )
        )
    return lines


def _line(depth: int, leaf: str, value: Any, hint: Any, default: Any, field, meaning: str) -> str:
    text = _yaml(value)
    notes = [_type_name(hint)]
    valid: Range | None = field.metadata.get("range") if field is not None else None
    if valid is not None:
        notes.append(valid.describe())
    if _plain(value) != _plain(default):
        notes.append(f"default {_yaml(default)}")
    comment = f"  # {meaning} ({'; '.join(notes)})" if meaning else f"  # ({'; '.join(notes)})"
    return f"{'  ' * depth}{leaf}: {text}{comment}"


def _yaml(value: Any) -> str:
    """One value as inline YAML (a scalar document ends with '...', which is dropped)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):  # a record in a list (optim.stages)
        return _plain(dataclasses.asdict(value))
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
