"""One transport-neutral round: sampling, the downlink plan, checked aggregation, the byte ledger.

:class:`Rounds` is the server side of a run as every transport drives it: the in-process
simulator and the Flower strategy call the same two methods and differ only in how payloads
reach clients::

    plan = rounds.downlink(rnd)        # who is sampled; what each receives, serialised once per distinct payload
    fold = rounds.open(plan)           # the transport delivers plan's payloads; each uplink, as it arrives:
    fold.add(cid, upload)              #   checked and folded in (O(model) however many clients)
    rec, state = rounds.close(plan, fold, up_sizes, clients)   # the round folded into the server, counted
    evaluator(rec, rounds.evaluation_state(state)); rounds.commit(rec)

(``rounds.aggregate(plan, replies, up_sizes, clients)`` does the middle three for uplinks at hand.)

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
from rankfed.server.defence import ClipBound, DefendedSums, Defences, PrivacyLedger, UploadGuard
from rankfed.server.validate import CheckedRound, RoundFold
from rankfed.wire import Payload, encode, encoded_size

__all__ = ["Rounds", "Downlink", "CatchUp", "RoundRecord", "Evaluator", "sample_clients", "aggregate_round", "upload_limit", "finite_or_none"]


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int, online: Sequence[int] | None = None) -> list[int]:
    """The clients of round ``rnd``: ``per_round`` distinct ids, drawn from (seed, round) only;
    with ``online`` (the clients reachable this round), drawn from those (all of them if fewer)."""
    rng = np.random.default_rng([seed, rnd, 0x5A11])
    if online is None:
        return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))
    pool = sorted(int(c) for c in online)
    return sorted(int(i) for i in rng.choice(pool, size=min(per_round, len(pool)), replace=False)) if pool else []


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
    broadcast_bytes: int = 0  # stateful clients: one broadcast's length, sent to every client online
    broadcast_recipients: int = 0
    online: int | None = None  # clients reachable this round (None: all, no availability model)
    catch_ups: int = 0  # stateful clients back after missing broadcasts, brought up to date this round
    catch_up_bytes: int = 0  # what that cost (replayed broadcasts or the model), in downlink_bytes
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
    # the federation's defences this round (rankfed.server.defence): weights cut, uploads clipped,
    # the clipping bound, Krum's choice, the privacy spent; empty without defences
    defence: dict = field(default_factory=dict)

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
        defence = d.pop("defence")
        d |= {k: v for k, v in defence.items() if not isinstance(v, (list, dict))}  # counts here, who in rounds.jsonl
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
            "online": self.online,
            "catch_ups": self.catch_ups,
            "catch_up_bytes": self.catch_up_bytes,
            "round_s": self.round_s,
            "train_loss": finite_or_none(self.train_loss),
            "rejected": {str(c): why for c, why in self.rejected.items()},
            "skipped": self.skipped,
            **{k: finite_or_none(v) for k, v in self.transport.items()},
            **{k: finite_or_none(v) for k, v in self.defence.items()},
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
    online: list[int] | None = None  # the clients reachable this round (None: all K)
    catch_up_sizes: list[int] = field(default_factory=list)  # bytes of each catch-up sent this round

    skipped_broadcasts: int = 0  # clients sent the replica whole this round instead of the broadcast

    def charge(self, catch_up: CatchUp, replaces_broadcast: bool = True) -> None:
        """Count ``catch_up``, sent this round, as downlink. A client sent the replica whole is
        not sent this round's broadcast (the replica already includes it) unless
        ``replaces_broadcast`` is False (a message that carries both, as Flower's do)."""
        self.catch_up_sizes.append(catch_up.size)
        self.skipped_broadcasts += catch_up.kind == "model" and replaces_broadcast

    def payload_for(self, cid: int) -> Payload:
        return self.broadcast if self.broadcast is not None else self.payloads[self.payload_of[cid]]

    @property
    def down_sizes(self) -> list[int]:
        """Bytes of each sampled client's own downlink (stateless), in ``ids`` order."""
        return [len(self.raws[self.payload_of[c]]) for c in self.ids if c in self.payload_of]


@dataclass
class CatchUp:
    """What brings a stateful client that missed broadcasts back up to date in round ``rnd``:
    the missed broadcasts (rounds since+1 .. rnd-1) to replay in order before this round's
    (``kind = "replay"``), or the replica itself (``"model"``,
    :meth:`~rankfed.protocol.ServerHalf.replica_state`: it already includes this round's
    broadcast, which the client is then not sent), whichever is smaller. ``raws`` are the
    serialised payloads; ``size`` is what is charged as downlink."""

    kind: str
    raws: list[bytes]
    since: int | None  # the last round the client had synced (None: not known)
    rnd: int  # the round it is brought up to date in

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.raws)


