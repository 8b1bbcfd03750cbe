"""The in-process federated simulator.

One process plays the server and every client, in sequence. It is a faithful
transport, not a shortcut: every downlink and uplink payload is serialised
with :func:`rankfed.wire.encode` (that length is what the run reports) and the
receiving half gets the decoded copy, so an algorithm that works here
communicates only through its payloads.

Costs kept low on purpose: client data stays in device tensors, one model
object is reused for every client, a payload sent identically to many clients
is serialised once (and counted once per recipient).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.algorithms.base import CLIENT_KINDS, Algorithm, ClientContext, RunContext
from rankfed.algorithms.validate import CheckedRound, aggregate_checked, nonfinite_entries, upload_limit
from rankfed.data import ClientData
from rankfed.sim.trainer import LocalTrainer
from rankfed.sim.vectorized import CohortOutOfMemory, cohort_supported, has_dropout
from rankfed.wire import decode, encode

__all__ = ["Simulator", "RoundRecord", "Diverged", "aggregate_round", "evaluate", "sample_clients"]


class Diverged(RuntimeError):
    """The global model holds non-finite values after a round's aggregation (training diverged)."""

    def __init__(self, rnd: int, names: list[str], where: str = "the global model has"):
        self.round, self.names = rnd, names
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        super().__init__(f"training diverged in round {rnd}: {where} non-finite values in {shown} (try a lower client.lr)")


def aggregate_round(server, rnd: int, replies, *, min_clients: int, max_bytes: int | None) -> tuple[CheckedRound, dict[str, torch.Tensor]]:
    """A round's checked aggregation (:func:`rankfed.algorithms.validate.aggregate_checked`) and
    the resulting global model state, shared by every transport. Raises :class:`Diverged` when
    every upload was non-finite, or when the global model is non-finite all the same (a
    non-finite starting model, which no upload can repair)."""
    checked = aggregate_checked(server, rnd, replies, min_clients=min_clients, max_bytes=max_bytes)
    if checked.all_nonfinite:  # every client's training blew up: the run diverged
        raise Diverged(rnd, sorted({n for _, p in replies for n in nonfinite_entries(p)}), where="every client's upload has")
    state = checked.server.global_model_state()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Diverged(rnd, bad)
    return checked, state


def _to_device(c: ClientData, device: torch.device) -> ClientData:
    return ClientData(x=c.x.to(device), y=c.y.to(device), val_x=c.val_x.to(device), val_y=c.val_y.to(device))


