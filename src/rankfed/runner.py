"""From an experiment config to a finished run folder.

A run folder holds:

* ``config.toml``   - the resolved experiment (every default filled in);
* ``metrics.jsonl`` - one line per evaluated round: round, accuracy, loss,
  uplink_bytes, downlink_bytes, cum_uplink_bytes, cum_downlink_bytes, wall_s, ...;
* ``rounds.jsonl``  - one line per round, with the bytes of every client;
* ``summary.json``  - best and final accuracy, byte totals, parameter count,
  algorithm options;
* ``model.pt``      - the final global model's state dict (``torch.save``);
* ``checkpoints/round-NNNN.pt`` - with ``federation.checkpoint_every = n``: the global model
  before round 1 (``round-0000``), every n rounds and after the last (for ``rankfed analyze``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import rankfed
from rankfed.algorithms import get_algorithm
from rankfed.algorithms.base import Algorithm, RunContext, float_state
from rankfed.config import ConfigError, ExperimentConfig, to_toml
from rankfed.data import ClientData, Dataset, federate, load_dataset
from rankfed.models import build_model, count_parameters
from rankfed.sim.simulator import Diverged, RoundRecord, Simulator
from rankfed.wire import encoded_size

__all__ = ["Experiment", "build_experiment", "build_run_parts", "client_kind", "run_experiment", "RunFolder", "DEFAULT_MODELS", "resolve_device"]

RESUME_FILE = "resume.pt"  # in a run folder: the state `rankfed run --resume` continues from
_RESUME_FORMAT = 1

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("federation.device = 'cuda': no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything a run needs, built from a config."""

    cfg: ExperimentConfig
    dataset: Dataset
    clients: list[ClientData]
    model: torch.nn.Module  # the seeded initial model
    model_name: str
    algorithm: Algorithm
    ctx: RunContext

    def simulator(self) -> Simulator:
        fed = self.cfg.federation
        return Simulator(
            self.algorithm,
            self.model,
            self.clients,
            (self.dataset.test_x, self.dataset.test_y),
            self.ctx,
            clients_per_round=fed.clients_per_round,
            eval_every=fed.eval_every,
            eval_batch_size=fed.eval_batch_size,
            client_kind=self.client_kind,
            min_clients=fed.min_clients,
            execution=fed.execution,
            compile=fed.compile,
            workers=fed.workers,
        )

    @property
    def client_kind(self) -> str:
        return client_kind(self.cfg, self.algorithm)


def client_kind(cfg: ExperimentConfig, algorithm: Algorithm) -> str:
    """The client kind in force: as configured, or the algorithm's paper default for "auto"."""
    kind = cfg.federation.client_kind
    return algorithm.default_client_kind if kind == "auto" else kind


def load_task_data(cfg: ExperimentConfig) -> Dataset:
    task, fed = cfg.task, cfg.federation
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
    return dataclasses.replace(
        ds,
        train_x=ds.train_x[t],
        train_y=ds.train_y[t],
        groups=None if ds.groups is None else ds.groups[idx],
    )


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
        raise ConfigError(
            f"task.init_weights = {path!r}: does not fit the model (missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})"
        )


def build_run_parts(cfg: ExperimentConfig, input_shape: tuple, num_classes: int) -> tuple[torch.nn.Module, str, Algorithm, RunContext]:
    """What an experiment builds besides its data: the seeded initial model (and its name), the
    algorithm, the run context. Depends on the data only through its input shape and classes."""
    task, fed = cfg.task, cfg.federation
    model_name = task.model or DEFAULT_MODELS[task.dataset]
    torch.manual_seed(fed.seed)
    model = build_model(model_name, tuple(input_shape), num_classes, **task.model_options)
    if task.init_weights:
        load_init_weights(model, task.init_weights)
    algorithm = get_algorithm(cfg.algorithm.name, cfg.algorithm.options)
    ctx = RunContext(
        num_clients=fed.clients,
        rounds=fed.rounds,
        seed=fed.seed,
        client=cfg.client,
        device=resolve_device(fed.device),
    )
    return model, model_name, algorithm, ctx


