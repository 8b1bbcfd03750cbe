"""Flower ServerApp and ClientApp from a factory: your own model and data on a real Flower deployment.

::

    import rankfed as rf
    from rankfed.flower import client_app, server_app

    def make(context):                 # a flwr.app.Context: run_config, node_config, state
        return rf.Federation(model=MyNet, clients=load_clients(), test=load_test(),
                             algorithm=rf.FedLoRU(rank=8), seed=0)

    server = server_app(make, rounds=20, clients_per_round=5)
    client = client_app(make, rounds=20, clients_per_round=5)

Name them in your Flower App's ``pyproject.toml`` (``rankfed.flower.write_app`` writes one)::

    [tool.flwr.app.components]
    serverapp = "mypackage.app:server"
    clientapp = "mypackage.app:client"

(Flower checks those names by reading the module: give each its own ``name = ...`` line),
and give the run config ``out-dir`` (the run folder the ServerApp writes: the same folder
``Federation.run`` writes). The factory runs on the SuperLink's machine and on every SuperNode
and must build the same federation everywhere (the same seed, the same client list); it may
return ``(federation, options)`` to set the run options (``rounds``, ``clients_per_round``,
``round_timeout``, ``connect_timeout``, and any :class:`~rankfed.server.RunOptions` key) per run.

A SuperNode learns which clients it hosts from its node config: ``partition-id`` and
``num-partitions`` (client c on the SuperNode with ``c % num-partitions == partition-id``;
``rankfed-fault = "nan"`` is fault injection for tests). Client-side state lives in the
SuperNode's per-run ``Context.state``, since every message runs in a fresh ClientApp
process (on Flower's simulation runtime, in whichever Ray worker is free, with the virtual
SuperNode's ``Context``): each hosted client's private state (error feedback, personal factors), its data's
tensors (so later messages need not load the data again) and, for stateful algorithms, the
SuperNode's replica of the global model with the round it was last synced to.

With ``execution = "vectorized"`` (or ``"auto"`` on a GPU) the clients a SuperNode trains
in one message train as one vectorised cohort (:meth:`~rankfed.protocol.ClientHalf.fit_cohort`)
where the algorithm, model, optimiser, loss and data allow, as the simulator trains a round's
clients; otherwise, and if the cohort does not fit the device, one by one.
"""

from __future__ import annotations

import io
import json
import os
import time
import traceback
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from rankfed.errors import ConfigError, Diverged
from rankfed.local import ClientData, CohortOutOfMemory, cohort_supported
from rankfed.protocol import ClientContext
from rankfed.server import RESUME_FILE, RunFolder, RunOptions, private_client, resolve_noise, summarize
from rankfed.server.experiment import resolve_client_kind

from .records import payload_to_records, records_to_payload
from .strategy import CATCH_UP, META, QuickPollGrid, RankfedStrategy, hosted_clients

__all__ = ["server_app", "client_app", "serve", "client_train", "client_evaluate", "hello", "FLOWER_OPTIONS"]

FLOWER_OPTIONS = {"round_timeout": 600.0, "connect_timeout": 120.0}  # seconds
_DATA = "rankfed.data"  # Context.state: this SuperNode's clients' data, rankfed.data.<cid>
Factory = Callable[[Context], Any]


def _resolve(factory: Factory, context: Context, defaults: dict) -> tuple[Any, dict]:
    """The federation the factory builds for ``context`` and the run options (defaults, then
    the factory's own)."""
    made = factory(context)
    fed, own = made if isinstance(made, tuple) else (made, {})
    if not hasattr(fed, "experiment"):
        raise ConfigError(f"the Flower factory returned a {type(fed).__name__}, not a rankfed.Federation")
    options = {**defaults, **own}
    if "rounds" not in options:
        raise ConfigError("the Flower apps need the number of rounds: server_app(factory, rounds=...) and client_app(factory, rounds=...) or a factory returning (federation, {'rounds': ...})")
    return fed, options


