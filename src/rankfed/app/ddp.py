"""``rankfed ddp CONFIG``: data-parallel training of an experiment file's task and model.

The experiment's ``[task]`` gives the data and model (a built-in dataset; its whole training
split is sharded IID over the workers), ``[client]`` the optimiser, learning rate and batch
size per worker, ``task.loss`` the loss; the workers are :func:`rankfed.ddp.runner.run_ddp`'s.
"""

from __future__ import annotations

import os
from functools import partial

from rankfed.app.config import ExperimentConfig, is_import_path, to_toml
from rankfed.app.experiment import DEFAULT_MODELS, _load, load_task_data, model_factory
from rankfed.ddp.runner import DdpOptions, run_ddp
from rankfed.errors import ConfigError

__all__ = ["run_ddp_config"]


def _tensors(cfg: ExperimentConfig):
    """((train_x, train_y), (test_x, test_y)) of the experiment's dataset (in each worker)."""
    ds = load_task_data(cfg)
    return (ds.train_x, ds.train_y), (ds.test_x, ds.test_y)


def run_ddp_config(cfg: ExperimentConfig, opts: DdpOptions, out_dir: str | os.PathLike, *, overwrite: bool = False, command: str | None = None) -> dict:
    """Run ``cfg`` data-parallel with ``opts``; the summary (also in ``out_dir/summary.json``)."""
    if is_import_path(cfg.task.dataset):
        raise ConfigError(f"rankfed ddp trains on a built-in dataset's training split; task.dataset = {cfg.task.dataset!r} is a dataset of your own (use rankfed.ddp.runner.run_ddp from Python)")
    ds = load_task_data(cfg)  # fail here, with one clear error, if the data is missing
    loss = _load(cfg, cfg.task.loss, "task.loss") if cfg.task.loss else None
    info = {"dataset": cfg.task.dataset, "model": cfg.task.model or DEFAULT_MODELS[cfg.task.dataset]}
    return run_ddp(
        model_factory(cfg, ds.input_shape, ds.num_classes), partial(_tensors, cfg), opts, out_dir,
        local=cfg.client, loss=loss, seed=cfg.federation.seed, overwrite=overwrite, command=command, config_text=to_toml(cfg), info=info,
    )  # fmt: skip
