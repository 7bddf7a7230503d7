"""Per-sample weights for class-rebalanced sampling of long-tailed data (iNaturalist)."""

from __future__ import annotations

from collections import Counter

import torch

from lookcloser.errors import DataError

MODES = ("uniform", "balanced", "sqrt")


def sample_weights(labels: list[int], mode: str) -> torch.Tensor:
    """Sampling weight of each sample, normalised to sum to 1, for `mode`:

    - `uniform`: every sample equally likely (the usual shuffle); classes in proportion
      to their frequency n_c.
    - `balanced`: weight 1/n_c, so every class is drawn equally often (class-balanced).
    - `sqrt`: weight 1/sqrt(n_c), so a class is drawn in proportion to sqrt(n_c): a middle
      ground that softens the long tail without repeating rare images as often.

    Draw with `torch.multinomial(weights, n, replacement=True)` or
    `torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels))`.
    """
    if mode not in MODES:
        raise DataError(f"data.sampler: expected one of {', '.join(MODES)}; got {mode!r}")
    if not labels:
        raise DataError("data.sampler: no labels to weight")
    counts = Counter(labels)
    n = torch.tensor([counts[label] for label in labels], dtype=torch.float64)
    if mode == "uniform":
        weights = torch.ones_like(n)
    elif mode == "balanced":
        weights = 1.0 / n
    else:
        weights = n.rsqrt()
    return weights / weights.sum()
