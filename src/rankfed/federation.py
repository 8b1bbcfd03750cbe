"""The front door: :class:`Federation`, your model and data under a rankfed algorithm (the
example is the package's docstring, ``help(rankfed)``).

:func:`compare` runs one federation under several algorithms and writes the comparison
table and plot. The command line and the experiment files build a ``Federation`` exactly as
a script does.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from torch import nn

from rankfed.algorithms import Algorithm, FedAvg, get_algorithm
from rankfed.checks import bad, describe_object
from rankfed.errors import ConfigError, Diverged
from rankfed.local import ClientData, LocalTraining, Task, as_client_data
from rankfed.local.data import dataset_bytes, memory_budget
from rankfed.lowrank.peft_lora import is_peft_model, peft_config_of
from rankfed.protocol import RunContext
from rankfed.server import CLIENT_STATE_DIR, RESUME_FILE, Experiment, RoundRecord, RunFolder, RunOptions, summarize
from rankfed.sim import Simulator

__all__ = ["Federation", "Result", "Comparison", "compare", "compare_runs", "resolve_device", "resolve_threads", "run_state"]

_MAX_SEED = 2**32 - 1
MB = 1e6


def resolve_device(name: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (an error naming the setting when there is no GPU) or ``"auto"``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not str(name).startswith("cuda:"):
        raise bad("federation.device", name, "must be cpu, cuda or auto")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"federation.device = {name!r}: no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


@dataclass
class Result:
    """What :meth:`Federation.run` returns.

    Attributes:
        history: one dict per evaluated round (the ``metrics.jsonl`` fields, your metrics included).
        model: the final global model, as your own module type.
        bytes: ``{"uplink": total, "downlink": total}``, measured from the wire.
        summary: the ``summary.json`` dict (status, best and final accuracy, ...).
        path: the run folder, if ``out`` was given.
        records: every round's :class:`~rankfed.server.RoundRecord` (per-client bytes included).
    """

    history: list[dict]
    model: nn.Module
    bytes: dict
    summary: dict
    path: Path | None = None
    records: list[RoundRecord] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"completed"`` or ``"diverged"``."""
        return self.summary["status"]


