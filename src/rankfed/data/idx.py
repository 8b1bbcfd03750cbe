"""MNIST-family loaders (``fmnist``, ``mnist``, ``kmnist``) reading IDX files.

IDX (LeCun et al.) is a big-endian header followed by raw uint8 data:

    images: magic 0x00000803, count N, rows, cols, then N*rows*cols pixels
    labels: magic 0x00000801, count N, then N labels

A data folder holds the four files ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). The dotted spelling
``train-images.idx3-ubyte`` and torchvision's ``<root>/<Name>/raw`` folder are found too.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataFormatError, DataNotFoundError, Dataset, standardize

__all__ = ["FMNIST_DEFAULT_ROOT", "IDX_FILES", "load_idx_dataset", "read_idx"]

# Where the Debian package ``dataset-fashion-mnist`` installs the files.
FMNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
GZIP_MAGIC = b"\x1f\x8b"  # IDX files start with 0x0000, so the two never clash
IMAGE_SIZE = 28
NUM_CLASSES = 10

# dataset name -> (display name, torchvision folder name)
_VARIANTS = {
    "fmnist": ("Fashion-MNIST", "FashionMNIST"),
    "mnist": ("MNIST", "MNIST"),
    "kmnist": ("Kuzushiji-MNIST", "KMNIST"),
}
_FILES_HINT = "a folder with the four IDX files (" + ", ".join(f"{f}[.gz]" for f in IDX_FILES) + ")"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one uint8 IDX file (plain or gzipped) and check its header and length.

    Returns a read-only uint8 array of the shape stored in the header.

    Raises:
        DataFormatError: bad gzip stream, wrong magic number, or a length that does
            not match the header (e.g. a truncated download).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot be read ({err.strerror or err})") from None
    if data[:2] == GZIP_MAGIC:  # decide by content, not by the file name's suffix
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise DataFormatError(f"{path}: corrupt gzip stream ({err})") from err

    ndim = magic & 0xFF  # the magic's last byte is the number of dimensions
    header_len = 4 * (1 + ndim)
    if len(data) < header_len:
        raise DataFormatError(
            f"{path}: truncated, {len(data)} bytes is shorter than the {header_len}-byte IDX header"
        )
    found, *dims = struct.unpack_from(f">{1 + ndim}I", data)
    if found != magic:
        raise DataFormatError(f"{path}: IDX magic number is 0x{found:08X}, expected 0x{magic:08X}")
    expected_len = header_len + math.prod(dims)
    if len(data) != expected_len:
        problem = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise DataFormatError(
            f"{path}: {problem}, {len(data)} bytes but the header "
            f"(shape {'x'.join(map(str, dims))}) implies {expected_len}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_file(folder: Path, name: str) -> Path | None:
    """The first existing spelling of ``name`` in ``folder``: plain, gzipped, dotted."""
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _data_folder(name: str, root: str | os.PathLike | None) -> Path:
    """Resolve and check the folder holding ``name``'s IDX files."""
    display, torchvision_name = _VARIANTS[name]
    if root is None:
        if name != "fmnist":
            raise DataNotFoundError(
                f"{display} ({name!r}) has no default data folder: set task.data_dir "
                f"(the `root` argument of load_dataset) to {_FILES_HINT}"
            )
        folder = FMNIST_DEFAULT_ROOT
    else:
        folder = Path(root).expanduser()

    how_to_get = f"set task.data_dir to {_FILES_HINT}"
    if name == "fmnist":
        how_to_get = f"run `apt-get install dataset-fashion-mnist` or {how_to_get}"
    if folder.exists() and not folder.is_dir():
        raise DataNotFoundError(f"{display} not found: {folder} is a file, not a folder; {how_to_get}")
    if not folder.is_dir():
        raise DataNotFoundError(f"{display} not found: the folder {folder} does not exist; {how_to_get}")
    torchvision_folder = folder / torchvision_name / "raw"
    if _find_file(folder, IDX_FILES[0]) is None and _find_file(torchvision_folder, IDX_FILES[0]):
        folder = torchvision_folder
    missing = [f for f in IDX_FILES if _find_file(folder, f) is None]
    if missing:
        raise DataNotFoundError(
            f"{display} not found: the folder {folder} lacks {', '.join(missing)} (plain or .gz); "
            f"{how_to_get}"
        )
    return folder


def _read_split(folder: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find_file(folder, images_name), _find_file(folder, labels_name)
    images = read_idx(images_path, IMAGES_MAGIC)  # (N, 28, 28) uint8
    labels = read_idx(labels_path, LABELS_MAGIC)  # (N,) uint8
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if len(images) != len(labels):
        raise DataFormatError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    if len(images) == 0:
        raise DataFormatError(f"{images_path}: holds no images (the header's count is 0)")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataFormatError(f"{labels_path}: label {labels.max()} outside [0, {NUM_CLASSES})")
    return images, labels


def load_idx_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``fmnist``, ``mnist`` or ``kmnist`` from a folder of IDX files.

    ``root`` defaults to :data:`FMNIST_DEFAULT_ROOT` for ``fmnist``; ``mnist`` and
    ``kmnist`` need it. Images become ``float32 (N, 1, 28, 28)``, scaled to ``[0, 1]``
    and standardised with the train split's mean and std (one scalar each).
    """
    folder = _data_folder(name, root)
    train_images, train_labels = _read_split(folder, IDX_FILES[0], IDX_FILES[1])
    test_images, test_labels = _read_split(folder, IDX_FILES[2], IDX_FILES[3])

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32))  # copy: the IDX buffer is read-only
        return x.div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)

    train_x, test_x = to_tensor(train_images), to_tensor(test_images)
    standardize(train_x, test_x, dims=(0, 1, 2, 3))
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=NUM_CLASSES,
        input_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
    )
