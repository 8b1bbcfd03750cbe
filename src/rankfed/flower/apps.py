"""The Flower ServerApp and ClientApp that run any rankfed experiment.

Both read the experiment from the run config (``experiment``: the experiment
file's text, so every machine runs the same one) and, on the server, the run
folder to write (``out-dir``). A SuperNode learns which clients it hosts from
its node config: ``partition-id`` and ``num-partitions`` (and, optionally,
``data-dir``: where this machine keeps the dataset, overriding
``task.data_dir``; and ``rankfed-fault = "nan"``, fault injection for tests: the
SuperNode's uploads carry NaN, which the server must drop).

Components, as a Flower App's ``pyproject.toml`` names them::

    [tool.flwr.app.components]
    serverapp = "rankfed.flower.apps:server_app"
    clientapp = "rankfed.flower.apps:client_app"

Client-side state lives in the SuperNode's per-run ``Context.state``, since
every message runs in a fresh ClientApp process: each hosted client's private
state (error feedback, personal factors) and, for stateful algorithms, the
SuperNode's replica of the global model with the round it was last synced to.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import traceback
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from rankfed.algorithms.base import ClientContext
from rankfed.config import ConfigError, ExperimentConfig, parse_config, tomllib
from rankfed.data import ClientData
from rankfed.sim.simulator import Diverged, _to_device
from rankfed.sim.trainer import LocalTrainer

from .records import payload_to_records, records_to_payload
from .strategy import META, QuickPollGrid, RankfedStrategy, hosted_clients

__all__ = ["server_app", "client_app", "experiment_from_run_config"]

_DATA_META = "rankfed.data.meta"  # Context.state: the hosted clients' data is cached under rankfed.data.<cid>

server_app = ServerApp()
client_app = ClientApp()


def experiment_from_run_config(run_config) -> ExperimentConfig:
    text = run_config.get("experiment", "")
    if not text:
        raise ConfigError("the Flower run config has no 'experiment' (the experiment file's text); submit runs with `rankfed flower run`")
    return parse_config(tomllib.loads(str(text)))


# -- server ----------------------------------------------------------------------------------------
@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from rankfed.runner import RunFolder, build_experiment, summarize
    from rankfed.config import to_toml

    out = str(context.run_config.get("out-dir", ""))
    if not out:
        raise ConfigError("the Flower run config has no 'out-dir' (the run folder to write)")
    folder = RunFolder(out, overwrite=True)  # the submitter checked and cleared it
    t0 = time.perf_counter()
    status: dict = {"status": "failed"}
    strategy = None
    exp = None
    try:
        cfg = experiment_from_run_config(context.run_config)
        folder.write_text("config.toml", to_toml(cfg))
        exp = build_experiment(cfg)
        strategy = RankfedStrategy(exp, on_round=folder.on_round, on_checkpoint=folder.save_checkpoint)
        grid = QuickPollGrid(grid)
        strategy.connect(grid, cfg.flower.connect_timeout)
        try:
            strategy.start(grid, ArrayRecord(), num_rounds=cfg.federation.rounds, timeout=cfg.flower.round_timeout, evaluate_fn=strategy.evaluate_global)
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
        folder.write_text("summary.json", json.dumps(summary | status, indent=2) + "\n")


# -- client ----------------------------------------------------------------------------------------
class _Node:
    """One SuperNode's view of the experiment: its clients' data, the model, the client half.

    The first message of a run loads the dataset and keeps this SuperNode's clients' tensors
    in the run's ``Context.state``; later messages (each a fresh process) read them from there
    instead of loading and splitting the whole dataset again.
    """

    def __init__(self, context: Context):
        from rankfed.runner import build_experiment, build_run_parts, client_kind

        cfg = experiment_from_run_config(context.run_config)
        data_dir = context.node_config.get("data-dir")
        if data_dir:
            cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
        self.partition_id = int(context.node_config.get("partition-id", 0))
        self.num_partitions = int(context.node_config.get("num-partitions", 1))
        self.clients = hosted_clients(cfg.federation.clients, self.partition_id, self.num_partitions)
        meta = context.state.get(_DATA_META)
        if meta is None:
            exp = build_experiment(cfg)
            model, algorithm, ctx, kind = exp.model, exp.algorithm, exp.ctx, exp.client_kind
            data = {cid: exp.clients[cid] for cid in self.clients}
            context.state[_DATA_META] = ConfigRecord({"input_shape": list(exp.dataset.input_shape), "num_classes": exp.dataset.num_classes})
            for cid, d in data.items():
                for name, rec in payload_to_records(dataclasses.asdict(d), f"rankfed.data.{cid}").items():
                    context.state[name] = rec
        else:
            model, _, algorithm, ctx = build_run_parts(cfg, tuple(meta["input_shape"]), int(meta["num_classes"]))
            data = {cid: ClientData(**records_to_payload(context.state, f"rankfed.data.{cid}")) for cid in self.clients}
            kind = client_kind(cfg, algorithm)
        dev = ctx.device
        self.model = model.to(dev)
        self.client = algorithm.make_client(self.model, ctx)
        self.trainer = LocalTrainer(ctx.client, ctx.rounds, ctx.seed)
        self.data = {cid: _to_device(d, dev) for cid, d in data.items()}
        self.kind = kind


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


def _replica(node: _Node, context: Context, rnd: int, broadcast) -> dict[str, torch.Tensor] | None:
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


@client_app.query()
def hello(msg: Message, context: Context) -> Message:
    """The start-up handshake: which partition this SuperNode is."""
    info = {"partition-id": int(context.node_config.get("partition-id", 0)), "num-partitions": int(context.node_config.get("num-partitions", 1))}
    return Message(RecordDict({META: ConfigRecord(info)}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    node = _Node(context)
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


@client_app.evaluate()
def evaluate_personal(msg: Message, context: Context) -> Message:
    """Each hosted client's own (personalised) model on its held-out split."""
    node = _Node(context)
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
