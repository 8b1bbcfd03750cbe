"""rankfed on Flower: any rankfed federation as a real Flower deployment.

* :func:`server_app`, :func:`client_app` (:mod:`rankfed.flower.apps`): a ServerApp and a
  ClientApp from a factory ``context -> Federation``, for your own model and data;
* :mod:`rankfed.flower.strategy`: :class:`RankfedStrategy`, a Flower Strategy driving an
  algorithm's server half through the transport-neutral round;
* :mod:`rankfed.flower.records`: payloads as ArrayRecord/ConfigRecord, message sizes;
* :mod:`rankfed.flower.deploy`: a local SuperLink + SuperNodes, Flower App folders, submitting runs.

Experiment files run through ``rankfed flower run`` (:mod:`rankfed.app.flower`). Needs
``flwr`` (the ``flower`` extra: ``pip install rankfed[flower]``).
"""

from rankfed.flower.apps import client_app, server_app
from rankfed.flower.deploy import LocalDeployment, submit, write_app

__all__ = ["server_app", "client_app", "LocalDeployment", "submit", "write_app"]
