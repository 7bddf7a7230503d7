"""Gradients of class heads with respect to their input, in closed form: no autograd, so a
method that needs them at inference (DCN's saliency) still exports to ONNX."""

from __future__ import annotations

from torch import Tensor, nn


def input_gradient(head: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    """d(sum grad * head(x))/dx without autograd (so it exports): the head's own
    `input_gradient`, or grad @ weight for a linear layer."""
    if hasattr(head, "input_gradient"):
        return head.input_gradient(x, grad)
    return grad @ head.weight.to(grad.dtype)


def has_input_gradient(head: nn.Module) -> bool:
    """Whether `input_gradient` knows this head."""
    return hasattr(head, "input_gradient") or isinstance(head, nn.Linear)
