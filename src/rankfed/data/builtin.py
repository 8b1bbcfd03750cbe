"""Datasets that need no files: sklearn's ``digits`` and the generated ``mnist1d``.

Both are small enough for quick experiments and tests on a CPU.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .base import Dataset, standardize

__all__ = ["load_digits", "load_mnist1d"]


def load_digits(*, seed: int = 0) -> Dataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn.

    A stratified 80/20 train/test split drawn from ``seed``; pixels are scaled from
    ``[0, 16]`` to ``[0, 1]`` and standardised with the train split's mean and std.
    """
    # imported here: scikit-learn and mnist1d (which pulls in scipy and matplotlib) cost ~1 s
    # at import, paid by every process (each Flower ClientApp message is a fresh one)
    from sklearn.datasets import load_digits as _sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = _sklearn_digits()
    x = bunch.data.astype(np.float32) / 16.0  # (1797, 64), raw values are 0..16
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    train_x = torch.from_numpy(x_tr).reshape(-1, 1, 8, 8)
    test_x = torch.from_numpy(x_te).reshape(-1, 1, 8, 8)
    standardize(train_x, test_x, dims=(0, 1, 2, 3))
    return Dataset(
        name="digits",
        train_x=train_x,
        train_y=torch.from_numpy(y_tr),
        test_x=test_x,
        test_y=torch.from_numpy(y_te),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def load_mnist1d(*, seed: int = 0, num_samples: int | None = None) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally from the package's templates.

    Args:
        seed: Seed of the generator (replaces the package default of 42).
        num_samples: Total number of samples (rounded down to a multiple of the 10
            classes), split 80/20 into train/test by the package; ``None`` keeps the
            package default (5,000).

    Returns ``float32 (N, 40)`` signals, standardised with the train split's statistics.
    """
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    if hasattr(args, "seed"):
        args.seed = seed
    if num_samples is not None:
        if not hasattr(args, "num_samples"):
            raise ValueError("this mnist1d version does not support the num_samples option")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
            raise ValueError(f"mnist1d num_samples must be at least 10 (one per class), got {num_samples!r}")
        args.num_samples = int(num_samples)

    # make_dataset reseeds Python's and NumPy's global generators; restore them so
    # loading a dataset does not change the random streams of the caller.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    train_x = torch.from_numpy(np.asarray(raw["x"], dtype=np.float32))  # (0.8 N, 40)
    test_x = torch.from_numpy(np.asarray(raw["x_test"], dtype=np.float32))  # (0.2 N, 40)
    standardize(train_x, test_x, dims=(0, 1))
    return Dataset(
        name="mnist1d",
        train_x=train_x,
        train_y=torch.from_numpy(np.asarray(raw["y"], dtype=np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(np.asarray(raw["y_test"], dtype=np.int64)),
        num_classes=10,
        input_shape=tuple(train_x.shape[1:]),
    )