@dataclass
class RoundRecord:
    """What happened in one round. ``accuracy``/``loss`` are None on rounds not evaluated."""

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
    accuracy: float | None = None
    loss: float | None = None
    eval_s: float | None = None
    # personalised algorithms: mean over clients of each one's accuracy on its own held-out split
    personal_accuracy: float | None = None
    # uploads dropped by the server's checks (client id -> reason), and whether too few were left
    rejected: dict = field(default_factory=dict)
    skipped: bool = False
    # what a real transport measured (Flower: its message sizes, failed clients); empty in the simulator
    transport: dict = field(default_factory=dict)

    def metrics_line(self) -> dict:
        """The record as a metrics.jsonl line (per-client lists left out, transport fields inlined)."""
        d = asdict(self)
        for k in ("clients", "uplink_bytes_per_client", "downlink_bytes_per_client"):
            d.pop(k)
        d["num_clients"] = len(self.clients)
        d["rejected_uploads"] = len(d.pop("rejected"))
        d |= d.pop("transport")
        return d


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of round ``rnd``: ``per_round`` distinct ids, drawn from (seed, round) only."""
    rng = np.random.default_rng([seed, rnd, 0x5A11])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = max(len(y), 1)
    return float(correct) / n, float(loss_sum) / n


class Simulator:
    """Runs an algorithm's rounds over in-memory clients.

    ``model`` is the seeded initial model: the server half starts from its
    weights, a deep copy serves as the one client model object, and another
    as the evaluation model.

    ``client_kind`` is "stateless" or "stateful" (see
    :mod:`rankfed.algorithms.base`). Stateful clients all apply the same
    broadcasts to the same initial replica, so their replicas are identical:
    the simulator keeps one, updated only through the client half's ``sync``
    from the decoded broadcast, and charges each broadcast to all K clients.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        model: nn.Module,
        clients: Sequence[ClientData],
        test: tuple[torch.Tensor, torch.Tensor],
        ctx: RunContext,
        clients_per_round: int,
        eval_every: int = 1,
        eval_batch_size: int = 1024,
        client_kind: str = "stateless",
        min_clients: int = 1,
        execution: str = "auto",
        compile: bool = False,
        workers: int = 1,
    ):
        if not 1 <= clients_per_round <= len(clients):
            raise ValueError(f"clients_per_round = {clients_per_round} must be in [1, {len(clients)}]")
        if client_kind not in CLIENT_KINDS:
            raise ValueError(f"client_kind = {client_kind!r}: must be one of {', '.join(CLIENT_KINDS)}")
        self.client_kind = client_kind
        if execution not in ("auto", "sequential", "vectorized"):
            raise ValueError(f"execution = {execution!r}: must be auto, sequential or vectorized")
        # vectorized: the round's clients train as one batched computation where the algorithm
        # supports it (ClientHalf.fit_cohort), else one after another; auto: vectorized on a GPU
        # only (on a CPU it is measured slower than sequential, benchmarks/RESULTS.md)
        if execution == "auto":
            execution = "vectorized" if ctx.device.type == "cuda" else "sequential"
        self.execution, self.compile = execution, compile
        self.cohort_rounds = 0  # rounds whose clients trained as one vectorised cohort
        self._warned_fallback = False
        if workers < 1:
            raise ValueError(f"workers = {workers}: must be >= 1")
        # workers > 1: clients not trained as a cohort train in that many threads at once, each
        # with its own client half and model; not with dropout (torch's global RNG seeds it)
        if workers > 1 and has_dropout(model):
            warnings.warn(f"federation.workers = {workers}: the model has dropout, whose masks come from torch's global RNG; clients train one at a time", stacklevel=2)
            workers = 1
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.min_clients = min_clients
        self.max_upload_bytes = upload_limit(model)
        self.algorithm = algorithm
        self.ctx = ctx
        dev = ctx.device
        model = model.to(dev)
        self.server = algorithm.make_server(model, ctx)
        self.client = algorithm.make_client(model, ctx)
        self.worker = copy.deepcopy(model)
        # one (client half, model) per client thread; the first is the simulator's own
        self._halves = [(self.client, self.worker)] + [(algorithm.make_client(model, ctx), copy.deepcopy(model)) for _ in range(self.workers - 1)]
        self.eval_model = copy.deepcopy(model)
        # The one replica standing for every stateful client's (identical) replica.
        self.replica = self.client.init_replica(model) if client_kind == "stateful" else None
        self.clients = [_to_device(c, dev) for c in clients]
        self.test_x, self.test_y = test[0].to(dev), test[1].to(dev)
        self.clients_per_round = clients_per_round
        self.eval_every = eval_every
        self.eval_batch_size = eval_batch_size
        self.trainer = LocalTrainer(ctx.client, ctx.rounds, ctx.seed)
        self.client_states: dict[int, dict] = {}  # only clients whose algorithm keeps state
        self.history: list[RoundRecord] = []
        self.cum_up = self.cum_down = 0
        self._t_start: float | None = None
        # fault injection (tests, the reliability report): (round, client, decoded upload) -> the
        # upload the server receives instead, or None for one lost on the way
        self.tamper: Callable[[int, int, dict], dict | None] | None = None

    # -- one round -------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        return sample_clients(self.ctx.seed, rnd, len(self.clients), self.clients_per_round)

    def run_round(self, rnd: int) -> RoundRecord:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        t0 = time.perf_counter()
        ids = self.sample(rnd)
        replies = []
        up_sizes, down_sizes = [], []
        broadcast_bytes = broadcast_recipients = 0
        if self.client_kind == "stateful":
            raw = encode(self.server.broadcast(rnd))
            broadcast_bytes, broadcast_recipients = len(raw), len(self.clients)
            message = decode(raw)
            self.client.sync(message, self.replica)
            received_by = dict.fromkeys(ids, message)
        else:
            # Serialise each distinct downlink object once; each recipient is charged its length.
            downlinks = self.server.configure(rnd, ids)
            wire_cache: dict[int, tuple[int, dict, object]] = {}
            received_by = {}
            for cid in ids:
                sent = downlinks[cid]
                if id(sent) not in wire_cache:
                    raw = encode(sent)
                    wire_cache[id(sent)] = (len(raw), decode(raw), sent)  # keep `sent` alive: ids stay unique
                nbytes, received_by[cid], _ = wire_cache[id(sent)]
                down_sizes.append(nbytes)
        ctxs = [ClientContext(cid, rnd, self.worker, self.clients[cid], self.trainer, self.client_states.get(cid, {}), self.replica) for cid in ids]
        uplinks = None
        if self.execution == "vectorized":
            try:
                uplinks = self.client.fit_cohort([received_by[cid] for cid in ids], ctxs, compile=self.compile)
            except CohortOutOfMemory as e:  # nothing of the round was kept: train it, and the rest, one by one
                self.execution = "sequential"
                warnings.warn(f"federation.execution = 'vectorized': {e}; the clients train one by one from round {rnd} on", stacklevel=2)
        if uplinks is not None:
            self.cohort_rounds += 1
        elif self.execution == "vectorized" and not self._warned_fallback:
            self._warned_fallback = True
            why = cohort_supported(self.worker, self.ctx.client) or f"{self.algorithm.name} with these options has no vectorised path"
            warnings.warn(f"federation.execution = 'vectorized': clients train one by one ({why})", stacklevel=2)
        if uplinks is None and self.workers > 1 and len(ids) > 1:
            uplinks = self._fit_in_threads([received_by[cid] for cid in ids], ctxs)
        for i, (cid, cctx) in enumerate(zip(ids, ctxs)):
            state = cctx.state
            raw = encode(uplinks[i] if uplinks is not None else self.client.fit(received_by[cid], cctx))
            up_sizes.append(len(raw))
            upload = decode(raw)
            if self.tamper is not None:
                upload = self.tamper(rnd, cid, upload)
            if upload is not None:
                replies.append((cid, upload))
            if state:
                self.client_states[cid] = state
        checked, global_state = aggregate_round(self.server, rnd, replies, min_clients=self.min_clients, max_bytes=self.max_upload_bytes)
        self.server, stats = checked.server, checked.stats  # global_state: evaluated below
        round_s = time.perf_counter() - t0
        down_total = sum(down_sizes) + broadcast_bytes * broadcast_recipients
        self.cum_up += sum(up_sizes)
        self.cum_down += down_total
        rec = RoundRecord(
            round=rnd,
            clients=ids,
            uplink_bytes=sum(up_sizes),
            downlink_bytes=down_total,
            cum_uplink_bytes=self.cum_up,
            cum_downlink_bytes=self.cum_down,
            round_s=round_s,
            wall_s=0.0,
            train_loss=float(stats.get("train_loss", float("nan"))),
            uplink_bytes_per_client=up_sizes,
            downlink_bytes_per_client=down_sizes,
            broadcast_bytes=broadcast_bytes,
            broadcast_recipients=broadcast_recipients,
            rejected=checked.rejected,
            skipped=checked.skipped,
        )
        if rnd % self.eval_every == 0 or rnd == self.ctx.rounds:
            t1 = time.perf_counter()
            rec.accuracy, rec.loss = self.evaluate(global_state)
            if getattr(self.client, "personalized", False):
                rec.personal_accuracy = self.evaluate_personal(rnd)
            rec.eval_s = time.perf_counter() - t1
        rec.wall_s = time.perf_counter() - self._t_start
        self.history.append(rec)
        return rec

    def _fit_in_threads(self, payloads: list, ctxs: list[ClientContext]) -> list:
        """The round's clients trained by ``workers`` threads at once, each with its own client
        half and model object and 1/workers of torch's threads (small models train faster as
        several single-threaded clients than as one client on every core). Each client's work
        is what :meth:`ClientHalf.fit` does alone, so the uplinks equal sequential execution's
        up to the float order of multi-threaded kernels."""
        k = len(self._halves)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(k, thread_name_prefix="rankfed-client")
        out: list = [None] * len(ctxs)

        def work(j: int) -> None:
            half, model = self._halves[j]
            for i in range(j, len(ctxs), k):
                out[i] = half.fit(payloads[i], dataclasses.replace(ctxs[i], model=model))

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // k))
        try:
            for f in [self._pool.submit(work, j) for j in range(k)]:
                f.result()
        finally:
            torch.set_num_threads(threads)
        return out

    def close(self) -> None:
        """Stop the client threads (``federation.workers`` > 1); the simulator stays usable."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def evaluate(self, global_state: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """Accuracy and loss of the current global model on the test set."""
        self.eval_model.load_state_dict(self.server.global_model_state() if global_state is None else global_state)
        return evaluate(self.eval_model, self.test_x, self.test_y, self.eval_batch_size)

    def evaluate_personal(self, rnd: int) -> float | None:
        """Mean over clients of each client's personalised accuracy on its own held-out split
        (clients without one are left out; None if none has one). Evaluation downloads are
        not counted: they measure, they are not part of training."""
        payload = None
        if self.client_kind == "stateless":
            payload = decode(encode(next(iter(self.server.configure(rnd, [0]).values()))))
        accs = []
        for cid, data in enumerate(self.clients):
            cctx = ClientContext(cid, rnd, self.worker, data, self.trainer, self.client_states.get(cid, {}), self.replica)
            correct, n = self.client.evaluate_personal(payload, cctx)
            if n:
                accs.append(correct / n)
        return sum(accs) / len(accs) if accs else None

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1) -> list[RoundRecord]:
        for rnd in range(start_round, self.ctx.rounds + 1):
            rec = self.run_round(rnd)
            if on_round is not None:
                on_round(rec)
        return self.history
