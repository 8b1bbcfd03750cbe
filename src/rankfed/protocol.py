"""The algorithm protocol: a server half and a client half, and nothing else between them.

The server decides what each selected client receives (its *downlink* payload), the client
trains on its own data and returns an *uplink* payload, and the server folds the uplinks
into its state. Payloads (see :mod:`rankfed.wire`) are the only thing that crosses: no
shared Python objects, no global model read directly by a client. That is what lets one
algorithm run unchanged in the in-process simulator, on Flower and around a user's own
training loop.

Both halves may read the static experiment (:class:`RunContext`: the number of clients,
rounds, seed, local training settings, task), as every party of a real deployment reads
the same experiment.

Payload names starting with ``@`` are metadata scalars (``@round``, ``@num_samples``,
``@train_loss``); all other names are the algorithm's own.

Two kinds of client, and the bytes of each are counted honestly:

* ``stateless`` clients remember nothing between rounds: a sampled client downloads
  everything it needs to train (:meth:`ServerHalf.configure`, usually the model's
  trainable tensors: whatever every party rebuilds from the run's seed, such as frozen
  weights of the initial model, is never sent).
* ``stateful`` clients keep a *replica* of the global model: every round the server sends
  one broadcast (:meth:`ServerHalf.broadcast`) to all K clients, sampled or not, and each
  applies it to its replica (:meth:`ClientHalf.sync`); sampled clients then train from
  their replica. Cheap broadcasts (MAPA's seed and k numbers) make this the cheaper kind;
  the broadcast is charged to all K clients every round.

A client half's work is :meth:`ClientHalf.fit`; most algorithms split it in two around the
training loop (:meth:`ClientHalf.begin`: the module to train from the downlink;
:meth:`ClientHalf.end`: the uplink from the trained module), so a user can run their own
loop in between, as PEFT leaves the loop to its user.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rankfed.local import ClientData, CohortTrainer, LocalTrainer, LocalTraining, Task, TrainStats
from rankfed.wire import Payload

__all__ = [
    "CLIENT_KINDS",
    "RunContext",
    "ClientContext",
    "ServerHalf",
    "ClientHalf",
    "RoundSums",
    "derive_seed",
    "client_uplink",
    "float_state",
    "shared_state",
]

CLIENT_KINDS = ("stateless", "stateful")


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed from integers (a run's seed, a round, a client id, a tag):
    the one seed derivation of rankfed, never the global RNG."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class RunContext:
    """The static experiment, known to every party: K clients, the rounds, the run's seed, how
    clients train (``local``), what they learn (``task``) and the training device."""

    num_clients: int
    rounds: int
    seed: int
    local: LocalTraining = field(default_factory=LocalTraining)
    device: torch.device = torch.device("cpu")
    task: Task = field(default_factory=Task)

    def trainer(self) -> LocalTrainer:
        return LocalTrainer(self.local, self.rounds, self.seed, self.task)


@dataclass
class ClientContext:
    """What a client half is handed for one round of local work.

    ``model`` is one module object reused across clients (its weights are whatever the
    previous client left: the client half loads what it needs from the payload or the
    replica). ``state`` is this client's private storage, kept by the transport between
    rounds (empty on first visit); only algorithms that need client state write to it.
    ``replica`` is the client's synced copy of the global model for stateful clients (read
    only), None for stateless ones. ``num_samples`` is the client's aggregation weight
    (default: its data's size); ``run_seed`` the run's seed (default: the trainer's).
    """

    client_id: int
    round: int
    model: nn.Module | None = None
    data: ClientData | None = None
    trainer: LocalTrainer | None = None
    state: dict = field(default_factory=dict)
    replica: dict[str, torch.Tensor] | None = None
    run_seed: int | None = None
    num_samples: int | None = None

    def __post_init__(self) -> None:
        if self.run_seed is None:
            self.run_seed = self.trainer.seed if self.trainer is not None else 0
        if self.num_samples is None and self.data is not None:
            self.num_samples = self.data.num_samples

    @property
    def seed(self) -> int:
        """A seed for this client and round (its minibatch order, its compressor's draws)."""
        return derive_seed(self.run_seed, self.round, self.client_id, 0x5EED)


def client_uplink(ctx: ClientContext, stats: TrainStats, tensors: dict) -> Payload:
    """An uplink: the metadata every server half reads (``@num_samples``, the aggregation
    weight; ``@train_loss``) followed by the algorithm's own entries."""
    if ctx.num_samples is None:
        raise ValueError("the client context has no num_samples (give ClientContext(..., num_samples=n))")
    return {"@num_samples": int(ctx.num_samples), "@train_loss": float(stats.mean_loss), **tensors}


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of a model's state (parameters and float buffers).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are bookkeeping that no
    algorithm communicates.
    """
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a federation exchanges of ``model``: its trainable parameters (those with
    ``requires_grad``; frozen ones are the seeded initial model's, known to every party) and
    its floating-point buffers (BatchNorm statistics change in training). Live tensors,
    keyed as in ``model.state_dict()``."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return out


class RoundSums:
    """A round's uploads folded in one at a time: for each entry the weighted sum
    sum_i w_i t_i, the total weight sum_i w_i (the clients' sample counts), how many uploads
    and their weighted training loss. O(one upload) of memory however many clients a round has.

    :meth:`add` leaves the sums unchanged when it refuses an upload (entries other than the
    round's first upload's, or a sum it would make non-finite).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0.0
        self.count = 0
        self._loss = 0.0
        self._loss_weight = 0.0

    @torch.no_grad()
    def add(self, tensors: dict[str, torch.Tensor], weight: float, loss: float | None = None) -> None:
        """Fold in one upload's ``tensors`` with aggregation weight ``weight``."""
        if not weight > 0:
            raise ValueError(f"weight = {weight!r}: must be > 0")
        if self.count and tensors.keys() != self.sums.keys():
            missing, extra = sorted(self.sums.keys() - tensors.keys()), sorted(tensors.keys() - self.sums.keys())
            raise ValueError(f"its entries differ from the round's first upload's (missing {missing[:3]}, extra {extra[:3]})")
        new = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"entry {name!r} is a {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, not a floating-point tensor")
            if name in self.sums:
                s = self.sums[name]
                if t.shape != s.shape:
                    raise ValueError(f"entry {name!r} has shape {tuple(t.shape)}, the round's first upload {tuple(s.shape)}")
                new[name] = torch.add(s, t.to(s.device, s.dtype), alpha=weight)
            else:
                new[name] = t * weight
        bad = [n for n, v in new.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"it makes the round's sum non-finite ({', '.join(bad[:3])})")
        self.sums = new  # the old sums go: memory stays at one sum (and one upload) per entry
        self.weight += float(weight)
        self.count += 1
        if loss is not None:
            self._loss += float(loss) * weight
            self._loss_weight += weight

    def mean(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i w_i t_i / sum_i w_i of entry ``name`` (on ``like``'s device and dtype if given)."""
        m = self.sums[name] / self.weight
        return m if like is None else m.to(like.device, like.dtype)

    @property
    def train_loss(self) -> float:
        """The uploads' training losses averaged with their weights (NaN without any)."""
        return self._loss / self._loss_weight if self._loss_weight else float("nan")


class ServerHalf(ABC):
    """The server half of an algorithm. Holds the global state.

    Aggregation comes in two forms. A server half that averages what its uploads carry
    implements :meth:`fold` (one upload's tensors to average, decoded and checked, the server
    untouched) and :meth:`finish` (the round's :class:`RoundSums` folded into the global
    state): the transport then folds each upload in as it arrives, so a round holds O(model)
    beyond the uploads in flight, however many clients it has. Any other server half
    implements :meth:`aggregate` over the round's uploads at once.
    """

    @abstractmethod
    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        """Stateless clients: the downlink payload for each selected client. Return the
        *same* object for clients that receive the same bytes: the transport then
        serialises it once."""

    def broadcast(self, rnd: int) -> Payload:
        """Stateful clients: the message every client receives at the start of round
        ``rnd`` to bring its replica up to date (what changed since the last one)."""
        raise NotImplementedError(f"{type(self).__name__} does not support stateful clients")

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        """Streaming aggregation: the tensors of client ``cid``'s upload that the round averages
        (weighted by ``@num_samples``), decoded and checked against what this server expects
        (a missing entry, a wrong shape: raise). Must not change the server."""
        raise NotImplementedError(f"{type(self).__name__} aggregates a round's uploads at once (it has no fold)")

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        """Streaming aggregation: fold the round's sums into the global state (``sums.count``
        may be 0: a round that aggregates nothing); return round statistics."""
        raise NotImplementedError(f"{type(self).__name__} aggregates a round's uploads at once (it has no finish)")

    def fold_reference(self) -> dict[str, torch.Tensor] | None:
        """What the tensors :meth:`fold` returns are measured from when the server bounds an
        upload's size (``federation.clip_norm``): None (the default) when they are updates
        (deltas, MAPA's B, factor updates), else the current global values of those entries
        (a server half that averages models, as FedHM does)."""
        return None

    @property
    def streams(self) -> bool:
        """Whether this server half folds uploads one at a time (implements :meth:`fold`)."""
        return type(self).fold is not ServerHalf.fold

    def aggregate(self, rnd: int, replies: Sequence[tuple[int, Payload]]) -> dict[str, float]:
        """Fold the clients' uplinks into the global state; return round statistics. By
        default: each reply through :meth:`fold`, then :meth:`finish`."""
        if not self.streams:
            raise NotImplementedError(f"{type(self).__name__} implements neither aggregate nor fold/finish")
        sums = RoundSums()
        for cid, payload in replies:
            sums.add(self.fold(rnd, cid, payload), float(payload["@num_samples"]), payload.get("@train_loss"))
        return self.finish(rnd, sums)

    @abstractmethod
    def global_model_state(self) -> dict[str, torch.Tensor]:
        """The current global model as a state dict of the user's model (for evaluation and saving)."""

    def evaluation_state(self) -> dict[str, torch.Tensor] | None:
        """What the round just folded in should be evaluated as, when that is not the global
        model (None, the default: :meth:`global_model_state`). FedLoRU's ``eval_before_merge``
        gives the model before that round's merge. Read by the transport right after the
        round is folded in (:meth:`rankfed.server.Rounds.evaluation_state`); the global model
        kept, checkpointed and saved stays :meth:`global_model_state`."""
        return None

    def replica_state(self) -> Payload:
        """Stateful clients: what an up-to-date client's replica holds now (every entry of
        :meth:`ClientHalf.init_replica`), sent to a client that missed more broadcasts than
        replaying them would save (:meth:`ClientHalf.restore` applies it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot send a client its replica (only replay missed broadcasts)")


class ClientHalf(ABC):
    """The client half of an algorithm. Stateless between calls except ``ctx.state``."""

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        """Train on ``ctx.data`` starting from the downlink ``payload`` (stateless) or from
        ``ctx.replica`` and this round's broadcast (stateful); return the uplink. Must not
        modify ``payload`` or ``ctx.replica`` in place (they may be shared). By default:
        :meth:`begin`, the local loop over the module's trainable parameters, :meth:`end`."""
        module = self.begin(payload, ctx)
        stats = ctx.trainer.train(module, ctx.data, ctx.round, ctx.seed)
        return self.end(module, ctx, stats)

    def begin(self, payload: Payload, ctx: ClientContext) -> nn.Module:
        """The module to train this round, loaded from the downlink (or the replica): its
        parameters with ``requires_grad`` are what the algorithm trains. Train it with any
        loop, then call :meth:`end`."""
        raise NotImplementedError(f"{type(self).__name__} trains in phases of its own: call fit(), it has no begin/end split")

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        """The uplink of ``module`` (the one :meth:`begin` returned) after local training;
        ``stats.mean_loss`` is reported as the client's training loss."""
        raise NotImplementedError(f"{type(self).__name__} trains in phases of its own: call fit(), it has no begin/end split")

    def _remember_start(self, ctx: ClientContext, start: Payload) -> None:
        """Keep what a client started from between :meth:`begin` and :meth:`end` (by client and
        round: a loop of your own may interleave clients)."""
        self.__dict__.setdefault("_starts", {})[ctx.client_id, ctx.round] = start

    def _start_of(self, ctx: ClientContext) -> Payload:
        """What :meth:`begin` started ``ctx``'s client from (forgotten once read)."""
        return self.__dict__.setdefault("_starts", {}).pop((ctx.client_id, ctx.round))

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        """Optional: the uplinks of several clients trained together (``execution =
        "vectorized"``), equal to :meth:`fit` per client up to float summation order; None when
        this algorithm (or these options) cannot train that way. The transport has checked
        the model, optimiser, task and data (:func:`~rankfed.local.cohort_supported`).
        ``compile``: run each step as one ``torch.compile`` graph."""
        return None

    def cohort_trainer(self, model: nn.Module, trainer: LocalTrainer, build=None, compile: bool = False) -> CohortTrainer:
        """The :class:`~rankfed.local.CohortTrainer` of ``model`` kept by this client half (one
        per model object and compile setting, so a compiled step is compiled once)."""
        cache = self.__dict__.setdefault("_cohort_trainers", {})
        key = (id(model), compile)
        if key not in cache:
            cache[key] = CohortTrainer(model, trainer.cfg, build, compile, trainer.task)
        return cache[key]

    def init_replica(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Stateful clients: the replica every client starts with. All parties build the
        initial model from the run's seed, so this costs no bytes."""
        return {k: v.detach().clone() for k, v in shared_state(model).items()}

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        """Stateful clients: apply a broadcast to the replica, in place."""
        raise NotImplementedError(f"{type(self).__name__} does not support stateful clients")

    def restore(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        """Stateful clients: overwrite the replica, in place, with the server's
        :meth:`ServerHalf.replica_state` (a client that missed too many broadcasts to replay)."""
        missing = [k for k in replica if not isinstance(payload.get(k), torch.Tensor)]
        if missing:
            raise KeyError(f"the replica payload lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for name, value in replica.items():
                value.copy_(payload[name])
