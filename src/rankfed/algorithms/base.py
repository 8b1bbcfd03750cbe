"""The algorithm interface: a server half and a client half, and nothing else.

The server decides what each selected client receives (its *downlink*
payload), the client trains on its own data and returns an *uplink* payload,
and the server folds the uplinks into its state. Payloads (see
:mod:`rankfed.wire`) are the only thing that crosses: no shared Python objects,
no global model read directly by a client. That is what lets one algorithm run
unchanged in the in-process simulator and on real transports.

Both halves may read the static experiment (:class:`RunContext`: the number of
clients, rounds, seed, client training settings), as every party of a real
deployment reads the same experiment file.

Payload names starting with ``@`` are metadata scalars (``@round``,
``@num_samples``, ``@train_loss``); all other names are the algorithm's own.

Two kinds of client, and the bytes of each are counted honestly:

* ``stateless`` clients remember nothing between rounds: a sampled client
  downloads everything it needs to train (:meth:`ServerHalf.configure`,
  usually the whole model).
* ``stateful`` clients keep a *replica* of the global model: every round the
  server sends one broadcast (:meth:`ServerHalf.broadcast`) to all K clients,
  sampled or not, and each applies it to its replica
  (:meth:`ClientHalf.sync`); sampled clients then train from their replica.
  Cheap broadcasts (MAPA's seed and k numbers) make this the cheaper kind;
  the broadcast is charged to all K clients every round.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.config import ClientConfig, from_mapping
from rankfed.data import ClientData
from rankfed.sim.trainer import LocalTrainer, TrainStats
from rankfed.sim.vectorized import CohortTrainer, cohort_supported
from rankfed.wire import Payload

__all__ = [
    "Algorithm",
    "ServerHalf",
    "ClientHalf",
    "RunContext",
    "ClientContext",
    "ALGORITHMS",
    "CLIENT_KINDS",
    "register",
    "client_seed",
    "client_uplink",
    "float_state",
    "train_cross_entropy",
    "cohort_supported",
]


@dataclass(frozen=True)
class RunContext:
    """The static experiment, known to every party."""

    num_clients: int
    rounds: int
    seed: int
    client: ClientConfig
    device: torch.device = torch.device("cpu")


CLIENT_KINDS = ("stateless", "stateful")


@dataclass
class ClientContext:
    """What a client half is handed for one round of local work.

    ``model`` is one module object reused across clients (its weights are
    whatever the previous client left: the client half must load what it
    needs from the payload or the replica). ``state`` is this client's private
    storage, kept by the transport between rounds (empty on first visit); only
    algorithms that need client state write to it. ``replica`` is the
    client's synced copy of the global model for stateful clients (read
    only in :meth:`ClientHalf.fit`), None for stateless ones.
    """

    client_id: int
    round: int
    model: nn.Module
    data: ClientData
    trainer: LocalTrainer
    state: dict = field(default_factory=dict)
    replica: dict[str, torch.Tensor] | None = None

    @property
    def seed(self) -> int:
        """A seed for this client and round (never the global RNG)."""
        return client_seed(self.trainer.seed, self.round, self.client_id)


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """Derive an independent 63-bit seed from (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, rnd, client_id, 0x5EED]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_cross_entropy(model: nn.Module, ctx: ClientContext, params: list[torch.Tensor] | None = None, **hooks) -> TrainStats:
    """A client's local work: minimise cross-entropy of ``model`` on ``ctx.data`` over ``params``
    (default: every parameter that requires grad) for the round's epochs or steps.
    ``hooks`` (``after_backward``, ``after_step``) pass through to :meth:`LocalTrainer.run`."""
    model.train()
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return ctx.trainer.run(params, lambda x, y: F.cross_entropy(model(x), y), ctx.data, rnd=ctx.round, seed=ctx.seed, **hooks)


