"""Experiment files: the TOML front end, a thin layer over the Python API.

An experiment file has the sections ``[task]``, ``[federation]``, ``[client]`` and
``[algorithm]`` (``name`` plus that algorithm's own options), ``[flower]`` (read only on a
Flower deployment), and optionally ``[algorithms.<label>]`` tables (``name`` = the algorithm,
default the label, plus its options) naming the variants that ``rankfed compare`` runs.
Each table is the keywords of a Python object, checked by that object: ``[client]`` is
:class:`rankfed.LocalTraining`, ``[algorithm]`` the algorithm's class (``rf.MAPA(k=...)``),
``[federation]`` :class:`rankfed.server.RunOptions` plus the clients, participation, seed and
device of :class:`rankfed.Federation`. Unknown sections and keys are errors, and every error
names the key and the bad value.

User code is named by import path (``"package.module:name"``): ``task.model`` (a model
class or factory, called with ``task.model_options``), ``task.dataset`` (a function
returning ``(clients, test)``), ``task.loss``, ``task.metrics``, ``client.optimizer``.
``task.python_path`` lists folders to import them from (relative to the experiment file).

A top-level ``preset = "<name>"`` (:data:`PRESETS`; on the command line ``--set
preset=<name>``) fills in a set of keys wherever the file does not give them: keys set
explicitly always win. ``"fedloru-code"`` is the FedLoRU authors' released code
(``haemPark/fedloru_official``) as options (see :data:`PRESETS`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from rankfed.checks import bad as _bad
from rankfed.checks import choice as _choice
from rankfed.checks import from_mapping
from rankfed.errors import ConfigError
from rankfed.local import LocalTraining
from rankfed.server import Defences, RunOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PRESETS",
    "apply_preset",
    "preset_algorithm_options",
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
    "to_dict",
    "is_import_path",
    "CLIENT_ALIASES",
]

_MAX_SEED = 2**32 - 1
ClientConfig = LocalTraining  # the [client] table
# older spellings of [client] keys, still read
CLIENT_ALIASES = {"local_epochs": "epochs", "local_steps": "steps"}


# Presets: section -> {key: value}. An [algorithm] key is set only for an algorithm that has that
# option; keys the experiment file sets win; "tau" (the merge schedule) is left out where the
# table gives tau or merge_rounds.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The FedLoRU authors' code (github.com/haemPark/fedloru_official), where it differs from the
    # paper's text: zero base weights with both factors Kaiming-uniform (keep_original_weights=False),
    # BatchNorm without running statistics (freeze_bn), dropout 0.1 between the factors, SGD with
    # weight decay 1e-4 and gradient clipping at norm 0.1, momentum merges (--accumulate) every 50
    # rounds evaluated before the merge, and FedHM's own factorisation (split_conv).
    "fedloru-code": {
        "task": {"batchnorm": "batch"},
        "client": {"weight_decay": 1e-4, "grad_clip": 0.1},
        "algorithm": {
            "base_init": "zero",
            "factor_dropout": 0.1,
            "reinit": "momentum",
            "tau": 50,
            "eval_before_merge": True,
            "factorization": "code",
        },
    },
}
_PRESET_SECTIONS = ("task", "client")  # the sections a preset fills besides the algorithm tables


def _check_preset(name: object) -> dict[str, dict[str, Any]]:
    if not isinstance(name, str) or (name and name not in PRESETS):
        raise _bad("preset", name, f"must be one of {', '.join(PRESETS)} (or \"\" for none)")
    return PRESETS.get(name, {})


def preset_algorithm_options(name: str, algorithm: str, options: dict | None = None) -> dict:
    """``options`` (an algorithm's table, without ``name``) with preset ``name``'s algorithm
    keys filled in where the algorithm has that option and the table does not set it (the
    merge schedule ``tau`` only where neither ``tau`` nor ``merge_rounds`` is set). An unknown
    algorithm gets nothing (its name is checked elsewhere)."""
    from rankfed.algorithms import ALGORITHMS

    out = dict(options or {})
    preset = _check_preset(name).get("algorithm", {})
    cls = ALGORITHMS.get(algorithm)
    if cls is None:
        return out
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in preset.items():
        if key not in fields or key in out or (key == "tau" and "merge_rounds" in out):
            continue
        out[key] = copy.deepcopy(value)
    return out


def apply_preset(data: dict, name: str | None = None) -> dict:
    """A parsed experiment document with preset ``name`` (default: the document's own top-level
    ``preset`` key) filled in: its [task] and [client] keys and, in [algorithm], the keys of
    :func:`preset_algorithm_options`, wherever the document does not set them. Returns a new
    document (``data`` is not changed) that keeps the ``preset`` key; [algorithms.<label>]
    variants get the preset when they are built (:meth:`ExperimentConfig.variant`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment must be a table of sections, got {type(data).__name__}")
    name = data.get("preset", "") if name is None else name
    preset = _check_preset(name)
    out = dict(data)
    if not name:
        return out
    out["preset"] = name
    for section in _PRESET_SECTIONS:
        table = out.get(section, {})
        if isinstance(table, dict):  # (a bad one is reported by parse_config)
            out[section] = {**copy.deepcopy(preset.get(section, {})), **table}
    algo = out.get("algorithm", {})
    if isinstance(algo, dict):
        algo_name = algo.get("name", "fedavg")
        options = {k: v for k, v in algo.items() if k != "name"}
        out["algorithm"] = {**({"name": algo_name} if "name" in algo else {}), **preset_algorithm_options(name, algo_name if isinstance(algo_name, str) else "", options)}
    return out


def is_import_path(name: str) -> bool:
    """Whether a task name is user code (``"package.module:name"``) rather than a built-in name."""
    return ":" in name


def _check_import_path(key: str, value: str) -> None:
    module, _, attr = value.partition(":")
    if not module or not attr or any(not part.isidentifier() for part in [*module.split("."), *attr.split(".")]):
        raise _bad(key, value, "must be a built-in name or an import path 'package.module:name'")


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
    model: str = ""  # "" = the dataset's reference model; or an import path "package.module:Class"
    init_weights: str = ""  # a state-dict file (torch.save) to start from, e.g. a centrally pretrained model
    dataset_options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)
    loss: str = ""  # "" = cross-entropy; or an import path of a loss(output, target) -> scalar
    metrics: dict = field(default_factory=dict)  # {name = "package.module:fn"}: fn(outputs, targets) -> float
    python_path: list = field(default_factory=list)  # folders the import paths are imported from
    # PEFT adapters put on the model: a peft.LoraConfig's keywords ({r = 8, lora_alpha = 16,
    # target_modules = ["c_attn"]}); {} = none (the model as its factory builds it)
    adapters: dict = field(default_factory=dict)
    # "running": BatchNorm as the model builds it (running statistics at evaluation);
    # "batch": no running statistics, batch statistics in training and at evaluation
    # (rankfed.models.batch_stats_only, the FedLoRU/FedHM code's models), for every algorithm
    batchnorm: str = "running"

    def __post_init__(self) -> None:
        from rankfed.data import DATASETS, PARTITIONS

        if is_import_path(self.dataset):
            _check_import_path("task.dataset", self.dataset)
        else:
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
        if is_import_path(self.model):
            _check_import_path("task.model", self.model)
        elif self.model:
            from rankfed.models import MODELS

            _choice("task.model", self.model, MODELS)
        if is_import_path(self.dataset) and not self.model:
            raise _bad("task.model", self.model, f"a dataset of your own ({self.dataset}) needs a model: give task.model (a built-in name or an import path)")
        if self.loss:
            _check_import_path("task.loss", self.loss)
        for name, path in self.metrics.items():
            if not isinstance(path, str):
                raise _bad(f"task.metrics.{name}", path, "must be an import path 'package.module:fn'")
            _check_import_path(f"task.metrics.{name}", path)
        if not all(isinstance(p, str) for p in self.python_path):
            raise _bad("task.python_path", self.python_path, "must be a list of folders")
        from rankfed.models import BATCHNORMS

        _choice("task.batchnorm", self.batchnorm, BATCHNORMS)


@dataclass
class FederationConfig(RunOptions):
    """Who takes part and how often: :class:`~rankfed.server.RunOptions` plus the clients, the
    fraction sampled each round, the seed and the device."""

    clients: int = 10
    participation: float = 1.0  # fraction of clients sampled each round
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    # torch intra-op threads for the run; 0 = the cores available to the process (results
    # depend on the thread count: the summary records it)
    threads: int = 0
    # experiment trackers told of every round: "tensorboard", "mlflow" (pip install 'rankfed[tracking]')
    loggers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clients < 1:
            raise _bad("federation.clients", self.clients, "must be >= 1")
        if not 0 < self.participation <= 1:
            raise _bad("federation.participation", self.participation, "must be in (0, 1]")
        if not 0 <= self.seed <= _MAX_SEED:  # NumPy's legacy seeding and scikit-learn take 32-bit seeds
            raise _bad("federation.seed", self.seed, f"must be in [0, {_MAX_SEED}]")
        _choice("federation.device", self.device, ("cpu", "cuda", "auto"))
        if self.threads < 0:
            raise _bad("federation.threads", self.threads, "must be >= 1 (0: the cores available to the process)")
        from rankfed.tracking import LOGGERS

        for name in self.loggers:
            _choice("federation.loggers", name, sorted(LOGGERS))

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.participation * self.clients))

    def run_options(self) -> dict:
        """The keywords of :meth:`rankfed.Federation.run` (the RunOptions fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)}


@dataclass
class AlgorithmConfig:
    """The algorithm's name and its own options (checked by the algorithm)."""

    name: str = "fedavg"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from rankfed.algorithms import ALGORITHMS

        _choice("algorithm.name", self.name, sorted(ALGORITHMS))
        # The algorithm's class checks keys and values now; keep them with every default
        # filled in, so a resolved config reads back equal.
        self.options = ALGORITHMS[self.name].from_options(self.options, section="algorithm").to_options()

    def build(self):
        """The algorithm object (``rf.MAPA(k=...)``)."""
        from rankfed.algorithms import ALGORITHMS

        return ALGORITHMS[self.name].from_options(self.options, section="algorithm")


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
    client: LocalTraining = field(default_factory=LocalTraining)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    # variants for `rankfed compare`, by label: {"mapa": {"k": 64}, "fedavg+qsgd": {"name": "fedavg", "compressor": "qsgd"}}
    algorithms: dict = field(default_factory=dict)
    # the preset the file named ("" = none): already filled into task, client and algorithm;
    # a variant's algorithm gets its algorithm keys when it is built (see variant)
    preset: str = ""

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        for label, opts in self.algorithms.items():
            if not isinstance(opts, dict):
                raise _bad(f"algorithms.{label}", opts, "must be a table of options")
            self.variant(label)  # checks the algorithm name and its options
            self.variant_client(label)  # and the client overrides

    def variant(self, label: str) -> AlgorithmConfig:
        """The algorithm and options a label stands for: an [algorithms.<label>] table (its
        ``name`` key, default the label, and its options); else the algorithm of that name
        with the [algorithm] options if it is the one there, defaults otherwise. The preset's
        algorithm keys fill in what a table or the defaults leave unset."""
        from rankfed.algorithms import ALGORITHMS

        if label in self.algorithms:
            opts = dict(self.algorithms[label])
            name = opts.pop("name", label)
            opts.pop("client", None)  # client overrides: see with_algorithm
            if name not in ALGORITHMS:
                raise _bad(f"algorithms.{label}.name" if label != name else "algorithms", name, f"must be one of {', '.join(sorted(ALGORITHMS))}")
            opts = preset_algorithm_options(self.preset, name, opts)
            ALGORITHMS[name].from_options(opts, section=f"algorithms.{label}")
            return AlgorithmConfig(name=name, options=opts)
        if label not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm or variant {label!r}; algorithms: {', '.join(sorted(ALGORITHMS))}; variants: {', '.join(self.algorithms) or 'none'}")
        # the [algorithm] table's options already hold the preset's keys
        opts = dict(self.algorithm.options) if label == self.algorithm.name else preset_algorithm_options(self.preset, label)
        return AlgorithmConfig(name=label, options=opts)

    def with_algorithm(self, label: str) -> ExperimentConfig:
        """The same experiment run with another algorithm or variant (see :meth:`variant`).
        A variant's ``client`` table overrides [client] keys (a learning rate tuned per method)."""
        return dataclasses.replace(self, algorithm=self.variant(label), client=self.variant_client(label))

    def variant_client(self, label: str) -> LocalTraining:
        """[client] with the variant's ``client`` table applied over it."""
        overrides = self.algorithms.get(label, {}).get("client", {})
        if not isinstance(overrides, dict):
            raise _bad(f"algorithms.{label}.client", overrides, "must be a table of [client] keys")
        if not overrides:
            return self.client
        overrides = {CLIENT_ALIASES.get(k, k): v for k, v in overrides.items()}
        try:
            return from_mapping(LocalTraining, {**self.client.describe(), **overrides}, f"algorithms.{label}.client")
        except ConfigError as e:  # a value check names "client.x": point at the variant's table
            msg = str(e)
            raise ConfigError(f"algorithms.{label}.{msg}" if msg.startswith("client.") else msg) from None


