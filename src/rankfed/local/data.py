"""A client's local data: tensors on the training device (the fast path), or a streamed Dataset.

:class:`ClientData` holds a client's training samples and its own held-out split. In memory,
``x`` is a tensor (or a dict of tensors: a model called as ``model(**x)``) and ``y`` a tensor,
and a minibatch is one index gather on the device. A map-style ``torch.utils.data.Dataset``
is *materialised* once into such tensors (its items collated with ``default_collate``) when
it fits in memory, or *streamed*: each minibatch collated from ``dataset[i]`` for the same
indices, so both give the same batches. :func:`as_client_data` turns what a user passes
(a Dataset, an ``(x, y)`` pair, a ClientData) into one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, default_collate

from rankfed.errors import ConfigError

__all__ = ["ClientData", "as_client_data", "dataset_bytes", "memory_budget"]

Inputs = torch.Tensor | dict[str, torch.Tensor]


def _index(x: Inputs, idx: torch.Tensor | slice) -> Inputs:
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _length(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _float32(x: Any) -> Any:
    """float64 from collated Python floats or NumPy arrays becomes the default dtype."""
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return x.to(torch.get_default_dtype())
    return x


def _collate(items: list, where: str) -> tuple[Inputs, torch.Tensor]:
    first = items[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ConfigError(f"{where}: dataset items must be (input, target) pairs, got {type(first).__name__}" + (f" of length {len(first)}" if isinstance(first, (tuple, list)) else ""))
    x, y = default_collate(items)
    return _float32(x), _float32(y)


class ClientData:
    """One client's training samples (``x``, ``y``) and held-out split (``val_x``, ``val_y``,
    possibly empty), in memory; or a streamed ``dataset`` (and ``val_dataset``)."""

    def __init__(self, x: Inputs | None = None, y: torch.Tensor | None = None, val_x: Inputs | None = None, val_y: torch.Tensor | None = None, *, dataset: Dataset | None = None, val_dataset: Dataset | None = None, device: torch.device | str = "cpu"):
        if dataset is None and (x is None or y is None):
            raise ValueError("ClientData needs x and y tensors, or a dataset to stream")
        self.x, self.y, self.dataset = x, y, dataset
        if val_x is None and x is not None:
            val_x, val_y = _index(x, torch.arange(0)), y[:0]
        self.val_x, self.val_y, self.val_dataset = val_x, val_y, val_dataset
        self.device = torch.device(device) if dataset is not None else _device_of(x)
        if x is not None and _length(x) != len(y):
            raise ValueError(f"ClientData: x has {_length(x)} samples but y has {len(y)}")

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    @property
    def num_samples(self) -> int:
        """Training samples (the client's weight in FedAvg)."""
        return len(self.y) if self.in_memory else len(self.dataset)

    @property
    def num_val(self) -> int:
        if self.in_memory:
            return len(self.val_y)
        return len(self.val_dataset) if self.val_dataset is not None else 0

    def batch(self, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """The training minibatch at indices ``idx`` (on this data's device)."""
        if self.in_memory:
            return _index(self.x, idx), self.y[idx]
        x, y = _collate([self.dataset[i] for i in idx.tolist()], "client data")
        return _to(x, self.device), _to(y, self.device)

    def batches(self, batch_size: int, split: str = "train") -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Consecutive minibatches of the training split (``"train"``) or the held-out one (``"val"``)."""
        if self.in_memory:
            x, y = (self.x, self.y) if split == "train" else (self.val_x, self.val_y)
            for s in range(0, len(y), batch_size):
                idx = slice(s, s + batch_size)
                yield _index(x, idx), y[idx]
            return
        ds = self.dataset if split == "train" else self.val_dataset
        n = len(ds) if ds is not None else 0
        for s in range(0, n, batch_size):
            x, y = _collate([ds[i] for i in range(s, min(n, s + batch_size))], "client data")
            yield _to(x, self.device), _to(y, self.device)

    def to(self, device: torch.device | str) -> ClientData:
        """This data on ``device`` (streamed data: its batches are moved there)."""
        device = torch.device(device)
        if not self.in_memory:
            return ClientData(dataset=self.dataset, val_dataset=self.val_dataset, device=device)
        if self.device == device:
            return self
        return ClientData(_to(self.x, device), self.y.to(device), _to(self.val_x, device), self.val_y.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The in-memory tensors by name (x.<key> for a dict input), for caching (Flower)."""
        if not self.in_memory:
            raise ValueError("streamed client data has no tensors to cache")
        out: dict[str, torch.Tensor] = {}
        for part, value in (("x", self.x), ("val_x", self.val_x)):
            if isinstance(value, dict):
                out |= {f"{part}.{k}": v for k, v in value.items()}
            else:
                out[part] = value
        return out | {"y": self.y, "val_y": self.val_y}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ClientData:
        """Inverse of :meth:`tensors`."""
        parts: dict[str, Any] = {}
        for name, value in tensors.items():
            head, _, key = name.partition(".")
            if key:
                parts.setdefault(head, {})[key] = value
            else:
                parts[head] = value
        return cls(parts["x"], parts["y"], parts["val_x"], parts["val_y"])

    def split(self, train: np.ndarray, held: np.ndarray) -> ClientData:
        """This data's samples at indices ``train`` for training and ``held`` held out."""
        if self.in_memory:
            t, h = torch.from_numpy(train), torch.from_numpy(held)
            return ClientData(_index(self.x, t), self.y[t], _index(self.x, h), self.y[h])
        return ClientData(dataset=Subset(self.dataset, train.tolist()), val_dataset=Subset(self.dataset, held.tolist()), device=self.device)

    def __repr__(self) -> str:
        if not self.in_memory:
            return f"ClientData(streamed {type(self.dataset).__name__}, train={self.num_samples}, val={self.num_val})"
        shape = {k: tuple(v.shape) for k, v in self.x.items()} if isinstance(self.x, dict) else tuple(self.x.shape)
        dtype = "" if isinstance(self.x, dict) else f" {self.x.dtype}"
        return f"ClientData(train={len(self.y)}, val={len(self.val_y)}, x={shape}{dtype})"


def _device_of(x: Inputs) -> torch.device:
    return next(iter(x.values())).device if isinstance(x, dict) else x.device


def dataset_bytes(ds: Dataset) -> int:
    """An estimate of a map-style dataset's size in memory: its first item's tensors x its length."""
    n = len(ds)
    if n == 0:
        return 0
    x, y = _collate([ds[0]], "dataset")
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    return n * sum(t.numel() * t.element_size() for t in [*leaves, y])


def memory_budget() -> int:
    """How many bytes of client data rankfed materialises by default: a quarter of the machine's memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 4 << 30


def _materialise(ds: Dataset, where: str) -> tuple[Inputs, torch.Tensor]:
    n = len(ds)
    xs, ys = [], []
    for s in range(0, n, 4096):  # collate in chunks: the item list never holds the whole dataset
        x, y = _collate([ds[i] for i in range(s, min(n, s + 4096))], where)
        xs.append(x)
        ys.append(y)
    if isinstance(xs[0], dict):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)
    return torch.cat(xs), torch.cat(ys)


def as_client_data(obj: Any, where: str, *, in_memory: bool = True) -> ClientData:
    """A :class:`ClientData` from what a user passes: a ClientData, an ``(x, y)`` pair of tensors
    (or arrays), or a map-style Dataset of ``(input, target)`` items (materialised, or streamed
    when ``in_memory`` is False). ``where`` names it in errors (``clients[3]``)."""
    if isinstance(obj, ClientData):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj, Dataset):
        x, y = obj
        x = {k: torch.as_tensor(v) for k, v in x.items()} if isinstance(x, Mapping) else torch.as_tensor(x)
        y = torch.as_tensor(y)
        if _length(x) != len(y):
            raise ConfigError(f"{where}: x has {_length(x)} samples but y has {len(y)}")
        return ClientData(_float32(x), _float32(y))
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        if len(obj) == 0:
            raise ConfigError(f"{where}: the dataset is empty")
        if not in_memory:
            _collate([obj[0]], where)  # the item format is checked now, not in round 1
            return ClientData(dataset=obj)
        return ClientData(*_materialise(obj, where))
    raise ConfigError(f"{where}: expected a torch Dataset, an (x, y) pair of tensors or a ClientData, got {type(obj).__name__}")


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """The inputs of several clients as one (the vectorised cohort's gather source)."""
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(list(parts))