def client_uplink(ctx: ClientContext, stats: TrainStats, tensors: dict) -> Payload:
    """An uplink: the metadata every server half reads (``@num_samples``, the aggregation
    weight; ``@train_loss``) followed by the algorithm's own entries."""
    return {"@num_samples": ctx.data.num_samples, "@train_loss": stats.mean_loss, **tensors}


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of a model's state (parameters and float buffers).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are bookkeeping that
    no algorithm communicates.
    """
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


class ServerHalf(ABC):
    """The server half of an algorithm. Holds the global state."""

    @abstractmethod
    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        """Stateless clients: the downlink payload for each selected client. Return the
        *same* object for clients that receive the same bytes: the transport then
        serialises it once."""

    def broadcast(self, rnd: int) -> Payload:
        """Stateful clients: the message every client receives at the start of round
        ``rnd`` to bring its replica up to date (what changed since the last one)."""
        raise NotImplementedError(f"{type(self).__name__} does not support stateful clients")

    @abstractmethod
    def aggregate(self, rnd: int, replies: Sequence[tuple[int, Payload]]) -> dict[str, float]:
        """Fold the clients' uplinks into the global state; return round statistics."""

    @abstractmethod
    def global_model_state(self) -> dict[str, torch.Tensor]:
        """The current global model as a state dict (for evaluation and saving)."""


class ClientHalf(ABC):
    """The client half of an algorithm. Stateless between calls except ``ctx.state``."""

    @abstractmethod
    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        """Train on ``ctx.data`` starting from the downlink ``payload`` (stateless) or
        from ``ctx.replica`` and this round's broadcast (stateful); return the uplink.
        Must not modify ``payload`` or ``ctx.replica`` in place (they may be shared)."""

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        """Optional: the uplinks of several clients trained together (``federation.execution =
        "vectorized"``), equal to :meth:`fit` per client up to float summation order; None when
        this algorithm (or this model, or these settings) cannot train that way. ``compile``:
        run each step as one ``torch.compile`` graph."""
        return None

    def cohort_trainer(self, model: nn.Module, cfg: ClientConfig, build=None, compile: bool = False) -> CohortTrainer:
        """The :class:`~rankfed.sim.vectorized.CohortTrainer` of ``model`` kept by this client
        half (one per model object and compile setting, so a compiled step is compiled once)."""
        cache = self.__dict__.setdefault("_cohort_trainers", {})
        key = (id(model), compile)
        if key not in cache:
            cache[key] = CohortTrainer(model, cfg, build, compile)
        return cache[key]

    def init_replica(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Stateful clients: the replica every client starts with. All parties build
        the initial model from the run's seed, so this costs no bytes."""
        return {k: v.detach().clone() for k, v in float_state(model).items()}

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        """Stateful clients: apply a broadcast to the replica, in place."""
        raise NotImplementedError(f"{type(self).__name__} does not support stateful clients")


class Algorithm(ABC):
    """An algorithm: a name, an options dataclass, and factories for its two halves."""

    name: ClassVar[str]
    Options: ClassVar[type]
    # The client kind the algorithm's paper assumes; `federation.client_kind = "auto"` uses it.
    default_client_kind: ClassVar[str] = "stateless"

    def __init__(self, options: Any):
        self.options = options

    @classmethod
    def parse_options(cls, options: dict, section: str = "algorithm") -> Any:
        """Check ``options`` (unknown keys, types, values) and build the Options dataclass."""
        return from_mapping(cls.Options, dict(options), section)

    @classmethod
    def from_options(cls, options: dict, section: str = "algorithm") -> Algorithm:
        return cls(cls.parse_options(options, section))

    @abstractmethod
    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        """The server half, starting from ``model``'s weights (the seeded initial model)."""

    @abstractmethod
    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        """The client half for clients whose model has ``model``'s architecture (built from
        the same experiment as the server's). One object serves every client; per-client
        state lives in ClientContext.state."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.options)}


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to the registry under ``cls.name``."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls
