"""CIFAR-10 / CIFAR-100 loaders for the "python version" pickle batches.

Layout (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch
                           keys b"data" (10000, 3072) uint8, b"labels" list[int]
    cifar-100-python/      train, test
                           keys b"data" (N, 3072) uint8, b"fine_labels" list[int]

Each row of ``data`` holds the red, then green, then blue 32x32 plane, row-major, so
``data.reshape(N, 3, 32, 32)`` is already channels-first.

The batches are pickles written by the dataset authors. They are read with
``encoding="bytes"`` through an unpickler that only resolves the few NumPy globals an
array needs, so a tampered file fails with :class:`DataFormatError` instead of
running code.
"""

from __future__ import annotations

import os
import pickle
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataFormatError, DataNotFoundError, Dataset, standardize

__all__ = ["load_cifar"]

# dataset name -> (folder name inside the archive, train files, test files, label key, classes)
_LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bytes, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}
_PIXELS = 3 * 32 * 32

# Everything a pickled ndarray may reference (NumPy 1.x and 2.x spellings).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles of bytes written by Python 3
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler restricted to plain containers and NumPy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):
            # NumPy 2 renamed numpy.core to numpy._core; avoid its deprecation shim.
            with suppress(ImportError, AttributeError):
                return super().find_class("numpy._core." + module.removeprefix("numpy.core."), name)
        return super().find_class(module, name)


def _data_folder(name: str, root: str | os.PathLike | None) -> Path:
    subfolder, train_files, test_files, _, _ = _LAYOUTS[name]
    hint = f"set task.data_dir to the {subfolder} folder of the python-version archive (or its parent)"
    if root is None:
        raise DataNotFoundError(f"{name} has no default data folder: {hint}")
    folder = Path(root).expanduser()
    if not (folder / train_files[0]).is_file() and (folder / subfolder).is_dir():
        folder = folder / subfolder
    if folder.exists() and not folder.is_dir():
        raise DataNotFoundError(f"{name} not found: {folder} is a file, not a folder; {hint}")
    if not folder.is_dir():
        raise DataNotFoundError(f"{name} not found: the folder {folder} does not exist; {hint}")
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{name} not found: the folder {folder} lacks {', '.join(missing)}; {hint}")
    return folder


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 (N, 3072) pixels, int64 (N,) labels)."""
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle (or an unreadable file) can fail in many ways
        reason = f"{type(err).__name__}: {err}"
        raise DataFormatError(f"{path}: not a readable CIFAR pickle ({reason})") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataFormatError(f"{path}: expected a dict with keys b'data' and {label_key!r}")
    try:
        data = np.asarray(batch[b"data"])
    except (ValueError, TypeError) as err:  # e.g. ragged nested lists
        raise DataFormatError(f"{path}: b'data' is not an array ({err})") from None
    try:
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as err:
        raise DataFormatError(f"{path}: {label_key!r} is not a list of labels ({err})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataFormatError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, {_PIXELS})")
    if len(data) == 0:
        raise DataFormatError(f"{path}: holds no images")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(
            f"{path}: {label_key!r} must hold {len(data)} integer labels, got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{path}: labels outside [0, {num_classes})")
    return data, labels.astype(np.int64)


def load_cifar(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``cifar10`` or ``cifar100`` (fine labels) from the python-version batches.

    ``root`` is the batch folder or its parent. Images become ``float32 (N, 3, 32, 32)``
    in ``[0, 1]``, standardised per channel with the train split's mean and std.
    """
    _, train_files, test_files, label_key, num_classes = _LAYOUTS[name]
    folder = _data_folder(name, root)

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(folder / f, label_key, num_classes) for f in files]
        data = np.concatenate([d for d, _ in parts])  # (N, 3072) uint8: R, G, B planes
        x = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
        return x, torch.from_numpy(np.concatenate([y for _, y in parts]))

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    standardize(train_x, test_x, dims=(0, 2, 3))  # one mean/std per colour channel
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        input_shape=(3, 32, 32),
    )
