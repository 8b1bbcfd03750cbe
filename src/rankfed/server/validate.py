"""Every upload is checked before the server folds it in; a bad one is dropped, not fatal.

Two layers, the same for every algorithm and every transport:

1. **Generic checks** (:func:`check_upload`): ``@num_samples`` a positive
   integer (the aggregation weight), ``@train_loss`` (if sent) a finite number,
   every floating-point tensor finite, the encoded size within a bound.
2. **The algorithm's own decoding** of that one upload. A server half that streams
   (:meth:`~rankfed.protocol.ServerHalf.fold`) decodes each upload as it arrives,
   checked against the tensors it updates; an upload it cannot use (a missing entry,
   a wrong shape, a scalar where a tensor belongs, decoded values that are not finite,
   a sum it would make non-finite) is dropped with the error as the reason, and the
   round's sums stay as they were. The round's sums are then folded into a *copy* of
   the server half (:meth:`~rankfed.protocol.ServerHalf.finish`); if that leaves the
   global model non-finite, the uploads are fine alone but bad together and the round
   is dropped. Memory: O(model) beyond the upload in hand, however many clients.

   A server half that only has ``aggregate`` gets the uploads at once: they are
   aggregated into a copy first and, if that raises or leaves the model non-finite,
   each upload is tried alone on a fresh copy to find the culprits.

An accepted round's copy becomes the server (so an upload is never applied twice).
A round keeps its aggregation if at least ``min_clients`` uploads survive;
otherwise it is *skipped*: the server aggregates nothing (its model unchanged,
and a stateful algorithm's next broadcast carries no update). If every upload
of a round was rejected for non-finite values, the clients' training diverged:
:func:`rankfed.server.round.aggregate_round` raises :class:`~rankfed.errors.Diverged` (see
``all_nonfinite``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rankfed.protocol import RoundSums, ServerHalf, float_state
from rankfed.server.defence import UploadGuard
from rankfed.wire import Payload, encoded_size

__all__ = ["upload_limit", "check_upload", "nonfinite_entries", "aggregate_checked", "CheckedRound", "RoundFold", "NONFINITE"]

NONFINITE = "non-finite values"


def upload_limit(model: torch.nn.Module) -> int:
    """The largest upload accepted for ``model``: 4x a full FedAvg upload of it plus 64 KiB (every
    algorithm's honest upload is at most about one FedAvg upload; FedLoRU's factors at a rank
    above a layer's full rank can exceed it)."""
    return 4 * encoded_size(float_state(model)) + 65536


def nonfinite_entries(payload: Payload) -> list[str]:
    """Names of the floating-point tensors of ``payload`` holding NaN or infinity."""
    return [k for k, v in payload.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_upload(payload: Payload, max_bytes: int | None = None) -> str | None:
    """Why ``payload`` cannot be an upload (generic checks), or None if it passes them."""
    if not isinstance(payload, dict):
        return f"not a payload ({type(payload).__name__})"
    n = payload.get("@num_samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"@num_samples = {n!r}: must be a positive integer"
    loss = payload.get("@train_loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        return f"@train_loss = {loss!r}: must be a number"
    bad = nonfinite_entries(payload) + (["@train_loss"] if loss is not None and not math.isfinite(loss) else [])
    if bad:  # a client whose training blew up
        return f"{NONFINITE} in {', '.join(bad[:3])}" + (", ..." if len(bad) > 3 else "")
    if max_bytes is not None:
        size = encoded_size(payload)
        if size > max_bytes:
            return f"{size} bytes, over the limit of {max_bytes}"
    return None


@dataclass
class CheckedRound:
    server: ServerHalf  # the server half to keep (a copy with this round folded in, or the old one)
    stats: dict
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)  # client id -> reason
    skipped: bool = False

    @property
    def all_nonfinite(self) -> bool:
        """Nothing accepted and every rejection was for non-finite values (training diverged)."""
        return not self.accepted and bool(self.rejected) and all(r.startswith(NONFINITE) for r in self.rejected.values())


def _nonfinite_state(server: ServerHalf) -> list[str]:
    return [k for k, v in server.global_model_state().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _try(server: ServerHalf, rnd: int, replies: Sequence[tuple[int, Payload]]) -> tuple[ServerHalf | None, dict, str | None]:
    trial = copy.deepcopy(server)
    try:
        stats = trial.aggregate(rnd, list(replies))
    except Exception as e:  # noqa: BLE001 - any failure to read an upload makes it a bad one
        return None, {}, f"the {type(trial).__name__} could not use it: {type(e).__name__}: {e}"
    bad = _nonfinite_state(trial)
    if bad:
        return None, {}, f"it makes the global model non-finite ({', '.join(bad[:3])})"
    return trial, stats, None


class RoundFold:
    """One round's checked aggregation, an upload at a time (see the module): :meth:`add` each
    ``(client id, upload)`` as it arrives, then :meth:`result`. A server half without
    :meth:`~rankfed.protocol.ServerHalf.fold` gets the accepted uploads at once in :meth:`result`."""

    def __init__(self, server: ServerHalf, rnd: int, *, max_bytes: int | None = None, guard: UploadGuard | None = None):
        self.server, self.rnd, self.max_bytes = server, rnd, max_bytes
        self.streams = server.streams
        self.guard = guard
        if guard is not None and not self.streams:
            raise ValueError(f"{type(server).__name__} aggregates a round's uploads at once (it has no fold): the federation's defences (aggregator, clipping, dp, sample weights) need a server half that folds uploads one by one")
        self.sums = RoundSums() if guard is None else guard.sums()
        self._reference = server.fold_reference() if guard is not None and guard.defences.server_clip else None
        self.good: list[tuple[int, Payload]] = []  # a server half that does not stream: the uploads to aggregate
        self.accepted: list[int] = []
        self.rejected: dict[int, str] = {}
        self.nonfinite: set[str] = set()  # names of the non-finite entries of rejected uploads (a diverged round's message)

    def add(self, cid: int, payload: Payload) -> str | None:
        """Check and fold in client ``cid``'s upload; why it was dropped, or None."""
        why = check_upload(payload, self.max_bytes)
        if why is not None and why.startswith(NONFINITE):
            self.nonfinite.update(nonfinite_entries(payload))
            loss = payload.get("@train_loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                self.nonfinite.add("@train_loss")
        if why is None and self.streams:
            try:
                tensors = self.server.fold(self.rnd, cid, payload)
            except Exception as e:  # noqa: BLE001 - any failure to read an upload makes it a bad one
                why = f"the {type(self.server).__name__} could not use it: {type(e).__name__}: {e}"
            else:
                bad = [n for n, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
                if bad:  # finite on the wire, not once decoded: the client's values blew up all the same
                    self.nonfinite.update(bad)
                    why = f"{NONFINITE} in its decoded {', '.join(bad[:3])}"
                else:
                    weight = float(payload["@num_samples"])
                    if self.guard is not None:
                        weight = self.guard.weight(cid, payload["@num_samples"])
                        tensors = self.guard.clip(cid, tensors, self._reference)
                    try:
                        self.sums.add(tensors, weight, payload.get("@train_loss"))
                    except Exception as e:  # noqa: BLE001
                        why = f"the {type(self.server).__name__} could not use it: {e}"
                        if self.guard is not None:
                            self.guard.forget(cid)
        if why is not None:
            self.rejected[cid] = why
        else:
            self.accepted.append(cid)
            if not self.streams:
                self.good.append((cid, payload))
        return why

    def result(self, min_clients: int = 1) -> CheckedRound:
        """The round: the server half with the accepted uploads folded in (a copy), or the round
        skipped when fewer than ``min_clients`` were accepted."""
        if not self.streams:
            return _aggregate_at_once(self.server, self.rnd, self.good, dict(self.rejected), min_clients)
        rejected = dict(self.rejected)
        if len(self.accepted) >= min_clients:
            trial, stats, why = _finish(self.server, self.rnd, self.sums)
            if why is None:
                return CheckedRound(trial, stats, list(self.accepted), rejected)
            rejected.update({cid: f"together with the others: {why}" for cid in self.accepted})
        empty, _, _ = _finish(self.server, self.rnd, RoundSums())
        return CheckedRound(empty if empty is not None else self.server, {"clients": 0}, [], rejected, skipped=True)


def _finish(server: ServerHalf, rnd: int, sums: RoundSums) -> tuple[ServerHalf | None, dict, str | None]:
    trial = copy.deepcopy(server)
    try:
        stats = trial.finish(rnd, sums)
    except Exception as e:  # noqa: BLE001
        return None, {}, f"the {type(trial).__name__} could not fold the round in: {type(e).__name__}: {e}"
    bad = _nonfinite_state(trial)
    if bad:
        return None, {}, f"it makes the global model non-finite ({', '.join(bad[:3])})"
    return trial, stats, None


def aggregate_checked(
    server: ServerHalf,
    rnd: int,
    replies: Sequence[tuple[int, Payload]],
    *,
    min_clients: int = 1,
    max_bytes: int | None = None,
    guard: UploadGuard | None = None,
) -> CheckedRound:
    """Aggregate the valid ``replies`` (see the module); never raises for a bad upload."""
    fold = RoundFold(server, rnd, max_bytes=max_bytes, guard=guard)
    for cid, payload in replies:
        fold.add(cid, payload)
    return fold.result(min_clients)


def _aggregate_at_once(server: ServerHalf, rnd: int, good: list[tuple[int, Payload]], rejected: dict[int, str], min_clients: int) -> CheckedRound:
    """A server half without fold: the generically valid uploads ``good`` at once."""
    if len(good) >= min_clients:
        trial, stats, why = _try(server, rnd, good)
        if why is not None:  # find the culprits one by one, then aggregate the rest
            keep = []
            for cid, payload in good:
                _, _, alone = _try(server, rnd, [(cid, payload)])
                if alone is None:
                    keep.append((cid, payload))
                else:
                    rejected[cid] = alone
            trial = None
            if len(keep) >= min_clients:
                trial, stats, why = _try(server, rnd, keep)
                if why is not None:  # fine alone, bad together: drop the round
                    rejected.update({cid: f"together with the others: {why}" for cid, _ in keep})
                    keep = []
            good = keep
        if trial is not None:
            return CheckedRound(trial, stats, [cid for cid, _ in good], rejected)
    # too few valid uploads: the model stays; the server records an empty round (so a stateful
    # algorithm's next broadcast carries no stale update)
    empty, _, _ = _try(server, rnd, [])
    return CheckedRound(empty if empty is not None else server, {"clients": 0}, [], rejected, skipped=True)
