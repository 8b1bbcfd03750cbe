"""rankfed on Flower: any rankfed federation as a real Flower deployment.

* :func:`server_app`, :func:`client_app` (:mod:`rankfed.flower.apps`): a ServerApp and a
  ClientApp from a factory ``context -> Federation``, for your own model and data;
* :mod:`rankfed.flower.strategy`: :class:`RankfedStrategy`, a Flower Strategy driving an
  algorithm's server half through the transport-neutral round;
* :mod:`rankfed.flower.records`: payloads as ArrayRecord/ConfigRecord, message sizes;
* :mod:`rankfed.flower.deploy`: a local SuperLink + SuperNodes, Flower App folders, submitting runs;
* :func:`simulate` (:mod:`rankfed.flower.simulation`): the same apps on Flower's simulation
  runtime, N virtual SuperNodes run by Ray workers (local Ray or a Ray cluster).

Experiment files run through ``rankfed flower run`` and ``rankfed flower simulate``
(:mod:`rankfed.app.flower`). Needs ``flwr`` with its simulation extra (the ``flower`` extra:
``pip install rankfed[flower]``).
"""

from rankfed.flower.apps import client_app, server_app
from rankfed.flower.deploy import LocalDeployment, submit, write_app
from rankfed.flower.simulation import simulate

__all__ = ["server_app", "client_app", "LocalDeployment", "submit", "write_app", "simulate"]
