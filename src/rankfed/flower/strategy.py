"""The server side of a rankfed run on Flower: a Strategy on Flower's Message API.

:class:`RankfedStrategy` drives any rankfed algorithm's server half through
:meth:`flwr.serverapp.strategy.Strategy.start`. The round is the
simulator's, :class:`rankfed.server.Rounds` (sampling, the downlink plan, checked
aggregation, the byte ledger); this module only converts payloads to and from Flower
messages. So for one seed a deployment and the simulator train the same clients on the same
data from the same payloads and end with the same model.

Clients and SuperNodes: the experiment's K clients are spread over the P
SuperNodes by ``client_id % P == partition-id`` (one client per SuperNode when
P = K). Every round each SuperNode hosting a sampled client gets one ``train``
message carrying the downlink payload(s) of its sampled clients (stateless
kinds) or the round's broadcast (stateful kinds: every SuperNode, sampled or
not, so every replica stays current) and replies with one uplink per client.

Failures: a SuperNode that is gone (no heartbeat), replies with an error, or
does not reply within ``flower.round_timeout`` costs the round its clients; the
round aggregates what arrived if at least ``federation.min_clients`` valid
uploads did, and is skipped (the global model unchanged) otherwise. Uploads
are checked as in the simulator (:mod:`rankfed.server.validate`); a bad
one counts as a failure ("bad upload: ..."). All are counted per round and in
the summary.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from rankfed.server import Downlink, Evaluator, Experiment, Rounds, upload_limit
from rankfed.wire import WireError, encoded_size

from .records import message_wire_bytes, payload_to_records, records_to_payload

__all__ = ["RankfedStrategy", "NodeMap", "QuickPollGrid", "hosted_clients", "META"]

META = "rankfed"  # the ConfigRecord every rankfed message carries (round, client ids, ...)


def hosted_clients(num_clients: int, partition_id: int, num_partitions: int) -> list[int]:
    """The client ids SuperNode ``partition_id`` of ``num_partitions`` hosts."""
    if not 1 <= num_partitions <= num_clients:
        raise ValueError(f"num-partitions = {num_partitions}: must be in [1, federation.clients = {num_clients}] (every SuperNode hosts at least one client)")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id}: must be in [0, num-partitions = {num_partitions})")
    return list(range(partition_id, num_clients, num_partitions))


class QuickPollGrid:
    """A Grid whose ``send_and_receive`` polls for replies every ``interval`` seconds.

    Flower's own polls every 3 s, which adds up to 3 s to every round for nothing once the
    replies are in; everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, interval: float = 0.1):
        self._grid, self.interval = grid, interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies


@dataclass
class NodeMap:
    """Which SuperNode (Flower node id) holds which partition."""

    num_partitions: int
    node_of_partition: dict[int, int] = field(default_factory=dict)

    def node_of_client(self, cid: int) -> int:
        return self.node_of_partition[cid % self.num_partitions]


@dataclass
class _Round:
    """What the strategy sent in the round being run."""

    plan: Downlink
    clients_of_node: dict[int, list[int]]
    flower_down: int
    failures: dict[int, str] = field(default_factory=dict)  # client id -> why it did not count


