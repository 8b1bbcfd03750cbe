"""Build reference models by name.

``build_model(name, input_shape, num_classes, **options)`` checks the generic
arguments (a known name, a shape of positive ints, a positive class count,
options the model accepts) and leaves the model-specific checks (which shapes
it can take, which option values make sense) to the model's constructor.
Weights use torch's default initialisation: seed torch before building to
get reproducible models.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from .resnet import ResNet18, WideResNet16_4
from .text import CharLSTM, CharTransformer
from .vision import CNN2, CNN3, MLP, LogisticRegression

__all__ = ["MODELS", "ModelOptionError", "build_model", "count_parameters"]


class ModelOptionError(TypeError, ValueError):
    """A model option the model does not accept.

    A :class:`TypeError` (what a constructor raises for an unexpected keyword) and a
    :class:`ValueError` (bad user input, which the command line reports in one line).
    """


_REGISTRY: dict[str, type[nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn2": CNN2,
    "cnn3": CNN3,
    "resnet18": ResNet18,
    "wrn16_4": WideResNet16_4,
    "char_lstm": CharLSTM,
    "transformer": CharTransformer,
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_model`."""


def _options(model_cls: type[nn.Module]) -> tuple[str, ...]:
    """The options of a model: the keyword-only arguments of its constructor."""
    parameters = inspect.signature(model_cls).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _as_shape(input_shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, Sequence)
        or len(input_shape) == 0
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints (one sample, no batch dim), "
            f"got {input_shape!r}"
        )
    return tuple(input_shape)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any
) -> nn.Module:
    """Build the reference model ``name`` for samples of ``input_shape``.

    Args:
        name: one of :data:`MODELS`.
        input_shape: shape of one sample without the batch dimension, e.g.
            ``(1, 28, 28)`` for MNIST or ``(80,)`` for an 80-character window.
        num_classes: number of output logits; for the text models also the
            vocabulary size.
        **options: model-specific options, e.g. ``hidden=(200, 200)`` for
            ``"mlp"`` or ``norm="group"`` for ``"resnet18"``.

    Returns:
        A module mapping a batch ``(B, *input_shape)`` to logits ``(B, num_classes)``.

    Raises:
        ValueError: unknown ``name``, an ``input_shape`` the model cannot take,
            a bad ``num_classes`` or a bad option value.
        ModelOptionError: an option the model does not accept (a TypeError and a ValueError).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    model_cls = _REGISTRY[name]
    valid = _options(model_cls)
    unknown = [option for option in options if option not in valid]
    if unknown:
        raise ModelOptionError(
            f"model {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) if valid else 'none'}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = _as_shape(input_shape)
    try:
        return model_cls(shape, num_classes, **options)
    except (RuntimeError, MemoryError) as e:  # e.g. a layer width so large its weights cannot be allocated
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ValueError(f"model {name!r} ({opts}) cannot be built: {type(e).__name__}: {e}") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (shared parameters counted once).

    With ``trainable_only`` only parameters with ``requires_grad`` are counted.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
