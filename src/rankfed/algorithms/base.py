"""The algorithm classes: typed, self-checking options with factories for the two halves.

An algorithm is a dataclass whose fields are its options (``rf.FedLoRU(rank=8, tau=10)``);
``__post_init__`` checks every option, with messages naming ``algorithm.<option>`` as the
experiment file's ``[algorithm]`` table does, so Python keywords and a TOML table are checked
the same way. It makes the server half and the client half of :mod:`rankfed.protocol` for a
model (``make_server`` / ``make_client``); everything else it does lives in those halves.

The registry maps the experiment-file names (``"fedavg"``, ``"mapa"``, ``"fa_lora"``, ...) to
the classes; :func:`get_algorithm` builds one from a name and a table of options.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankfed.checks import check_fields, describe_object, from_mapping
from rankfed.compress import Compressor
from rankfed.errors import ConfigError
from rankfed.local import LocalTraining, Task
from rankfed.protocol import ClientHalf, RunContext, ServerHalf

__all__ = ["Algorithm", "ALGORITHMS", "register", "get_algorithm"]


@dataclass
class Algorithm(ABC):
    """Base of the algorithm classes (see the module docstring)."""

    name: ClassVar[str]
    # The client kind the algorithm's paper assumes; client_kind = "auto" uses it.
    default_client_kind: ClassVar[str] = "stateless"

    def __post_init__(self) -> None:
        check_fields(self, "algorithm")

    @abstractmethod
    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        """The server half, starting from ``model``'s weights (the seeded initial model)."""

    @abstractmethod
    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        """The client half for clients whose model has ``model``'s architecture (built from the
        same experiment as the server's). One object serves every client; per-client state
        lives in ``ClientContext.state``."""

    def local_noise_unsupported(self) -> str | None:
        """Why local differential privacy (noise each client adds to its uplink) cannot work on
        this algorithm, or None when it can: its uplink's tensors are the update the server
        averages."""
        return "its uplink is not the update the server averages (local DP's noise needs one that is)"

    # -- descriptions ------------------------------------------------------------------------
    def to_options(self) -> dict[str, Any]:
        """The options as an experiment file's ``[algorithm]`` table (without ``name``); an option
        holding Python code (a compressor of your own) is described as ``<python: ...>``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, dict)):
                value = [dict(v) if isinstance(v, dict) else v for v in value] if isinstance(value, list) else dict(value)
            elif isinstance(value, Compressor):
                value = f"<python: {value.name}>"
            elif not isinstance(value, (str, int, float, bool)):
                value = describe_object(value)
            out[f.name] = value
        return out

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **options}``: what a run's summary records."""
        return {"name": self.name, **self.to_options()}

    @classmethod
    def from_options(cls, options: dict, section: str = "algorithm") -> Algorithm:
        """Build from a table of options (unknown keys and types checked, naming ``section``)."""
        try:
            return from_mapping(cls, dict(options), section)
        except ConfigError as e:  # a value check names "algorithm.x": point at the table it came from
            msg = str(e)
            if section != "algorithm" and msg.startswith("algorithm."):
                raise ConfigError(f"{section}.{msg.removeprefix('algorithm.')}") from None
            raise

    # -- the two halves, for your own loop ---------------------------------------------------------
    def _context(self, num_clients: int, rounds: int, seed: int, local: LocalTraining | None, task: Task | None, device) -> RunContext:
        return RunContext(num_clients=num_clients, rounds=rounds, seed=seed, local=local or LocalTraining(), device=torch.device(device), task=task or Task())

    def server(self, model: nn.Module, *, seed: int = 0, num_clients: int = 1, rounds: int = 1, local: LocalTraining | None = None, task: Task | None = None, device: str = "cpu") -> ServerHalf:
        """The server half for ``model`` (the seeded initial model every party starts from)."""
        return self.make_server(model, self._context(num_clients, rounds, seed, local, task, device))

    def client(self, model: nn.Module, *, seed: int = 0, num_clients: int = 1, rounds: int = 1, local: LocalTraining | None = None, task: Task | None = None, device: str = "cpu") -> ClientHalf:
        """The client half for ``model``: ``begin(downlink, ctx)`` gives the module to train with
        your own loop, ``end(module, ctx, stats)`` the uplink (see the README)."""
        return self.make_client(model, self._context(num_clients, rounds, seed, local, task, device))


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to the registry under ``cls.name``."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str, options: dict | None = None, section: str = "algorithm") -> Algorithm:
    """The registered algorithm ``name`` with the (checked) ``options``."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name].from_options(options or {}, section)