def build_experiment(cfg: ExperimentConfig, dataset: Dataset | None = None) -> Experiment:
    """Load and split the data, build the seeded model and the algorithm.

    ``dataset`` may be passed to reuse one already loaded (``rankfed compare``).
    """
    task, fed = cfg.task, cfg.federation
    ds = dataset if dataset is not None else load_task_data(cfg)
    if task.train_samples:
        ds = subsample_train(ds, task.train_samples, seed=fed.seed)
    n_train = len(ds.train_y)
    if fed.clients > n_train:
        raise ConfigError(f"federation.clients = {fed.clients}: more clients than training samples ({n_train})")
    clients = federate(
        ds,
        fed.clients,
        task.partition,
        seed=fed.seed,
        holdout=task.holdout,
        alpha=task.alpha,
        classes_per_client=task.classes_per_client,
    )
    model, model_name, algorithm, ctx = build_run_parts(cfg, ds.input_shape, ds.num_classes)
    return Experiment(cfg, ds, clients, model, model_name, algorithm, ctx)


class RunFolder:
    """Writes a run folder; refuses to write into a non-empty one unless ``overwrite``."""

    @staticmethod
    def check_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
        """Raise FileExistsError if ``path`` is a file, or a non-empty folder without ``overwrite``."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise FileExistsError(f"run folder {str(p)!r} is a file, not a folder")
        if p.exists() and any(p.iterdir()) and not overwrite:
            raise FileExistsError(f"run folder {str(p)!r} exists and is not empty (pass --overwrite to replace it)")

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.check_writable(self.path, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "rounds.jsonl", "summary.json", "model.pt", RESUME_FILE):
            (self.path / name).unlink(missing_ok=True)
        for old in (self.path / "checkpoints").glob("round-*.pt"):
            old.unlink()

    def write_text(self, name: str, text: str) -> None:
        """Write atomically: a reader never sees half a file."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunFolder:
        """An existing run folder, opened to continue it (nothing deleted)."""
        folder = cls.__new__(cls)
        folder.path = Path(path)
        if not (folder.path / "config.toml").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a run folder (no config.toml)")
        return folder

    def truncate_rounds(self, last_round: int) -> None:
        """Drop the metrics.jsonl and rounds.jsonl lines of rounds after ``last_round`` (and a
        line cut short by a kill), so a resumed run appends where its saved state ends."""
        for name in ("metrics.jsonl", "rounds.jsonl"):
            file = self.path / name
            if not file.exists():
                continue
            keep = []
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["round"] <= last_round:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            self.write_text(name, "".join(k + "\n" for k in keep))

    def save_checkpoint(self, rnd: int, state: dict[str, torch.Tensor]) -> Path:
        """The global model after round ``rnd`` (0 = the initial model), written atomically."""
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        tmp, final = d / f".round-{rnd:04d}.pt.tmp", d / f"round-{rnd:04d}.pt"
        torch.save(state, tmp)
        os.replace(tmp, final)
        return final

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_round(self, rec: RoundRecord) -> None:
        self.append_jsonl(
            "rounds.jsonl",
            {
                "round": rec.round,
                "clients": rec.clients,
                "uplink_bytes_per_client": rec.uplink_bytes_per_client,
                "downlink_bytes_per_client": rec.downlink_bytes_per_client,
                "broadcast_bytes": rec.broadcast_bytes,
                "broadcast_recipients": rec.broadcast_recipients,
                "round_s": rec.round_s,
                "train_loss": rec.train_loss,
                "rejected": {str(c): why for c, why in rec.rejected.items()},
                "skipped": rec.skipped,
                **rec.transport,
            },
        )
        if rec.accuracy is not None:
            self.append_jsonl("metrics.jsonl", rec.metrics_line())


