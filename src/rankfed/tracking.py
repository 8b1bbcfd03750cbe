"""Experiment tracking: TensorBoard and MLflow loggers, as run callbacks.

Pass them to a run, ``fed.run(..., callbacks=[TensorBoardLogger(), MLflowLogger()])``, or name
them in an experiment file, ``[federation] loggers = ["tensorboard", "mlflow"]``. Both need the
``tracking`` extra (``pip install 'rankfed[tracking]'``). Write your own by subclassing
:class:`Callback`.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rankfed.errors import ConfigError
from rankfed.server import CLIENT_STATE_DIR, RESUME_FILE, Experiment, RoundRecord

__all__ = ["Callback", "TensorBoardLogger", "MLflowLogger", "LOGGERS", "make_loggers", "round_scalars"]

_INSTALL = "pip install 'rankfed[tracking]'"


def _need(module: str, logger: str, package: str):
    """Import ``module`` for the logger named ``logger``, or say how to install ``package``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"federation.loggers = [{logger!r}] needs {package}: {_INSTALL}") from None


class Callback:
    """What a run tells a tracker; every method does nothing unless overridden.

    * ``on_run_start(exp, path, start_round)``: the run (a :class:`rankfed.server.Experiment`)
      is about to run round ``start_round`` (1, or k + 1 when resuming after round k);
      ``path`` is its run folder (None without one).
    * ``on_round(record)``: a round finished (a :class:`rankfed.server.RoundRecord`; its
      ``accuracy`` and ``loss`` are None on rounds not evaluated).
    * ``on_run_end(summary, path)``: the run ended and its folder is final; ``summary`` is
      summary.json, its ``status`` one of completed, diverged, failed, interrupted (the last
      two hold only ``status`` and ``error``).
    """

    def on_run_start(self, exp: Experiment, path: Path | None, start_round: int) -> None:
        pass

    def on_round(self, record: RoundRecord) -> None:
        pass

    def on_run_end(self, summary: dict, path: Path | None) -> None:
        pass


def _name(key: str) -> str:
    """``key`` as a metric or parameter name MLflow accepts (other characters become ``_``)."""
    return re.sub(r"[^/\w.\- ]", "_", key)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The scalars both loggers write for a round, by name (None and non-finite values left out)."""
    values: dict[str, Any] = {"accuracy": record.accuracy, "loss": record.loss}
    values |= {_name(f"metrics/{k}"): v for k, v in (record.metrics or {}).items()}
    values |= {
        "personal_accuracy": record.personal_accuracy,
        "train_loss": record.train_loss,
        "bytes/uplink": record.uplink_bytes,
        "bytes/downlink": record.downlink_bytes,
        "bytes/cum_uplink": record.cum_uplink_bytes,
        "bytes/cum_downlink": record.cum_downlink_bytes,
        "bytes/cum_total": record.cum_uplink_bytes + record.cum_downlink_bytes,
        "time/round_s": record.round_s,
        "time/wall_s": record.wall_s,
    }
    return {k: x for k, v in values.items() if (x := _number(v)) is not None}


def _algorithm_name(exp: Experiment) -> str:
    return str(getattr(exp.algorithm, "name", type(exp.algorithm).__name__))


class TensorBoardLogger(Callback):
    """Each round's scalars as TensorBoard events (``global_step`` = the round).

    Args:
        log_dir: where the event files go; default the run folder's ``tensorboard/`` (without a
            run folder, ``./runs/tensorboard/<algorithm>-<time>``).

    Writes ``accuracy``, ``loss``, ``metrics/<name>``, ``personal_accuracy``, ``train_loss``,
    ``bytes/uplink``, ``bytes/downlink``, ``bytes/cum_uplink``, ``bytes/cum_downlink``,
    ``bytes/cum_total``, ``time/round_s`` and ``time/wall_s`` (where a round has them), and the
    experiment file as the text ``config``. A resumed run replaces the steps after its resume
    point. View with ``tensorboard --logdir <dir>``.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self._tb = _need("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer = None
        self.path: Path | None = None  # the folder of the current (or last) run's events

    def on_run_start(self, exp: Experiment, path: Path | None, start_round: int) -> None:
        self._close()
        if self.log_dir is not None:
            where = self.log_dir
        elif path is not None:
            where = Path(path) / "tensorboard"
            if start_round <= 1:  # a run folder started over (overwrite): its old events go
                for old in where.glob("events.out.tfevents.*"):
                    old.unlink()
        else:
            where = Path("runs") / "tensorboard" / f"{_algorithm_name(exp)}-{time.strftime('%Y%m%d-%H%M%S')}"
        where.mkdir(parents=True, exist_ok=True)
        fresh = not any(where.glob("events.out.tfevents.*"))
        self.path = where
        self.writer = self._tb.SummaryWriter(str(where), purge_step=start_round if start_round > 1 else None)
        if fresh and exp.config_text:
            self.writer.add_text("config", "```toml\n" + exp.config_text.rstrip("\n") + "\n```", global_step=0)
            self.writer.flush()

    def on_round(self, record: RoundRecord) -> None:
        if self.writer is None:
            return
        for name, value in round_scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record.round)
        self.writer.flush()

    def on_run_end(self, summary: dict, path: Path | None) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(table: Mapping, prefix: str = "") -> dict[str, str]:
    """A parsed TOML table as ``{"section.key": str(value)}`` (an empty table as ``"{}"``)."""
    out: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= _flatten(value, name + ".")
        else:
            out[name] = "{}" if isinstance(value, Mapping) else str(value)
    return out