def _split(options: dict) -> tuple[int, int | None, dict, dict]:
    """(rounds, clients_per_round, RunOptions keywords, Flower timeouts) of the run options."""
    options = dict(options)
    rounds, per_round = options.pop("rounds"), options.pop("clients_per_round", None)
    flower = {k: float(options.pop(k, v)) for k, v in FLOWER_OPTIONS.items()}
    for key, value in flower.items():
        if not value > 0:
            raise ConfigError(f"flower.{key} = {value!r}: must be > 0 (seconds)")
    unknown = set(options) - set(RunOptions.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown run option(s) {', '.join(sorted(unknown))} for the Flower apps")
    return rounds, per_round, options, flower


# -- server ----------------------------------------------------------------------------------------
def serve(grid: Grid, context: Context, fed, options: dict) -> dict:
    """Run ``fed`` as the ServerApp over ``grid``: write the run folder named by the run config's
    ``out-dir`` and return the summary."""
    out = str(context.run_config.get("out-dir", ""))
    if not out:
        raise ConfigError("the Flower run config has no 'out-dir' (the run folder to write)")
    resume = str(context.run_config.get("resume", "")).lower() == "true"
    # the submitter checked and cleared it; a resumed run continues it from its resume.pt
    folder = RunFolder.existing(out) if resume else RunFolder(out, overwrite=True)
    t0 = time.perf_counter()
    status: dict = {"status": "failed"}
    strategy = exp = None
    try:
        rounds, per_round, run_options, flower = _split(options)
        exp = fed.experiment(rounds, per_round, **run_options)
        saved = _load_resume(folder, exp) if resume else None
        if saved is None:
            folder.write_text("config.toml", exp.config_text)
        save_every = exp.options.resume_every

        def on_round(rec) -> None:
            folder.on_round(rec)
            if save_every and rec.round % save_every == 0 and rec.round < rounds:
                _save_resume(folder, strategy, exp, time.perf_counter() - t0)

        strategy = RankfedStrategy(exp, on_round=on_round, on_checkpoint=folder.save_checkpoint)
        if saved is None:  # metrics.jsonl's round-0 line, as the simulator writes it
            folder.write_initial_evaluation(strategy.evaluator.measure(strategy.server.global_model_state()))
        if saved is not None:
            strategy.load_state_dict(saved)
            folder.truncate_rounds(strategy.offset)
            t0 -= saved["wall_s"]
        grid = QuickPollGrid(grid)
        strategy.connect(grid, flower["connect_timeout"])
        try:
            strategy.start(grid, ArrayRecord(), num_rounds=rounds - strategy.offset, timeout=flower["round_timeout"], evaluate_fn=strategy.evaluate_global)
            status = {"status": "completed"}
        except Diverged as e:
            status = {"status": "diverged", "diverged_at_round": e.round, "diverged": str(e)}
        if saved is not None:
            status["resumed_from_round"] = saved["round"]
        torch.save(strategy.global_model_state(), folder.path / "model.pt")
        (folder.path / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing to resume
    except Exception as e:  # recorded in the run folder for the submitter, then re-raised for Flower
        status = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        raise
    finally:
        if exp is not None and strategy is not None:
            summary = summarize(exp, strategy.history, time.perf_counter() - t0, str(context.run_config.get("command", "")) or None)
            summary |= {
                "transport": "flower",
                "supernodes": strategy.nodes.num_partitions if strategy.nodes else None,
                "total_flower_uplink_bytes": strategy.cum_flower_up,
                "total_flower_downlink_bytes": strategy.cum_flower_down,
                "execution": exp.execution,
                "cohort_messages": strategy.cohort_messages,  # train messages a SuperNode trained as one vectorised cohort
                "failed_client_rounds": strategy.failures_total,
                "failure_reasons": strategy.failure_reasons,
                "failure_examples": strategy.failure_examples,
                "skipped_rounds": strategy.skipped_rounds,
            }
        else:
            summary = {"transport": "flower"}
        folder.write_summary(summary | status)
    return summary | status


_RESUME_FORMAT = 1


def _save_resume(folder: RunFolder, strategy: RankfedStrategy, exp, wall_s: float) -> None:
    """``resume.pt``: the strategy's state after its last round, written atomically."""
    tmp = folder.path / f".{RESUME_FILE}.tmp"
    torch.save({"format": _RESUME_FORMAT, "config": exp.config_text, "wall_s": wall_s, **strategy.state_dict()}, tmp)
    os.replace(tmp, folder.path / RESUME_FILE)


def _load_resume(folder: RunFolder, exp) -> dict:
    path = folder.path / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder.path}: no {RESUME_FILE} to resume from (federation.resume_every = 0, or the run stopped before its first resume point)")
    saved = torch.load(path, map_location="cpu", weights_only=False)  # this run's own file
    if saved.get("format") != _RESUME_FORMAT or saved.get("config") != exp.config_text:
        raise ConfigError(f"{path}: saved by a different experiment or rankfed version; cannot resume it with this one")
    return saved


# -- client ----------------------------------------------------------------------------------------
class Node:
    """One SuperNode's view of the federation: its clients' data, the model, the client half.

    The first message of a run reads this SuperNode's clients' data from the federation and
    keeps their tensors in the run's ``Context.state``; later messages (each a fresh process)
    read them from there.
    """

    def __init__(self, context: Context, fed, options: dict):
        self.partition_id = int(context.node_config.get("partition-id", 0))
        self.num_partitions = int(context.node_config.get("num-partitions", 1))
        self.clients = hosted_clients(fed.num_clients, self.partition_id, self.num_partitions)
        rounds, _, run_options, _ = _split(options)
        run = RunOptions(rounds=rounds, **run_options)
        self.data = _cached_data(context, self.clients)
        if self.data is None:
            clients, _ = fed.data()
            self.data = {cid: clients[cid] for cid in self.clients}
            _cache_data(context, self.data)
        self.ctx = ctx = fed.run_context(rounds)
        self.model = fed.initial_model().to(ctx.device)
        # local DP: the noise goes on here, on the SuperNode (dp_noise as the server resolves it)
        defences = resolve_noise(run.defences, rounds, 1.0) if run.defences.dp == "local" else run.defences
        self.client = private_client(fed.algorithm, fed.algorithm.make_client(self.model, ctx), defences)
        self.trainer = ctx.trainer()
        self.data = {cid: d.to(ctx.device) for cid, d in self.data.items()}
        self.kind = resolve_client_kind(fed.algorithm, run.client_kind)
        # as Experiment.execution resolves it: "auto" is vectorized on a GPU, where it is measured faster
        self.execution = run.execution if run.execution != "auto" else ("vectorized" if ctx.device.type == "cuda" else "sequential")
        self.compile = run.compile

    def fit_cohort(self, payloads: list, ctxs: list[ClientContext]) -> list | None:
        """The uplinks of ``ctxs``' clients trained as one vectorised cohort, as the simulator
        trains them; None (train them one by one) when the model, options, loss or data do not
        allow it, the algorithm has no cohort path, or the cohort does not fit the device."""
        why = cohort_supported(self.model, self.ctx.local, self.ctx.task, self.data[self.clients[0]])
        if why is None:
            try:
                uplinks = self.client.fit_cohort(payloads, ctxs, compile=self.compile)
            except CohortOutOfMemory as e:  # nothing of the cohort was kept
                why = str(e)
            else:
                if uplinks is not None:
                    return uplinks
                why = "this algorithm with these options has no vectorised path"
        log(WARNING, "rankfed: federation.execution = 'vectorized': clients %s train one by one (%s)", [c.client_id for c in ctxs], why)
        return None


def _cached_data(context: Context, clients: list[int]) -> dict[int, ClientData] | None:
    if f"{_DATA}.{clients[0]}.config" not in context.state:
        return None
    return {cid: ClientData.from_tensors(records_to_payload(context.state, f"{_DATA}.{cid}")) for cid in clients}


def _cache_data(context: Context, data: dict[int, ClientData]) -> None:
    if not all(d.in_memory for d in data.values()):
        return  # streamed data is read from the federation every time
    for cid, d in data.items():
        for name, rec in payload_to_records(d.tensors(), f"{_DATA}.{cid}").items():
            context.state[name] = rec


def _load_state(context: Context, cid: int) -> dict:
    rec = context.state.get(f"rankfed.client.{cid}")
    if rec is None:
        return {}
    return torch.load(io.BytesIO(rec["state"]), weights_only=False)  # written by this SuperNode itself


def _save_state(context: Context, cid: int, state: dict) -> None:
    if state:
        buf = io.BytesIO()
        torch.save(state, buf)
        context.state[f"rankfed.client.{cid}"] = ConfigRecord({"state": buf.getvalue()})


def catch_up_of(content: RecordDict) -> tuple[str, list[int], list] | None:
    """The catch-up a train message carries: (kind, rounds, payloads), or None."""
    meta = content.get(CATCH_UP)
    if meta is None:
        return None
    rounds = [int(r) for r in meta["rounds"]]
    count = len(rounds) if meta["kind"] == "replay" else 1
    return str(meta["kind"]), rounds, [records_to_payload(content, f"catchup.{i}") for i in range(count)]


def _replica(node: Node, context: Context, rnd: int, broadcast, catch_up: tuple[str, list[int], list] | None = None) -> dict[str, torch.Tensor] | None:
    """Stateful kinds: this SuperNode's replica, brought up to round ``rnd`` with ``broadcast``
    (after the missed broadcasts of a ``catch_up`` replayed, or the replica a catch-up sends whole)."""
    if node.kind != "stateful":
        return None
    meta = context.state.get("rankfed.replica.meta")
    if meta is None:
        replica = node.client.init_replica(node.model)
        synced = 0
    else:
        replica = records_to_payload(context.state, "rankfed.replica")
        synced = int(meta["round"])
    kind, rounds, payloads = catch_up if catch_up is not None else ("", [], [])
    if kind == "model":  # the server's replica, this round's broadcast included
        node.client.restore(payloads[0], replica)
    else:
        missed = [(r, p) for r, p in zip(rounds, payloads) if r > synced]  # (it may have synced some already)
        if synced + len(missed) != rnd - 1:
            raise RuntimeError(f"replica is at round {synced} but this is round {rnd}: a broadcast was missed (the SuperNode was down) and not replayed")
        for _, payload in missed:
            node.client.sync(payload, replica)
        node.client.sync(broadcast, replica)
    for name, rec in payload_to_records(replica, "rankfed.replica").items():
        context.state[name] = rec
    context.state["rankfed.replica.meta"] = ConfigRecord({"round": rnd})
    return replica


def hello(msg: Message, context: Context) -> Message:
    """The start-up handshake: which partition this SuperNode is."""
    info = {"partition-id": int(context.node_config.get("partition-id", 0)), "num-partitions": int(context.node_config.get("num-partitions", 1))}
    return Message(RecordDict({META: ConfigRecord(info)}), reply_to=msg)


def client_train(msg: Message, context: Context, node: Node) -> Message:
    """Train this SuperNode's clients that the message names; reply with one uplink each."""
    meta = msg.content[META]
    rnd, cids = int(meta["round"]), [int(c) for c in meta["clients"]]
    broadcast = records_to_payload(msg.content, "broadcast") if node.kind == "stateful" else None
    replica = _replica(node, context, rnd, broadcast, catch_up_of(msg.content) if node.kind == "stateful" else None)
    downlinks = {}
    if node.kind == "stateless":
        received = {j: records_to_payload(msg.content, f"down.{j}") for j in sorted(set(meta["downlink_of"]))}
        downlinks = {cid: received[j] for cid, j in zip(cids, meta["downlink_of"])}
    for cid in cids:
        if cid not in node.data:
            raise ValueError(f"client {cid} is not hosted on partition {node.partition_id} of {node.num_partitions}")
    ctxs = [ClientContext(cid, rnd, node.model, node.data[cid], node.trainer, _load_state(context, cid), replica) for cid in cids]
    payloads = [broadcast if node.kind == "stateful" else downlinks[cid] for cid in cids]
    uplinks = node.fit_cohort(payloads, ctxs) if node.execution == "vectorized" and cids else None
    cohort = uplinks is not None
    if uplinks is None:
        uplinks = [node.client.fit(payload, cctx) for payload, cctx in zip(payloads, ctxs)]
    out: dict = {META: ConfigRecord({"clients": cids, "cohort": cohort})}
    for cid, cctx, uplink in zip(cids, ctxs, uplinks):
        _save_state(context, cid, cctx.state)
        if context.node_config.get("rankfed-fault") == "nan":  # fault injection: a SuperNode sending garbage
            uplink = {k: v * float("nan") if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in uplink.items()}
        out |= payload_to_records(uplink, f"up.{cid}")
    log(INFO, "rankfed: round %d: trained clients %s%s", rnd, cids, " as one cohort" if cohort else "")
    return Message(RecordDict(out), reply_to=msg)


def client_evaluate(msg: Message, context: Context, node: Node) -> Message:
    """Each hosted client's own (personalised) model on its held-out split."""
    rnd = int(msg.content[META]["round"])
    payload = records_to_payload(msg.content, "down.0") if "down.0.config" in msg.content else None
    replica = None
    if node.kind == "stateful" and context.state.get("rankfed.replica.meta") is not None:
        replica = records_to_payload(context.state, "rankfed.replica")
    correct, samples = [], []
    for cid in node.clients:
        cctx = ClientContext(cid, rnd, node.model, node.data[cid], node.trainer, _load_state(context, cid), replica)
        c, n = node.client.evaluate_personal(payload, cctx)
        correct.append(int(c))
        samples.append(int(n))
    return Message(RecordDict({META: ConfigRecord({"clients": node.clients, "correct": correct, "samples": samples})}), reply_to=msg)


def server_app(factory: Factory, **options) -> ServerApp:
    """A Flower ServerApp running the federation ``factory(context)`` builds (see the module
    docstring). ``options``: ``rounds`` (required, here or from the factory),
    ``clients_per_round``, ``round_timeout`` / ``connect_timeout`` (seconds), and any
    :class:`~rankfed.server.RunOptions` keyword (``eval_every``, ``client_kind``, ...)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        out = str(context.run_config.get("out-dir", ""))
        try:
            fed, opts = _resolve(factory, context, options)
        except Exception as e:  # the factory failed: say so in the run folder, where the submitter looks
            if out:
                RunFolder(out, overwrite=True).write_text("summary.json", json.dumps({"transport": "flower", "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, indent=2) + "\n")
            raise
        serve(grid, context, fed, opts)

    return app


def client_app(factory: Factory, **options) -> ClientApp:
    """The Flower ClientApp of :func:`server_app` (the same factory and options)."""
    app = ClientApp()
    app.query()(hello)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        fed, opts = _resolve(factory, context, options)
        return client_train(msg, context, Node(context, fed, opts))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        fed, opts = _resolve(factory, context, options)
        return client_evaluate(msg, context, Node(context, fed, opts))

    return app
