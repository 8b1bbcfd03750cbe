"""Experiment configuration: dataclasses that check themselves, loaded from TOML.

An experiment file has the sections ``[task]``, ``[federation]``, ``[client]``
and ``[algorithm]`` (``name`` plus that algorithm's own options), ``[flower]``
(read only on a Flower deployment), and optionally
``[algorithms.<label>]`` tables (``name`` = the algorithm, default the label,
plus its options) naming the variants that ``rankfed
compare``. Unknown sections and keys are errors, and every error names the key
and the bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "TaskConfig",
    "FederationConfig",
    "ClientConfig",
    "AlgorithmConfig",
    "FlowerConfig",
    "ExperimentConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "from_mapping",
    "to_toml",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the key and value."""


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {why}")


_MAX_SEED = 2**32 - 1


def _choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise _bad(key, value, f"must be one of {', '.join(choices)}")


@dataclass
class TaskConfig:
    """What is learned: the dataset, how it is split over clients, the model."""

    dataset: str = "digits"
    data_dir: str = ""  # "" = the dataset's default location
    partition: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration (partition = "dirichlet")
    classes_per_client: int = 2  # partition = "shards"
    holdout: float = 0.1  # fraction of each client's data kept as its own held-out split
    train_samples: int = 0  # > 0: a seeded random subset of this many training samples (0 = all)
    model: str = ""  # "" = the dataset's reference model
    init_weights: str = ""  # a state-dict file (torch.save) to start from, e.g. a centrally pretrained model
    dataset_options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from rankfed.data import DATASETS, PARTITIONS

        _choice("task.dataset", self.dataset, DATASETS)
        _choice("task.partition", self.partition, PARTITIONS)
        if not 0 < self.alpha < math.inf:
            raise _bad("task.alpha", self.alpha, "must be > 0 and finite")
        if self.classes_per_client < 1:
            raise _bad("task.classes_per_client", self.classes_per_client, "must be >= 1")
        if not 0 <= self.holdout < 1:
            raise _bad("task.holdout", self.holdout, "must be in [0, 1)")
        if self.train_samples < 0:
            raise _bad("task.train_samples", self.train_samples, "must be >= 0 (0 = all)")
        if self.model:
            from rankfed.models import MODELS

            _choice("task.model", self.model, MODELS)


@dataclass
class FederationConfig:
    """Who takes part and how often: clients, sampling, rounds, evaluation."""

    clients: int = 10
    participation: float = 1.0  # fraction of clients sampled each round
    rounds: int = 20
    seed: int = 0
    eval_every: int = 1  # evaluate the global model every n rounds (and after the last)
    eval_batch_size: int = 1024
    device: str = "cpu"  # cpu | cuda | auto
    # stateless: a sampled client downloads what it needs; stateful: every client keeps a
    # replica and receives every round's broadcast; auto: what the algorithm's paper assumes
    client_kind: str = "auto"
    checkpoint_every: int = 0  # > 0: save the global model every n rounds (and before round 1 and after the last)
    # a round aggregates if at least this many valid uploads arrive (bad ones are dropped); else it is skipped
    min_clients: int = 1
    resume_every: int = 10  # save what `rankfed run --resume` needs every n rounds (0 = never)
    # vectorized: a round's clients train together (torch.func.vmap) where the algorithm, model and
    # optimiser allow it (FedAvg, MAPA, FA-LoRA, FedLoRA, FedLoRU with SGD on models without
    # dropout, BatchNorm included), else one by one; auto: vectorized on a GPU, sequential on the CPU
    # (where vectorized is measured slower: benchmarks/RESULTS.md, "Simulator speed")
    execution: str = "auto"
    compile: bool = False  # vectorized: torch.compile each cohort step (a one-time compile, ~20 s on a CPU)
    # clients not trained as a cohort train in this many threads at once, each with its own model
    # and cores/workers torch threads (2 on the 2-core CPU: 1.3x the rounds/s for small models)
    workers: int = 1

    def __post_init__(self) -> None:
        _choice("federation.client_kind", self.client_kind, ("auto", "stateless", "stateful"))
        _choice("federation.execution", self.execution, ("auto", "sequential", "vectorized"))
        if self.clients < 1:
            raise _bad("federation.clients", self.clients, "must be >= 1")
        if not 1 <= self.workers <= 256:
            raise _bad("federation.workers", self.workers, "must be in [1, 256]")
        if not 0 < self.participation <= 1:
            raise _bad("federation.participation", self.participation, "must be in (0, 1]")
        if self.rounds < 1:
            raise _bad("federation.rounds", self.rounds, "must be >= 1")
        if not 0 <= self.seed <= _MAX_SEED:  # NumPy's legacy seeding and scikit-learn take 32-bit seeds
            raise _bad("federation.seed", self.seed, f"must be in [0, {_MAX_SEED}]")
        if self.eval_every < 1:
            raise _bad("federation.eval_every", self.eval_every, "must be >= 1")
        if self.eval_batch_size < 1:
            raise _bad("federation.eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.resume_every < 0:
            raise _bad("federation.resume_every", self.resume_every, "must be >= 0 (0 = no resume state)")
        if self.min_clients < 1:
            raise _bad("federation.min_clients", self.min_clients, "must be >= 1")
        if self.checkpoint_every < 0:
            raise _bad("federation.checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = no checkpoints)")
        _choice("federation.device", self.device, ("cpu", "cuda", "auto"))

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.participation * self.clients))


