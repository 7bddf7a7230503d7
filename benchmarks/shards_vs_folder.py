"""Train from an image folder and from its shards with the same seed; compare test metrics.

Also checks the evaluation path itself: the folder-trained model's test logits from the
shards must equal its logits from the folder (same decoded images, same Predictor path).

    PYTHONPATH=src python benchmarks/shards_vs_folder.py ../shared/data/butterflies10 \
        --work /tmp/lookcloser-shards-check --image-size 96 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lookcloser import api
from lookcloser.data.batch import collate
from lookcloser.data.shards import ShardDataset, open_shards, pack_shards
from lookcloser.data.sources import build_source


def main() -> None:
    """Pack, train twice, compare; print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an ImageFolder tree with train/ and test/")
    parser.add_argument("--work", default="/tmp/lookcloser-shards-check")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=100)
    args = parser.parse_args()
    work = Path(args.work)
    shards = work / "shards"
    common = [
        f"seed={args.seed}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=2",
        "model.backbone=tf_efficientnet_lite0",
        "model.pretrained=true",
        f"trainer.epochs={args.epochs}",
        "trainer.val_every_n_epochs=0",
        "data.val_fraction=0",  # train on all of train, as the recorded figures did
        "overwrite=true",
    ]
    folder = ["data.source=imagefolder", f"data.root={args.folder}"]
    if not (shards / "dataset.json").exists():
        cfg = api.as_config(None, folder)
        pack_shards(build_source(cfg.data), shards, args.shard_size, seed=args.seed)
    runs = {}
    for name, data in (
        ("folder", folder),
        ("shards", ["data.source=shards", f"data.root={shards}"]),
    ):
        start = time.perf_counter()
        result = api.train(None, [*common, *data, f"out={work / name}"], progress=False)
        runs[name] = (result.metrics["test"], time.perf_counter() - start)

    # The folder-trained model, evaluated on the folder's and the shards' test split.
    predictor = api.load(work / "folder")
    cfg = api.as_config(None, folder)
    from_folder = predictor.run_samples(build_source(cfg.data).test, args.batch_size, 0, False)
    test = ShardDataset.from_index(
        open_shards(str(shards)), "test", transform=predictor.transform, meta_keys=[]
    )
    loader = DataLoader(test, batch_size=args.batch_size, collate_fn=collate)
    from_shards = predictor.run_batches(loader, progress=False)
    same_labels = torch.equal(from_folder.labels, from_shards.labels)
    diff = (from_folder.logits - from_shards.logits).abs().max().item()
    shard_eval = api.evaluate(
        work / "folder", ["data.source=shards", f"data.root={shards}"], progress=False
    )

    print("| run | test images | top-1 | mean per-class acc | train+eval time (s) |")
    print("|---|---|---|---|---|")
    for name, (metrics, seconds) in runs.items():
        print(
            f"| trained from {name} | {metrics['images']} | {metrics['top1']:.4f} | "
            f"{metrics['mean_per_class_accuracy']:.4f} | {seconds:.0f} |"
        )
    print(
        f"| folder model, evaluated on shards | {shard_eval['images']} | "
        f"{shard_eval['top1']:.4f} | {shard_eval['mean_per_class_accuracy']:.4f} | |"
    )
    print(
        f"\nfolder model: same test labels in the same order: {same_labels}; "
        f"max |logit difference| folder vs shards: {diff:.3g}"
    )
    print(
        f"top-1 difference, shards - folder training: "
        f"{runs['shards'][0]['top1'] - runs['folder'][0]['top1']:+.4f}"
    )
    (work / "summary.json").write_text(
        json.dumps(
            {
                "runs": {k: v[0] for k, v in runs.items()},
                "shard_eval": shard_eval,
                "max_logit_diff": diff,
                "same_labels": same_labels,
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
