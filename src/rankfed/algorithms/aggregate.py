"""Aggregation maths shared by the server halves: pure functions on tensors and payloads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from rankfed.wire import Payload

__all__ = ["weighted_mean", "sample_weights", "apply_mean_update", "mean_train_loss", "add_present_"]


def _weight_total(weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    return total


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * t_i / sum_i w_i, accumulated in the tensors' dtype."""
    total = _weight_total(weights)
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w / total)
    return out


def sample_weights(replies: Sequence[tuple[int, Payload]]) -> list[float]:
    """Each reply's weight: the client's training sample count (FedAvg's n_i)."""
    return [float(p["@num_samples"]) for _, p in replies]


@torch.no_grad()
def apply_mean_update(
    targets: Mapping[str, torch.Tensor], deltas: Iterable[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """targets[n] += weighted mean of deltas[i][n], in place, for each name; returns the means.

    ``deltas`` may be a generator: it is read once, one client at a time, so a caller that
    decompresses lazily holds one client's dense update at a time, not the cohort's. The sums
    are formed in the order :func:`weighted_mean` forms them (bitwise the same result)."""
    names = list(targets if names is None else names)
    total = _weight_total(weights)
    means: dict[str, torch.Tensor] = {}
    for d, w in zip(deltas, weights):
        for name in names:
            t = d[name]
            if name not in means:
                means[name] = torch.zeros_like(t)
            means[name].add_(t, alpha=w / total)
    for name in names:
        target = targets[name]
        means[name] = means[name].to(target.device)
        target.add_(means[name])
    return means


def mean_train_loss(replies: Sequence[tuple[int, Payload]], weights: Sequence[float]) -> float:
    """The clients' training losses averaged with the aggregation weights."""
    losses = [float(p["@train_loss"]) for _, p in replies]
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights)


@torch.no_grad()
def add_present_(targets: Mapping[str, torch.Tensor], payload: Payload) -> None:
    """targets[n] += payload[n] for every target name the payload carries (a replica sync)."""
    for name, value in targets.items():
        if name in payload:
            value.add_(payload[name].to(value.device))
