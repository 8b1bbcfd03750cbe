"""An experiment resolved for a transport: the parts every transport runs, and its run options.

:class:`Experiment` is what :class:`rankfed.Federation` builds for a run and what the
simulator and the Flower apps consume: the seeded initial model, the clients' data, the test
data, the algorithm, the run context (K, rounds, seed, local training, task, device) and the
:class:`RunOptions` (``[federation]`` settings of a run). ``info`` says in the summary what the
model and data were; ``config_text`` is the run folder's ``config.toml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from rankfed.algorithms import Algorithm
from rankfed.checks import bad, check_fields, choice
from rankfed.local import ClientData
from rankfed.protocol import ClientHalf, RunContext
from rankfed.server.defence import Defences, check_local_noise, private_client, resolve_noise

__all__ = ["RunOptions", "Experiment", "EXECUTIONS", "resolve_client_kind"]

EXECUTIONS = ("auto", "sequential", "vectorized")


@dataclass
class RunOptions(Defences):
    """How a run goes (the ``[federation]`` keys of an experiment file besides clients, seed, device).

    Args:
        rounds: communication rounds.
        eval_every: evaluate the global model every n rounds (and after the last).
        eval_batch_size: batch size of evaluation.
        client_kind: ``"stateless"`` (a sampled client downloads what it needs), ``"stateful"``
            (every client keeps a replica and receives every round's broadcast) or ``"auto"``
            (what the algorithm's paper assumes).
        checkpoint_every: > 0: save the global model every n rounds (and before round 1 and
            after the last) to the run folder's ``checkpoints/``.
        min_clients: a round aggregates if at least this many valid uploads arrive, else it is skipped.
        resume_every: save what ``resume`` needs every n rounds (0 = never).
        execution: ``"sequential"``, ``"vectorized"`` (a round's clients as one
            ``torch.func.vmap`` computation, where algorithm, model, optimiser, loss and data
            allow) or ``"auto"`` (vectorized on a GPU, sequential on a CPU).
        compile: vectorized: ``torch.compile`` each cohort step.
        workers: clients not trained as a cohort train in this many threads at once.
        client_state: where per-client state lives (error feedback, GreedyLore bases, personal
            factors): ``"memory"``, or ``"disk"`` (the run folder's ``client-state/``, at most
            ``client_state_cache`` clients' states in memory).
        client_state_cache: ``client_state = "disk"``: clients whose state is kept in memory.
        availability: the probability that a client is online in a round (simulator; clients
            are sampled among those online, and a stateful client that was offline is brought
            up to date when it is back).
        availability_trace: a file saying who is online in each round, instead (one line per
            round: the online client ids).
        aggregator, trim_beta, krum_malicious, krum_keep, sample_weights, max_sample_weight,
        clip_norm, clip_quantile, clip_window, dp, dp_noise, dp_epsilon, dp_delta: the
            defences against a client taking over the model (robust aggregation, trusted
            weights, bounded uploads, differential privacy): see :mod:`rankfed.server.defence`.
            All off by default.
    """

    rounds: int = 20
    eval_every: int = 1
    eval_batch_size: int = 1024
    client_kind: str = "auto"
    checkpoint_every: int = 0
    min_clients: int = 1
    resume_every: int = 10
    execution: str = "auto"
    compile: bool = False
    workers: int = 1
    client_state: str = "memory"
    client_state_cache: int = 256
    availability: float = 1.0
    availability_trace: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "federation")
        super().__post_init__()  # the defence keys
        choice("federation.client_kind", self.client_kind, ("auto", "stateless", "stateful"))
        choice("federation.execution", self.execution, EXECUTIONS)
        choice("federation.client_state", self.client_state, ("memory", "disk"))
        if not 0.0 < self.availability <= 1.0:
            raise bad("federation.availability", self.availability, "must be in (0, 1] (the probability a client is online in a round)")
        if self.availability_trace and self.availability != 1.0:
            raise bad("federation.availability", self.availability, "give either it or federation.availability_trace, not both")
        if self.client_state_cache < 1:
            raise bad("federation.client_state_cache", self.client_state_cache, "must be >= 1 (clients whose state stays in memory)")
        if self.rounds < 1:
            raise bad("federation.rounds", self.rounds, "must be >= 1")
        if not 1 <= self.workers <= 256:
            raise bad("federation.workers", self.workers, "must be in [1, 256]")
        if self.eval_every < 1:
            raise bad("federation.eval_every", self.eval_every, "must be >= 1")
        if self.eval_batch_size < 1:
            raise bad("federation.eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.resume_every < 0:
            raise bad("federation.resume_every", self.resume_every, "must be >= 0 (0 = no resume state)")
        if self.min_clients < 1:
            raise bad("federation.min_clients", self.min_clients, "must be >= 1")
        if self.checkpoint_every < 0:
            raise bad("federation.checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = no checkpoints)")


    @property
    def defences(self) -> Defences:
        """The defence keys alone, as :class:`~rankfed.server.defence.Defences`."""
        return Defences.from_options(self)


def resolve_client_kind(algorithm: Algorithm, kind: str) -> str:
    """``kind``, or for ``"auto"`` the kind the algorithm's paper assumes."""
    return algorithm.default_client_kind if kind == "auto" else kind


@dataclass
class Experiment:
    """Everything a transport needs to run one federation (see the module docstring)."""

    algorithm: Algorithm
    model: nn.Module  # the seeded initial model
    clients: Sequence[ClientData]
    test: ClientData | None
    ctx: RunContext
    clients_per_round: int
    options: RunOptions = field(default_factory=RunOptions)
    info: dict = field(default_factory=dict)
    config_text: str = ""

    def __post_init__(self) -> None:
        k = len(self.clients)
        if not 1 <= self.clients_per_round <= k:
            raise bad("clients_per_round", self.clients_per_round, f"must be in [1, {k}] (the number of clients)")
        if self.options.rounds != self.ctx.rounds:
            raise ValueError(f"options.rounds = {self.options.rounds} but the run context has {self.ctx.rounds}")
        if self.options.min_clients > self.clients_per_round:
            raise bad("federation.min_clients", self.options.min_clients, f"must be <= the clients per round ({self.clients_per_round}): no round could aggregate")
        d = self.options.defences
        check_local_noise(self.algorithm, d)  # here, before any transport starts
        if d.aggregator == "krum" and d.krum_keep > self.clients_per_round:
            raise bad("federation.krum_keep", d.krum_keep, f"must be <= the clients per round ({self.clients_per_round})")

    @property
    def defences(self) -> Defences:
        """The run's defences, with ``dp_epsilon`` turned into the noise multiplier that spends it
        over the run's rounds (:func:`~rankfed.server.defence.resolve_noise`)."""
        if "_defences" not in self.__dict__:
            self.__dict__["_defences"] = resolve_noise(self.options.defences, self.ctx.rounds, self.participation)
        return self.__dict__["_defences"]

    def make_client(self, model: nn.Module) -> ClientHalf:
        """The algorithm's client half of ``model``, with local DP's noise around it if the run has it."""
        return private_client(self.algorithm, self.algorithm.make_client(model, self.ctx), self.defences)

    @property
    def client_kind(self) -> str:
        """The client kind in force: as configured, or the algorithm's paper default for "auto"."""
        return resolve_client_kind(self.algorithm, self.options.client_kind)

    @property
    def participation(self) -> float:
        return self.clients_per_round / len(self.clients)

    @property
    def execution(self) -> str:
        """"sequential" or "vectorized" ("auto": vectorized on a GPU, where it is measured faster)."""
        if self.options.execution == "auto":
            return "vectorized" if self.ctx.device.type == "cuda" else "sequential"
        return self.options.execution
