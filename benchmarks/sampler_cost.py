"""Cost of TASN's attention sampler against a backbone forward on the same batch.

The sampler (resize the maps to the input, max marginals, cap and spread, inverse CDF,
`grid_sample`) runs on a batch of attention maps; the reference is the inference forward of
the backbone on the sampled batch. Ratios come from interleaved runs.

    python benchmarks/sampler_cost.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402
from throughput import interleaved  # noqa: E402

from lookcloser.methods.tasn import attention_sample  # noqa: E402
from lookcloser.models.backbones import Backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--maps", type=int, default=28, help="attention map side")
    parser.add_argument("--out", type=int, default=224, help="sampled image side")
    parser.add_argument("--inputs", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = Backbone(args.backbone).eval()
    sampled = torch.rand(args.batch, 3, args.out, args.out)
    maps = torch.rand(args.batch, args.maps, args.maps) ** 4  # peaky, as trained maps are

    def forward():
        with torch.inference_mode():
            backbone(sampled)

    rows = []
    for size in args.inputs:
        images = torch.rand(args.batch, 3, size, size)

        def sample(images=images):
            with torch.inference_mode():
                attention_sample(images, maps, args.out)

        rate_sampler, rate_forward = interleaved(
            sample, forward, args.batch, args.iters, args.rounds
        )
        rows.append(
            [
                f"{args.batch} maps {args.maps} x {args.maps}, images {size} -> {args.out} px",
                f"{rate_sampler:.0f} / {rate_forward:.1f}",
                f"**{100 * rate_forward / rate_sampler:.1f} %**",
            ]
        )
    command = "python benchmarks/sampler_cost.py " + " ".join(sys.argv[1:])
    text = (
        "## TASN's attention sampler against a backbone forward\n\n"
        f"Command: `{command.strip()}`. Machine: {machine()}. Reference: {args.backbone} "
        f"inference forward on the {args.batch} sampled {args.out} px images. Medians of "
        f"{args.rounds} interleaved rounds.\n\n"
        + markdown_table(
            ["sampler on", "images/s: sampler / forward", "sampler cost, % of the forward"],
            rows,
        )
    )
    print(text)
    if not args.no_write:
        write_section("cost-tasn-sampler", text)


if __name__ == "__main__":
    main()
