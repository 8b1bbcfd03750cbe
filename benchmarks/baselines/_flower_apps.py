"""Flower 1.41 Message-API apps for the baseline benchmark (used by ``flower_sim.py``).

A module of its own (not the script's ``__main__``) so that Ray pickles the ClientApp's
functions by reference: each Ray worker imports this module once, and ``_task.experiment()``
(rankfed's data split, built with ``lru_cache``) is then cached per worker process for the whole
run instead of being rebuilt, or shipped, with every message.
"""

from __future__ import annotations

import os
import random

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import _task

# -- client ----------------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    exp = _task.experiment()  # cached per worker process (first call loads and splits the data)
    data = exp.clients[pid]
    cfg = msg.content["config"]
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(cfg["server-round"])
    seed = 1000 * rnd + pid
    n, loss = _task.local_train(
        model,
        data.x,
        data.y,
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        weight_decay=float(cfg["weight-decay"]),
        batch_size=int(cfg["batch-size"]),
        seed=seed,
    )
    # pid / torch-threads / partition-id / seed: for the report and the bare replay check
    metrics = MetricRecord({"num-examples": n, "train-loss": loss, "pid": os.getpid(), "torch-threads": torch.get_num_threads(), "partition-id": pid, "seed": seed})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


_MODEL: list[torch.nn.Module] = []


def _model() -> torch.nn.Module:
    """One cnn2 per worker process, overwritten by the server's weights each message."""
    if not _MODEL:
        _MODEL.append(_task.new_model())
    return _MODEL[0]


# -- server ----------------------------------------------------------------------------------------
class TimedFedAvg(FedAvg):
    """Flower's FedAvg, also recording each round's client-samples and the worker processes."""

    def __init__(self, sink: dict, **kw) -> None:
        super().__init__(**kw)
        self.sink = sink

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        self.sink.setdefault("samples", []).append(sum(int(m.content["metrics"]["num-examples"]) for m in ok))
        self.sink.setdefault("cohorts", []).append([(int(m.content["metrics"]["partition-id"]), int(m.content["metrics"]["seed"])) for m in ok])
        self.sink.setdefault("errors", []).append(len(replies) - len(ok))
        self.sink.setdefault("pids", set()).update(int(m.content["metrics"]["pid"]) for m in ok)
        self.sink.setdefault("threads", set()).update(int(m.content["metrics"]["torch-threads"]) for m in ok)
        return super().aggregate_train(server_round, replies)


def make_server_app(participation: float, rounds: int, sink: dict) -> ServerApp:
    """A ServerApp running FedAvg for ``rounds`` rounds; timestamps and results go to ``sink``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(0)  # Flower's sample_nodes uses the global `random`
        exp = _task.experiment(participation, rounds)
        cfg = exp.cfg
        k = cfg.federation.clients_per_round
        strategy = TimedFedAvg(
            sink,
            fraction_train=participation,
            fraction_evaluate=0.0,  # no federated evaluation: training rounds only
            min_train_nodes=k,
            min_available_nodes=_task.NUM_CLIENTS,
        )
        watch = sink["watch"]
        initial = {k: v.detach().clone() for k, v in exp.model.state_dict().items()}
        bare = _task.Replayer(initial) if sink.get("interleave", True) else None
        sink["initial_state"], sink["bare"] = initial, bare

        def mark(server_round: int, arrays: ArrayRecord) -> None:
            # Flower calls this before round 1 and after every round: the round boundaries.
            if server_round > 0:
                watch.lap()
                if bare is not None:  # the same round in a bare loop, here in the driver, untimed
                    bare.step(sink["cohorts"][server_round - 1])
            watch.start()
            return None

        train_config = ConfigRecord({"lr": cfg.client.lr, "momentum": cfg.client.momentum, "weight-decay": cfg.client.weight_decay, "batch-size": cfg.client.batch_size})
        res = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(exp.model.state_dict()),
            train_config=train_config,
            num_rounds=rounds,
            evaluate_fn=mark,
        )
        sink["final_state"] = res.arrays.to_torch_state_dict()

    return app
