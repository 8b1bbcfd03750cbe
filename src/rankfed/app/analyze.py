"""The rank analysis behind FedLoRU, along a training run's checkpoints.

* :func:`analyze_stable_rank`: the Hessian's stable rank on random training
  subsets of given sizes (FedLoRU Theorem 3.3, Figure 2a: the smaller the
  dataset, the higher the stable rank);
* :func:`analyze_gradient_similarity`: clients' gradients, full vs rank-r, by
  mean pairwise cosine similarity.

Both read a run folder written with ``federation.checkpoint_every = n``
(``checkpoints/round-NNNN.pt``) and write a JSON file, a markdown table and a
plot into an output folder. ``rankfed analyze`` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rankfed.analysis import StableRank, gradient_similarity, model_hessian, stable_rank
from rankfed.app.config import load_config
from rankfed.errors import ConfigError

__all__ = ["find_checkpoints", "load_run", "RunParts", "analyze_stable_rank", "summarize_stable_rank", "analyze_gradient_similarity"]


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(round, file) of every checkpoint of a run folder, by round."""
    d = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in d.glob("round-*.pt") if (m := re.fullmatch(r"round-(\d+)\.pt", p.name)))
    if not found:
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no checkpoints (checkpoints/round-NNNN.pt); run it with --set federation.checkpoint_every=N"
        )
    return found


@dataclasses.dataclass
class RunParts:
    """What the analyses read of a run: the model (seeded, as the run started), the task, the
    device, the clients' data and the whole training split (for built-in data, the dataset's)."""

    model: torch.nn.Module
    task: object
    device: torch.device
    clients: list
    train_x: torch.Tensor
    train_y: torch.Tensor


def load_run(run_dir: str | Path) -> RunParts:
    """The experiment of a run folder (its config.toml), built: model, task, clients, training data."""
    from rankfed.app.config import is_import_path
    from rankfed.app.experiment import federation_from_config, load_task_data, subsample_train

    cfg_file = Path(run_dir) / "config.toml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder (no config.toml)")
    if cfg_file.read_text(encoding="utf-8").startswith("# written by rankfed.Federation"):
        raise ConfigError(f"{str(run_dir)!r} was run from Python (rankfed.Federation): analyse it with rankfed.analysis on your model and data")
    cfg = load_config(cfg_file)
    fed = federation_from_config(cfg)
    clients, _ = fed.data()
    if is_import_path(cfg.task.dataset):
        x, y = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
    else:
        ds = load_task_data(cfg)
        if cfg.task.train_samples:
            ds = subsample_train(ds, cfg.task.train_samples, seed=cfg.federation.seed)
        x, y = ds.train_x, ds.train_y
    return RunParts(fed.initial_model(), fed.task, fed.device, clients, x, y)


def _select(found: list[tuple[int, Path]], rounds: Sequence[int] | None) -> list[tuple[int, Path]]:
    if rounds is None:
        return found
    have = dict(found)
    missing = [r for r in rounds if r not in have]
    if missing:
        raise ConfigError(f"--rounds {','.join(map(str, rounds))}: no checkpoint for round(s) {missing}; have {sorted(have)}")
    return [(r, have[r]) for r in rounds]


