"""Plots of run folders: accuracy vs round, and accuracy vs cumulative bytes (log axis).

Runs without an accuracy (a regression, a loss of your own on other outputs) are drawn by
their test loss instead (and the training loss when there is no test data).

Each algorithm has its own colour in every plot (variants of one algorithm share it and differ
by line style); a marker sits at every evaluated round, the first at round 0 (the initial
model) where the run evaluated it; the legend is drawn below the panels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["find_runs", "read_metrics", "plot_runs", "run_labels", "algorithm_color", "BYTES_KINDS"]

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


def read_metrics(run: Path, allow_empty: bool = False) -> list[dict]:
    """The lines of ``run/metrics.jsonl``; a missing, unreadable or (unless ``allow_empty``)
    empty file is an error naming it."""
    file = Path(run) / "metrics.jsonl"
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(file)!r} does not exist: not a run folder, or a run that has not evaluated yet") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # a line cut short by a kill mid-write: the rounds before it stand
                break
            raise ValueError(f"{str(file)!r} line {i}: not JSON ({e})") from None
    if not rows and not allow_empty:
        raise ValueError(f"{str(file)!r} is empty: the run has no evaluated round to plot")
    return rows


# one colour per algorithm, the same in every plot (matplotlib's tab10, then tab20's light shades)
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
_STYLES = ("-", "--", ":", "-.")


def algorithm_color(algorithm: str) -> str:
    """The colour of ``algorithm`` in every rankfed plot (fixed by its place among the built-in algorithms)."""
    from rankfed.algorithms import ALGORITHMS

    names = sorted(ALGORITHMS)
    if algorithm in names:
        return _PALETTE[names.index(algorithm) % len(_PALETTE)]
    return _PALETTE[sum(algorithm.encode()) % len(_PALETTE)]  # an algorithm of your own: stable, by its name


def run_labels(runs: list[Path]) -> list[str]:
    """Unique names for ``runs``: the folder name, or parent/name where two runs share a name
    (and more of the path while that still clashes)."""
    runs = [Path(r).resolve() for r in runs]
    depth = [1] * len(runs)
    while True:
        labels = ["/".join(r.parts[-d:]) for r, d in zip(runs, depth)]
        clash = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(runs[i].parts)]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def _non_default(algorithm: str, options: dict) -> dict:
    """The options that differ from the algorithm's defaults (all of them if it is unknown)."""
    from rankfed.algorithms import ALGORITHMS

    if algorithm not in ALGORITHMS:
        return options
    defaults = ALGORITHMS[algorithm]().to_options()
    return {k: v for k, v in options.items() if defaults.get(k) != v}


def _summary(run: Path) -> dict:
    file = run / "summary.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _config_algorithm(run: Path) -> str:
    """The algorithm of a run still going (no summary yet), from its config.toml."""
    import tomllib

    try:
        return tomllib.loads((run / "config.toml").read_text(encoding="utf-8")).get("algorithm", {}).get("name", "")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return ""


def _label(run: Path, name: str, s: dict) -> str:
    opts = {k: v for k, v in s.get("algorithm_options", {}).items() if k != "name"}
    extra = ", ".join(f"{k}={v}" for k, v in _non_default(s.get("algorithm", ""), opts).items())
    return f"{name} ({extra})" if extra else name


def _y_key(rows: list[dict]) -> str:
    """What the plots draw: accuracy where the runs have one, else the test loss, else the training loss."""
    for key in ("accuracy", "loss"):
        if any(r.get(key) is not None for r in rows):
            return key
    return "train_loss"


def plot_runs(runs: list[Path], out: str | os.PathLike, bytes_kind: str = "total", title: str | None = None) -> Path:
    """Write a PNG with two panels, one line per run: the metric against the round, and against
    the cumulative bytes (log axis). A run without metrics is an error naming its file."""
    if bytes_kind not in BYTES_KINDS:
        raise ValueError(f"bytes_kind = {bytes_kind!r}: must be one of {', '.join(BYTES_KINDS)}")
    if not runs:
        raise ValueError("plot_runs: no runs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [Path(r) for r in runs]
    all_rows = {run: read_metrics(run) for run in runs}
    key = _y_key([r for rows in all_rows.values() for r in rows])
    for run, rows in all_rows.items():
        if not any(r.get(key) is not None for r in rows):
            raise ValueError(f"{str(run / 'metrics.jsonl')!r} has no {key} to plot (the other runs have one)")
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8))
    seen: dict[str, int] = {}
    for run, name in zip(runs, run_labels(runs)):
        s = _summary(run)
        algorithm = s.get("algorithm") or _config_algorithm(run)
        nth = seen.get(algorithm, 0)
        seen[algorithm] = nth + 1
        style = {"color": algorithm_color(algorithm), "linestyle": _STYLES[nth % len(_STYLES)], "marker": "o", "markersize": 3}
        rows = [r for r in all_rows[run] if r.get(key) is not None]
        rounds = [r["round"] for r in rows]
        acc = [100 * r[key] if key == "accuracy" else r[key] for r in rows]
        if bytes_kind == "total":
            sent = [r["cum_uplink_bytes"] + r["cum_downlink_bytes"] for r in rows]
        else:
            sent = [r[f"cum_{bytes_kind}_bytes"] for r in rows]
        label = _label(run, name, s)
        ax_r.plot(rounds, acc, label=label, **style)
        on_log = [(b / 1e6, a) for b, a in zip(sent, acc) if b > 0]  # round 0 sent nothing: not on a log axis
        ax_b.plot([b for b, _ in on_log], [a for _, a in on_log], label=label, **style)
    ylabel = {"accuracy": "test accuracy (%)", "loss": "test loss", "train_loss": "training loss"}[key]
    ax_r.set_xlabel("round")
    ax_r.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_r.set_ylabel(ylabel)
    ax_b.set_xscale("log")
    ax_b.set_xlabel(f"cumulative {bytes_kind} MB (log)")
    ax_b.set_ylabel(ylabel)
    for ax in (ax_r, ax_b):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_r.get_legend_handles_labels()
    ncol = min(len(labels), 3)
    if title:
        fig.suptitle(title)
    # the legend below both panels, clear of the curves
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows_of_legend = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, min(0.45, 0.05 + 0.045 * rows_of_legend), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_extra_artists=(legend,))
    plt.close(fig)
    return out
