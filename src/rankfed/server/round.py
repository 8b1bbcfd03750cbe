"""One transport-neutral round: sampling, the downlink plan, checked aggregation, the byte ledger.

:class:`Rounds` is the server side of a run as every transport drives it: the in-process
simulator and the Flower strategy call the same two methods and differ only in how payloads
reach clients::

    plan = rounds.downlink(rnd)        # who is sampled; what each receives, serialised once per distinct payload
    ...                                # the transport delivers plan's payloads and collects uplinks
    rec, state = rounds.aggregate(plan, [(cid, upload), ...], up_sizes, clients)   # checked, folded in, counted
    evaluator(rec, state); rounds.commit(rec)

Bytes are measured, never computed: a downlink's size is the length of
:func:`rankfed.wire.encode` of its payload (one serialisation per distinct payload object,
charged to each recipient), a broadcast's is charged to all K clients (stateful clients),
and an uplink's size is what the transport measured of the serialised upload.
:class:`Evaluator` evaluates the global model with the run's task on the test data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from rankfed.errors import Diverged
from rankfed.local import ClientData, Task
from rankfed.protocol import CLIENT_KINDS, ServerHalf, float_state
from rankfed.server.validate import CheckedRound, aggregate_checked, nonfinite_entries
from rankfed.wire import Payload, encode, encoded_size

__all__ = ["Rounds", "Downlink", "RoundRecord", "Evaluator", "sample_clients", "aggregate_round", "upload_limit", "finite_or_none"]


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of round ``rnd``: ``per_round`` distinct ids, drawn from (seed, round) only."""
    rng = np.random.default_rng([seed, rnd, 0x5A11])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def upload_limit(model: nn.Module, server: ServerHalf | None = None) -> int:
    """The largest upload accepted: 4x the larger of a full FedAvg upload of ``model`` and what
    the server half says its honest upload holds (``upload_tensors``), plus 64 KiB."""
    size = encoded_size(float_state(model))
    own = getattr(server, "upload_tensors", None)
    if callable(own):
        size = max(size, encoded_size(own()))
    return 4 * size + 65536


def finite_or_none(value):
    """``value``, or None for a float that is NaN or infinite (metrics files are strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RoundRecord:
    """What happened in one round. ``accuracy``/``loss``/``metrics`` are set on evaluated rounds
    (``evaluated``); ``accuracy`` stays None where it means nothing (regression) or without test data."""

    round: int
    clients: list[int]
    uplink_bytes: int
    downlink_bytes: int
    cum_uplink_bytes: int
    cum_downlink_bytes: int
    round_s: float  # wall time of this round's communication and training (not evaluation)
    wall_s: float  # wall time since the run started, evaluation included
    train_loss: float
    uplink_bytes_per_client: list[int] = field(default_factory=list)
    downlink_bytes_per_client: list[int] = field(default_factory=list)
    broadcast_bytes: int = 0  # stateful clients: one broadcast's length, sent to every client
    broadcast_recipients: int = 0
    evaluated: bool = False
    accuracy: float | None = None
    loss: float | None = None
    metrics: dict = field(default_factory=dict)  # the user's metrics on the test data
    eval_s: float | None = None
    # personalised algorithms: mean over clients of each one's accuracy on its own held-out split
    personal_accuracy: float | None = None
    # uploads dropped by the server's checks (client id -> reason), and whether too few were left
    rejected: dict = field(default_factory=dict)
    skipped: bool = False
    # what a real transport measured (Flower: its message sizes, failed clients); empty in the simulator
    transport: dict = field(default_factory=dict)

    def metrics_line(self) -> dict:
        """The record as a metrics.jsonl line: per-client lists left out, the user's metrics and
        the transport's fields inlined, non-finite numbers written as null (strict JSON)."""
        d = asdict(self)
        for k in ("clients", "uplink_bytes_per_client", "downlink_bytes_per_client", "evaluated"):
            d.pop(k)
        d["num_clients"] = len(self.clients)
        d["rejected_uploads"] = len(d.pop("rejected"))
        d |= d.pop("metrics")
        d |= d.pop("transport")
        return {k: finite_or_none(v) for k, v in d.items()}

    def rounds_line(self) -> dict:
        """The record as a rounds.jsonl line (every client's bytes)."""
        return {
            "round": self.round,
            "clients": self.clients,
            "uplink_bytes_per_client": self.uplink_bytes_per_client,
            "downlink_bytes_per_client": self.downlink_bytes_per_client,
            "broadcast_bytes": self.broadcast_bytes,
            "broadcast_recipients": self.broadcast_recipients,
            "round_s": self.round_s,
            "train_loss": finite_or_none(self.train_loss),
            "rejected": {str(c): why for c, why in self.rejected.items()},
            "skipped": self.skipped,
            **{k: finite_or_none(v) for k, v in self.transport.items()},
        }


