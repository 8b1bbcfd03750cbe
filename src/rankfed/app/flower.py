"""``rankfed flower run``: an experiment file as a real Flower deployment.

The Flower App of experiment files: its components are :data:`server_app` and
:data:`client_app` below, built by :func:`rankfed.flower.server_app` / :func:`~rankfed.flower.client_app` from a factory that reads the
experiment from the run config (``experiment``: the file's text, so every machine runs the same
one) and, on a SuperNode, ``data-dir`` from its node config (where that machine keeps the
dataset, overriding ``task.data_dir``). User code named by import path in the experiment
(``task.model = "pkg.nets:TinyResNet"``) must be importable on every machine (installed, or in
a folder of ``task.python_path``).

Components, as a Flower App's ``pyproject.toml`` names them (``rankfed flower app DIR``)::

    [tool.flwr.app.components]
    serverapp = "rankfed.app.flower:server_app"
    clientapp = "rankfed.app.flower:client_app"
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context

from rankfed.app.config import ExperimentConfig, parse_config, to_toml, tomllib
from rankfed.app.experiment import _run_options, federation_from_config
from rankfed.errors import ConfigError
from rankfed.flower import client_app as _client_app
from rankfed.flower import server_app as _server_app
from rankfed.flower.deploy import LocalDeployment, submit

__all__ = ["server_app", "client_app", "experiment_from_run_config", "run_flower"]

_META = "rankfed.task.meta"  # Context.state: a built-in dataset's input shape and classes, once loaded


def experiment_from_run_config(run_config, node_config=None) -> ExperimentConfig:
    """The experiment a Flower run carries (``data-dir`` of a SuperNode's node config applied)."""
    text = run_config.get("experiment", "")
    if not text:
        raise ConfigError("the Flower run config has no 'experiment' (the experiment file's text); submit runs with `rankfed flower run`")
    cfg = parse_config(tomllib.loads(str(text)))
    data_dir = (node_config or {}).get("data-dir")
    if data_dir:
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
    return cfg


def _options(cfg: ExperimentConfig) -> dict:
    return {"rounds": cfg.federation.rounds, "clients_per_round": cfg.federation.clients_per_round, **_run_options(cfg), **dataclasses.asdict(cfg.flower)}


def _factory(context: Context):
    cfg = experiment_from_run_config(context.run_config, context.node_config)
    meta = context.state.get(_META)
    shapes = (list(meta["input_shape"]), int(meta["num_classes"])) if meta is not None else None
    fed = federation_from_config(cfg, shapes=shapes)
    if meta is None and "input_shape" in fed.info:
        context.state[_META] = ConfigRecord({"input_shape": list(fed.info["input_shape"]), "num_classes": int(fed.info["num_classes"])})
    return fed, _options(cfg)


server_app = _server_app(_factory)
client_app = _client_app(_factory)


def run_flower(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    supernodes: int = 2,
    superlink: str | None = None,
    root_certificates: str | None = None,
    insecure: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    data_dir: str | None = None,
) -> dict:
    """Run ``cfg`` on Flower and return the summary (also in ``out_dir/summary.json``).

    Without ``superlink``: start a local deployment of one SuperLink and ``supernodes``
    SuperNodes, run, and stop every process (also on error or Ctrl-C). With ``superlink``
    (host:port): submit to that running federation over TLS (verified with
    ``root_certificates``, a CA file, or the system's CAs when None), or without TLS if
    ``insecure``; ``out_dir`` is then written by the ServerApp on the SuperLink's machine.
    """
    if data_dir:  # a local deployment's processes all read the data from here
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
    if superlink is None:
        if not 1 <= supernodes <= cfg.federation.clients:
            raise ValueError(f"--supernodes {supernodes}: must be in [1, federation.clients = {cfg.federation.clients}] (each SuperNode hosts at least one client)")
        # Every process of a local deployment builds this experiment: fail here, once, with the
        # clear error (missing data, a bad option) rather than in the ServerApp's log.
        federation_from_config(cfg).data()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"experiment": to_toml(cfg)}
    if superlink is not None:
        return submit(None, out, superlink, run_config=run_config, insecure=insecure, root_certificates=root_certificates, command=command, on_metrics=on_metrics, timeout=timeout)
    with LocalDeployment(supernodes, out / "flower-logs") as dep:
        return submit(None, out, dep.address, run_config=run_config, env=dep.env, insecure=True, command=command, on_metrics=on_metrics, timeout=timeout)
