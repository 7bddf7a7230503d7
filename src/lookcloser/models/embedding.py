"""The feature a method's class decision reads (lookalikes.embed, ONNX's `embedding` output).

Every class classifier layer of the method (a linear layer with one output per class, a
cosine or prototype head) is watched during the ordinary forward; the embedding is the input
of the call whose output *is* the logits the method returns. Model-level only (no files, no
Predictor), so export and the Predictor both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lookcloser.errors import ConfigError
from lookcloser.models.heads import CosineHead, PrototypeHead


def is_classifier(module: nn.Module, num_classes: int) -> bool:
    """Whether `module` is a class classifier layer: a cosine or prototype head, or a linear
    layer with one output per class."""
    if isinstance(module, CosineHead | PrototypeHead):
        return True
    return isinstance(module, nn.Linear) and module.out_features == num_classes


@dataclass
class ClassifierCall:
    """One call of a classifier layer during a forward: its name, input and output."""

    name: str
    inputs: Tensor
    output: Tensor


@contextlib.contextmanager
def watch_classifiers(method: nn.Module) -> Iterator[list[ClassifierCall]]:
    """Within the block, every call of the method's classifier layers, in order."""
    calls: list[ClassifierCall] = []
    num_classes = int(getattr(method, "num_classes", -1))
    handles = []
    for name, module in method.named_modules():
        if not is_classifier(module, num_classes):
            continue

        def hook(module, args, output, name=name):
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                calls.append(ClassifierCall(name, args[0], output))

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def decision_call(calls: Sequence[ClassifierCall], logits: Tensor) -> ClassifierCall | None:
    """The call whose output is the method's logits (the last such), or None."""
    return next((c for c in reversed(calls) if c.output is logits), None)


def method_logits_and_features(
    method: nn.Module,
    images: Tensor,
    meta: Tensor | None = None,
    meta_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, str, bool]:
    """(logits, the decision classifier's input features (not normalised), the classifier's
    module name, exact) of a batch of preprocessed images; see the module docstring."""
    with watch_classifiers(method) as calls:
        logits = method(images, meta, meta_mask)
    found = decision_call(calls, logits)
    exact = found is not None
    if found is None:  # several heads summed: the whole image's feature, as forward_head reads it
        with watch_classifiers(method) as calls:
            head_logits = method.forward_head(method.forward_features(images), meta, meta_mask)
        found = decision_call(calls, head_logits)
    if found is None:
        raise ConfigError(
            f"method {getattr(method, 'name', '?')!r}: no class head (a linear, cosine or "
            "prototype layer from Method.make_head) makes its prediction; it has no embedding"
        )
    return logits, found.inputs, found.name, exact