def _config_params(text: str) -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return _flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        return {}


def _default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_END_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflowLogger(Callback):
    """Each run as an MLflow run: parameters, per-round metrics, the run folder as artifacts.

    Args:
        tracking_uri: the MLflow store or server (``http://host:5000``, ``sqlite:///path.db``,
            ``databricks``); default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
            with artifacts in ``<cwd>/mlruns`` (MLflow's own default: a local store that needs
            no server; the file store ``./mlruns`` is refused by MLflow 3.13 and later). The
            SQLite store needs sqlalchemy and alembic, which the ``tracking`` extra brings.
        experiment: the MLflow experiment (made if missing).
        run_name: the MLflow run's name; default the run folder's name (else the algorithm's).

    Parameters: the experiment file, flattened to ``section.key``. Metrics: the names
    :class:`TensorBoardLogger` writes, ``step`` = the round. Tags: ``rankfed.algorithm``,
    ``rankfed.run_folder``, ``rankfed.status`` and, for a resumed run (a new MLflow run),
    ``rankfed.resumed_from_round``. At the end the run folder is logged as artifacts (without
    resume.pt and client-state/) and the run set FINISHED (completed, diverged), FAILED or
    KILLED (interrupted). Uses its own ``MlflowClient``, not mlflow's global active run.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "rankfed", run_name: str | None = None):
        self._mlflow = _need("mlflow", "mlflow", "mlflow (mlflow-skinny)")
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()
        if self.tracking_uri.startswith("sqlite:"):
            for module in ("sqlalchemy", "alembic"):
                _need(module, "mlflow", f"{module} for the local MLflow store {self.tracking_uri}")
        self.experiment, self.run_name = experiment, run_name
        self.client = None
        self.run_id: str | None = None  # the current (or last) run's MLflow run id

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except self._mlflow.exceptions.MlflowException:  # made meanwhile by a parallel run
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def on_run_start(self, exp: Experiment, path: Path | None, start_round: int) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if self.client is None:
            self.client = self._mlflow.MlflowClient(self.tracking_uri)
        algorithm = _algorithm_name(exp)
        tags = {"rankfed.algorithm": algorithm}
        if path is not None:
            tags["rankfed.run_folder"] = str(Path(path).resolve())
        if start_round > 1:
            tags["rankfed.resumed_from_round"] = str(start_round - 1)
        name = self.run_name or (Path(path).name if path is not None else algorithm)
        run = self.client.create_run(self._experiment_id(), run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(_name(k)[:250], v[:MAX_PARAM_VAL_LENGTH]) for k, v in _config_params(exp.config_text).items()]
        try:
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        except Exception:  # the run will not start: its MLflow run is not left running
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None
            raise

    def on_round(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, record.round) for name, value in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_run_end(self, summary: dict, path: Path | None) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        status = summary.get("status", "completed")
        try:
            self.client.set_tag(run_id, "rankfed.status", str(status))
            if summary.get("error"):
                self.client.set_tag(run_id, "rankfed.error", str(summary["error"])[:8000])
            if path is not None and Path(path).is_dir():
                for item in sorted(Path(path).iterdir()):
                    if item.name in (RESUME_FILE, CLIENT_STATE_DIR) or item.name.startswith("."):
                        continue
                    if item.is_dir():
                        self.client.log_artifacts(run_id, str(item), artifact_path=item.name)
                    else:
                        self.client.log_artifact(run_id, str(item))
        finally:
            self.client.set_terminated(run_id, _END_STATUS.get(status, "FAILED"))


LOGGERS: dict[str, type[Callback]] = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


def make_loggers(names: Iterable[str]) -> list[Callback]:
    """The loggers named (``federation.loggers`` of an experiment file), each with its defaults."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"federation.loggers = {names!r}: unknown logger {name!r} (valid: {', '.join(LOGGERS)})")
    return [LOGGERS[name]() for name in names]