def summarize(exp: Experiment, history: list[RoundRecord], wall_s: float, command: str | None = None) -> dict:
    """The summary.json of a finished run."""
    evaluated = [r for r in history if r.accuracy is not None]
    best = max(evaluated, key=lambda r: r.accuracy) if evaluated else None
    last = evaluated[-1] if evaluated else None
    uploads = sum(len(r.clients) for r in history)
    fed = exp.cfg.federation
    # What one FedAvg upload of this model would be on the wire (a reference, not a measurement of this run).
    fedavg_upload = encoded_size({"@num_samples": 0, "@train_loss": 0.0, **float_state(exp.model)})
    total_up = history[-1].cum_uplink_bytes if history else 0
    total_down = history[-1].cum_downlink_bytes if history else 0
    personal = [r for r in evaluated if r.personal_accuracy is not None]
    extra: dict = {}
    tiers = exp.algorithm.client_tiers(fed.clients) if hasattr(exp.algorithm, "client_tiers") else None
    if tiers:  # clients of different ranks: what each tier sends
        sent: dict[str, list[int]] = {label: [] for label in dict.fromkeys(tiers)}
        for r in history:
            for cid, nbytes in zip(r.clients, r.uplink_bytes_per_client):
                sent[tiers[cid]].append(nbytes)
        extra["uplink_bytes_per_upload_by_tier"] = {k: (sum(v) / len(v) if v else None) for k, v in sent.items()}
    if personal:  # personalised algorithms: each client's model on its own held-out split, averaged
        best_p = max(personal, key=lambda r: r.personal_accuracy)
        extra |= {"best_personal_accuracy": best_p.personal_accuracy, "best_personal_round": best_p.round, "final_personal_accuracy": personal[-1].personal_accuracy}
    return {
        "algorithm": exp.algorithm.name,
        "algorithm_options": exp.algorithm.describe(),
        "dataset": exp.cfg.task.dataset,
        "partition": exp.cfg.task.partition,
        "model": exp.model_name,
        "num_parameters": count_parameters(exp.model),
        "clients": fed.clients,
        "clients_per_round": fed.clients_per_round,
        "rounds": len(history),
        "seed": fed.seed,
        # stateless: each sampled client downloads its downlink; stateful: every client gets every broadcast
        "client_kind": exp.client_kind,
        "best_accuracy": best.accuracy if best else None,
        "best_round": best.round if best else None,
        "final_accuracy": last.accuracy if last else None,
        "final_loss": last.loss if last else None,
        **extra,
        "total_uplink_bytes": total_up,
        "total_downlink_bytes": total_down,
        "uploads": uploads,
        "mean_uplink_bytes_per_upload": total_up / uploads if uploads else 0,
        "fedavg_uplink_bytes_per_upload": fedavg_upload,
        "uplink_vs_fedavg": (total_up / uploads) / fedavg_upload if uploads else None,
        "wall_s": wall_s,
        "mean_round_s": sum(r.round_s for r in history) / len(history) if history else 0,
        "device": str(exp.ctx.device),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "rankfed": rankfed.__version__,
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
    }


