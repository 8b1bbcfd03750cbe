"""Run folders: what a run writes, the same whichever transport or front end ran it.

* ``config.toml``   - the resolved experiment (every default filled in);
* ``metrics.jsonl`` - one line per evaluated round: round, accuracy, loss, the user's metrics,
  uplink_bytes, downlink_bytes, cum_uplink_bytes, cum_downlink_bytes, wall_s, ... (strict
  JSON: a non-finite number is ``null``);
* ``rounds.jsonl``  - one line per round, with the bytes of every client;
* ``summary.json``  - status, best and final accuracy and loss, byte totals, parameter counts,
  the algorithm's options, the FedAvg reference, the machine and the command;
* ``model.pt``      - the final global model's state dict (``torch.save``);
* ``checkpoints/round-NNNN.pt`` - with ``checkpoint_every = n``: the global model before round 1
  (``round-0000``), every n rounds and after the last (for ``rankfed analyze``);
* ``resume.pt``     - while running: what a resumed run continues from;
* ``client-state/`` - while running, with ``client_state = "disk"``: the clients' own state.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from rankfed._version import __version__
from rankfed.protocol import shared_state
from rankfed.server.defence import Defences
from rankfed.server.experiment import Experiment
from rankfed.server.round import RoundRecord, finite_or_none
from rankfed.wire import encoded_size

__all__ = ["RunFolder", "summarize", "RESUME_FILE", "CLIENT_STATE_DIR", "dumps"]

RESUME_FILE = "resume.pt"
CLIENT_STATE_DIR = "client-state"


def dumps(obj, **kwargs) -> str:
    """Strict JSON (``allow_nan=False``): NaN and infinities become null, anywhere in ``obj``."""

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return finite_or_none(o)

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


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
        shutil.rmtree(self.path / CLIENT_STATE_DIR, ignore_errors=True)

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
            f.write(dumps(record) + "\n")

    def on_round(self, rec: RoundRecord) -> None:
        self.append_jsonl("rounds.jsonl", rec.rounds_line())
        if rec.evaluated:
            self.append_jsonl("metrics.jsonl", rec.metrics_line())

    def write_initial_evaluation(self, measured: dict) -> None:
        """metrics.jsonl's round-0 line: the initial model on the test data (``Evaluator.measure``),
        before anything was sent (nothing, without test data)."""
        if not measured:
            return
        line = {"round": 0, "accuracy": None, "loss": None, **measured, "uplink_bytes": 0, "downlink_bytes": 0, "cum_uplink_bytes": 0, "cum_downlink_bytes": 0, "wall_s": 0.0, "initial": True}
        self.append_jsonl("metrics.jsonl", {k: finite_or_none(v) for k, v in line.items()})

    def write_summary(self, summary: dict) -> None:
        self.write_text("summary.json", dumps(summary, indent=2) + "\n")


def summarize(exp: Experiment, history: list[RoundRecord], wall_s: float, command: str | None = None) -> dict:
    """The summary.json of a finished run (its ``status`` is the caller's to add)."""
    evaluated = [r for r in history if r.evaluated]
    with_acc = [r for r in evaluated if r.accuracy is not None]
    with_loss = [r for r in evaluated if r.loss is not None]
    best = max(with_acc, key=lambda r: r.accuracy) if with_acc else None
    best_l = min(with_loss, key=lambda r: r.loss) if with_loss else None
    last = evaluated[-1] if evaluated else None
    uploads = sum(len(r.clients) for r in history)
    model = exp.model
    # What one FedAvg upload of this model's trainable tensors would be (a reference, not a measurement).
    shared = shared_state(model)
    fedavg_upload = encoded_size({"@num_samples": 0, "@train_loss": 0.0, **shared})
    total_up = history[-1].cum_uplink_bytes if history else 0
    total_down = history[-1].cum_downlink_bytes if history else 0
    broadcast = sum(r.broadcast_bytes * r.broadcast_recipients for r in history)
    personal = [r for r in evaluated if r.personal_accuracy is not None]
    extra: dict = {}
    tiers = exp.algorithm.client_tiers(len(exp.clients)) if hasattr(exp.algorithm, "client_tiers") else None
    if tiers:  # clients of different ranks: what each tier sends
        sent: dict[str, list[int]] = {label: [] for label in dict.fromkeys(tiers)}
        for r in history:
            for cid, nbytes in zip(r.clients, r.uplink_bytes_per_client):
                sent[tiers[cid]].append(nbytes)
        extra["uplink_bytes_per_upload_by_tier"] = {k: (sum(v) / len(v) if v else None) for k, v in sent.items()}
    if personal:  # personalised algorithms: each client's model on its own held-out split, averaged
        best_p = max(personal, key=lambda r: r.personal_accuracy)
        extra |= {"best_personal_accuracy": best_p.personal_accuracy, "best_personal_round": best_p.round, "final_personal_accuracy": personal[-1].personal_accuracy}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    defended = [r for r in history if r.defence]
    if defended:  # the defences in force, what they did, and the privacy spent
        d, asked = exp.defences, exp.options.defences  # (dp_noise resolved from dp_epsilon; as configured)
        extra["defences"] = {f.name: getattr(asked, f.name) for f in dataclasses.fields(asked) if getattr(asked, f.name) != getattr(Defences(), f.name)}
        extra["weights_cut_uploads"] = sum(r.defence.get("weights_cut", 0) for r in defended)
        extra["clipped_uploads"] = sum(r.defence.get("clipped", 0) for r in defended)
        if "epsilon" in defended[-1].defence:
            extra |= {"epsilon": defended[-1].defence["epsilon"], "dp_delta": d.dp_delta, "dp_noise": d.dp_noise}
    if "adapters" in exp.info:  # PEFT adapters: what the LoRA family trains (its rank options do not apply)
        extra["adapters"] = exp.info["adapters"]
    return {
        "algorithm": exp.algorithm.name,
        "algorithm_options": exp.algorithm.describe(),
        "dataset": exp.info.get("dataset"),
        "partition": exp.info.get("partition"),
        "model": exp.info.get("model"),
        "loss": exp.ctx.task.describe(exp.model)["loss"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "clients": len(exp.clients),
        "clients_per_round": exp.clients_per_round,
        "rounds": len(history),
        "seed": exp.ctx.seed,
        # stateless: each sampled client downloads its downlink; stateful: every client gets every broadcast
        "client_kind": exp.client_kind,
        "best_accuracy": best.accuracy if best else None,
        "best_round": best.round if best else (best_l.round if best_l else None),
        "final_accuracy": last.accuracy if last else None,
        "best_loss": best_l.loss if best_l else None,
        "final_loss": last.loss if last else None,
        "final_metrics": dict(last.metrics) if last else {},
        **extra,
        "total_uplink_bytes": total_up,
        "total_downlink_bytes": total_down,
        "broadcast_downlink_bytes": broadcast,
        "uploads": uploads,
        "mean_uplink_bytes_per_upload": total_up / uploads if uploads else 0,
        "fedavg_uplink_bytes_per_upload": fedavg_upload,
        "fedavg_reference": f"one FedAvg upload of this model's trainable parameters and float buffers ({sum(t.numel() for t in shared.values()):,} numbers)",
        "uplink_vs_fedavg": (total_up / uploads) / fedavg_upload if uploads else None,
        "wall_s": wall_s,
        "mean_round_s": sum(r.round_s for r in history) / len(history) if history else 0,
        "device": str(exp.ctx.device),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "rankfed": __version__,
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
    }
