"""Turning a :class:`Dataset` into per-client tensors (:class:`~rankfed.local.ClientData`)."""

from __future__ import annotations

import numpy as np
import torch

from rankfed.local.data import ClientData

from .base import Dataset
from .partition import holdout_split, partition

__all__ = ["ClientData", "federate"]


def federate(
    ds: Dataset,
    num_clients: int,
    method: str,
    *,
    seed: int,
    holdout: float = 0.1,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[ClientData]:
    """Partition ``ds``'s train split over clients and give each a local held-out split.

    The split is :func:`~rankfed.data.partition` with ``seed``; client ``i`` then holds
    out ``round(holdout * n_i)`` of its samples, shuffled with
    ``np.random.default_rng([seed, 1, i])``, a stream of its own that does not depend on
    the other clients. Every client tensor is a contiguous copy.
    """
    if method == "natural" and ds.groups is None:
        raise ValueError(
            f"dataset {ds.name!r} has no natural split (no per-sample groups); "
            "use the iid, dirichlet or shards partition"
        )
    parts = partition(
        ds.train_y.numpy(),
        num_clients,
        method,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        groups=ds.groups,
    )
    clients = []
    for client_id, indices in enumerate(parts):
        train, held_out = holdout_split(indices, holdout, np.random.default_rng([seed, 1, client_id]))
        train, held_out = torch.from_numpy(train), torch.from_numpy(held_out)
        # Advanced indexing gathers into new contiguous tensors: clients never alias ds.
        clients.append(
            ClientData(
                x=ds.train_x[train],
                y=ds.train_y[train],
                val_x=ds.train_x[held_out],
                val_y=ds.train_y[held_out],
            )
        )
    return clients
