"""Aggregation maths shared by the server halves: pure functions on tensors and payloads.

Besides the sample-weighted mean the server halves apply (:func:`add_means_` over a round's
:class:`~rankfed.protocol.RoundSums`), the robust aggregators of ``federation.aggregator``
live here as pure functions of a round's uploads, each a list of ``{name: tensor}`` with the
same entries, as Flower's ``flwr.server.strategy.aggregate`` has them over NDArrays:

* :func:`weighted_mean`: sum_i w_i t_i / sum_i w_i (Flower's ``aggregate``);
* :func:`coordinate_median`: the median of every coordinate, unweighted (an even count
  averages the two middle values, as ``np.median``; Flower's ``aggregate_median``);
* :func:`trimmed_mean`: every coordinate's mean after dropping its ``int(beta * n)`` lowest
  and highest values, unweighted (Flower's ``aggregate_trimmed_avg``, scipy's ``trim_mean``);
* :func:`krum_scores` / :func:`krum`: Krum (Blanchard et al., 2017): each upload's score is
  the sum of its squared distances to its n - f - 2 nearest others, the whole upload as one
  vector; Krum keeps the lowest-scoring upload, multi-Krum the ``keep`` lowest and averages
  them with their weights (Flower's ``aggregate_krum``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from rankfed.wire import Payload

__all__ = ["add_present_", "expect_entries", "add_means_", "AGGREGATORS", "weighted_mean", "coordinate_median", "trimmed_mean", "krum_scores", "krum_select", "krum"]

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


@torch.no_grad()
def add_present_(targets: Mapping[str, torch.Tensor], payload: Payload) -> None:
    """targets[n] += payload[n] for every target name the payload carries (a replica sync)."""
    for name, value in targets.items():
        if name in payload:
            value.add_(payload[name].to(value.device))


def expect_entries(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str = "upload") -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` named in ``reference``, each a floating-point tensor of its
    reference's shape (a server half's :meth:`~rankfed.protocol.ServerHalf.fold` checks an
    upload against the tensors it updates); KeyError/ValueError naming the first bad entry."""
    out = {}
    for name, ref in reference.items():
        if name not in tensors:
            raise KeyError(f"the {what} lacks entry {name!r}")
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{what} entry {name!r} is {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, not a floating-point tensor")
        if t.shape != ref.shape:
            raise ValueError(f"{what} entry {name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        out[name] = t
    return out


@torch.no_grad()
def add_means_(targets: Mapping[str, torch.Tensor], sums, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """targets[n] += the round's mean of entry n (a :class:`~rankfed.protocol.RoundSums`), in
    place, for each name; returns the means (on the targets' devices)."""
    means = {}
    for name in targets if names is None else names:
        target = targets[name]
        means[name] = sums.mean(name, like=target)
        target.add_(means[name])
    return means


Uploads = Sequence[Mapping[str, torch.Tensor]]


def _stack(uploads: Uploads, name: str) -> torch.Tensor:
    return torch.stack([u[name] for u in uploads])


def _check(uploads: Uploads) -> None:
    if not uploads:
        raise ValueError("no uploads to aggregate")


@torch.no_grad()
def weighted_mean(uploads: Uploads, weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i u_i / sum_i w_i of every entry."""
    _check(uploads)
    if len(weights) != len(uploads):
        raise ValueError(f"{len(weights)} weights for {len(uploads)} uploads")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if not bool((w > 0).all()):
        raise ValueError(f"weights = {list(weights)}: must all be > 0")
    out = {}
    for name in uploads[0]:
        stack = _stack(uploads, name)
        ww = w.to(stack.device, stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
        out[name] = (stack * ww).sum(0) / ww.sum()
    return out


@torch.no_grad()
def coordinate_median(uploads: Uploads) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of the uploads (unweighted; the mean of the two middle values
    when their number is even)."""
    _check(uploads)
    n = len(uploads)
    out = {}
    for name in uploads[0]:
        ordered = _stack(uploads, name).sort(dim=0).values
        out[name] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return out


@torch.no_grad()
def trimmed_mean(uploads: Uploads, beta: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the ``int(beta * n)`` lowest and highest values of
    each coordinate (unweighted); ``beta`` in [0, 0.5)."""
    _check(uploads)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta = {beta!r}: must be in [0, 0.5) (the fraction cut at each end)")
    n = len(uploads)
    cut = int(beta * n)
    out = {}
    for name in uploads[0]:
        ordered = _stack(uploads, name).sort(dim=0).values
        out[name] = ordered[cut : n - cut].mean(0)
    return out


@torch.no_grad()
def krum_scores(uploads: Uploads, num_malicious: int) -> list[float]:
    """Each upload's Krum score: the sum of the squared L2 distances (over all its entries) to
    its ``max(1, n - num_malicious - 2)`` nearest other uploads."""
    _check(uploads)
    if num_malicious < 0:
        raise ValueError(f"num_malicious = {num_malicious!r}: must be >= 0")
    flat = torch.stack([torch.cat([u[name].reshape(-1).double() for name in uploads[0]]) for u in uploads])
    dist = torch.stack([(flat - row).pow(2).sum(1) for row in flat])  # O(n x upload) memory, not n^2
    n = len(uploads)
    closest = max(1, n - num_malicious - 2)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]]).sort().values
        scores.append(float(others[:closest].sum()))
    return scores


def krum_select(uploads: Uploads, num_malicious: int, keep: int = 1) -> list[int]:
    """The indices of the ``keep`` uploads of lowest Krum score, best first (``keep`` = 1: Krum)."""
    if not 1 <= keep <= len(uploads):
        raise ValueError(f"keep = {keep!r}: must be in [1, {len(uploads)}] (the uploads of the round)")
    scores = krum_scores(uploads, num_malicious)
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:keep]


def krum(uploads: Uploads, weights: Sequence[float], num_malicious: int, keep: int = 1) -> dict[str, torch.Tensor]:
    """Krum (``keep`` = 1: the best-scoring upload itself) or multi-Krum (the weighted mean of
    the ``keep`` best)."""
    chosen = krum_select(uploads, num_malicious, keep)
    if keep == 1:
        return {name: t.clone() for name, t in uploads[chosen[0]].items()}
    return weighted_mean([uploads[i] for i in chosen], [weights[i] for i in chosen])
