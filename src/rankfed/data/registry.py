"""Dataset registry: :func:`load_dataset` dispatches a name to its loader."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial

from .base import Dataset
from .builtin import load_digits, load_mnist1d
from .cifar import load_cifar
from .idx import load_idx_dataset
from .shakespeare import load_shakespeare
from .synthetic import load_synthetic

__all__ = ["DATASETS", "load_dataset"]

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "synthetic": load_synthetic,
    "fmnist": partial(load_idx_dataset, "fmnist"),
    "mnist": partial(load_idx_dataset, "mnist"),
    "kmnist": partial(load_idx_dataset, "kmnist"),
    "cifar10": partial(load_cifar, "cifar10"),
    "cifar100": partial(load_cifar, "cifar100"),
    "shakespeare": load_shakespeare,
}
DATASETS = tuple(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike | None = None, *, seed: int = 0, **options) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) into memory.

    Args:
        name: Dataset name.
        root: Where the files are (a folder, or the text file for ``shakespeare``);
            ignored by the generated datasets (``digits``, ``mnist1d``, ``synthetic``).
        seed: Seed for datasets with randomness (generation or train/test split);
            file-based datasets are deterministic and ignore it.
        **options: Dataset-specific keyword options, e.g. ``alpha``/``beta``/``num_devices``
            for ``synthetic``, ``num_samples`` for ``mnist1d``, ``seq_len``/``stride``/
            ``min_samples``/``max_samples_per_role`` for ``shakespeare``.

    Raises:
        ValueError: Unknown name or option.
        DataNotFoundError: The files are missing; the message says where to put them.
        DataFormatError: A file is corrupt or truncated; the message names it.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    loader = _LOADERS[name]
    params = inspect.signature(loader).parameters
    valid = [p.name for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name != "seed"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    if "root" in params:
        options["root"] = root
    if "seed" in params:
        options["seed"] = seed
    return loader(**options)