class RankfedStrategy(Strategy):
    """Runs ``exp``'s algorithm over a Flower grid; writes rounds to ``on_round``."""

    def __init__(self, exp: Experiment, on_round=None, on_checkpoint=None):
        self.exp = exp
        self.options = exp.options
        self.ctx = exp.ctx
        self.kind = exp.client_kind
        model = exp.model.to(exp.ctx.device)
        server = exp.algorithm.make_server(model, exp.ctx)
        self.rounds = Rounds(
            server, num_clients=len(exp.clients), clients_per_round=exp.clients_per_round, seed=exp.ctx.seed,
            client_kind=self.kind, min_clients=exp.options.min_clients, max_upload_bytes=upload_limit(model, server),
        )  # fmt: skip
        self.client_half = exp.algorithm.make_client(model, exp.ctx)  # for .personalized only
        test = exp.test.to(exp.ctx.device) if exp.test is not None else None
        self.evaluator = Evaluator(copy.deepcopy(model), test, exp.ctx.task, rounds=exp.ctx.rounds, eval_every=exp.options.eval_every, batch_size=exp.options.eval_batch_size)
        self.nodes: NodeMap | None = None
        self.on_round = on_round
        self.on_checkpoint = on_checkpoint  # (round, global state) every checkpoint_every rounds
        if on_checkpoint is not None and self.options.checkpoint_every:
            on_checkpoint(0, self.server.global_model_state())
        self.cum_flower_up = self.cum_flower_down = 0
        self.failures_total = 0
        self.failure_reasons: dict[str, int] = {}  # category ("error", "no reply ...", ...) -> count
        self.failure_examples: dict[str, str] = {}  # category -> the first such failure's message
        self.skipped_rounds: list[int] = []
        self._round: _Round | None = None
        self._rec = None  # the round aggregated last, before evaluation
        self._global_state: dict[str, torch.Tensor] | None = None
        self._t_start: float | None = None

    @property
    def server(self):
        return self.rounds.server

    @property
    def history(self):
        return self.rounds.history

    # -- start-up ------------------------------------------------------------------------------
    def connect(self, grid: Grid, timeout: float) -> NodeMap:
        """Ask every connected SuperNode for its partition until all partitions answered (or
        ``timeout`` seconds pass: then a clear error naming the missing ones)."""
        deadline = time.monotonic() + timeout
        seen: dict[int, int] = {}  # partition -> node id
        num_partitions: int | None = None
        asked: set[int] = set()
        while True:
            new = [n for n in grid.get_node_ids() if n not in asked]
            msgs = [Message(RecordDict({META: ConfigRecord({"op": "hello"})}), dst_node_id=n, message_type="query") for n in new]
            asked.update(new)
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())) if msgs else []:
                if reply.has_error():
                    log(WARNING, "rankfed: SuperNode %s failed the hello: %s", reply.metadata.src_node_id, reply.error.reason)
                    continue
                info = reply.content[META]
                p, n = int(info["partition-id"]), int(info["num-partitions"])
                if num_partitions is None:
                    num_partitions = n
                    hosted_clients(self.ctx.num_clients, 0, n)  # checks n against K
                elif n != num_partitions:
                    raise ValueError(f"SuperNodes disagree on num-partitions: {num_partitions} and {n}")
                if p in seen:
                    raise ValueError(f"two SuperNodes (ids {seen[p]} and {reply.metadata.src_node_id}) both have partition-id = {p}")
                hosted_clients(self.ctx.num_clients, p, n)  # checks p
                seen[p] = reply.metadata.src_node_id
            if num_partitions is not None and len(seen) == num_partitions:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_partitions or 1)) - set(seen))
                raise TimeoutError(f"after {timeout:.0f} s (flower.connect_timeout) no SuperNode with partition-id {missing} has connected")
            time.sleep(0.5)
        log(INFO, "rankfed: %d SuperNodes, %d clients", num_partitions, self.ctx.num_clients)
        self.nodes = NodeMap(num_partitions, seen)
        return self.nodes

    # -- Strategy --------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── rankfed algorithm: %s (%s clients)", self.exp.algorithm.name, self.kind)
        log(INFO, "\t└── %d clients, %d per round", self.ctx.num_clients, self.exp.clients_per_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        assert self.nodes is not None, "connect() first"
        if self._t_start is None:
            self._t_start = time.perf_counter()
        rnd = server_round
        plan = self.rounds.downlink(rnd)
        ids = plan.ids
        alive = set(grid.get_node_ids())
        clients_of_node: dict[int, list[int]] = {}
        failures: dict[int, str] = {}
        for cid in ids:
            node = self.nodes.node_of_client(cid)
            if node in alive:
                clients_of_node.setdefault(node, []).append(cid)
            else:
                failures[cid] = "node unavailable"
        contents: dict[int, RecordDict] = {}
        if plan.broadcast is not None:
            records = payload_to_records(plan.broadcast, "broadcast")
            for node in self.nodes.node_of_partition.values():  # every replica must see every broadcast
                if node in alive:
                    contents[node] = RecordDict({META: ConfigRecord({"round": rnd, "clients": clients_of_node.get(node, [])}), **records})
        else:
            for node, cids in clients_of_node.items():
                # each distinct downlink once per message (as the plan serialised it once)
                index: dict[int, int] = {}
                records: dict = {}
                for cid in cids:
                    key = plan.payload_of[cid]
                    if key not in index:
                        index[key] = len(index)
                        records |= payload_to_records(plan.payloads[key], f"down.{index[key]}")
                meta = ConfigRecord({"round": rnd, "clients": cids, "downlink_of": [index[plan.payload_of[c]] for c in cids]})
                contents[node] = RecordDict({META: meta, **records})
        messages = [Message(content, dst_node_id=node, message_type="train") for node, content in contents.items()]
        flower_down = sum(message_wire_bytes(m) for m in messages)
        self._round = _Round(plan, clients_of_node, flower_down, failures)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self._round
        assert r is not None and r.plan.rnd == server_round
        uplinks: dict[int, tuple[dict, int]] = {}
        flower_up = 0
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            flower_up += message_wire_bytes(reply)
            cids = r.clients_of_node.get(node, [])
            if reply.has_error():
                for cid in cids:
                    r.failures[cid] = f"error: {reply.error.reason}"
                continue
            for cid in cids:
                try:
                    payload = records_to_payload(reply.content, f"up.{cid}")
                except WireError as e:
                    r.failures[cid] = f"bad upload: {e}"
                    continue
                uplinks[cid] = (payload, encoded_size(payload))
        for node, cids in r.clients_of_node.items():
            if node not in answered:
                for cid in cids:
                    r.failures[cid] = "no reply within flower.round_timeout"
        arrived = sorted(uplinks)  # the simulator's order: ascending client id
        rnd, min_clients = r.plan.rnd, self.options.min_clients
        up_sizes = [uplinks[cid][1] for cid in arrived]  # bytes that crossed, bad uploads included
        rec, self._global_state = self.rounds.aggregate(r.plan, [(cid, uplinks[cid][0]) for cid in arrived], up_sizes, arrived)
        ok = [cid for cid in arrived if cid not in rec.rejected]
        for cid, why in rec.rejected.items():
            r.failures[cid] = f"bad upload: {why}"
        if rec.skipped:
            self.skipped_rounds.append(rnd)
            log(WARNING, "rankfed: round %d skipped: %d of %d sampled clients sent a valid upload (federation.min_clients = %d)", rnd, 0, len(r.plan.ids), min_clients)
        for cid, why in sorted(r.failures.items()):
            log(WARNING, "rankfed: round %d: client %d failed: %s", rnd, cid, why)
            self.failures_total += 1
            reason = why.split(":")[0]
            self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
            self.failure_examples.setdefault(reason, f"round {rnd}, client {cid}: {why.strip()[-400:]}")
        self.cum_flower_up += flower_up
        self.cum_flower_down += r.flower_down
        rec.transport = {  # what Flower moved (message sizes), beside the payload bytes above
            "flower_uplink_bytes": flower_up,
            "flower_downlink_bytes": r.flower_down,
            "cum_flower_uplink_bytes": self.cum_flower_up,
            "cum_flower_downlink_bytes": self.cum_flower_down,
            "failed_clients": len(r.failures),
        }
        self._rec = rec
        return None, MetricRecord({"train_loss": rec.train_loss, "replied": len(ok), "failed": len(r.failures)})

    def _evaluating(self, rnd: int) -> bool:
        return self.evaluator.due(rnd)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Personalised algorithms only: every SuperNode evaluates each of its clients' own model
        on that client's held-out split (evaluation downloads are not counted, as in the simulator)."""
        if not (getattr(self.client_half, "personalized", False) and self._evaluating(server_round)):
            return []
        assert self.nodes is not None
        records: dict = {}
        if self.kind == "stateless":
            records = payload_to_records(next(iter(self.server.configure(server_round, [0]).values())), "down.0")
        alive = set(grid.get_node_ids())
        return [
            Message(RecordDict({META: ConfigRecord({"round": server_round}), **records}), dst_node_id=node, message_type="evaluate")
            for node in self.nodes.node_of_partition.values()
            if node in alive
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accs = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "rankfed: personal evaluation failed on SuperNode %s: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            meta = reply.content[META]
            accs += [c / n for c, n in zip(meta["correct"], meta["samples"]) if n]
        if not accs or self._rec is None or self._rec.round != server_round:
            return None
        self._rec.personal_accuracy = sum(accs) / len(accs)
        return MetricRecord({"personal_accuracy": self._rec.personal_accuracy})

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the global model on the test set (called after each round's
        evaluate step), and the round's record handed to ``on_round``."""
        if server_round == 0 or self._rec is None or self._rec.round != server_round:
            return None
        rec = self._rec
        self.evaluator(rec, self._global_state)  # raises Diverged on a non-finite test loss
        rec.wall_s = time.perf_counter() - self._t_start
        self.rounds.commit(rec)
        if self.on_round is not None:
            self.on_round(rec)
        every = self.options.checkpoint_every
        if self.on_checkpoint is not None and every and (server_round % every == 0 or server_round == self.ctx.rounds):
            self.on_checkpoint(server_round, self._global_state)
        if rec.loss is None:
            return None
        return MetricRecord({k: v for k, v in {"accuracy": rec.accuracy, "loss": rec.loss, **rec.metrics}.items() if v is not None})

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.server.global_model_state()