@dataclass
class Downlink:
    """What round ``rnd`` sends: the sampled ``ids``; for stateful clients one ``broadcast`` (to
    all K); for stateless ones each client's payload, one entry of ``payloads`` per distinct
    payload object, with ``raws`` its serialisation (``payload_of[cid]`` indexes both)."""

    rnd: int
    ids: list[int]
    t0: float
    broadcast: Payload | None = None
    broadcast_raw: bytes | None = None
    payloads: list[Payload] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)
    payload_of: dict[int, int] = field(default_factory=dict)

    def payload_for(self, cid: int) -> Payload:
        return self.broadcast if self.broadcast is not None else self.payloads[self.payload_of[cid]]

    @property
    def down_sizes(self) -> list[int]:
        """Bytes of each sampled client's own downlink (stateless), in ``ids`` order."""
        return [len(self.raws[self.payload_of[c]]) for c in self.ids if c in self.payload_of]


def aggregate_round(server: ServerHalf, rnd: int, replies, *, min_clients: int, max_bytes: int | None) -> tuple[CheckedRound, dict[str, torch.Tensor]]:
    """A round's checked aggregation (:func:`rankfed.server.validate.aggregate_checked`) and the
    resulting global model state. Raises :class:`Diverged` when every upload was non-finite,
    or when the global model is non-finite all the same (a non-finite starting model, which
    no upload can repair)."""
    checked = aggregate_checked(server, rnd, replies, min_clients=min_clients, max_bytes=max_bytes)
    if checked.all_nonfinite:  # every client's training blew up: the run diverged
        names = {n for _, p in replies for n in nonfinite_entries(p)}
        names |= {"@train_loss" for _, p in replies if isinstance(p.get("@train_loss"), float) and not math.isfinite(p["@train_loss"])}
        raise Diverged(rnd, sorted(names), where="every client's upload has")
    state = checked.server.global_model_state()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Diverged(rnd, bad)
    return checked, state