_SECTIONS = {
    "task": TaskConfig,
    "federation": FederationConfig,
    "client": LocalTraining,
    "flower": FlowerConfig,
}
_ALIASES = {"client": CLIENT_ALIASES}


def parse_config(data: dict) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a parsed TOML document (its ``preset``, if any,
    filled in first: :func:`apply_preset`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment must be a table of sections, got {type(data).__name__}")
    data = apply_preset(data)
    known = {*_SECTIONS, "algorithm", "algorithms"}
    for key in data:
        if key == "preset":
            continue
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (sections: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown section [{key}]{hint}")
    parts = {name: from_mapping(cls, data.get(name, {}), name, _ALIASES.get(name)) for name, cls in _SECTIONS.items()}
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
        preset=data.get("preset", ""),
    )


def _parse_value(text: str) -> Any:
    """A --set value: a TOML literal if it parses as one, else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (and ``preset=name``) to a parsed TOML document
    (in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        if keys == ["preset"]:  # the one top-level key
            data["preset"] = _parse_value(text.strip())
            continue
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
    """Read an experiment file (or the defaults when ``path`` is None) and apply overrides.

    ``task.python_path`` entries and ``task.data_dir`` are made absolute against the file's
    folder (a ``--set task.data_dir`` stays relative to the working directory); a file that
    names user code by import path and gives no ``python_path`` imports it from its own
    folder (recorded in the resolved config, so a resumed run finds it again)."""
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
        _resolve_data_dir(data, p.resolve().parent)  # the file's own; a --set one is the caller's (cwd)
    apply_overrides(data, overrides or [])
    if path is not None:
        _resolve_python_path(data, Path(path).resolve().parent)
    return parse_config(data)


def _resolve_data_dir(data: dict, folder: Path) -> None:
    """A relative ``task.data_dir`` in an experiment file is relative to the file's folder."""
    task = data.get("task")
    if isinstance(task, dict) and isinstance(task.get("data_dir"), str) and task["data_dir"]:
        d = Path(task["data_dir"]).expanduser()
        if not d.is_absolute():
            task["data_dir"] = str((folder / d).resolve())


def _resolve_python_path(data: dict, folder: Path) -> None:
    task = data.get("task")
    if not isinstance(task, dict):
        return
    paths = task.get("python_path")
    if isinstance(paths, list):
        task["python_path"] = [str((folder / p).resolve()) if isinstance(p, str) else p for p in paths]
        return
    metrics = task.get("metrics")
    names = [task.get("model"), task.get("dataset"), task.get("loss"), *(metrics.values() if isinstance(metrics, dict) else [])]
    if paths is None and any(isinstance(n, str) and is_import_path(n) for n in names):
        task["python_path"] = [str(folder)]


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved configuration as a TOML-ready document (algorithm options inlined)."""
    out = {name: (getattr(cfg, name).describe() if name == "client" else dataclasses.asdict(getattr(cfg, name))) for name in _SECTIONS}
    defence_keys = [f.name for f in dataclasses.fields(Defences)]  # RunOptions' base: after the keys of a run
    out["federation"] = {**{k: v for k, v in out["federation"].items() if k not in defence_keys}, **{k: out["federation"][k] for k in defence_keys}}
    out["algorithm"] = {"name": cfg.algorithm.name, **cfg.algorithm.build().to_options()}
    if cfg.algorithms:
        out["algorithms"] = cfg.algorithms
    if cfg.preset:  # every key it set is written out above; kept to say where they came from
        out = {"preset": cfg.preset, **out}
    return out


def to_toml(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))