class Federation:
    """Your model, your clients' data and loss, under one rankfed algorithm.

    Args:
        model: an ``nn.Module`` factory (a class or a function of no arguments, called after
            seeding torch with ``seed``, so every party builds the same initial model), or a
            module (deep-copied; its weights are the start).
        clients: one entry per client: a map-style ``torch.utils.data.Dataset`` of ``(input,
            target)`` items, an ``(x, y)`` pair of tensors, or a :class:`~rankfed.local.ClientData`.
            Datasets are materialised once into tensors when the clients' data fits in a quarter
            of the machine's memory (``in_memory = "auto"``), else streamed in minibatches.
        test: the test data (a Dataset or ``(x, y)``, or a function of no arguments returning
            one, read when a run starts), or None: no evaluation.
        algorithm: an algorithm object (``rf.FedLoRU(rank=8)``) or its name (default ``FedAvg()``).
        local: how clients train (:class:`LocalTraining`; a dict of its keywords also works).
        loss: ``(output, target) -> scalar``; default cross-entropy on class logits (token-level
            too). Accuracy is reported where it means something (class logits, integer targets).
        metrics: ``{name: fn(outputs, targets) -> float}`` evaluated on ``test`` every evaluation.
        seed: every random draw of the run derives from it (0 to 2**32 - 1).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        holdout: fraction of each client's data held out as its own validation split (the
            personalised algorithms' ``personal_accuracy``).
        in_memory: ``"auto"``, True (materialise every Dataset) or False (stream them).
        adapters: a ``peft`` config (``LoraConfig(r=8, target_modules=[...])``): the model gets
            these PEFT adapters (``get_peft_model``, after seeding torch with ``seed``) and the
            LoRA family trains and sends them. None: the model as given (already a PeftModel, or
            no PEFT at all).
        info, config_text: set by front ends (the experiment files): what the summary says the
            model and data are, and the run folder's ``config.toml``.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        clients: Sequence[Any],
        test: Any = None,
        algorithm: Algorithm | str | None = None,
        local: LocalTraining | Mapping | None = None,
        loss: Callable | None = None,
        metrics: Mapping[str, Callable] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        holdout: float = 0.0,
        in_memory: bool | str = "auto",
        adapters: Any = None,
        *,
        info: Mapping | None = None,
        config_text: str | None = None,
    ):
        if not (isinstance(model, nn.Module) or callable(model)):
            raise bad("model", model, "must be an nn.Module or a factory returning one (a class, a function)")
        one_pair = isinstance(clients, tuple) and len(clients) == 2 and isinstance(clients[0], torch.Tensor)  # (x, y) of one client
        if isinstance(clients, (str, bytes)) or not isinstance(clients, Sequence) or one_pair:
            raise ConfigError(f"clients: expected a list with one entry per client (a Dataset, an (x, y) pair or a ClientData), got {type(clients).__name__}")
        if len(clients) < 1:
            raise ConfigError("clients: the list is empty; give at least one client's data")
        if algorithm is None:
            algorithm = FedAvg()
        elif isinstance(algorithm, str):
            algorithm = get_algorithm(algorithm)
        if not isinstance(algorithm, Algorithm):
            raise bad("algorithm", algorithm, "must be an algorithm object such as rf.FedAvg() or rf.MAPA(k=256), or its name")
        if local is None:
            local = LocalTraining()
        elif isinstance(local, Mapping):
            local = LocalTraining(**local)
        if not isinstance(local, LocalTraining):
            raise bad("local", local, "must be an rf.LocalTraining(...)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
            raise bad("federation.seed", seed, f"must be an int in [0, {_MAX_SEED}]")
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
            raise bad("task.holdout", holdout, "must be in [0, 1)")
        if in_memory not in ("auto", True, False):
            raise bad("in_memory", in_memory, "must be 'auto', True or False")
        self.model = model
        self.algorithm, self.local = algorithm, local
        self.task = Task(loss, dict(metrics or {}))
        if adapters is not None and not any(c.__name__ == "PeftConfig" for c in type(adapters).__mro__):
            raise bad("adapters", adapters, "must be a peft config such as peft.LoraConfig(r=8, target_modules=[...]), or None")
        self.seed, self.holdout, self.in_memory = seed, float(holdout), in_memory
        self.adapters = adapters
        self.device = resolve_device(device)
        self._raw_clients, self._raw_test = clients, test
        self._data: tuple[list[ClientData], ClientData | None] | None = None
        self.info = dict(info or {})
        self.config_text = config_text

    # -- the parts -------------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        """K, the number of clients."""
        return len(self._raw_clients)

    def initial_model(self) -> nn.Module:
        """The seeded initial model every party starts from (under ``adapters``, if given)."""
        if isinstance(self.model, nn.Module):
            built = copy.deepcopy(self.model)
        else:
            torch.manual_seed(self.seed)
            built = self.model()
            if not isinstance(built, nn.Module):
                raise bad("model", self.model, f"the factory returned a {type(built).__name__}, not an nn.Module")
        if self.adapters is not None:
            from peft import get_peft_model

            torch.manual_seed(self.seed)  # PEFT draws lora_A from torch's RNG: the same adapters on every party
            try:
                built = get_peft_model(built, copy.deepcopy(self.adapters))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"adapters: PEFT could not add them to the model ({type(e).__name__}: {e})") from None
        return built

    def data(self) -> tuple[list[ClientData], ClientData | None]:
        """The clients' data and the test data as :class:`ClientData` (materialised once, or streamed)."""
        if self._data is None:
            in_memory = self.in_memory
            if in_memory == "auto":
                total = sum(dataset_bytes(c) for c in self._raw_clients if _is_dataset(c))
                in_memory = total <= memory_budget()
            clients = [as_client_data(c, f"clients[{i}]", in_memory=in_memory) for i, c in enumerate(self._raw_clients)]
            if self.holdout:
                from rankfed.data.partition import holdout_split

                clients = [c.split(*holdout_split(np.arange(c.num_samples), self.holdout, np.random.default_rng([self.seed, 1, i]))) for i, c in enumerate(clients)]
            raw_test = self._raw_test() if callable(self._raw_test) and not _is_dataset(self._raw_test) else self._raw_test
            test = None if raw_test is None else as_client_data(raw_test, "test", in_memory=in_memory)
            self._data = (clients, test)
        return self._data

    def with_algorithm(self, algorithm: Algorithm | str, local: LocalTraining | None = None) -> Federation:
        """The same federation (the same data objects) under another algorithm (and local training)."""
        other = copy.copy(self)
        other.algorithm = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
        other.local = local if local is not None else self.local
        other.config_text = None  # described anew from the new algorithm
        return other

    def experiment(self, rounds: int = 20, clients_per_round: int | None = None, **run_options) -> Experiment:
        """The resolved experiment a transport runs (see :class:`~rankfed.server.RunOptions` for
        ``run_options``: eval_every, client_kind, execution, ...)."""
        options = RunOptions(rounds=rounds, **run_options)
        clients, test = self.data()
        per_round = len(clients) if clients_per_round is None else clients_per_round
        if isinstance(per_round, bool) or not isinstance(per_round, int) or not 1 <= per_round <= len(clients):
            raise bad("clients_per_round", per_round, f"must be an int in [1, {len(clients)}] (the number of clients)")
        ctx = self.run_context(rounds)
        model = self.initial_model()
        exp = Experiment(self.algorithm, model, clients, test, ctx, per_round, options, self._info(model), "")
        exp.config_text = self.config_text if self.config_text is not None else self._config_text(exp)
        return exp

    def run_context(self, rounds: int) -> RunContext:
        """The static experiment every party reads: K, rounds, seed, local training, device, task."""
        return RunContext(num_clients=self.num_clients, rounds=rounds, seed=self.seed, local=self.local, device=self.device, task=self.task)

    def simulator(self, rounds: int = 20, clients_per_round: int | None = None, **run_options) -> Simulator:
        """An in-process :class:`~rankfed.sim.Simulator` of this federation (``run_round(r)`` by hand)."""
        return Simulator(self.experiment(rounds, clients_per_round, **run_options))

    def _info(self, model: nn.Module | None = None) -> dict:
        info = {"model": describe_object(self.model) if not isinstance(self.model, nn.Module) else f"<python: {type(self.model).__qualname__} instance>", "dataset": f"<python: {self.num_clients} clients>", "partition": "given"}
        config = peft_config_of(model) if model is not None and is_peft_model(model) else None
        if config is not None:  # what the LoRA family trains: the PEFT adapters, not the algorithm's rank option
            info["adapters"] = f"peft LoRA r={config.r}, lora_alpha={config.lora_alpha}, target_modules={sorted(config.target_modules or [])}"
        return info | self.info

    def describe(self, exp: Experiment) -> dict:
        """The experiment as an experiment file's tables (what ``config.toml`` holds)."""
        o = exp.options
        task = self.task.describe(exp.model)
        return {
            "task": {"model": exp.info["model"], "dataset": exp.info["dataset"], "holdout": self.holdout, "loss": task["loss"], "metrics": task["metrics"]},
            "federation": {"clients": len(exp.clients), "participation": exp.participation, "seed": self.seed, "device": str(self.device), **{k: getattr(o, k) for k in o.__dataclass_fields__}},
            "client": _toml_safe(self.local.describe()),
            "algorithm": {"name": self.algorithm.name, **_toml_safe(self.algorithm.to_options())},
        }

    def _config_text(self, exp: Experiment) -> str:
        return "# written by rankfed.Federation from Python: resume it with Federation.run(..., resume=True)\n" + tomli_w.dumps(self.describe(exp))

    # -- running ---------------------------------------------------------------------------------
    def run(
        self,
        rounds: int = 20,
        clients_per_round: int | None = None,
        out: str | Path | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
        on_round: Callable[[RoundRecord], None] | None = None,
        command: str | None = None,
        callbacks: Sequence[Any] = (),
        threads: int | None = None,
        **run_options,
    ) -> Result:
        """Run the federation in the in-process simulator.

        Args:
            rounds, clients_per_round: communication rounds; clients sampled per round (default all).
            out: a run folder to write (``metrics.jsonl``, ``summary.json``, ``model.pt``, ...,
                the files ``rankfed plot`` and ``compare`` read). An existing non-empty folder
                is an error unless ``overwrite``.
            resume: continue the interrupted run in ``out`` from its last saved state
                (``resume_every``); it ends exactly as the uninterrupted run would have.
            on_round: called with each round's record (progress bars, logging).
            command: recorded in the summary (the command line that asked for the run; a
                resumed run keeps the first one and lists its own under ``resume_commands``).
            callbacks: objects with ``on_run_start(exp, path, start_round)``,
                ``on_round(record)`` and ``on_run_end(summary, path)`` (see
                :class:`rankfed.tracking.Callback`: TensorBoard, MLflow).
            threads: torch intra-op threads for the run (default: the cores this process may
                use, ``os.sched_getaffinity``); recorded in the summary, since results depend on it.
            **run_options: see :class:`~rankfed.server.RunOptions` (``eval_every``,
                ``client_kind``, ``checkpoint_every``, ``resume_every``, ``execution``, ...).
        """
        threads = resolve_threads(threads)
        state = None
        if resume:
            if out is None:
                raise ConfigError("resume needs the run folder (out=...)")
            folder = RunFolder.existing(out)
            state = _load_resume(folder, out)
        elif out is not None:
            RunFolder.check_writable(out, overwrite)  # before the (slow) build: refuse early
        exp = self.experiment(rounds, clients_per_round, **run_options)
        # bad data or options fail here (MAPA's k > d ...), before any folder exists; client states
        # on disk go to the run folder's client-state/ (made at the first write)
        sim = Simulator(exp, Path(out) / CLIENT_STATE_DIR if out is not None else None)
        if resume:
            if state.get("format") != Simulator.resume_format() or state.get("config") != exp.config_text:
                raise ConfigError(f"{folder.path / RESUME_FILE}: saved by a different experiment or rankfed version; cannot resume it with this federation")
            folder.truncate_rounds(state["round"])
        else:
            folder = RunFolder(out, overwrite=overwrite) if out is not None else None
            if folder:
                folder.write_text("config.toml", exp.config_text)
        return _drive(sim, exp, folder, state, on_round, command, callbacks=callbacks, threads=threads)


