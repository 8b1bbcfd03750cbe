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

Execution (``RunOptions.execution``): ``sequential`` clients one after another; ``vectorized``
a round's clients as one ``torch.func.vmap`` cohort where the algorithm, model, optimiser,
loss and data allow (else one by one, with one warning saying why); ``workers = N`` clients
in N threads at once.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from rankfed.local import CohortOutOfMemory, cohort_supported, has_dropout
from rankfed.protocol import ClientContext
from rankfed.server import Evaluator, Experiment, RoundRecord, Rounds, upload_limit
from rankfed.wire import decode, encode

__all__ = ["Simulator"]

_RESUME_FORMAT = 2


class Simulator:
    """Runs an :class:`~rankfed.server.Experiment`'s rounds over in-memory clients.

    The server half starts from the experiment's seeded initial model; a deep copy serves as
    the one client model object, and another as the evaluation model.
    """

    def __init__(self, exp: Experiment):
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
        # workers > 1: clients not trained as a cohort train in that many threads at once, each
        # with its own client half and model; not with dropout (torch's global RNG seeds it)
        if workers > 1 and has_dropout(model):
            warnings.warn(f"federation.workers = {workers}: the model has dropout, whose masks come from torch's global RNG; clients train one at a time", stacklevel=2)
            workers = 1
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        server = exp.algorithm.make_server(model, ctx)
        self.rounds = Rounds(
            server,
            num_clients=len(exp.clients),
            clients_per_round=exp.clients_per_round,
            seed=ctx.seed,
            client_kind=self.client_kind,
            min_clients=opts.min_clients,
            max_upload_bytes=upload_limit(model, server),
        )
        self.client = exp.algorithm.make_client(model, ctx)
        self.worker = copy.deepcopy(model)
        # one (client half, model) per client thread; the first is the simulator's own
        self._halves = [(self.client, self.worker)] + [(exp.algorithm.make_client(model, ctx), copy.deepcopy(model)) for _ in range(self.workers - 1)]
        self.evaluator = Evaluator(copy.deepcopy(model), exp.test.to(ctx.device) if exp.test is not None else None, ctx.task, rounds=ctx.rounds, eval_every=opts.eval_every, batch_size=opts.eval_batch_size)
        # The one replica standing for every stateful client's (identical) replica.
        self.replica = self.client.init_replica(model) if self.client_kind == "stateful" else None
        self.clients = [c.to(ctx.device) for c in exp.clients]
        self.trainer = ctx.trainer()
        self.client_states: dict[int, dict] = {}  # only clients whose algorithm keeps state
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
        plan = self.rounds.downlink(rnd)
        ids = plan.ids
        if plan.broadcast_raw is not None:
            message = decode(plan.broadcast_raw)
            self.client.sync(message, self.replica)
            received_by = dict.fromkeys(ids, message)
        else:  # each distinct downlink decoded once, as every recipient receives the same bytes
            decoded = [decode(raw) for raw in plan.raws]
            received_by = {cid: decoded[plan.payload_of[cid]] for cid in ids}
        ctxs = [ClientContext(cid, rnd, self.worker, self.clients[cid], self.trainer, self.client_states.get(cid, {}), self.replica) for cid in ids]
        uplinks = self._fit_cohort(rnd, [received_by[cid] for cid in ids], ctxs) if self.execution == "vectorized" else None
        if uplinks is None and self.workers > 1 and len(ids) > 1:
            uplinks = self._fit_in_threads([received_by[cid] for cid in ids], ctxs)
        replies, up_sizes = [], []
        for i, (cid, cctx) in enumerate(zip(ids, ctxs)):
            raw = encode(uplinks[i] if uplinks is not None else self.client.fit(received_by[cid], cctx))
            up_sizes.append(len(raw))
            upload = decode(raw)
            if self.tamper is not None:
                upload = self.tamper(rnd, cid, upload)
            if upload is not None:
                replies.append((cid, upload))
            if cctx.state:
                self.client_states[cid] = cctx.state
        rec, state = self.rounds.aggregate(plan, replies, up_sizes, ids)
        self.evaluator(rec, state)
        if rec.evaluated and getattr(self.client, "personalized", False):
            t1 = time.perf_counter()
            rec.personal_accuracy = self.evaluate_personal(rnd)
            rec.eval_s = (rec.eval_s or 0.0) + time.perf_counter() - t1
        rec.wall_s = time.perf_counter() - self._t_start
        return self.rounds.commit(rec)

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
            "client_states": self.client_states,
            "wall_s": wall_s,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds, self.client, self.worker = state["rounds"], state["client"], state["worker"]
        self.evaluator.model = state["eval_model"]
        self._halves[0] = (self.client, self.worker)
        self.replica, self.client_states = state["replica"], state["client_states"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self._t_start = time.perf_counter() - (self.history[-1].wall_s if self.history else 0.0)

    @staticmethod
    def resume_format() -> int:
        return _RESUME_FORMAT
