"""Splitting a training set across federated clients.

All partitioners work on the label vector alone (plus group ids for ``natural``),
return one sorted ``int64`` index array per client into the train set, and draw their
randomness only from ``np.random.default_rng(seed)``, so a seed fixes the split.

    iid        uniform random split into near-equal parts
    dirichlet  per class, client proportions ~ Dir(alpha) (Hsu et al. 2019);
               small alpha -> few classes per client, large alpha -> close to iid
    shards     sort by label, cut into equal shards, deal classes_per_client shards
               to each client (McMahan et al. 2017)
    natural    one client per group of the data (speaking role, device)
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

__all__ = ["PARTITIONS", "holdout_split", "partition"]

PARTITIONS = ("iid", "dirichlet", "shards", "natural")
# Dirichlet draws are repeated until no client is empty; this bounds the retries.
MAX_DIRICHLET_TRIES = 100


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split the sample indices ``0..len(labels)-1`` among ``num_clients`` clients.

    Args:
        labels: ``(N,)`` integer class of each train sample.
        num_clients: Number of clients, ``1 <= num_clients <= N``.
        method: One of :data:`PARTITIONS`.
        seed: Seed of the only random generator used.
        alpha: Dirichlet concentration (``dirichlet``).
        classes_per_client: Shards per client (``shards``).
        groups: ``(N,)`` group id of each sample (``natural``).

    Returns:
        ``num_clients`` disjoint, sorted ``int64`` index arrays. They cover every sample
        except for ``shards`` (the ``N mod (num_clients * classes_per_client)`` samples
        that do not fill a shard are left out) and ``natural`` with fewer clients than
        groups (only the ``num_clients`` largest groups are used, ties broken by the
        smaller group id; clients are ordered by group id).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition method {method!r}; choose one of {', '.join(PARTITIONS)}")
    n = len(labels)
    if not isinstance(num_clients, Integral) or not 1 <= num_clients <= n:
        raise ValueError(
            f"num_clients must be an integer between 1 and the number of samples ({n}), got {num_clients!r}"
        )
    rng = np.random.default_rng(seed)

    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif method == "shards":
        parts = _shards(labels, num_clients, classes_per_client, rng)
    else:
        parts = _natural(labels, num_clients, groups)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
    classes, counts = np.unique(labels, return_counts=True)
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # indices of each class
    for _ in range(MAX_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            share = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,) this class's split
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                chunks[client].append(chunk)
        parts = [np.concatenate(c) for c in chunks]
        if min(len(p) for p in parts) > 0:
            return parts
    raise ValueError(
        f"dirichlet partition with alpha={alpha} left a client without samples in {MAX_DIRICHLET_TRIES} "
        f"draws ({num_clients} clients, {len(labels)} samples, {len(classes)} classes); "
        "use a larger alpha or fewer clients"
    )


def _shards(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if not isinstance(classes_per_client, Integral) or classes_per_client < 1:
        raise ValueError(f"classes_per_client must be a positive integer, got {classes_per_client!r}")
    num_shards = num_clients * classes_per_client
    shard_size = len(labels) // num_shards
    if shard_size == 0:
        raise ValueError(
            f"shards partition: {len(labels)} samples cannot fill {num_clients} clients x "
            f"{classes_per_client} classes_per_client = {num_shards} non-empty shards"
        )
    # Sort by label (random order within a class): each shard then holds a single class
    # when class sizes are multiples of the shard size; otherwise some shards straddle a
    # class boundary, as in McMahan et al.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = by_label[: num_shards * shard_size].reshape(num_shards, shard_size)
    dealt = rng.permutation(num_shards).reshape(num_clients, classes_per_client)  # shard ids per client
    return [shards[ids].ravel() for ids in dealt]


def _natural(labels: np.ndarray, num_clients: int, groups: np.ndarray | None) -> list[np.ndarray]:
    if groups is None:
        raise ValueError(
            "the natural partition needs per-sample groups, but this dataset has no natural split"
        )
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(
            f"groups has shape {groups.shape}, labels {labels.shape}; need one group id per sample"
        )
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if num_clients > len(ids):
        raise ValueError(
            f"natural partition: num_clients={num_clients} exceeds the {len(ids)} groups in the data"
        )
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])  # indices per group
    largest = np.lexsort((ids, -counts))[:num_clients]  # by size descending, then group id
    return [members[g] for g in np.sort(largest)]


def holdout_split(
    indices: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``indices`` and hold out the last ``round(fraction * n)`` of them.

    At least one index always stays in the training part (when there is any).

    Returns:
        ``(train, held_out)``, disjoint and together a permutation of ``indices``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction!r}")
    shuffled = rng.permutation(np.asarray(indices))
    n = len(shuffled)
    n_held = min(round(fraction * n), max(n - 1, 0))
    return shuffled[: n - n_held], shuffled[n - n_held :]
