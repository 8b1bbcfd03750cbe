"""From an experiment file to a :class:`rankfed.Federation`: the CLI builds what a script would.

The built-in datasets are loaded (:func:`rankfed.data.load_dataset`), optionally subsampled,
and split over ``federation.clients`` clients by ``task.partition``; the model is the
built-in one of that name (or the dataset's reference model), seeded with
``federation.seed``. User code comes by import path: ``task.model = "pkg.nets:TinyResNet"``
(called with ``task.model_options``), ``task.dataset = "pkg.data:load_clients"`` (called with
``task.dataset_options``, and ``seed`` / ``num_clients`` when it takes them; it returns
``(clients, test)`` as :class:`rankfed.Federation` takes them), ``task.loss``, ``task.metrics``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rankfed.app.config import ExperimentConfig, is_import_path, to_toml
from rankfed.checks import accepts_keyword, load_object
from rankfed.data import ClientData, Dataset, federate, load_dataset
from rankfed.errors import ConfigError
from rankfed.federation import Federation, Result
from rankfed.models import batch_stats_only, build_model
from rankfed.server import Experiment
from rankfed.sim import Simulator

__all__ = ["federation_from_config", "build_experiment", "run_config", "run_experiment", "load_task_data", "task_data", "model_factory", "DEFAULT_MODELS", "subsample_train", "load_init_weights"]

# The reference model of each dataset (the papers' choices where they have one).
DEFAULT_MODELS = {
    "digits": "mlp",
    "mnist1d": "mlp",
    "synthetic": "logreg",
    "fmnist": "cnn2",
    "mnist": "cnn2",
    "kmnist": "cnn2",
    "cifar10": "cnn3",
    "cifar100": "wrn16_4",
    "shakespeare": "char_lstm",
}


def _load(cfg: ExperimentConfig, path: str, key: str):
    return load_object(path, key, cfg.task.python_path)


def load_task_data(cfg: ExperimentConfig) -> Dataset:
    """A built-in dataset of an experiment (not subsampled, not split)."""
    task, fed = cfg.task, cfg.federation
    if is_import_path(task.dataset):
        raise ConfigError(f"task.dataset = {task.dataset!r} is a dataset of your own: it has no train/test tensors to load as a whole")
    opts = dict(task.dataset_options)
    if task.dataset == "synthetic":
        opts.setdefault("num_devices", fed.clients)
    return load_dataset(task.dataset, task.data_dir or None, seed=fed.seed, **opts)


def subsample_train(ds: Dataset, n: int, *, seed: int) -> Dataset:
    """The dataset with a seeded random ``n`` of its training samples (test split untouched)."""
    total = len(ds.train_y)
    if n > total:
        raise ConfigError(f"task.train_samples = {n}: the {ds.name} training split has only {total} samples")
    if n == total:
        return ds
    idx = np.sort(np.random.default_rng([seed, 0x5AB5]).choice(total, size=n, replace=False))
    t = torch.from_numpy(idx)
    return dataclasses.replace(ds, train_x=ds.train_x[t], train_y=ds.train_y[t], groups=None if ds.groups is None else ds.groups[idx])


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Load a state dict saved with ``torch.save`` (tensors only: ``weights_only``) into ``model``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"task.init_weights = {path!r}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise ConfigError(f"task.init_weights = {path!r}: not a readable state-dict file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"task.init_weights = {path!r}: holds a {type(state).__name__}, not a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"task.init_weights = {path!r}: does not fit the model ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"task.init_weights = {path!r}: does not fit the model (missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})")


def _finish_model(model: torch.nn.Module, init_weights: str, batchnorm: str) -> torch.nn.Module:
    if init_weights:  # first: a saved model's running statistics load, then go with batchnorm = "batch"
        load_init_weights(model, init_weights)
    if batchnorm == "batch":
        batch_stats_only(model)
    return model


def _built_model(name: str, input_shape: tuple, num_classes: int, options: dict, init_weights: str, batchnorm: str = "running") -> torch.nn.Module:
    try:
        model = build_model(name, tuple(input_shape), num_classes, **options)
    except (ValueError, TypeError) as e:  # ModelOptionError included: name the option at fault
        text = str(e)
        keys = [k for k in options if f"'{k}'" in text or f"option {k} " in text]
        if not keys:
            raise
        raise ConfigError(f"task.model_options.{keys[0]}: {text}") from None
    return _finish_model(model, init_weights, batchnorm)


def _user_model(factory, options: dict, init_weights: str, key: str, batchnorm: str = "running") -> torch.nn.Module:
    try:
        model = factory(**options)
    except TypeError as e:
        text = str(e)
        keys = [k for k in options if f"'{k}'" in text]  # "got an unexpected keyword argument 'x'"
        where = f"task.model_options.{keys[0]}" if keys else "task.model_options"
        raise ConfigError(f"{key}: calling it with {where} ({options!r}) failed: {text}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{key}: returned a {type(model).__name__}, not an nn.Module")
    return _finish_model(model, init_weights, batchnorm)


def model_factory(cfg: ExperimentConfig, input_shape: tuple | None = None, num_classes: int | None = None):
    """A picklable factory of the experiment's model (built-in: for data of ``input_shape`` and
    ``num_classes``), for :class:`Federation` (which seeds it) and data-parallel workers. With
    ``task.batchnorm = "batch"`` its BatchNorm layers keep no running statistics
    (:func:`rankfed.models.batch_stats_only`), whatever the algorithm."""
    task = cfg.task
    if is_import_path(task.model):
        return partial(_user_model, _load(cfg, task.model, "task.model"), dict(task.model_options), task.init_weights, f"task.model = {task.model!r}", task.batchnorm)
    name = task.model or DEFAULT_MODELS[task.dataset]
    return partial(_built_model, name, tuple(input_shape), num_classes, dict(task.model_options), task.init_weights, task.batchnorm)


def task_data(cfg: ExperimentConfig, dataset: Dataset | None = None) -> tuple[list, object, dict]:
    """The experiment's clients, test data and what the summary says of them (dataset, partition,
    and for built-in data input_shape / num_classes)."""
    task, fed = cfg.task, cfg.federation
    if is_import_path(task.dataset):
        loader = _load(cfg, task.dataset, "task.dataset")
        kwargs = dict(task.dataset_options)
        if accepts_keyword(loader, "seed"):
            kwargs.setdefault("seed", fed.seed)
        if accepts_keyword(loader, "num_clients"):
            kwargs.setdefault("num_clients", fed.clients)
        try:
            got = loader(**kwargs)
        except TypeError as e:
            raise ConfigError(f"task.dataset = {task.dataset!r}: calling it with {kwargs!r} failed: {e}") from None
        if not isinstance(got, tuple) or len(got) != 2:
            raise ConfigError(f"task.dataset = {task.dataset!r}: must return (clients, test), got {type(got).__name__}")
        clients, test = got
        if len(clients) != fed.clients:
            raise ConfigError(f"federation.clients = {fed.clients}: task.dataset = {task.dataset!r} returned {len(clients)} clients; set federation.clients = {len(clients)}")
        return list(clients), test, {"dataset": task.dataset, "partition": "given"}
    ds = dataset if dataset is not None else load_task_data(cfg)
    if task.train_samples:
        ds = subsample_train(ds, task.train_samples, seed=fed.seed)
    n_train = len(ds.train_y)
    if fed.clients > n_train:
        raise ConfigError(f"federation.clients = {fed.clients}: more clients than training samples ({n_train})")
    clients: list[ClientData] = federate(ds, fed.clients, task.partition, seed=fed.seed, holdout=task.holdout, alpha=task.alpha, classes_per_client=task.classes_per_client)
    info = {"dataset": task.dataset, "partition": task.partition, "input_shape": tuple(ds.input_shape), "num_classes": ds.num_classes}
    return clients, (ds.test_x, ds.test_y), info


class _LazyData:
    """An experiment's clients and test data, loaded on first use (a Flower SuperNode that has
    its clients' tensors cached never loads the dataset again)."""

    def __init__(self, cfg: ExperimentConfig, dataset: Dataset | None):
        self.cfg, self.dataset, self._parts = cfg, dataset, None

    def parts(self):
        if self._parts is None:
            self._parts = task_data(self.cfg, self.dataset)
        return self._parts

    def test(self):
        return self.parts()[1]


