"""Argument checks shared by the model families.

Every model validates its input shape and option values in ``__init__`` so that
a mismatch fails at build time with a message naming the model, the bad value
and what was expected, instead of as a shape error deep inside ``forward``.
"""

from __future__ import annotations

from typing import Any


def shape_error(model: str, shape: tuple[int, ...], expects: str) -> ValueError:
    """The error raised when ``model`` cannot take inputs of ``shape``."""
    return ValueError(f"model {model!r} cannot take input_shape {shape}: it expects {expects}")


def check_image_shape(
    model: str,
    shape: tuple[int, ...],
    *,
    channels: int | None = None,
    multiple: int = 1,
) -> tuple[int, int, int]:
    """Check that ``shape`` is ``(C, H, W)`` and return it.

    ``channels`` pins ``C``; ``multiple`` requires ``H`` and ``W`` to be divisible
    by the model's total pooling factor, so that no border pixels are silently
    dropped and the classifier's in-features follow exactly from the shape.
    """
    expects = f"({'C' if channels is None else channels}, H, W)"
    if multiple > 1:
        expects += f" with H and W multiples of {multiple}"
    if (
        len(shape) != 3
        or (channels is not None and shape[0] != channels)
        or shape[1] % multiple
        or shape[2] % multiple
    ):
        raise shape_error(model, shape, expects)
    c, h, w = shape
    return c, h, w


def check_sequence_shape(model: str, shape: tuple[int, ...]) -> int:
    """Check that ``shape`` is ``(L,)``, a window of ``L`` token ids, and return ``L``."""
    if len(shape) != 1:
        raise shape_error(model, shape, "(L,): a window of L character or token ids")
    return shape[0]


def check_positive_int(model: str, option: str, value: Any) -> int:
    """Check that the option ``option`` of ``model`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {model!r}: option {option} must be a positive int, got {value!r}")
    return value


def check_dropout(model: str, value: Any) -> float:
    """Check that a dropout probability lies in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"model {model!r}: option dropout must be a float in [0, 1), got {value!r}"
        )
    return float(value)