def resolve_threads(threads: int | None, key: str = "threads") -> int:
    """``threads`` as a count: None or 0 is the cores this process may use."""
    if threads is None or threads == 0:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            return os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise bad(key, threads, "must be an int >= 1 (0: the cores available to the process)")
    return threads


def _is_dataset(obj: Any) -> bool:
    return not isinstance(obj, (ClientData, tuple, list)) and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _toml_safe(d: Mapping) -> dict:
    """A dict tomli_w can write (None and other objects as strings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out[k] = _toml_safe(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [(_toml_safe(x) if isinstance(x, Mapping) else x if isinstance(x, (str, int, float, bool)) else str(x)) for x in v]
        elif isinstance(v, (str, int, float, bool)):
            out[k] = v
        else:
            out[k] = str(v)
    return out


def _load_resume(folder: RunFolder, out) -> dict:
    state_file = folder.path / RESUME_FILE
    if not state_file.is_file():
        done = (folder.path / "summary.json").is_file()
        if done:
            raise FileNotFoundError(f"{str(out)!r} is a completed run (it has no {RESUME_FILE} left): there is nothing to resume")
        raise FileNotFoundError(f"{str(out)!r} has no {RESUME_FILE} to resume from (federation.resume_every = 0, or killed before its first resume point); start it again with --overwrite")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)  # this run's own file
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{state_file}: not a readable resume state ({type(e).__name__}: {e})") from None


def _save_resume(folder: RunFolder, sim: Simulator, exp: Experiment, wall_s: float, commands: list) -> None:
    """``resume.pt``, written atomically (a kill mid-write leaves the last one)."""
    tmp = folder.path / f".{RESUME_FILE}.tmp"
    torch.save(sim.state_dict(exp.config_text, wall_s) | {"commands": commands}, tmp)
    os.replace(tmp, folder.path / RESUME_FILE)
    sim.resume_saved()  # only now may what the previous resume.pt needs go


def _drive(sim: Simulator, exp: Experiment, folder: RunFolder | None, state: dict | None, on_round, command, *, callbacks: Sequence[Any] = (), threads: int = 1) -> Result:
    """Run ``sim`` to the end (from ``state`` if resuming) on ``threads`` torch threads, writing
    ``folder`` and telling ``callbacks``; the Result."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    path = folder.path if folder else None
    started: list = []
    try:
        result = _drive_on(sim, exp, folder, state, on_round, command, callbacks, started, threads)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        for cb in started:  # every tracker that saw the start hears how it ended
            try:
                cb.on_run_end({"status": status, "error": f"{type(e).__name__}: {e}"}, path)
            except Exception as cb_error:  # noqa: BLE001 - the run's own error is the one to raise
                warnings.warn(f"{type(cb).__name__}.on_run_end failed: {cb_error}", stacklevel=2)
        raise
    finally:
        torch.set_num_threads(previous_threads)
    for cb in callbacks:
        cb.on_run_end(result.summary, path)
    return result