class _LazyClients(Sequence):
    def __init__(self, data: _LazyData, n: int):
        self._data, self._n = data, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._data.parts()[0][i]


def federation_from_config(cfg: ExperimentConfig, dataset: Dataset | None = None, shapes: tuple | None = None) -> Federation:
    """The :class:`Federation` an experiment file describes (``dataset``: one already loaded).
    With ``shapes`` (the built-in dataset's input shape and class count, known from an earlier
    load), the data is read only when first used."""
    task = cfg.task
    if shapes is not None and not is_import_path(task.dataset):
        lazy = _LazyData(cfg, dataset)
        clients, test = _LazyClients(lazy, cfg.federation.clients), lazy.test
        info = {"dataset": task.dataset, "partition": task.partition, "input_shape": tuple(shapes[0]), "num_classes": int(shapes[1])}
    else:
        clients, test, info = task_data(cfg, dataset)
    factory = model_factory(cfg, info.get("input_shape"), info.get("num_classes"))
    info["model"] = task.model or DEFAULT_MODELS[task.dataset]
    loss = _load(cfg, task.loss, "task.loss") if task.loss else None
    metrics = {name: _load(cfg, path, f"task.metrics.{name}") for name, path in task.metrics.items()}
    holdout = task.holdout if is_import_path(task.dataset) else 0.0  # built-in data: federate() held it out
    return Federation(
        factory, clients, test, algorithm=cfg.algorithm.build(), local=cfg.client, loss=loss, metrics=metrics,
        seed=cfg.federation.seed, device=cfg.federation.device, holdout=holdout, adapters=lora_config(task.adapters),
        info=info, config_text=to_toml(cfg),
    )  # fmt: skip


