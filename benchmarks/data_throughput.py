"""Training data-loading throughput from an image folder and from its shards, as a ratio to
the training step's consumption rate (baseline forward + backward + optimizer step).

A ratio above 1 means the loader delivers images faster than the step consumes them, so
loading is not the bottleneck. Loader and step are timed separately, in the same run.

    PYTHONPATH=src python benchmarks/data_throughput.py ../shared/data/butterflies10 \
        --shards /tmp/lookcloser-shards-check/shards --sizes 224 128
"""

from __future__ import annotations

import argparse
import time

import torch

from lookcloser import api
from lookcloser.data.batch import Batch
from lookcloser.data.shards import open_shards, pack_shards
from lookcloser.data.sources import build_source
from lookcloser.data.transforms import eval_transform, train_transform
from lookcloser.engine.datamodule import FGVCDataModule, ShardDataModule
from lookcloser.methods import build_method


def loader_rate(loader, batches: int) -> float:
    """Images/s over `batches` batches, after a first batch that pays for worker start-up."""
    it = _endless(loader)
    next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(it))  # a Batch
    return images / (time.perf_counter() - start)


def _endless(loader):
    while True:
        yield from loader


def step_rate(cfg, num_classes: int, batch_size: int, size: int, steps: int) -> float:
    """Images/s of the training step (forward, backward, optimizer) on random images."""
    method = build_method(cfg, num_classes).train()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    images = torch.rand(batch_size, 3, size, size)
    labels = torch.randint(0, num_classes, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        method.training_losses(Batch(images, labels))["loss"].backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    """Measure and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an ImageFolder tree with train/ and test/")
    parser.add_argument("--shards", required=True, help="its shards (packed here if missing)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder_cfg = ["data.source=imagefolder", f"data.root={args.folder}"]
    splits = build_source(api.as_config(None, folder_cfg).data)
    try:
        index = open_shards(args.shards)
    except Exception:
        pack_shards(splits, args.shards, 100)
        index = open_shards(args.shards)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device for the step: {device}; torch threads {torch.get_num_threads()}; "
        f"loader workers {args.workers}; batch {args.batch_size}"
    )
    print("| size | step (img/s) | folder loader (img/s) | ratio | shards loader (img/s) | ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = api.as_config(
            None,
            [
                *folder_cfg,
                f"data.image_size={size}",
                f"data.batch_size={args.batch_size}",
                "model.backbone=tf_efficientnet_lite0",
                "model.pretrained=false",
            ],
        )
        transforms = (
            train_transform(cfg.data, "bicubic"),
            eval_transform(size, cfg.data.crop_pct, "bicubic"),
        )
        folder = FGVCDataModule(
            splits.train,
            [],
            *transforms,
            batch_size=args.batch_size,
            num_workers=args.workers,
            seed=0,
            max_pixels=cfg.data.max_image_pixels,
        ).train_dataloader()
        shards = ShardDataModule(
            index,
            *transforms,
            batch_size=args.batch_size,
            num_workers=args.workers,
            seed=0,
            shuffle_buffer=cfg.data.shuffle_buffer,
            max_pixels=cfg.data.max_image_pixels,
        ).train_dataloader()
        folder_ips = loader_rate(folder, args.batches)
        shards_ips = loader_rate(shards, args.batches)
        del folder, shards  # stop the workers before timing the step
        step_ips = step_rate(cfg, len(splits.classes), args.batch_size, size, args.steps)
        print(
            f"| {size} | {step_ips:.1f} | {folder_ips:.1f} | {folder_ips / step_ips:.2f} | "
            f"{shards_ips:.1f} | {shards_ips / step_ips:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
