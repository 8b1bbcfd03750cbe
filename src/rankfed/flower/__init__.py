"""rankfed on Flower: any rankfed algorithm as a real Flower deployment.

* :mod:`rankfed.flower.apps`: the ServerApp and ClientApp (Flower's Message API);
* :mod:`rankfed.flower.strategy`: :class:`RankfedStrategy`, a Flower Strategy that
  drives a rankfed algorithm's server half;
* :mod:`rankfed.flower.records`: payloads as ArrayRecord/ConfigRecord, message sizes;
* :mod:`rankfed.flower.deploy`: a local SuperLink + SuperNodes, and submitting runs.

:func:`run_flower` is what ``rankfed flower run`` calls. Needs ``flwr`` (the
``flower`` extra: ``pip install rankfed[flower]``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rankfed.config import ExperimentConfig
from rankfed.runner import build_experiment

__all__ = ["run_flower"]


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
    from .deploy import LocalDeployment, submit

    if data_dir:  # a local deployment's processes all read the data from here
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_dir=str(data_dir)))
    if superlink is None:
        if not 1 <= supernodes <= cfg.federation.clients:
            raise ValueError(f"--supernodes {supernodes}: must be in [1, federation.clients = {cfg.federation.clients}] (each SuperNode hosts at least one client)")
        # Every process of a local deployment builds this experiment: fail here, once, with the
        # clear error (missing data, a bad option) rather than in the ServerApp's log.
        build_experiment(cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if superlink is not None:
        return submit(cfg, out, superlink, insecure=insecure, root_certificates=root_certificates, command=command, on_metrics=on_metrics, timeout=timeout)
    with LocalDeployment(supernodes, out / "flower-logs") as dep:
        return submit(cfg, out, dep.address, env=dep.env, insecure=True, command=command, on_metrics=on_metrics, timeout=timeout)
