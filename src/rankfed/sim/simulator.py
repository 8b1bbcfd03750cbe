"""The in-process federated simulator.

One process plays the server and every client. It is a faithful transport, not a shortcut:
the round is :class:`rankfed.server.Rounds`' (sampling, the downlink plan, checked
aggregation, the byte ledger), every downlink and uplink payload is serialised with
:func:`rankfed.wire.encode` (that length is what the run reports), and the receiving half gets
the decoded copy, so an algorithm that works here communicates only through its payloads.

Costs kept low on purpose: in-memory client data stays in device tensors, one model object
is reused for every client, a payload sent identically to many clients is serialised and
decoded once (and counted once per recipient). Stateful clients all apply the same broadcasts
to the same initial replica, so their replicas are identical: the simulator keeps one, updated
only through the client half's ``sync`` from the decoded broadcast.

Clients that come and go (``RunOptions.availability`` or ``availability_trace``): a round
samples among the clients online, and only they receive a stateful broadcast. A stateful
client back after missing broadcasts is brought up to date by the server's catch-up
(:meth:`rankfed.server.Rounds.catch_up`: the missed broadcasts replayed, or the replica sent
whole), charged as downlink; the simulator applies it to the replica that client last had
(kept while some client is at that round and replaying from it could still pay) and checks
the result against the up-to-date replica: bitwise equal, it trains from the shared one.

Per-client state (``RunOptions.client_state``) is a dict in memory, or on disk with a bounded
cache (:class:`~rankfed.sim.clientstate.DiskClientStates`); clients training one after
another load theirs one at a time.

Execution (``RunOptions.execution``): ``sequential`` clients one after another; ``vectorized``
a round's clients as one ``torch.func.vmap`` cohort where the algorithm, model, optimiser,
loss and data allow (else one by one, with one warning saying why); ``workers = N`` clients
in N threads at once.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from rankfed.local import CohortOutOfMemory, cohort_supported, has_dropout
from rankfed.protocol import ClientContext
from rankfed.server import Evaluator, Experiment, RoundRecord, Rounds
from rankfed.sim.availability import Availability, read_trace
from rankfed.sim.clientstate import DiskClientStates
from rankfed.wire import decode, encode

__all__ = ["Simulator"]

_RESUME_FORMAT = 3


class Simulator:
    """Runs an :class:`~rankfed.server.Experiment`'s rounds over in-memory clients.

    The server half starts from the experiment's seeded initial model; a deep copy serves as
    the one client model object, and another as the evaluation model.
    """

    def __init__(self, exp: Experiment, state_dir: str | os.PathLike | None = None):
        """``state_dir``: the folder of ``client_state = "disk"`` (default: a temporary one,
        removed by :meth:`close`)."""
        self.exp = exp
        ctx, opts = exp.ctx, exp.options
        self.ctx = ctx
        self.algorithm = exp.algorithm
        self.client_kind = exp.client_kind
        self.execution, self.compile = exp.execution, opts.compile
        self.cohort_rounds = 0  # rounds whose clients trained as one vectorised cohort
        self._warned_fallback = False
        workers = opts.workers
        model = exp.model.to(ctx.device)
        self._pool: ThreadPoolExecutor | None = None
        server = exp.algorithm.make_server(model, ctx)
        self.rounds = Rounds.for_experiment(exp, server, model)
        self.client = exp.make_client(model)
        # workers > 1: clients not trained as a cohort train in that many threads at once, each
        # with its own client half and model; not with dropout (torch's global RNG seeds it), the
        # model's or the client half's own (the LoRA family's factor_dropout)
        trained = getattr(self.client, "model", None)
        if workers > 1 and (has_dropout(model) or (isinstance(trained, torch.nn.Module) and has_dropout(trained))):
            warnings.warn(f"federation.workers = {workers}: the model has dropout, whose masks come from torch's global RNG; clients train one at a time", stacklevel=2)
            workers = 1
        self.workers = workers
        self.worker = copy.deepcopy(model)
        # one (client half, model) per client thread; the first is the simulator's own
        self._halves = [(self.client, self.worker)] + [(exp.make_client(model), copy.deepcopy(model)) for _ in range(self.workers - 1)]
        self.evaluator = Evaluator(copy.deepcopy(model), exp.test.to(ctx.device) if exp.test is not None else None, ctx.task, rounds=ctx.rounds, eval_every=opts.eval_every, batch_size=opts.eval_batch_size)
        # The one replica standing for every stateful client's (identical) replica.
        self.replica = self.client.init_replica(model) if self.client_kind == "stateful" else None
        self.clients = [c.to(ctx.device) for c in exp.clients]
        trace = read_trace(opts.availability_trace, len(exp.clients), ctx.rounds) if opts.availability_trace else None
        self.availability = Availability(len(exp.clients), ctx.seed, opts.availability, trace)
        # stateful clients that come and go: the round each last synced its replica in, and the
        # replicas of rounds that some offline client is still at ([replica, clients at it])
        self.synced = np.zeros(len(exp.clients), dtype=np.int64)
        self._snapshots: dict[int, list] = {}
        self._own_replicas: dict[int, dict] = {}  # this round: caught-up replicas that are not bitwise the shared one
        self.trainer = ctx.trainer()
        # only clients whose algorithm keeps state: in memory, or on disk with a bounded cache
        self._state_tmp: tempfile.TemporaryDirectory | None = None
        self.client_states: dict[int, dict] | DiskClientStates = {}
        if opts.client_state == "disk":
            if state_dir is None:
                self._state_tmp = tempfile.TemporaryDirectory(prefix="rankfed-client-state-")
                state_dir = self._state_tmp.name
            self.client_states = DiskClientStates(state_dir, opts.client_state_cache)
        self._cohort_why: str | None | bool = False  # why clients cannot train as a cohort (False: not asked yet)
        self._t_start: float | None = None
        # fault injection (tests, the reliability report): (round, client, decoded upload) -> the
        # upload the server receives instead, or None for one lost on the way
        self.tamper: Callable[[int, int, dict], dict | None] | None = None

    # -- state a run reads -----------------------------------------------------------------------
    @property
    def server(self):
        return self.rounds.server

    @server.setter
    def server(self, value) -> None:
        self.rounds.server = value

    @property
    def history(self) -> list[RoundRecord]:
        return self.rounds.history

    @property
    def eval_model(self):
        return self.evaluator.model

    def sample(self, rnd: int) -> list[int]:
        return self.rounds.sample(rnd)

    # -- one round -------------------------------------------------------------------------------
    def _cohort_reason(self) -> str | None:
        if self._cohort_why is False:
            self._cohort_why = cohort_supported(self.worker, self.ctx.local, self.ctx.task, self.clients[0])
        return self._cohort_why

    def run_round(self, rnd: int) -> RoundRecord:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        online = self.availability.online(rnd)
        plan = self.rounds.downlink(rnd, online)
        ids = plan.ids
        if plan.broadcast_raw is not None:
            message = decode(plan.broadcast_raw)
            if online is not None:
                self._keep_replicas_of_leavers(rnd, online)
            self.client.sync(message, self.replica)
            if online is not None:
                self._catch_up(plan, online, message)
            received_by = dict.fromkeys(ids, message)
        else:  # each distinct downlink decoded once, as every recipient receives the same bytes
            decoded = [decode(raw) for raw in plan.raws]
            received_by = {cid: decoded[plan.payload_of[cid]] for cid in ids}
        ctxs, uplinks = None, None  # the clients' contexts built at once only for those that train at once
        if self.execution == "vectorized" or (self.workers > 1 and len(ids) > 1):
            ctxs = [self._context(cid, rnd) for cid in ids]
            uplinks = self._fit_cohort(rnd, [received_by[cid] for cid in ids], ctxs) if self.execution == "vectorized" else None
            if uplinks is None and self.workers > 1 and len(ids) > 1:
                uplinks = self._fit_in_threads([received_by[cid] for cid in ids], ctxs)
        fold, up_sizes = self.rounds.open(plan), []
        for i, cid in enumerate(ids):  # each upload folded in as it arrives, then dropped
            cctx = ctxs[i] if ctxs is not None else self._context(cid, rnd)  # one client's state loaded at a time
            raw = encode(uplinks[i] if uplinks is not None else self.client.fit(received_by[cid], cctx))
            if uplinks is not None:
                uplinks[i] = None
            up_sizes.append(len(raw))
            upload = decode(raw)
            del raw
            if self.tamper is not None:
                upload = self.tamper(rnd, cid, upload)
            if upload is not None:
                fold.add(cid, upload)
            del upload
            if cctx.state:
                self.client_states[cid] = cctx.state
        rec, state = self.rounds.close(plan, fold, up_sizes, ids)
        self._own_replicas = {}
        self.evaluator(rec, self.rounds.evaluation_state(state))
        if rec.evaluated and getattr(self.client, "personalized", False):
            t1 = time.perf_counter()
            rec.personal_accuracy = self.evaluate_personal(rnd)
            rec.eval_s = (rec.eval_s or 0.0) + time.perf_counter() - t1
        rec.wall_s = time.perf_counter() - self._t_start
        return self.rounds.commit(rec)

    def _context(self, cid: int, rnd: int) -> ClientContext:
        replica = self._own_replicas.get(cid, self.replica)
        return ClientContext(cid, rnd, self.worker, self.clients[cid], self.trainer, self.client_states.get(cid, {}), replica)

    # -- stateful clients that come and go ---------------------------------------------------------
    def _keep_replicas_of_leavers(self, rnd: int, online: list[int]) -> None:
        """Before round ``rnd``'s broadcast: keep the replica of round rnd-1 for the clients
        synced in it that are offline now; drop kept replicas no replay can start from any more."""
        is_online = np.zeros(len(self.clients), dtype=bool)
        is_online[online] = True
        leaving = int(np.count_nonzero((self.synced == rnd - 1) & ~is_online))
        if leaving:
            self._snapshots[rnd - 1] = [{k: v.clone() for k, v in self.replica.items()}, leaving]
        log = self.rounds.broadcast_log
        oldest = log[0][0] if log else rnd
        for s in [s for s in self._snapshots if s + 1 < oldest]:  # its clients will be sent the replica whole
            del self._snapshots[s]

    def _catch_up(self, plan, online: list[int], message: dict) -> None:
        """After the shared replica synced round ``plan.rnd``'s broadcast: bring every online client
        that missed broadcasts up to date (the server's catch-up, charged to the round), applied
        to the replica it last had, and check it against the shared one."""
        rnd = plan.rnd
        self._own_replicas = {}
        for cid in online:
            since = int(self.synced[cid])
            self.synced[cid] = rnd
            if since == rnd - 1:
                continue
            cu = self.rounds.catch_up(since, rnd)
            plan.charge(cu)
            kept = self._snapshots.get(since)
            if kept is not None:
                kept[1] -= 1
                if not kept[1]:
                    del self._snapshots[since]
            if cu.kind == "replay":
                if kept is None:
                    raise RuntimeError(f"client {cid} last synced in round {since}: its replica was not kept, so the catch-up cannot be replayed")
                replica = {k: v.clone() for k, v in kept[0].items()} if kept[1] else kept[0]
                for raw in cu.raws:
                    self.client.sync(decode(raw), replica)
                self.client.sync(message, replica)
            else:
                replica = {k: torch.empty_like(v) for k, v in self.replica.items()}
                self.client.restore(decode(cu.raws[0]), replica)
            self._check_caught_up(cid, since, cu.kind, replica)

    def _check_caught_up(self, cid: int, since: int, kind: str, replica: dict) -> None:
        differ = [k for k, v in self.replica.items() if not torch.equal(v, replica[k])]
        if not differ:
            return  # the client trains from the shared replica
        far = [k for k in differ if not torch.allclose(self.replica[k], replica[k], rtol=1e-5, atol=1e-6)]
        if far:
            raise RuntimeError(
                f"client {cid}, back after round {since}, caught up by {kind} to a replica that differs from the up-to-date one in "
                f"{', '.join(far[:3])}: {self.algorithm.name}'s sync/restore do not reproduce the server's broadcasts"
            )
        self._own_replicas[cid] = replica  # equal up to float order: the client trains from its own

    def _fit_cohort(self, rnd: int, payloads: list, ctxs: list[ClientContext]) -> list | None:
        why = self._cohort_reason()
        uplinks = None
        if why is None:
            try:
                uplinks = self.client.fit_cohort(payloads, ctxs, compile=self.compile)
            except CohortOutOfMemory as e:  # nothing of the round was kept: train it, and the rest, one by one
                self.execution = "sequential"
                warnings.warn(f"federation.execution = 'vectorized': {e}; the clients train one by one from round {rnd} on", stacklevel=3)
                return None
        if uplinks is not None:
            self.cohort_rounds += 1
        elif not self._warned_fallback:
            self._warned_fallback = True
            why = why or f"{self.algorithm.name} with these options has no vectorised path"
            warnings.warn(f"federation.execution = 'vectorized': clients train one by one ({why})", stacklevel=3)
        return uplinks

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
        """Stop the client threads (``workers`` > 1); the simulator stays usable."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def discard_client_states(self) -> None:
        """A finished run: remove the client states' temporary folder (``client_state = "disk"``
        without a state folder of the caller's)."""
        if self._state_tmp is not None:
            self._state_tmp.cleanup()
            self._state_tmp = None

    def evaluate(self, global_state: dict[str, torch.Tensor] | None = None) -> tuple[float | None, float | None]:
        """(accuracy, loss) of the current global model on the test data."""
        result = self.evaluator.measure(self.server.global_model_state() if global_state is None else global_state)
        return result.get("accuracy"), result.get("loss")

    def evaluate_personal(self, rnd: int) -> float | None:
        """Mean over clients of each client's personalised accuracy on its own held-out split
        (clients without one are left out; None if none has one). Evaluation downloads are
        not counted: they measure, they are not part of training."""
        payload = None
        if self.client_kind == "stateless":
            payload = decode(encode(next(iter(self.server.configure(rnd, [0]).values()))))
        accs = []
        for cid in range(len(self.clients)):
            correct, n = self.client.evaluate_personal(payload, self._context(cid, rnd))
            if n:
                accs.append(correct / n)
        return sum(accs) / len(accs) if accs else None

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1) -> list[RoundRecord]:
        for rnd in range(start_round, self.ctx.rounds + 1):
            rec = self.run_round(rnd)
            if on_round is not None:
                on_round(rec)
        return self.history

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self, config_text: str, wall_s: float) -> dict:
        """Everything a resumed run needs to continue after the last finished round: the server
        and client halves, the client-side state, the model objects, the history, the byte
        counters and every RNG state."""
        return {
            "format": _RESUME_FORMAT,
            "round": self.history[-1].round if self.history else 0,
            "config": config_text,
            "rounds": self.rounds,
            "client": self.client,
            "worker": self.worker,
            "eval_model": self.evaluator.model,
            "replica": self.replica,
            "synced": self.synced,
            "snapshots": self._snapshots,
            "client_states": self.client_states.commit() if isinstance(self.client_states, DiskClientStates) else self.client_states,
            "wall_s": wall_s,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def resume_saved(self) -> None:
        """The :meth:`state_dict` just taken is saved: client-state files only older resume
        points name can go (``client_state = "disk"``)."""
        if isinstance(self.client_states, DiskClientStates):
            self.client_states.collect()

    def load_state_dict(self, state: dict) -> None:
        self.rounds, self.client, self.worker = state["rounds"], state["client"], state["worker"]
        self.evaluator.model = state["eval_model"]
        self._halves[0] = (self.client, self.worker)
        self.replica = state["replica"]
        self.synced, self._snapshots = state["synced"], state["snapshots"]
        if isinstance(self.client_states, DiskClientStates):
            self.client_states.restore(state["client_states"])
        else:
            self.client_states = state["client_states"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self._t_start = time.perf_counter() - (self.history[-1].wall_s if self.history else 0.0)

    @staticmethod
    def resume_format() -> int:
        return _RESUME_FORMAT
