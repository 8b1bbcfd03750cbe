"""Data-parallel training with gradient compression: dense, torch's powerSGD_hook, rankfed PowerSGD, GreedyLore.

Same model, data, steps and seeds for every run; one `rankfed ddp` per (compressor,
rank), run one after another so step times are not disturbed by each other.
Fashion-MNIST, the 2NN (784-200-200-10), 4 gloo workers on the CPU (or NCCL with
--backend nccl on a machine with 4 GPUs), batch 32 per worker, SGD momentum 0.9,
lr 0.05, 10 dense warm-up steps, GreedyLore refreshing its subspace every 100 steps, every matrix
compressed (the classifier too: --no-dense-head; rankfed ddp now keeps the head dense by default).
This is the protocol the issue-19 review found outside GreedyLore's regime; benchmarks/greedylore_protocol.py
is the study on the paper's own protocol.

    python benchmarks/ddp_compressors.py --workers 4 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import HERE, write_result  # noqa: E402

ROOT = HERE.parent
RUNS = HERE / "runs" / "ddp_compressors"
CONFIG_TEXT = """# written by benchmarks/ddp_compressors.py
[task]
dataset = "fmnist"
model = "mlp"
[federation]
seed = 0
[client]
optimizer = "sgd"
lr = 0.05
momentum = 0.9
batch_size = 32
"""
RANKS = [1, 2, 4, 8]
COMPRESSORS = ["torch-powersgd", "powersgd", "greedylore"]


def run(args, compressor: str, rank: int) -> dict:
    out = RUNS / (f"{compressor}-r{rank}" if compressor != "none" else "none") / f"w{args.workers}-s{args.steps}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "rankfed", "-q", "ddp", os.path.relpath(RUNS / "config.toml", ROOT), "--workers", str(args.workers), "--compressor", compressor,
           "--rank", str(rank), "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--warmup", "10", "--update-gap", "100",
           "--backend", args.backend, "--no-dense-head", "--out", os.path.relpath(out, ROOT), "--overwrite"]
    print("$", " ".join(shlex.quote(a) for a in ["rankfed", *cmd[3:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "config.toml").write_text(CONFIG_TEXT)

    results = {("none", 0): run(args, "none", 1)}
    for rank in RANKS:
        for comp in COMPRESSORS:
            results[(comp, rank)] = run(args, comp, rank)

    dense = results[("none", 0)]
    lines = [
        "| compressor | rank | final acc | best acc | bytes per step per worker | vs dense | mean step time | vs dense step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (comp, rank), s in results.items():
        step = sum(s["mean_step_s_per_worker"]) / len(s["mean_step_s_per_worker"])
        dstep = sum(dense["mean_step_s_per_worker"]) / len(dense["mean_step_s_per_worker"])
        if s.get("status") == "diverged":
            lines.append(f"| {comp} | {rank or '-'} | diverged at step {s['diverged_at_step']} | - | {s['mean_bytes_per_step'] / 1e3:.1f} kB | {100 * s['bytes_vs_dense']:.1f}% | - | - |")
            continue
        lines.append(
            f"| {comp}{' (bytes by rule)' if comp == 'torch-powersgd' else ''} | {rank or '-'} | {100 * s['final_accuracy']:.2f}% | {100 * s['best_accuracy']:.2f}% | "
            f"{s['mean_bytes_per_step'] / 1e3:.1f} kB | {100 * s['bytes_vs_dense']:.1f}% | {1e3 * step:.1f} ms | {step / dstep:.2f}x |"
        )

    def acc(comp, r):
        s = results[(comp, r)]
        return None if s.get("status") == "diverged" else s["final_accuracy"]

    wins = []
    for r in RANKS:
        g, p, t = acc("greedylore", r), acc("powersgd", r), acc("torch-powersgd", r)
        others = [a for a in (p, t) if a is not None]
        if g is not None and others:
            wins.append(f"rank {r}: GreedyLore {100 * g:.2f}% vs best PowerSGD {100 * max(others):.2f}% ({'ahead' if g > max(others) else 'behind'})")
        else:
            wins.append(f"rank {r}: GreedyLore {'diverged' if g is None else f'{100 * g:.2f}%'}")
    verdict = "; ".join(wins) + (
        ". GreedyLore sends k + r·max(n, m) numbers per matrix and PowerSGD r·(n + m), so at equal rank their bytes differ"
        " slightly; compare along the bytes axis of the plot."
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for comp, marker in zip(COMPRESSORS, "o^s"):
        done = [r for r in RANKS if results[(comp, r)].get("status") != "diverged"]
        pts = [(results[(comp, r)]["mean_bytes_per_step"] / 1e3, 100 * results[(comp, r)]["final_accuracy"]) for r in done]
        if not pts:
            continue
        ax.plot(*zip(*pts), marker + "-", label=comp)
        for r, (b, a) in zip(done, pts):
            ax.annotate(f"r{r}", (b, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * dense["final_accuracy"], color="k", ls="--", lw=0.8, label=f"dense ({dense['mean_bytes_per_step'] / 1e3:.0f} kB/step)")
    ax.set_xscale("log")
    ax.set_xlabel("kB all-reduced per step per worker (log)")
    ax.set_ylabel(f"test accuracy after {args.steps} steps (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Fashion-MNIST 2NN, {args.workers} workers ({args.backend})")
    fig.tight_layout()
    png = HERE / "results" / "ddp_compressors.png"
    fig.savefig(png, dpi=120)

    body = f"""Fashion-MNIST, 2NN (199,210 parameters), {args.workers} workers ({args.backend}), batch 32 per worker, SGD momentum 0.9,
lr 0.05, {args.steps} steps, seed 0; low-rank compressors: 10 dense warm-up steps, error feedback; GreedyLore refreshes its
subspace every 100 steps. Bytes are the numbers each worker puts into all-reduces x 4 (torch's hook: counted by its
documented compression rule, not measured). Step time: forward, backward, communication and optimiser step, mean over
workers; the workers share the machine's cores. Runs: `rankfed ddp benchmarks/runs/ddp_compressors/config.toml ...`,
commands in each summary.json. A run whose weights or gradients turn non-finite stops there ("diverged").

{chr(10).join(lines)}

**Here:** {verdict}

![accuracy vs bytes](results/ddp_compressors.png)
"""
    print(body)
    write_result("ddp_compressors", "Data-parallel gradient compression: dense, PowerSGD (torch and rankfed), GreedyLore", body)


if __name__ == "__main__":
    main()
