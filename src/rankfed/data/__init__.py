"""Datasets and federated partitioning for rankfed.

Typical use::

    from rankfed.data import load_dataset, federate

    ds = load_dataset("fmnist", root="/data/fashion-mnist")
    clients = federate(ds, num_clients=100, method="dirichlet", seed=0, alpha=0.3)

:func:`load_dataset` returns a :class:`Dataset` holding the whole train and test split
as tensors; :func:`partition` splits the train indices among clients and
:func:`federate` turns that split into per-client :class:`ClientData`.
All loaders read local files only; nothing is downloaded.
"""

from .base import DataFormatError, DataNotFoundError, Dataset
from .federate import ClientData, federate
from .partition import PARTITIONS, holdout_split, partition
from .registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ClientData",
    "DataFormatError",
    "DataNotFoundError",
    "Dataset",
    "federate",
    "holdout_split",
    "load_dataset",
    "partition",
]
