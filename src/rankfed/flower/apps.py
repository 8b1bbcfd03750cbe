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
process: each hosted client's private state (error feedback, personal factors), its data's
tensors (so later messages need not load the data again) and, for stateful algorithms, the
SuperNode's replica of the global model with the round it was last synced to.
"""

from __future__ import annotations

import io
import json
import time
import traceback
from collections.abc import Callable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from rankfed.errors import ConfigError, Diverged
from rankfed.local import ClientData
from rankfed.protocol import ClientContext
from rankfed.server import RunFolder, RunOptions, summarize
from rankfed.server.experiment import resolve_client_kind

from .records import payload_to_records, records_to_payload
from .strategy import META, QuickPollGrid, RankfedStrategy, hosted_clients

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
    folder = RunFolder(out, overwrite=True)  # the submitter checked and cleared it
    t0 = time.perf_counter()
    status: dict = {"status": "failed"}
    strategy = exp = None
    try:
        rounds, per_round, run_options, flower = _split(options)
        exp = fed.experiment(rounds, per_round, **run_options)
        folder.write_text("config.toml", exp.config_text)
        strategy = RankfedStrategy(exp, on_round=folder.on_round, on_checkpoint=folder.save_checkpoint)
        grid = QuickPollGrid(grid)
        strategy.connect(grid, flower["connect_timeout"])
        try:
            strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=flower["round_timeout"], evaluate_fn=strategy.evaluate_global)
            status = {"status": "completed"}
        except Diverged as e:
            status = {"status": "diverged", "diverged_at_round": e.round, "diverged": str(e)}
        torch.save(strategy.global_model_state(), folder.path / "model.pt")
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
                "failed_client_rounds": strategy.failures_total,
                "failure_reasons": strategy.failure_reasons,
                "failure_examples": strategy.failure_examples,
                "skipped_rounds": strategy.skipped_rounds,
            }
        else:
            summary = {"transport": "flower"}
        folder.write_summary(summary | status)
    return summary | status


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
        ctx = fed.run_context(rounds)
        self.model = fed.initial_model().to(ctx.device)
        self.client = fed.algorithm.make_client(self.model, ctx)
        self.trainer = ctx.trainer()
        self.data = {cid: d.to(ctx.device) for cid, d in self.data.items()}
        self.kind = resolve_client_kind(fed.algorithm, run.client_kind)


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


def _replica(node: Node, context: Context, rnd: int, broadcast) -> dict[str, torch.Tensor] | None:
    """Stateful kinds: this SuperNode's replica, brought up to round ``rnd`` with ``broadcast``."""
    if node.kind != "stateful":
        return None
    meta = context.state.get("rankfed.replica.meta")
    if meta is None:
        replica = node.client.init_replica(node.model)
        synced = 0
    else:
        replica = records_to_payload(context.state, "rankfed.replica")
        synced = int(meta["round"])
    if synced != rnd - 1:
        raise RuntimeError(f"replica is at round {synced} but this is round {rnd}: a broadcast was missed (the SuperNode was down)")
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
    replica = _replica(node, context, rnd, broadcast)
    downlinks = {}
    if node.kind == "stateless":
        received = {j: records_to_payload(msg.content, f"down.{j}") for j in sorted(set(meta["downlink_of"]))}
        downlinks = {cid: received[j] for cid, j in zip(cids, meta["downlink_of"])}
    out: dict = {META: ConfigRecord({"clients": cids})}
    for cid in cids:
        if cid not in node.data:
            raise ValueError(f"client {cid} is not hosted on partition {node.partition_id} of {node.num_partitions}")
        state = _load_state(context, cid)
        cctx = ClientContext(cid, rnd, node.model, node.data[cid], node.trainer, state, replica)
        uplink = node.client.fit(broadcast if node.kind == "stateful" else downlinks[cid], cctx)
        _save_state(context, cid, state)
        if context.node_config.get("rankfed-fault") == "nan":  # fault injection: a SuperNode sending garbage
            uplink = {k: v * float("nan") if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in uplink.items()}
        out |= payload_to_records(uplink, f"up.{cid}")
    log(INFO, "rankfed: round %d: trained clients %s", rnd, cids)
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