class Rounds:
    """The server side of a run (see the module docstring): the server half, sampling, the
    downlink plan, checked aggregation and the byte ledger, for any transport."""

    def __init__(self, server: ServerHalf, *, num_clients: int, clients_per_round: int, seed: int, client_kind: str, min_clients: int = 1, max_upload_bytes: int | None = None):
        if client_kind not in CLIENT_KINDS:
            raise ValueError(f"client_kind = {client_kind!r}: must be one of {', '.join(CLIENT_KINDS)}")
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients_per_round = {clients_per_round} must be in [1, {num_clients}]")
        self.server = server
        self.num_clients, self.clients_per_round, self.seed = num_clients, clients_per_round, seed
        self.client_kind, self.min_clients, self.max_upload_bytes = client_kind, min_clients, max_upload_bytes
        self.cum_up = self.cum_down = 0
        self.history: list[RoundRecord] = []

    def sample(self, rnd: int) -> list[int]:
        return sample_clients(self.seed, rnd, self.num_clients, self.clients_per_round)

    def downlink(self, rnd: int) -> Downlink:
        """Round ``rnd``'s sampled clients and payloads, each distinct payload serialised once."""
        plan = Downlink(rnd, self.sample(rnd), time.perf_counter())
        if self.client_kind == "stateful":
            plan.broadcast = self.server.broadcast(rnd)
            plan.broadcast_raw = encode(plan.broadcast)
            return plan
        downlinks = self.server.configure(rnd, plan.ids)
        index: dict[int, int] = {}  # id(payload object) -> its entry
        for cid in plan.ids:
            sent = downlinks[cid]
            if id(sent) not in index:
                index[id(sent)] = len(plan.payloads)
                plan.payloads.append(sent)  # kept alive with the plan: ids stay unique
                plan.raws.append(encode(sent))
            plan.payload_of[cid] = index[id(sent)]
        return plan

    def aggregate(self, plan: Downlink, replies: Sequence[tuple[int, Payload]], up_sizes: Sequence[int], clients: Sequence[int]) -> tuple[RoundRecord, dict[str, torch.Tensor]]:
        """Fold ``replies`` ((client id, decoded upload), in ascending client order) into the
        server; the round's record and the global model state. ``clients`` sent uploads of
        ``up_sizes`` bytes (what the transport measured on the wire, lost and rejected uploads
        included). The transport evaluates, then adds the record with :meth:`commit`."""
        checked, state = aggregate_round(self.server, plan.rnd, list(replies), min_clients=self.min_clients, max_bytes=self.max_upload_bytes)
        self.server, stats = checked.server, checked.stats
        up_sizes = list(up_sizes)
        down_sizes = plan.down_sizes
        broadcast = len(plan.broadcast_raw) if plan.broadcast_raw is not None else 0
        recipients = self.num_clients if plan.broadcast_raw is not None else 0
        down_total = sum(down_sizes) + broadcast * recipients
        self.cum_up += sum(up_sizes)
        self.cum_down += down_total
        rec = RoundRecord(
            round=plan.rnd,
            clients=list(clients),
            uplink_bytes=sum(up_sizes),
            downlink_bytes=down_total,
            cum_uplink_bytes=self.cum_up,
            cum_downlink_bytes=self.cum_down,
            round_s=time.perf_counter() - plan.t0,
            wall_s=0.0,
            train_loss=float(stats.get("train_loss", float("nan"))),
            uplink_bytes_per_client=up_sizes,
            downlink_bytes_per_client=down_sizes,
            broadcast_bytes=broadcast,
            broadcast_recipients=recipients,
            rejected=checked.rejected,
            skipped=checked.skipped,
        )
        return rec, state

    def commit(self, rec: RoundRecord) -> RoundRecord:
        """Add a finished (evaluated) round to ``history``."""
        self.history.append(rec)
        return rec


class Evaluator:
    """The global model on the test data with the run's task, every ``eval_every`` rounds and
    after the last. A non-finite test loss ends the run as diverged (:class:`Diverged`)."""

    def __init__(self, model: nn.Module, test: ClientData | None, task: Task, *, rounds: int, eval_every: int = 1, batch_size: int = 1024):
        self.model, self.test, self.task = model, test, task
        self.rounds, self.eval_every, self.batch_size = rounds, eval_every, batch_size

    def due(self, rnd: int) -> bool:
        return rnd % self.eval_every == 0 or rnd == self.rounds

    def measure(self, state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Loss, accuracy (None where it means nothing) and the metrics of the model ``state``
        on the test data (empty without test data)."""
        if self.test is None or self.test.num_samples == 0:
            return {}
        self.model.load_state_dict(state)
        return self.task.evaluate(self.model, self.test.batches(self.batch_size))

    def __call__(self, rec: RoundRecord, state: dict[str, torch.Tensor]) -> RoundRecord:
        """Evaluate ``state`` into ``rec`` (if due)."""
        if not self.due(rec.round):
            return rec
        rec.evaluated = True
        t1 = time.perf_counter()
        result = self.measure(state)
        if not result:
            return rec
        rec.loss, rec.accuracy = result.pop("loss"), result.pop("accuracy")
        rec.metrics = result
        rec.eval_s = time.perf_counter() - t1
        if rec.loss is not None and not math.isfinite(rec.loss):
            raise Diverged(rec.round, ["the test loss"], where="evaluation has")
        return rec