def _drive_on(sim: Simulator, exp: Experiment, folder: RunFolder | None, state: dict | None, on_round, command, callbacks, started: list, threads: int) -> Result:
    opts = exp.options
    start, wall0 = 1, 0.0
    commands = [command]
    if state is not None:
        sim.load_state_dict(state)
        start, wall0 = state["round"] + 1, state["wall_s"]
        commands = [*state.get("commands", [None]), command]
    t0 = time.perf_counter() - wall0
    every, save_every = opts.checkpoint_every, opts.resume_every
    if folder and every and state is None:
        folder.save_checkpoint(0, sim.server.global_model_state())
    if folder and state is None:  # the curves' round-0 point: the initial model
        folder.write_initial_evaluation(sim.evaluator.measure(sim.server.global_model_state()))
    for cb in callbacks:
        cb.on_run_start(exp, folder.path if folder else None, start)
        started.append(cb)

    def _on_round(rec: RoundRecord) -> None:
        if folder:
            folder.on_round(rec)
            if every and (rec.round % every == 0 or rec.round == opts.rounds):
                folder.save_checkpoint(rec.round, sim.server.global_model_state())
            if save_every and rec.round % save_every == 0 and rec.round < opts.rounds:
                _save_resume(folder, sim, exp, time.perf_counter() - t0, commands)
        for cb in callbacks:
            cb.on_round(rec)
        if on_round:
            on_round(rec)

    diverged = None
    try:
        history = sim.run(_on_round, start_round=start)
    except Diverged as e:  # a result, not a crash: the rounds before it stand
        history, diverged = sim.history, e
    finally:
        sim.close()
    summary = summarize(exp, history, time.perf_counter() - t0, commands[0])
    if len(commands) > 1:
        summary["resume_commands"] = commands[1:]
    summary["status"] = "completed" if diverged is None else "diverged"
    summary["execution"] = sim.execution
    summary["threads"] = threads
    summary["cohort_rounds"] = sim.cohort_rounds  # rounds trained as vectorised cohorts (this process)
    if state is not None:
        summary["resumed_from_round"] = start - 1
    if diverged is not None:
        summary["diverged_at_round"] = diverged.round
        summary["diverged"] = str(diverged)
        warnings.warn(f"{diverged}; the run stopped there", stacklevel=4)
    global_state = sim.server.global_model_state()
    if folder:
        torch.save(global_state, folder.path / "model.pt")
        folder.write_summary(summary)
        (folder.path / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing to resume
        shutil.rmtree(folder.path / CLIENT_STATE_DIR, ignore_errors=True)
    sim.discard_client_states()
    model = copy.deepcopy(exp.model).cpu()
    model.load_state_dict({k: v.detach().cpu() for k, v in global_state.items()})
    lines = [r.metrics_line() for r in history if r.evaluated]
    return Result(lines, model, {"uplink": summary["total_uplink_bytes"], "downlink": summary["total_downlink_bytes"]}, summary, folder.path if folder else None, list(history))


# -- comparisons ---------------------------------------------------------------------------------
def _is_plain_fedavg(summary: dict) -> bool:
    return summary["algorithm"] == "fedavg" and not summary["algorithm_options"].get("compressor")


def comparison_rows(summaries: Mapping[str, dict]) -> list[dict]:
    """One row per labelled run; communication relative to the plain FedAvg run among them (if
    any), and which run that is (``baseline``)."""
    ref_label = next((label for label, s in summaries.items() if _is_plain_fedavg(s)), None)
    ref = summaries[ref_label] if ref_label is not None else None
    rows = []
    for label, s in summaries.items():
        up, down = s["total_uplink_bytes"], s["total_downlink_bytes"]
        broadcast = s.get("broadcast_downlink_bytes", 0)
        rows.append({
            "algorithm": label,
            "client_kind": s.get("client_kind"),
            "best_accuracy": s["best_accuracy"],
            "best_round": s["best_round"],
            "final_accuracy": s["final_accuracy"],
            "final_loss": s.get("final_loss"),
            "uplink_MB": up / MB,
            "downlink_MB": down / MB,
            "broadcast_share": broadcast / down if down else None,
            "uplink_vs_fedavg": up / ref["total_uplink_bytes"] if ref else None,
            "total_vs_fedavg": (up + down) / (ref["total_uplink_bytes"] + ref["total_downlink_bytes"]) if ref else None,
            "baseline": ref_label,
            "status": s.get("status"),
            "wall_s": s["wall_s"],
        })  # fmt: skip
    return rows


COLUMNS = ("algorithm", "client kind", "best acc", "at round", "final acc", "final loss", "uplink MB", "downlink MB", "broadcast share", "uplink vs FedAvg", "total vs FedAvg", "time s")
# "broadcast share": of the downlink, what went to every client as a stateful broadcast


def comparison_cells(r: dict) -> list[str]:
    """One comparison row's cells, in :data:`COLUMNS` order (the terminal and markdown tables)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    num = lambda v: "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"  # noqa: E731
    name = r["algorithm"] + (" (diverged)" if r.get("status") == "diverged" else "")
    return [
        name, str(r.get("client_kind") or "-"), pct(r["best_accuracy"]), str(r["best_round"]), pct(r["final_accuracy"]), num(r.get("final_loss")),
        f"{r['uplink_MB']:.3f}", f"{r['downlink_MB']:.3f}", pct(r.get("broadcast_share")), pct(r["uplink_vs_fedavg"]), pct(r["total_vs_fedavg"]), f"{r['wall_s']:.1f}",
    ]  # fmt: skip


def baseline_note(rows: list[dict]) -> str:
    """The sentence that states what "vs FedAvg" compares against."""
    ref = rows[0].get("baseline") if rows else None
    if ref is None:
        return "No plain FedAvg run among these: the vs-FedAvg columns are empty."
    return (f"vs FedAvg: each run's bytes over those of the run {ref!r} (FedAvg without a compressor, sending the model's trainable "
            "parameters and float buffers). Broadcast share: the part of a run's downlink that went to every client as a stateful broadcast.")  # fmt: skip


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(comparison_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + baseline_note(rows) + "\n"


@dataclass
class Comparison:
    """What :func:`compare` returns: the table's rows, each run's Result, the output folder."""

    rows: list[dict]
    results: dict[str, Result]
    path: Path | None = None

    def markdown(self) -> str:
        """The comparison table as markdown (what ``comparison.md`` holds), with its baseline stated."""
        return comparison_markdown(self.rows)

    def __str__(self) -> str:
        return self.markdown()


COMPARE_FILE = "compare.json"  # a compare folder's labels, title and command, written at its start


def run_state(path: str | os.PathLike) -> str:
    """Where the run folder ``path`` stands: ``"done"`` (its summary.json written), ``"resumable"``
    (a resume.pt left by an interrupted run), ``"unfinished"`` (killed before its first resume
    point) or ``"new"`` (no folder, or an empty one)."""
    path = Path(path)
    if (path / RESUME_FILE).is_file():
        return "resumable"
    if (path / "summary.json").is_file():
        return "done"
    if path.is_dir() and any(path.iterdir()):
        return "unfinished"
    return "new"


def open_compare_folder(out: str | os.PathLike, labels: Sequence[str], *, resume: bool, overwrite: bool, record: Mapping | None = None) -> dict:
    """Start the compare folder ``out`` (``compare.json`` holds ``labels`` and ``record``) or, with
    ``resume``, read it back: the labels must be the ones it was started with."""
    import json

    out = Path(out)
    file = out / COMPARE_FILE
    if resume:
        if not file.is_file():
            raise FileNotFoundError(f"{str(out)!r} is not a compare folder to resume (no {COMPARE_FILE}; it was started by an older rankfed, or not by compare)")
        saved = json.loads(file.read_text(encoding="utf-8"))
        if list(saved.get("labels", [])) != list(labels):
            raise ConfigError(f"{str(out)!r} compared {saved.get('labels')}, not {list(labels)}: resume it with the same algorithms, or start a new folder")
        return saved
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {str(out)!r} exists and is not empty (pass --overwrite to replace it, or --resume to continue it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = {"labels": list(labels), **dict(record or {})}
    tmp = out / f".{COMPARE_FILE}.tmp"
    tmp.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)
    return saved


def read_summary(run: str | os.PathLike) -> dict:
    """A finished run folder's summary.json (an error naming the file if it is missing or unreadable)."""
    import json

    file = Path(run) / "summary.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(file)!r} does not exist: the run did not finish (resume it, or leave it out)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(file)!r}: not a readable summary ({e})") from None