def save_resume_state(folder: RunFolder, sim: Simulator, cfg: ExperimentConfig, wall_s: float) -> None:
    """Everything ``rankfed run --resume`` needs to continue after the last finished round:
    the server and client halves, the client-side state, the model objects, the history, the
    byte counters and every RNG state; written atomically (a kill mid-write leaves the last one)."""
    import random

    state = {
        "format": _RESUME_FORMAT,
        "round": sim.history[-1].round if sim.history else 0,
        "config": to_toml(cfg),
        "server": sim.server,
        "client": sim.client,
        "worker": sim.worker,
        "eval_model": sim.eval_model,
        "replica": sim.replica,
        "client_states": sim.client_states,
        "history": sim.history,
        "cum": (sim.cum_up, sim.cum_down),
        "wall_s": wall_s,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    tmp = folder.path / f".{RESUME_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder.path / RESUME_FILE)


def _restore(sim: Simulator, state: dict) -> None:
    import random

    sim.server, sim.client, sim.worker, sim.eval_model = state["server"], state["client"], state["worker"], state["eval_model"]
    sim.replica, sim.client_states, sim.history = state["replica"], state["client_states"], state["history"]
    sim.cum_up, sim.cum_down = state["cum"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    dataset: Dataset | None = None,
    command: str | None = None,
    resume: bool = False,
) -> dict:
    """Run one experiment in the simulator; write the run folder if ``out_dir`` is given.

    ``command`` (the command line that asked for the run) is recorded in the summary.
    With ``resume``, ``out_dir`` is a run folder of ``cfg`` whose run was interrupted: it
    continues from its last saved state (``resume.pt``, written every
    ``federation.resume_every`` rounds) and ends as the uninterrupted run would have.

    Returns the summary (also written to ``summary.json``).
    """
    if resume:
        if out_dir is None:
            raise ValueError("resume needs the run folder")
        folder = RunFolder.existing(out_dir)
        state_file = folder.path / RESUME_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{str(out_dir)!r} has no {RESUME_FILE} to resume from (federation.resume_every = 0, or killed before round {cfg.federation.resume_every})")
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)  # this run's own file
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{state_file}: not a readable resume state ({type(e).__name__}: {e})") from None
        if state.get("format") != _RESUME_FORMAT or state.get("config") != to_toml(cfg):
            raise ValueError(f"{state_file}: saved by a different experiment or rankfed version; cannot resume it with {str(out_dir)!r}/config.toml")
    elif out_dir is not None:
        RunFolder.check_writable(out_dir, overwrite)  # before the (slow) build: refuse early
    exp = build_experiment(cfg, dataset)  # bad data or options fail here or in the simulator's
    sim = exp.simulator()  # set-up (MAPA's k > d ...), before any folder exists
    if not resume:
        folder = RunFolder(out_dir, overwrite=overwrite) if out_dir is not None else None
        if folder:
            folder.write_text("config.toml", to_toml(cfg))
    start, wall0 = 1, 0.0
    if resume:
        _restore(sim, state)
        start, wall0 = state["round"] + 1, state["wall_s"]
        folder.truncate_rounds(state["round"])
        sim._t_start = time.perf_counter() - (sim.history[-1].wall_s if sim.history else 0.0)
    t0 = time.perf_counter() - wall0
    every = cfg.federation.checkpoint_every
    save_every = cfg.federation.resume_every
    if folder and every and not resume:
        folder.save_checkpoint(0, sim.server.global_model_state())

    def _on_round(rec: RoundRecord) -> None:
        if folder:
            folder.on_round(rec)
            if every and (rec.round % every == 0 or rec.round == cfg.federation.rounds):
                folder.save_checkpoint(rec.round, sim.server.global_model_state())
            if save_every and rec.round % save_every == 0 and rec.round < cfg.federation.rounds:
                save_resume_state(folder, sim, cfg, time.perf_counter() - t0)
        if on_round:
            on_round(rec)

    diverged = None
    try:
        history = sim.run(_on_round, start_round=start)
    except Diverged as e:  # a result, not a crash: the rounds before it stand
        history, diverged = sim.history, e
    finally:
        sim.close()
    summary = summarize(exp, history, time.perf_counter() - t0, command)
    summary["status"] = "completed" if diverged is None else "diverged"
    summary["execution"] = sim.execution
    summary["cohort_rounds"] = sim.cohort_rounds  # rounds trained as vectorised cohorts (this process)
    if resume:
        summary["resumed_from_round"] = start - 1
    if diverged is not None:
        summary["diverged_at_round"] = diverged.round
        summary["diverged"] = str(diverged)
    if folder:
        torch.save(sim.server.global_model_state(), folder.path / "model.pt")
        folder.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
        (folder.path / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing to resume
    return summary