def lora_config(table: dict):
    """The ``peft.LoraConfig`` of a ``task.adapters`` table (None for an empty one); an unknown
    key or a value PEFT refuses is a ConfigError naming ``task.adapters``."""
    if not table:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("task.adapters needs PEFT: pip install 'rankfed[hf]'") from None
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"task.adapters.{unknown[0]}: not a peft.LoraConfig option (r, lora_alpha, target_modules, lora_dropout, fan_in_fan_out, ...)")
    try:
        return LoraConfig(**table)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"task.adapters = {table!r}: {e}") from None


def run_config(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False, on_round=None, dataset: Dataset | None = None, command: str | None = None, resume: bool = False, callbacks=()) -> Result:
    """Run an experiment in the simulator (what ``rankfed run`` does); write ``out_dir`` if given.
    ``federation.loggers`` add their trackers to ``callbacks``."""
    from rankfed.tracking import make_loggers

    if out_dir is not None and not resume:
        from rankfed.server import RunFolder

        RunFolder.check_writable(out_dir, overwrite)  # before the (slow) data loading: refuse early
    trackers = [*make_loggers(cfg.federation.loggers), *callbacks]
    fed = federation_from_config(cfg, dataset)
    return fed.run(cfg.federation.rounds, cfg.federation.clients_per_round, out_dir, overwrite=overwrite, resume=resume, on_round=on_round, command=command, callbacks=trackers, threads=cfg.federation.threads, **_run_options(cfg))


def _run_options(cfg: ExperimentConfig) -> dict:
    opts = cfg.federation.run_options()
    opts.pop("rounds")
    return opts


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None, **kwargs) -> dict:
    """:func:`run_config`'s summary (the ``summary.json`` dict)."""
    return run_config(cfg, out_dir, **kwargs).summary


@dataclasses.dataclass
class FileExperiment(Experiment):
    """An experiment file resolved for a transport: the :class:`rankfed.server.Experiment`, plus
    the config it came from and (built-in data) the loaded dataset."""

    cfg: ExperimentConfig | None = None
    dataset: Dataset | None = None

    def simulator(self) -> Simulator:
        """An in-process simulator of it (``run_round(r)`` by hand)."""
        return Simulator(self)


def build_experiment(cfg: ExperimentConfig, dataset: Dataset | None = None) -> FileExperiment:
    """The experiment file resolved for a transport: data split, seeded model, algorithm."""
    if dataset is None and not is_import_path(cfg.task.dataset):
        dataset = load_task_data(cfg)
    exp = federation_from_config(cfg, dataset).experiment(cfg.federation.rounds, cfg.federation.clients_per_round, **_run_options(cfg))
    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(Experiment)}
    return FileExperiment(**fields, cfg=cfg, dataset=dataset)