def write_comparison(out: Path, runs: Sequence[str | os.PathLike], rows: list[dict], title: str | None) -> None:
    """comparison.json, comparison.md and comparison.png in ``out``, of the run folders ``runs``."""
    import json

    from rankfed.plot import plot_runs

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "comparison.md").write_text(comparison_markdown(rows), encoding="utf-8")
    plot_runs([Path(r) for r in runs], out / "comparison.png", title=title)


def compare_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *, title: str | None = None) -> list[dict]:
    """The comparison table (and, with ``out``, comparison.md / .json / .png) of finished run
    folders, from their summary.json and metrics.jsonl (what ``rankfed compare --from`` does).
    A compare folder stands for the runs in it. Labels are the folder names (parent/name where
    two share a name)."""
    from rankfed.plot import find_runs, run_labels

    found = find_runs(list(runs))
    summaries = {label: read_summary(run) for label, run in zip(run_labels(found), found)}
    rows = comparison_rows(summaries)
    if out is not None:
        write_comparison(Path(out), found, rows, title)
    return rows


def _result_from_folder(path: Path, fed: Federation) -> Result:
    """The Result of a finished run, read back from its folder (a resumed comparison keeps it)."""
    from rankfed.plot import read_metrics

    summary = read_summary(path)
    model = fed.initial_model()
    try:
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"{str(path)!r}: its model.pt does not fit this federation's model ({type(e).__name__}: {e}); rerun it with overwrite") from None
    history = [r for r in read_metrics(path, allow_empty=True) if r.get("round", 0) > 0]
    return Result(history, model, {"uplink": summary["total_uplink_bytes"], "downlink": summary["total_downlink_bytes"]}, summary, path, [])


