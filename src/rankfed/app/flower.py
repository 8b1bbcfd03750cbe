"""``rankfed flower run`` / ``simulate``: an experiment file as a real Flower deployment, or on
Flower's simulation runtime (virtual SuperNodes run by Ray workers).

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
from rankfed.server import RESUME_FILE
from rankfed.flower import client_app as _client_app
from rankfed.flower import server_app as _server_app
from rankfed.flower.deploy import LocalDeployment, submit

__all__ = ["server_app", "client_app", "experiment_from_run_config", "run_flower", "simulate_flower"]

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
    resume: bool = False,
) -> dict:
    """Run ``cfg`` on Flower and return the summary (also in ``out_dir/summary.json``).

    ``resume``: continue the killed run in ``out_dir`` from its ``resume.pt`` (every
    ``federation.resume_every`` rounds) with ``cfg`` its ``config.toml``.

    Without ``superlink``: start a local deployment of one SuperLink and ``supernodes``
    SuperNodes, run, and stop every process (also on error or Ctrl-C). With ``superlink``
    (host:port): submit to that running federation over TLS (verified with
    ``root_certificates``, a CA file, or the system's CAs when None), or without TLS if
    ``insecure``; ``out_dir`` is then written by the ServerApp on the SuperLink's machine.
    """
    if data_dir:  # a local deployment's processes all read the data from here
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
    if superlink is None:
        _check_locally(cfg, supernodes)
    if resume:
        out = Path(out_dir)
        if superlink is None and not (out / RESUME_FILE).is_file():
            done = (out / "summary.json").is_file()
            raise FileNotFoundError(f"{str(out)!r} " + ("is a completed run: there is nothing to resume" if done else f"has no {RESUME_FILE} to resume from (federation.resume_every = 0, or killed before its first resume point)"))
        (out / "summary.json").unlink(missing_ok=True)  # a failed attempt's
    else:
        out = _fresh_folder(out_dir, overwrite)
    run_config = {"experiment": to_toml(cfg), **({"resume": "true"} if resume else {})}
    if superlink is not None:
        return submit(None, out, superlink, run_config=run_config, insecure=insecure, root_certificates=root_certificates, command=command, on_metrics=on_metrics, timeout=timeout)
    with LocalDeployment(supernodes, out / "flower-logs") as dep:
        return submit(None, out, dep.address, run_config=run_config, env=dep.env, insecure=True, command=command, on_metrics=on_metrics, timeout=timeout)


def _check_locally(cfg: ExperimentConfig, supernodes: int) -> None:
    """Every process of a local run builds this experiment: fail here, once, with the clear
    error (too many SuperNodes, missing data, a bad option) rather than in the ServerApp's log."""
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or not 1 <= supernodes <= cfg.federation.clients:
        raise ValueError(f"--supernodes {supernodes}: must be in [1, federation.clients = {cfg.federation.clients}] (each SuperNode hosts at least one client)")
    federation_from_config(cfg).data()


def _fresh_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def simulate_flower(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    supernodes: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    overwrite: bool = False,
    command: str | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    data_dir: str | None = None,
) -> dict:
    """Run ``cfg`` on Flower's simulation runtime and return the summary (also in
    ``out_dir/summary.json``, the run folder ``rankfed run`` and ``rankfed flower run`` write).

    ``supernodes`` virtual SuperNodes (the clients spread over them as over a deployment's
    SuperNodes) whose messages Ray workers of ``num_cpus`` CPUs and ``num_gpus`` GPUs each run
    (:func:`rankfed.flower.simulation.simulate`): Ray on this machine, or the running Ray
    cluster at ``ray_address``. Every Ray process the run started is stopped when it returns.
    """
    from rankfed.flower.simulation import check_client_resources, simulate

    if data_dir:  # the ServerApp and every Ray worker read the data from here
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
    resources = check_client_resources(num_cpus, num_gpus)
    if cfg.federation.device == "cuda" and num_gpus == 0:
        raise ConfigError("federation.device = 'cuda' but --num-gpus = 0: a Ray worker sees a GPU only if it is given (a fraction) of one")
    _check_locally(cfg, supernodes)
    out = _fresh_folder(out_dir, overwrite)
    return simulate(
        server_app, client_app, supernodes=supernodes, out_dir=out, run_config={"experiment": to_toml(cfg)}, client_resources=resources,
        ray_address=ray_address, command=command, on_metrics=on_metrics, timeout=timeout,
    )  # fmt: skip