def analyze_stable_rank(
    run_dir: str | Path,
    sizes: Sequence[int] = (50, 500),
    *,
    subsets: int = 3,
    probes: int = 100,
    lanczos_steps: int = 30,
    rounds: Sequence[int] | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    out: str | Path | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Stable rank of the loss Hessian at each checkpoint, on ``subsets`` random training subsets
    of each size (the same subsets at every checkpoint). One row per (round, size, subset)."""
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--sizes {list(sizes)}: give positive subset sizes")
    if subsets < 1:
        raise ConfigError(f"--subsets {subsets}: must be >= 1")
    exp = load_run(run_dir)
    found = _select(find_checkpoints(run_dir), rounds)
    x_all, y_all = exp.train_x, exp.train_y
    n = len(y_all)
    if max(sizes) > n:
        raise ConfigError(f"--sizes {list(sizes)}: the training split has only {n} samples")
    dev = exp.device
    model = exp.model.to(dev)
    draws = {(s, i): torch.from_numpy(np.random.default_rng([seed, s, i, 0x5B]).choice(n, size=s, replace=False)) for s in sizes for i in range(subsets)}
    rows = []
    for rnd, path in found:
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        for (size, i), idx in draws.items():
            t0 = time.perf_counter()
            op = model_hessian(model, x_all[idx].to(dev), y_all[idx].to(dev), batch_size=512, task=exp.task)
            est: StableRank = stable_rank(op, probes=probes, lanczos_steps=lanczos_steps, seed=seed + i, confidence=confidence)
            row = {"round": rnd, "size": size, "subset": i, **est.as_dict(), "seconds": time.perf_counter() - t0, "parameters": op.dim}
            rows.append(row)
            if on_result:
                on_result(row)
    if out is not None:
        _write_stable_rank(rows, Path(out), sizes)
    return rows


def summarize_stable_rank(rows: list[dict]) -> list[dict]:
    """Per (round, size): mean stable rank over subsets, their spread, and the mean CI."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["round"], r["size"]), []).append(r)
    out = []
    for (rnd, size), rs in sorted(groups.items()):
        v = np.array([r["stable_rank"] for r in rs])
        out.append(
            {
                "round": rnd,
                "size": size,
                "subsets": len(rs),
                "stable_rank": float(v.mean()),
                "sd_over_subsets": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "ci_low": float(np.mean([r["ci_low"] for r in rs])),
                "ci_high": float(np.mean([r["ci_high"] for r in rs])),
                "spectral_norm": float(np.mean([r["spectral_norm"] for r in rs])),
            }
        )
    return out


def _write_stable_rank(rows: list[dict], out: Path, sizes: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_stable_rank(rows)
    (out / "stable_rank.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n", encoding="utf-8")
    rounds = sorted({s["round"] for s in summary})
    by = {(s["round"], s["size"]): s for s in summary}
    conf = rows[0]["confidence"] if rows else 0.95
    head = "| round | " + " | ".join(f"srank, n = {s} (mean ± sd over subsets) [{100 * conf:.0f}% CI]" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for r in rounds:
        cells = [f"{by[r, s]['stable_rank']:.2f} ± {by[r, s]['sd_over_subsets']:.2f} [{by[r, s]['ci_low']:.2f}, {by[r, s]['ci_high']:.2f}]" for s in sizes]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    (out / "stable_rank.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in sizes:
        m = np.array([by[r, s]["stable_rank"] for r in rounds])
        sd = np.array([by[r, s]["sd_over_subsets"] for r in rounds])
        ax.plot(rounds, m, marker="o", label=f"subset size {s}")
        ax.fill_between(rounds, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("stable rank of the Hessian")
    ax.set_title("Hessian stable rank along training (band: ±1 sd over subsets)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "stable_rank.png", dpi=120)
    plt.close(fig)


def analyze_gradient_similarity(
    run_dir: str | Path,
    *,
    clients: int | Sequence[int] = 10,
    rank: int = 4,
    rounds: Sequence[int] | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Mean pairwise cosine similarity of clients' full gradients vs their rank-``rank``
    approximations at each checkpoint. ``clients``: how many (a seeded random choice) or which ids."""
    exp = load_run(run_dir)
    found = _select(find_checkpoints(run_dir), rounds)
    k = len(exp.clients)
    if isinstance(clients, int):
        if not 2 <= clients <= k:
            raise ConfigError(f"--clients {clients}: must be in [2, {k}] (the run has {k} clients)")
        ids = sorted(int(c) for c in np.random.default_rng([seed, 0xC11]).choice(k, size=clients, replace=False))
    else:
        ids = sorted(set(clients))
        bad = [c for c in ids if not 0 <= c < k]
        if bad or len(ids) < 2:
            raise ConfigError(f"--clients {list(clients)}: need 2 or more ids in [0, {k})")
    dev = exp.device
    model = exp.model.to(dev)
    data = {cid: exp.clients[cid].to(dev) for cid in ids}
    rows = []
    for rnd, path in found:
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        res = gradient_similarity(model, data, rank, task=exp.task)
        row = {"round": rnd, "rank": rank, "clients": ids, "full": res.full, "low_rank": res.low_rank, "per_layer": res.per_layer}
        rows.append(row)
        if on_result:
            on_result(row)
    if out is not None:
        _write_similarity(rows, Path(out))
    return rows


def _write_similarity(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_similarity.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    layers = list(rows[0]["per_layer"]) if rows else []
    r = rows[0]["rank"] if rows else 0
    head = f"| round | all layers: full | rank {r} | " + " | ".join(f"{name}: full | rank {r}" for name in layers) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(layers)]
    for row in rows:
        cells = [f"{row['full']:.3f}", f"{row['low_rank']:.3f}"]
        for name in layers:
            cells += [f"{row['per_layer'][name]['full']:.3f}", f"{row['per_layer'][name]['low_rank']:.3f}"]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    (out / "gradient_similarity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rounds = [row["round"] for row in rows]
    ax.plot(rounds, [row["full"] for row in rows], marker="o", color="C0", label="full gradients (all layers)")
    ax.plot(rounds, [row["low_rank"] for row in rows], marker="o", color="C1", label=f"rank-{r} approximations (all layers)")
    for j, name in enumerate(layers):
        ax.plot(rounds, [row["per_layer"][name]["full"] for row in rows], color="C0", alpha=0.3, lw=1, ls=["--", ":", "-."][j % 3])
        ax.plot(rounds, [row["per_layer"][name]["low_rank"] for row in rows], color="C1", alpha=0.3, lw=1, ls=["--", ":", "-."][j % 3])
    ax.set_xlabel("round")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title(f"Clients' gradients: full vs rank {r} (faint: per layer)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gradient_similarity.png", dpi=120)
    plt.close(fig)
