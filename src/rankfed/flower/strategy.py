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
uploads did, and is skipped (the global model unchanged) otherwise. A SuperNode
that dies during a round does not hold the round until the timeout: once its
heartbeats are overdue the round stops waiting for it (:class:`QuickPollGrid`). Uploads
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
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from rankfed.server import CatchUp, Downlink, Evaluator, Experiment, Rounds
from rankfed.wire import WireError, decode, encoded_size

from .records import message_wire_bytes, payload_to_records, records_to_payload

__all__ = ["RankfedStrategy", "NodeMap", "QuickPollGrid", "hosted_clients", "META"]

META = "rankfed"  # the ConfigRecord every rankfed message carries (round, client ids, ...)
CATCH_UP = "catchup.meta"  # a stateful train message's catch-up, if the SuperNode missed broadcasts


def hosted_clients(num_clients: int, partition_id: int, num_partitions: int) -> list[int]:
    """The client ids SuperNode ``partition_id`` of ``num_partitions`` hosts."""
    if not 1 <= num_partitions <= num_clients:
        raise ValueError(f"num-partitions = {num_partitions}: must be in [1, federation.clients = {num_clients}] (every SuperNode hosts at least one client)")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id = {partition_id}: must be in [0, num-partitions = {num_partitions})")
    return list(range(partition_id, num_clients, num_partitions))


def catch_up_records(cu: CatchUp) -> dict:
    """A catch-up (:meth:`rankfed.server.Rounds.catch_up`) as the records of a train message:
    ``catchup.meta`` (its kind and the rounds of the replayed broadcasts) and each payload under
    ``catchup.<i>``."""
    rounds = list(range(cu.since + 1, cu.rnd)) if cu.kind == "replay" else [cu.rnd]
    out: dict = {CATCH_UP: ConfigRecord({"kind": cu.kind, "rounds": rounds})}
    for i, raw in enumerate(cu.raws):
        out |= payload_to_records(decode(raw), f"catchup.{i}")
    return out


class QuickPollGrid:
    """A Grid whose ``send_and_receive`` polls for replies every ``interval`` seconds and stops
    waiting for the messages of SuperNodes that are gone.

    Flower's own polls every 3 s, which adds up to 3 s to every round for nothing once the
    replies are in, and waits for a dead SuperNode's reply until the timeout. A SuperNode
    that stops sending heartbeats (killed, its machine lost) leaves ``get_node_ids()`` once
    its heartbeats are overdue (Flower 1.41: 2 x its 30 s heartbeat interval after the last
    one, which it sent at most ~20 s before it died), and from then on the SuperLink answers
    every message addressed to it with a ``NODE_UNAVAILABLE`` error reply.
    This grid also looks at ``get_node_ids()`` every ``node_check`` seconds and answers a
    pending message to a node no longer there with such an error reply itself, so a round
    ends as soon as every message is answered or addressed to a node that is gone, whatever
    the grid. Everything else is the wrapped grid's.
    """

    GONE = "Node Unavailable: the destination SuperNode left the federation (no heartbeat) before replying"

    def __init__(self, grid: Grid, interval: float = 0.1, node_check: float = 1.0):
        self._grid, self.interval, self.node_check = grid, interval, node_check

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        pending = {m for m in self._grid.push_messages(messages) if m}
        sent = {m.metadata.message_id: m for m in messages}  # the grid gave each message its id
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        checked = time.monotonic()
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            if time.monotonic() - checked >= self.node_check:
                checked = time.monotonic()
                alive = set(self._grid.get_node_ids())
                for mid in sorted(m for m in pending if m in sent and sent[m].metadata.dst_node_id not in alive):
                    replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=self.GONE), reply_to=sent[mid]))
                    pending.discard(mid)
                if not pending:
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
    messages: list[Message] = field(default_factory=list)  # as sent: the grid gives them their ids when it pushes them
    sent_to: set[int] = field(default_factory=set)  # the nodes sent a train message