def compare(
    federation: Federation,
    algorithms: Mapping[str, Algorithm | str | tuple[Algorithm, LocalTraining] | Federation],
    *,
    rounds: int = 20,
    clients_per_round: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    title: str | None = None,
    on_round: Callable[[str, RoundRecord], None] | None = None,
    on_kept: Callable[[str, Path], None] | None = None,
    command: str | None = None,
    callbacks: Sequence[Any] = (),
    threads: int | None = None,
    **run_options,
) -> Comparison:
    """Run ``federation`` under each of ``algorithms`` (``{label: algorithm}``, ``{label:
    (algorithm, LocalTraining)}`` for a learning rate of its own, or ``{label: Federation}``)
    on the same data and seed.

    With ``out``: each run in ``out/<label>``, and ``comparison.md`` / ``.json`` / ``.png`` (best
    accuracy, bytes, the client kind and the broadcast share of each run's downlink, and
    communication relative to the plain FedAvg run among them) beside them.

    ``resume``: continue the comparison interrupted in ``out``: finished runs are kept (read
    back from their folders; ``on_kept(label, path)`` is told), an interrupted run continues
    from its resume.pt, one killed before its first resume point starts again. ``callbacks``
    (trackers) get every run; ``threads``: see :meth:`Federation.run`.
    """
    if not algorithms:
        raise ConfigError("compare: give at least one algorithm")
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ConfigError("compare: resume needs the compare folder (out=...)")
    feds = {}
    for label, spec in algorithms.items():
        algo, local = spec if isinstance(spec, tuple) else (spec, None)
        feds[label] = spec if isinstance(spec, Federation) else federation.with_algorithm(algo, local)
    threads = resolve_threads(threads)
    if out_path is not None:
        open_compare_folder(out_path, list(feds), resume=resume, overwrite=overwrite, record={"title": title, "rounds": rounds, "command": command})
    results = {}
    for label, fed in feds.items():
        report = (lambda rec, label=label: on_round(label, rec)) if on_round else None
        run_out = out_path / label if out_path else None
        where = run_state(run_out) if resume else "new"
        if where == "done":
            expected = fed.experiment(rounds, clients_per_round, **run_options).config_text
            if (run_out / "config.toml").read_text(encoding="utf-8") != expected:
                raise ConfigError(f"{str(run_out)!r} was run with another configuration than this comparison's {label!r}: resume with the same federation, or start anew with overwrite")
            results[label] = _result_from_folder(run_out, fed)
            if on_kept:
                on_kept(label, run_out)
            continue
        results[label] = fed.run(rounds, clients_per_round, run_out, overwrite=True, resume=where == "resumable", on_round=report, command=command, callbacks=callbacks, threads=threads, **run_options)
    rows = comparison_rows({label: r.summary for label, r in results.items()})
    if out_path is not None:
        write_comparison(out_path, [out_path / label for label in results], rows, title)
    return Comparison(rows, results, out_path)
