"""Test accuracy of one trained TASN model with other test-time sampler settings.

The weights stay as trained; only `structure_power` and `max_zoom` of the structure sampler
change, which tells how much of a score comes from the warp itself.

    python benchmarks/tasn_test_sampler.py MODEL_DIR TEST_DIR --settings 2:4 1:4 1:2 0:4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from lookcloser.predictor import Predictor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("test_dir", type=Path, help="an ImageFolder split: <class>/<image>")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["2:4", "1:4", "1:2", "0:4"],
        help="structure_power:max_zoom pairs (power 0: a flat map, no warp)",
    )
    parser.add_argument("--section", help="docs/benchmarks.md section to write")
    args = parser.parse_args()

    predictor = Predictor.load(args.model_dir)
    if predictor.info["method"] != "tasn":
        parser.error(f"{args.model_dir} is a {predictor.info['method']!r} model, not tasn")
    files, labels = [], []
    for index, name in enumerate(predictor.classes):
        for path in sorted((args.test_dir / name).iterdir()):
            files.append(str(path))
            labels.append(index)
    labels = torch.tensor(labels)
    options = predictor.method.options
    trained = (options.structure_power, options.max_zoom)
    rows = []
    for setting in args.settings:
        power, zoom = (float(v) for v in setting.split(":"))
        # A power of 0 would make 0 ** 0 = 1 everywhere too, but stay clear of the edge case.
        options.structure_power, options.max_zoom = max(power, 1e-6), zoom
        predicted = torch.tensor([p.indices[0] for p in predictor.predict(files, top_k=1)])
        top1 = (predicted == labels).float().mean().item()
        note = "as trained" if (power, zoom) == trained else ""
        rows.append([f"{power:g}", f"{zoom:g}", f"**{100 * top1:.1f}**", note])
    options.structure_power, options.max_zoom = trained
    text = (
        f"## TASN with other test-time sampler settings: {args.model_dir.name}\n\n"
        f"Command: `python benchmarks/tasn_test_sampler.py {' '.join(sys.argv[1:])}`. "
        f"Machine: {machine()}. {len(files)} test images; the trained weights are unchanged.\n\n"
        + markdown_table(["structure_power", "max_zoom", "test top-1 %", ""], rows)
    )
    print(text)
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