class RankfedStrategy(Strategy):
    """Runs ``exp``'s algorithm over a Flower grid; writes rounds to ``on_round``."""

    def __init__(self, exp: Experiment, on_round=None, on_checkpoint=None):
        self.exp = exp
        self.options = exp.options
        self.ctx = exp.ctx
        self.kind = exp.client_kind
        model = exp.model.to(exp.ctx.device)
        server = exp.algorithm.make_server(model, exp.ctx)
        self.rounds = Rounds.for_experiment(exp, server, model)
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
        self.cohort_messages = 0  # train messages whose clients a SuperNode trained as one vectorised cohort
        self.failure_reasons: dict[str, int] = {}  # category ("error", "no reply ...", ...) -> count
        self.failure_examples: dict[str, str] = {}  # category -> the first such failure's message
        self.skipped_rounds: list[int] = []
        self._round: _Round | None = None
        self._rec = None  # the round aggregated last, before evaluation
        self._global_state: dict[str, torch.Tensor] | None = None
        self._eval_state: dict[str, torch.Tensor] | None = None  # what the round is evaluated as (Rounds.evaluation_state)
        self._t_start: float | None = None
        self.offset = 0  # a resumed run: Flower's round 1 is this run's round offset + 1
        # stateful kinds: the round each partition's replica was last synced in, as far as this
        # server knows (None: not known, after a failed message or a resume: sent the replica whole)
        self.synced: dict[int, int | None] = {}

    @property
    def server(self):
        return self.rounds.server

    @property
    def history(self):
        return self.rounds.history

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run continues from after the last finished round (the round's server
        half, history, byte ledger and broadcast log, and Flower's own counters)."""
        keep = ("rounds", "cum_flower_up", "cum_flower_down", "failures_total", "cohort_messages", "failure_reasons", "failure_examples", "skipped_rounds")
        return {"round": self.history[-1].round if self.history else 0, **{k: getattr(self, k) for k in keep}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict`): Flower's round 1 is round state["round"] + 1.
        A new Flower run has new SuperNode Contexts, so every replica is sent whole first, and
        client state kept on the SuperNodes (error feedback, personal factors) starts afresh."""
        for key, value in state.items():
            if key not in ("round", "format", "config", "wall_s"):
                setattr(self, key, value)
        self.offset = int(state["round"])
        self.synced = {}  # connect() marks every partition's replica as not known

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
        for p in range(num_partitions):  # a resumed run's SuperNodes have fresh Contexts: their replicas are not known
            self.synced.setdefault(p, None if self.offset else 0)
        return self.nodes

    # -- Strategy --------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── rankfed algorithm: %s (%s clients)", self.exp.algorithm.name, self.kind)
        log(INFO, "\t└── %d clients, %d per round", self.ctx.num_clients, self.exp.clients_per_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        assert self.nodes is not None, "connect() first"
        if self._t_start is None:
            self._t_start = time.perf_counter()
        rnd = server_round + self.offset
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
            for p, node in self.nodes.node_of_partition.items():  # every replica must see every broadcast
                if node in alive:
                    content = {META: ConfigRecord({"round": rnd, "clients": clients_of_node.get(node, [])}), **records}
                    since = self.synced.get(p, 0)
                    if since is None or since < rnd - 1:  # it missed broadcasts (or we do not know): catch it up
                        cu = self.rounds.catch_up(since, rnd)
                        plan.charge(cu, replaces_broadcast=False)
                        content |= catch_up_records(cu)
                    contents[node] = RecordDict(content)
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
        self._round = _Round(plan, clients_of_node, flower_down, failures, messages, set(contents))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self._round
        assert r is not None and r.plan.rnd == server_round + self.offset
        uplinks: dict[int, RecordDict] = {}  # client -> the reply holding its upload (decoded when folded in)
        flower_up = cohort_messages = 0
        answered: set[int] = set()
        synced_ok: set[int] = set()  # nodes that answered without an error
        # A reply answers for the destination of the message it replies to: the error the
        # SuperLink writes for a node that went offline comes from the SuperLink's own id.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in r.messages if m.metadata.message_id}
        for reply in replies:
            node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            gone = reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE  # it stopped sending heartbeats during the round
            flower_up += 0 if gone else message_wire_bytes(reply)  # (that error was written by the SuperLink or QuickPollGrid: it came from no SuperNode)
            cids = r.clients_of_node.get(node, [])
            if reply.has_error():
                for cid in cids:
                    r.failures[cid] = f"node unavailable: {reply.error.reason}" if gone else f"error: {reply.error.reason}"
                continue
            cohort_messages += bool(reply.content[META].get("cohort", False))
            synced_ok.add(node)
            for cid in cids:
                uplinks[cid] = reply.content
        for node, cids in r.clients_of_node.items():
            if node not in answered:
                for cid in cids:
                    r.failures[cid] = "no reply within flower.round_timeout"
        if r.plan.broadcast is not None:  # which replicas took this round's broadcast
            for p, node in self.nodes.node_of_partition.items():
                if node in synced_ok:
                    self.synced[p] = r.plan.rnd
                elif node in r.sent_to:
                    self.synced[p] = None  # it may or may not have synced before it failed
        rnd, min_clients = r.plan.rnd, self.options.min_clients
        arrived, up_sizes = [], []  # the simulator's order: ascending client id; bytes that crossed, bad uploads included
        fold = self.rounds.open(r.plan)
        for cid in sorted(uplinks):  # each decoded and folded in, one at a time
            try:
                payload = records_to_payload(uplinks.pop(cid), f"up.{cid}")
            except WireError as e:
                r.failures[cid] = f"bad upload: {e}"
                continue
            arrived.append(cid)
            up_sizes.append(encoded_size(payload))
            fold.add(cid, payload)
            del payload
        rec, self._global_state = self.rounds.close(r.plan, fold, up_sizes, arrived)
        self._eval_state = self.rounds.evaluation_state(self._global_state)  # now: a personal evaluation's configure comes first
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
        self.cohort_messages += cohort_messages
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
        server_round += self.offset
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
        server_round += self.offset
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
        if server_round == 0:
            return None
        server_round += self.offset
        if self._rec is None or self._rec.round != server_round:
            return None
        rec = self._rec
        self.evaluator(rec, self._eval_state)  # raises Diverged on a non-finite test loss
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