@dataclass
class ClientConfig:
    """How a client trains locally."""

    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adamw
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many minibatch steps instead of local_epochs
    batch_size: int = 32
    lr_schedule: str = "constant"  # constant | cosine (over rounds)
    lr_min: float = 0.0  # cosine floor
    grad_clip: float = 0.0  # max gradient norm, 0 = off

    def __post_init__(self) -> None:
        _choice("client.optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("client.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if not 0 < self.lr < math.inf:
            raise _bad("client.lr", self.lr, "must be > 0 and finite")
        if not 0 <= self.momentum < 1:
            raise _bad("client.momentum", self.momentum, "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise _bad("client.nesterov", self.nesterov, "needs client.momentum > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise _bad("client.weight_decay", self.weight_decay, "must be >= 0 and finite")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise _bad("client.betas", self.betas, "must be two numbers in [0, 1)")
        if self.local_epochs < 1:
            raise _bad("client.local_epochs", self.local_epochs, "must be >= 1")
        if self.local_steps < 0:
            raise _bad("client.local_steps", self.local_steps, "must be >= 0")
        if self.batch_size < 1:
            raise _bad("client.batch_size", self.batch_size, "must be >= 1")
        if not 0 <= self.lr_min <= self.lr:
            raise _bad("client.lr_min", self.lr_min, f"must be in [0, client.lr = {self.lr}]")
        if not 0 <= self.grad_clip < math.inf:
            raise _bad("client.grad_clip", self.grad_clip, "must be >= 0 and finite (0 = off)")


@dataclass
class AlgorithmConfig:
    """The algorithm's name and its own options (checked by the algorithm)."""

    name: str = "fedavg"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from rankfed.algorithms import ALGORITHMS

        _choice("algorithm.name", self.name, sorted(ALGORITHMS))
        # The algorithm's option dataclass checks keys and values now; keep them with every
        # default filled in, so a resolved config reads back equal.
        self.options = dataclasses.asdict(ALGORITHMS[self.name].parse_options(self.options, section="algorithm"))


@dataclass
class FlowerConfig:
    """How a run behaves on a Flower deployment (``rankfed flower run``; the simulator ignores it)."""

    round_timeout: float = 600.0  # seconds to wait for a round's replies (a dead SuperNode costs this once)
    connect_timeout: float = 120.0  # seconds to wait for every SuperNode to connect at the start

    def __post_init__(self) -> None:
        if not self.round_timeout > 0:
            raise _bad("flower.round_timeout", self.round_timeout, "must be > 0 (seconds)")
        if not self.connect_timeout > 0:
            raise _bad("flower.connect_timeout", self.connect_timeout, "must be > 0 (seconds)")


@dataclass
class ExperimentConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    # variants for `rankfed compare`, by label: {"mapa": {"k": 64}, "fedavg+qsgd": {"name": "fedavg", "compressor": "qsgd"}}
    algorithms: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, opts in self.algorithms.items():
            if not isinstance(opts, dict):
                raise _bad(f"algorithms.{label}", opts, "must be a table of options")
            self.variant(label)  # checks the algorithm name and its options
            self.variant_client(label)  # and the client overrides

    def variant(self, label: str) -> AlgorithmConfig:
        """The algorithm and options a label stands for: an [algorithms.<label>] table (its
        ``name`` key, default the label, and its options); else the algorithm of that name
        with the [algorithm] options if it is the one there, defaults otherwise."""
        from rankfed.algorithms import ALGORITHMS

        if label in self.algorithms:
            opts = dict(self.algorithms[label])
            name = opts.pop("name", label)
            opts.pop("client", None)  # client overrides: see with_algorithm
            if name not in ALGORITHMS:
                raise _bad(f"algorithms.{label}.name" if label != name else "algorithms", name, f"must be one of {', '.join(sorted(ALGORITHMS))}")
            try:
                ALGORITHMS[name].parse_options(opts, section=f"algorithms.{label}")
            except ConfigError as e:  # an option check names "algorithm.x": point at the variant's table
                msg = str(e)
                raise ConfigError(f"algorithms.{label}.{msg.removeprefix('algorithm.')}" if msg.startswith("algorithm.") else msg) from None
            return AlgorithmConfig(name=name, options=opts)
        if label not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm or variant {label!r}; algorithms: {', '.join(sorted(ALGORITHMS))}; variants: {', '.join(self.algorithms) or 'none'}")
        opts = dict(self.algorithm.options) if label == self.algorithm.name else {}
        return AlgorithmConfig(name=label, options=opts)

    def with_algorithm(self, label: str) -> ExperimentConfig:
        """The same experiment run with another algorithm or variant (see :meth:`variant`).
        A variant's ``client`` table overrides [client] keys (a learning rate tuned per method)."""
        return dataclasses.replace(self, algorithm=self.variant(label), client=self.variant_client(label))

    def variant_client(self, label: str) -> ClientConfig:
        """[client] with the variant's ``client`` table applied over it."""
        overrides = self.algorithms.get(label, {}).get("client", {})
        if not isinstance(overrides, dict):
            raise _bad(f"algorithms.{label}.client", overrides, "must be a table of [client] keys")
        if not overrides:
            return self.client
        try:
            return from_mapping(ClientConfig, {**dataclasses.asdict(self.client), **overrides}, f"algorithms.{label}.client")
        except ConfigError as e:  # a value check names "client.x": point at the variant's table
            msg = str(e)
            raise ConfigError(f"algorithms.{label}.{msg}" if msg.startswith("client.") else msg) from None


_SECTIONS = {
    "task": TaskConfig,
    "federation": FederationConfig,
    "client": ClientConfig,
    "flower": FlowerConfig,
}


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a TOML value against a dataclass field type."""
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer beyond float range: +-inf, which the range checks reject
            return True, math.inf if value > 0 else -math.inf
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, dict):
        return isinstance(value, tp), value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    return True, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_mapping(cls: type, data: dict, section: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise _bad(section, data, "must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown key {section}.{key}{hint}")
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise _bad(f"{section}.{key}", value, f"must be of type {_type_name(hints[key])}")
        kwargs[key] = coerced
    return cls(**kwargs)


def parse_config(data: dict) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a parsed TOML document."""
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment must be a table of sections, got {type(data).__name__}")
    known = {*_SECTIONS, "algorithm", "algorithms"}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (sections: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown section [{key}]{hint}")
    parts = {name: from_mapping(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()}
    algo = data.get("algorithm", {})
    if not isinstance(algo, dict):
        raise _bad("algorithm", algo, "must be a table")
    algo = dict(algo)
    name = algo.pop("name", "fedavg")
    if not isinstance(name, str):
        raise _bad("algorithm.name", name, "must be a string")
    algorithms = data.get("algorithms", {})
    if not isinstance(algorithms, dict):
        raise _bad("algorithms", algorithms, "must be a table of tables")
    return ExperimentConfig(
        **parts,
        algorithm=AlgorithmConfig(name=name, options=algo),
        algorithms={k: dict(v) if isinstance(v, dict) else v for k, v in algorithms.items()},
    )


def _parse_value(text: str) -> Any:
    """A --set value: a TOML literal if it parses as one, else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a parsed TOML document (in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"experiment file {str(p)!r} is a folder, not a TOML file")
        if not p.is_file():
            raise ConfigError(f"experiment file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: not UTF-8 text ({e})") from None
        except OSError as e:
            raise ConfigError(f"experiment file {str(p)!r} cannot be read: {e.strerror or e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    apply_overrides(data, overrides or [])
    return parse_config(data)


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved configuration as a TOML-ready document (algorithm options inlined)."""
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}
    from rankfed.algorithms import ALGORITHMS

    opts = ALGORITHMS[cfg.algorithm.name].parse_options(cfg.algorithm.options, section="algorithm")
    out["algorithm"] = {"name": cfg.algorithm.name, **dataclasses.asdict(opts)}
    if cfg.algorithms:
        out["algorithms"] = cfg.algorithms
    return out


def to_toml(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))