def aggregate_round(fold: RoundFold, *, min_clients: int) -> tuple[CheckedRound, dict[str, torch.Tensor]]:
    """A round's checked aggregation (:class:`rankfed.server.validate.RoundFold`, its uploads
    added) and the resulting global model state. Raises :class:`Diverged` when every upload was
    non-finite, or when the global model is non-finite all the same (a non-finite starting
    model, which no upload can repair)."""
    checked = fold.result(min_clients)
    if checked.all_nonfinite:  # every client's training blew up: the run diverged
        raise Diverged(fold.rnd, sorted(fold.nonfinite), where="every client's upload has")
    state = checked.server.global_model_state()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Diverged(fold.rnd, bad)
    return checked, state


class Rounds:
    """The server side of a run (see the module docstring): the server half, sampling, the
    downlink plan, checked aggregation and the byte ledger, for any transport."""

    def __init__(
        self,
        server: ServerHalf,
        *,
        num_clients: int,
        clients_per_round: int,
        seed: int,
        client_kind: str,
        min_clients: int = 1,
        max_upload_bytes: int | None = None,
        defences: Defences | None = None,
        recorded_samples: Sequence[int] | None = None,
    ):
        """``defences``: the federation's (:mod:`rankfed.server.defence`; ``dp_noise`` resolved,
        see :func:`~rankfed.server.defence.resolve_noise`), None or all off: the plain weighted
        mean. ``recorded_samples``: the server's own record of each client's data size
        (``sample_weights = "recorded"``)."""
        if client_kind not in CLIENT_KINDS:
            raise ValueError(f"client_kind = {client_kind!r}: must be one of {', '.join(CLIENT_KINDS)}")
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients_per_round = {clients_per_round} must be in [1, {num_clients}]")
        self.server = server
        self.num_clients, self.clients_per_round, self.seed = num_clients, clients_per_round, seed
        self.client_kind, self.min_clients, self.max_upload_bytes = client_kind, min_clients, max_upload_bytes
        self.cum_up = self.cum_down = 0
        self.history: list[RoundRecord] = []
        # stateful clients: the recent broadcasts, (round, serialised), kept while together no
        # bigger than the replica (older ones would never be replayed: the model is smaller)
        self.broadcast_log: list[tuple[int, bytes]] = []
        self._replica_size: int | None = None
        self.defences = defences if defences is not None and defences.active else None
        self.recorded_samples = None if recorded_samples is None else [int(n) for n in recorded_samples]
        if self.defences is not None and self.defences.dp and not self.defences.dp_noise:
            raise ValueError("defences.dp_noise is not resolved: pass resolve_noise(defences, rounds, sample_rate)")
        self.clip_bound = ClipBound(self.defences) if self.defences is not None else None
        self.privacy = PrivacyLedger(self.defences.dp, self.defences.dp_noise, clients_per_round / num_clients, self.defences.dp_delta) if self.defences is not None and self.defences.dp else None

    @classmethod
    def for_experiment(cls, exp, server: ServerHalf, model: nn.Module) -> Rounds:
        """The rounds of a transport running ``exp`` (an :class:`~rankfed.server.Experiment`)
        with ``server`` (its algorithm's server half of ``model``)."""
        return cls(
            server,
            num_clients=len(exp.clients),
            clients_per_round=exp.clients_per_round,
            seed=exp.ctx.seed,
            client_kind=exp.client_kind,
            min_clients=exp.options.min_clients,
            max_upload_bytes=upload_limit(model, server),
            defences=exp.defences,
            recorded_samples=[c.num_samples for c in exp.clients],
        )

    def sample(self, rnd: int, online: Sequence[int] | None = None) -> list[int]:
        return sample_clients(self.seed, rnd, self.num_clients, self.clients_per_round, online)

    def downlink(self, rnd: int, online: Sequence[int] | None = None) -> Downlink:
        """Round ``rnd``'s sampled clients (among ``online``, if given) and payloads, each
        distinct payload serialised once."""
        plan = Downlink(rnd, self.sample(rnd, online), time.perf_counter(), online=None if online is None else sorted(online))
        if self.client_kind == "stateful":
            plan.broadcast = self.server.broadcast(rnd)
            plan.broadcast_raw = encode(plan.broadcast)
            self._log(rnd, plan.broadcast_raw)
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

    # -- stateful clients that come and go -------------------------------------------------------
    def replica_size(self) -> int | None:
        """Bytes of the replica sent whole (None where the server half cannot send it)."""
        if self._replica_size is None:
            try:
                self._replica_size = encoded_size(self.server.replica_state())
            except NotImplementedError:
                return None
        return self._replica_size

    def _log(self, rnd: int, raw: bytes) -> None:
        self.broadcast_log.append((rnd, raw))
        limit = self.replica_size()
        while limit is not None and len(self.broadcast_log) > 1 and sum(len(r) for _, r in self.broadcast_log) > limit:
            self.broadcast_log.pop(0)

    def catch_up(self, since: int | None, rnd: int) -> CatchUp:
        """What brings a client whose replica was last synced in round ``since`` (None: not
        known, say after a failed message or a restart) up to date in round ``rnd`` (see
        :class:`CatchUp`): the broadcasts of rounds since+1 .. rnd-1 if they are all kept and,
        with this round's, smaller than the replica; else the replica (the server's state at
        round ``rnd``'s downlink). Call it after :meth:`downlink` of ``rnd``."""
        size = self.replica_size()
        if since is not None:
            logged = dict(self.broadcast_log)
            missed = [logged[r] for r in range(since + 1, rnd) if r in logged]
            now = len(logged.get(rnd, b""))
            if len(missed) == rnd - 1 - since and (size is None or sum(len(r) for r in missed) + now < size):
                return CatchUp("replay", missed, since, rnd)
        if size is None:
            raise RuntimeError(f"a client last synced in round {since} cannot catch up in round {rnd}: {type(self.server).__name__} cannot send its replica and the broadcasts it missed are no longer kept")
        return CatchUp("model", [encode(self.server.replica_state())], since, rnd)

    def open(self, plan: Downlink) -> RoundFold:
        """Round ``plan.rnd``'s aggregation: ``add(cid, upload)`` each decoded upload as it
        arrives (checked, folded in, never kept by a server half that streams), then :meth:`close`."""
        guard = None
        if self.defences is not None:
            guard = UploadGuard(self.defences, plan.rnd, bound=self.clip_bound.current(), recorded=self.recorded_samples, seed=self.seed)
        return RoundFold(self.server, plan.rnd, max_bytes=self.max_upload_bytes, guard=guard)

    def aggregate(self, plan: Downlink, replies: Sequence[tuple[int, Payload]], up_sizes: Sequence[int], clients: Sequence[int]) -> tuple[RoundRecord, dict[str, torch.Tensor]]:
        """:meth:`open`, ``add`` each of ``replies`` ((client id, decoded upload)), :meth:`close`."""
        fold = self.open(plan)
        for cid, payload in replies:
            fold.add(cid, payload)
        return self.close(plan, fold, up_sizes, clients)

    def close(self, plan: Downlink, fold: RoundFold, up_sizes: Sequence[int], clients: Sequence[int]) -> tuple[RoundRecord, dict[str, torch.Tensor]]:
        """Fold the round's checked uploads (``fold``, added in ascending client order for
        results that do not depend on arrival) into the server; the round's record and the
        global model state. ``clients`` sent uploads of ``up_sizes`` bytes (what the transport
        measured on the wire, lost and rejected uploads included). The transport evaluates,
        then adds the record with :meth:`commit`."""
        checked, state = aggregate_round(fold, min_clients=self.min_clients)
        self.server, stats = checked.server, checked.stats
        up_sizes = list(up_sizes)
        down_sizes = plan.down_sizes
        broadcast = len(plan.broadcast_raw) if plan.broadcast_raw is not None else 0
        reachable = self.num_clients if plan.online is None else len(plan.online)
        recipients = reachable - plan.skipped_broadcasts if plan.broadcast_raw is not None else 0
        down_total = sum(down_sizes) + broadcast * recipients + sum(plan.catch_up_sizes)
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
            online=None if plan.online is None else len(plan.online),
            catch_ups=len(plan.catch_up_sizes),
            catch_up_bytes=sum(plan.catch_up_sizes),
            rejected=checked.rejected,
            skipped=checked.skipped,
        )
        if fold.guard is not None:
            accepted = sorted(checked.accepted)
            if self.clip_bound is not None:  # the adaptive bound learns from the accepted uploads' norms
                self.clip_bound.record([fold.guard.norms[c] for c in accepted if c in fold.guard.norms])
            if self.privacy is not None and not checked.skipped:
                self.privacy.step(accepted)
            rec.defence = self._defence_report(fold, checked)
        return rec, state

    def _defence_report(self, fold: RoundFold, checked: CheckedRound) -> dict:
        """What the defences did in the round ``fold`` (accepted as ``checked``), and the privacy spent so far."""
        guard, d = fold.guard, self.defences
        accepted = set(checked.accepted)
        out: dict = {"aggregator": d.aggregator}
        if d.dp == "central" or d.sample_weights == "uniform":
            out["weights"] = "uniform"
        elif d.sample_weights == "recorded" or d.max_sample_weight:
            cut = {c: v for c, v in guard.weight_cut.items() if c in accepted}
            out["weights_cut"] = len(cut)
            out["weights_cut_clients"] = {str(c): {"claimed": n, "used": w} for c, (n, w) in sorted(cut.items())}
        if d.server_clip:
            norms = [guard.norms[c] for c in sorted(accepted) if c in guard.norms]
            out["clip_bound"] = guard.bound
            out["clipped"] = len([c for c in guard.clipped if c in accepted])
            out["clipped_clients"] = sorted(c for c in guard.clipped if c in accepted)
            out["upload_norm_median"] = float(np.median(norms)) if norms else None
        if d.aggregator == "krum" and isinstance(fold.sums, DefendedSums) and fold.sums.selected is not None and not checked.skipped:
            ids = fold.accepted  # in the order their uploads went into the sums
            out["krum_selected"] = sorted(ids[i] for i in fold.sums.selected) if len(ids) == len(fold.sums.uploads) else []
        if self.privacy is not None:
            out["dp"] = d.dp
            out["dp_noise"] = d.dp_noise
            out["epsilon"] = self.privacy.epsilon()
            out["dp_delta"] = d.dp_delta
        return out

    def evaluation_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model the round just closed is evaluated as: ``state`` (the global model
        :meth:`close` returned), or what the server half says instead
        (:meth:`~rankfed.protocol.ServerHalf.evaluation_state`: FedLoRU's model before a
        merge, with ``eval_before_merge``). Call it right after :meth:`close`, before the next
        round's downlink."""
        own = self.server.evaluation_state()
        return state if own is None else own

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
