"""Aggregation maths shared by the server halves: pure functions on tensors and payloads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from rankfed.wire import Payload

__all__ = ["add_present_", "expect_entries", "add_means_"]


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
