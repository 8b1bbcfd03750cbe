"""``rankfed ddp CONFIG``: data-parallel training of an experiment file's task and model.

The experiment's ``[task]`` gives the data and model (a built-in dataset; its whole training
split is sharded IID over the workers), ``[client]`` the optimiser, learning rate and batch
size per worker, ``task.loss`` the loss; the workers are :func:`rankfed.ddp.runner.run_ddp`'s.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from rankfed.app.config import ExperimentConfig, is_import_path, to_toml
from rankfed.app.experiment import DEFAULT_MODELS, _load, load_task_data, model_factory
from rankfed.ddp.runner import DdpOptions, read_resume_point, run_ddp
from rankfed.errors import ConfigError

__all__ = ["run_ddp_config", "resume_options"]


def _tensors(cfg: ExperimentConfig):
    """((train_x, train_y), (test_x, test_y)) of the experiment's dataset (in each worker)."""
    ds = load_task_data(cfg)
    return (ds.train_x, ds.train_y), (ds.test_x, ds.test_y)


def run_ddp_config(
    cfg: ExperimentConfig, opts: DdpOptions, out_dir: str | os.PathLike, *, overwrite: bool = False, command: str | None = None, resume: bool = False, stop_after: int | None = None
) -> dict:
    """Run ``cfg`` data-parallel with ``opts``; the summary (also in ``out_dir/summary.json``).
    ``resume``: continue the run in ``out_dir`` from its last resume point (``cfg`` and ``opts``
    as it was started with: :func:`resume_options` reads them back); ``stop_after``: as
    :func:`~rankfed.ddp.runner.run_ddp`'s."""
    if is_import_path(cfg.task.dataset):
        raise ConfigError(f"rankfed ddp trains on a built-in dataset's training split; task.dataset = {cfg.task.dataset!r} is a dataset of your own (use rankfed.ddp.runner.run_ddp from Python)")
    ds = load_task_data(cfg)  # fail here, with one clear error, if the data is missing
    loss = _load(cfg, cfg.task.loss, "task.loss") if cfg.task.loss else None
    info = {"dataset": cfg.task.dataset, "model": cfg.task.model or DEFAULT_MODELS[cfg.task.dataset]}
    return run_ddp(
        model_factory(cfg, ds.input_shape, ds.num_classes), partial(_tensors, cfg), opts, out_dir,
        local=cfg.client, loss=loss, seed=cfg.federation.seed, overwrite=overwrite, command=command, config_text=to_toml(cfg), info=info, resume=resume, stop_after=stop_after,
    )  # fmt: skip


def resume_options(run_dir: str | os.PathLike) -> tuple[ExperimentConfig, DdpOptions]:
    """The experiment and the :class:`DdpOptions` a ``rankfed ddp`` run folder was started with
    (its config.toml and its last resume point), to continue it with :func:`run_ddp_config`."""
    from rankfed.app.config import load_config

    saved = read_resume_point(run_dir)  # first: the clearer error for a finished or unsaved run
    path = Path(run_dir) / "config.toml"
    if not path.read_text(encoding="utf-8").strip():
        raise ConfigError(f"{str(run_dir)!r} was started from Python (rankfed.ddp.runner.run_ddp, no experiment file): resume it from your script with run_ddp(..., resume=True)")
    cfg = load_config(path)
    return cfg, DdpOptions(**saved["options"])
