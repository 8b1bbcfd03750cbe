"""Core data containers, error types and shared helpers for the dataset loaders.

Every loader in :mod:`rankfed.data` returns a :class:`Dataset`: the full train and test
tensors held in memory (the datasets used here are small enough), plus optional
per-sample group ids that define the "natural" federated split (speaking role,
device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rankfed.errors import DataFormatError, DataNotFoundError

__all__ = ["Dataset", "DataNotFoundError", "DataFormatError", "check_int_option", "check_number_option", "standardize"]


@dataclass(repr=False)
class Dataset:
    """A fully materialised dataset with a train and a test split.

    Attributes:
        name: Canonical dataset name (one of :data:`rankfed.data.DATASETS`).
        train_x: Inputs, ``float32 (N, C, H, W)`` for images, ``float32 (N, F)`` for
            vectors, ``uint8 (N, L)`` character ids for text windows.
        train_y: ``int64 (N,)`` class ids in ``[0, num_classes)``.
        test_x, test_y: The test split, same layout.
        num_classes: Number of classes (the output width of a classifier).
        input_shape: Shape of one sample, ``train_x.shape[1:]``.
        groups: ``int64 (N_train,)`` group id per train sample for the ``natural``
            partition, or ``None`` when the dataset has no natural split.
        group_names: Human-readable name of each group id (``group_names[g]``).
        vocab: For text, the characters; ``vocab[i]`` is the character of class ``i``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    vocab: str | None = None

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if len(x) != len(y):
                raise ValueError(f"{self.name}: {split}_x has {len(x)} samples but {split}_y has {len(y)}")
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name}: {split}_x samples have shape {tuple(x.shape[1:])}, "
                    f"input_shape says {self.input_shape}"
                )
        if self.groups is not None and len(self.groups) != len(self.train_y):
            raise ValueError(
                f"{self.name}: groups has {len(self.groups)} entries for {len(self.train_y)} train samples"
            )

    def __repr__(self) -> str:
        groups = "" if self.group_names is None else f", groups={len(self.group_names)}"
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape}{groups})"
        )


def check_int_option(dataset: str, option: str, value: Any, minimum: int) -> int:
    """A dataset option that must be an int >= ``minimum`` (bools rejected): ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{dataset} {option} must be an int >= {minimum}, got {value!r}")
    return value


def check_number_option(dataset: str, option: str, value: Any, minimum: float) -> float:
    """A dataset option that must be a finite number >= ``minimum``: ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < math.inf:
        raise ValueError(f"{dataset} {option} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def standardize(
    train: torch.Tensor, test: torch.Tensor, dims: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits in place with the train split's mean and std.

    Statistics are reduced over ``dims`` (e.g. all dims for a single scalar, or
    ``(0, 2, 3)`` for one value per image channel), so test data never leaks into them.
    """
    std, mean = torch.std_mean(train, dim=tuple(dims), keepdim=True, correction=0)
    std = std.clamp_min(1e-8)  # a constant feature must not produce inf/nan
    train.sub_(mean).div_(std)
    test.sub_(mean).div_(std)
    return train, test
