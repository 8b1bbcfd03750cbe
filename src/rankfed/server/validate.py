"""Every upload is checked before the server folds it in; a bad one is dropped, not fatal.

Two layers, the same for every algorithm and every transport:

1. **Generic checks** (:func:`check_upload`): ``@num_samples`` a positive
   integer (the aggregation weight), ``@train_loss`` (if sent) a finite number,
   every floating-point tensor finite, the encoded size within a bound.
2. **The algorithm's own decoding**: the uploads are aggregated into a *copy* of
   the server half first. If that raises (a missing entry, a wrong shape, a
   scalar where a tensor belongs, ...) or leaves the global model non-finite,
   each upload is tried alone on a fresh copy to find the culprits, which are
   dropped with the error as the reason; the round is then aggregated from the
   rest. Names, shapes and dtypes are thereby checked exactly as strictly as the
   algorithm reads them. An accepted round's copy becomes the server (so an
   upload is never applied twice).

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

from rankfed.protocol import ServerHalf, float_state
from rankfed.wire import Payload, encoded_size

__all__ = ["upload_limit", "check_upload", "nonfinite_entries", "aggregate_checked", "CheckedRound", "NONFINITE"]

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


def aggregate_checked(
    server: ServerHalf,
    rnd: int,
    replies: Sequence[tuple[int, Payload]],
    *,
    min_clients: int = 1,
    max_bytes: int | None = None,
) -> CheckedRound:
    """Aggregate the valid ``replies`` (see the module); never raises for a bad upload."""
    rejected: dict[int, str] = {}
    good = []
    for cid, payload in replies:
        why = check_upload(payload, max_bytes)
        if why is None:
            good.append((cid, payload))
        else:
            rejected[cid] = why
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
