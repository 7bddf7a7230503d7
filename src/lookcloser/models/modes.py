"""A module in eval mode for the length of a block, and back to its own mode after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block `module` is in eval mode (batch norm reads its running statistics and
    updates none, dropout is off); its own mode comes back after, also on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
