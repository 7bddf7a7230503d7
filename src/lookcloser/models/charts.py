"""Channel weights as a bar chart picture, for explain to show beside its map.

A plug-in block's channel weights (SE, CBAM's channel attention) and SK's branch weights
are one number (or one split) per channel and stage, not a map over the image; explain shows
them as an image view: one bar chart per stage, channels along x, weight (0 to 1) up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

BRANCH_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def weight_chart(
    rows: Sequence[tuple[str, Tensor]], branch_names: Sequence[str] = (), width: float = 6.0
) -> Tensor:
    """3 x h x w picture in [0, 1]: one bar chart per (title, weights) row.

    `weights` is C (one bar per channel) or P x C (bars stacked by branch: SK's shares of
    each channel, which sum to 1; `branch_names` label them).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 0.4 + 1.1 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (title, weights) in zip(axes, rows, strict=True):
        values = weights.detach().float().cpu().numpy()
        if values.ndim == 1:
            values = values[None]
        x = np.arange(values.shape[1])
        bottom = np.zeros(values.shape[1])
        for p, share in enumerate(values):
            label = branch_names[p] if p < len(branch_names) else None
            colour = BRANCH_COLOURS[p % len(BRANCH_COLOURS)]
            ax.bar(x, share, bottom=bottom, width=1.0, color=colour, label=label, linewidth=0)
            bottom = bottom + share
        ax.set_xlim(-0.5, values.shape[1] - 0.5)
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1])
        ax.tick_params(labelsize=6)
        ax.set_title(title, fontsize=7, pad=2)
        if branch_names and ax is axes[0]:
            ax.legend(fontsize=6, loc="upper right", ncols=len(branch_names), framealpha=0.8)
    axes[-1].set_xlabel("channel", fontsize=7)
    fig.tight_layout(pad=0.4, h_pad=0.6)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
