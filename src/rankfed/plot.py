"""Plots of run folders: accuracy vs round, and accuracy vs cumulative bytes (log axis).

Runs without an accuracy (a regression, a loss of your own on other outputs) are drawn by
their test loss instead (and the training loss when there is no test data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["find_runs", "read_metrics", "plot_runs", "BYTES_KINDS"]

BYTES_KINDS = ("total", "uplink", "downlink")


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run folders named directly, or found one level down (a `rankfed compare` folder)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            found = sorted(q.parent for q in p.glob("*/metrics.jsonl"))
            if not found:
                raise FileNotFoundError(f"{str(p)!r} holds no run (no metrics.jsonl in it or its subfolders)")
            runs.extend(found)
        else:
            raise FileNotFoundError(f"{str(p)!r} is not a run folder")
    return runs


def read_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _non_default(algorithm: str, options: dict) -> dict:
    """The options that differ from the algorithm's defaults (all of them if it is unknown)."""
    from rankfed.algorithms import ALGORITHMS

    if algorithm not in ALGORITHMS:
        return options
    defaults = ALGORITHMS[algorithm]().to_options()
    return {k: v for k, v in options.items() if defaults.get(k) != v}


def _label(run: Path) -> str:
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text(encoding="utf-8"))
        opts = {k: v for k, v in s.get("algorithm_options", {}).items() if k != "name"}
        extra = ", ".join(f"{k}={v}" for k, v in _non_default(s.get("algorithm", ""), opts).items())
        return f"{run.name} ({extra})" if extra else run.name
    return run.name


def _y_key(rows: list[dict]) -> str:
    """What the plots draw: accuracy where the runs have one, else the test loss, else the training loss."""
    for key in ("accuracy", "loss"):
        if any(r.get(key) is not None for r in rows):
            return key
    return "train_loss"


def plot_runs(runs: list[Path], out: str | os.PathLike, bytes_kind: str = "total", title: str | None = None) -> Path:
    """Write a PNG with two panels, one line per run."""
    if bytes_kind not in BYTES_KINDS:
        raise ValueError(f"bytes_kind = {bytes_kind!r}: must be one of {', '.join(BYTES_KINDS)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    all_rows = {run: read_metrics(run) for run in runs}
    key = _y_key([r for rows in all_rows.values() for r in rows])
    for run in runs:
        rows = [r for r in all_rows[run] if r.get(key) is not None]
        if not rows:
            continue
        rounds = [r["round"] for r in rows]
        acc = [100 * r[key] if key == "accuracy" else r[key] for r in rows]
        if bytes_kind == "total":
            sent = [r["cum_uplink_bytes"] + r["cum_downlink_bytes"] for r in rows]
        else:
            sent = [r[f"cum_{bytes_kind}_bytes"] for r in rows]
        label = _label(run)
        ax_r.plot(rounds, acc, label=label)
        ax_b.plot([s / 1e6 for s in sent], acc, label=label)
    ylabel = {"accuracy": "test accuracy (%)", "loss": "test loss", "train_loss": "training loss"}[key]
    ax_r.set_xlabel("round")
    ax_r.set_ylabel(ylabel)
    ax_b.set_xscale("log")
    ax_b.set_xlabel(f"cumulative {bytes_kind} MB (log)")
    ax_b.set_ylabel(ylabel)
    for ax in (ax_r, ax_b):
        ax.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
