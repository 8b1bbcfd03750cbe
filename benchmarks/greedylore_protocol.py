"""GreedyLore on its own protocol: dense vs PowerSGD vs a random subspace vs GreedyLore at about equal
bytes per step, 3 seeds, on (a) the Fashion-MNIST 2NN and (b) a small character transformer trained
from scratch on tinyshakespeare with AdamW (the paper's transformer-pretraining analogue).

The earlier study (benchmarks/ddp_compressors.py) ran GreedyLore outside the paper's regime
(ranks 1-4, 10 dense warm-up steps, SGD momentum 0.9 at the dense lr, the 10 x 200 classifier
compressed). Here, as the paper's experiments and the authors' code do: embeddings and the output
head all-reduced dense, a dense warm-up and subspace refresh that are long against the run,
ranks >= 8 on layers of width >= 256 (the transformer's), AdamW for the transformer.

Equal bytes: PowerSGD sends r (n + m) numbers per matrix, the random subspace r max(n, m) and
GreedyLore r max(n, m) + min(n, m); PowerSGD rank 8 and the others at rank 12 (transformer: 256 x 256 and
256 x 1024 matrices) or rank 11 (2NN: 200 x 784 and 200 x 200) send about the same per step (the table shows the bytes).

Everything is a `rankfed ddp` run on 4 gloo workers sharing the 2-core CPU (step times are not
speed figures).

    python benchmarks/greedylore_protocol.py all
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import HERE, write_result  # noqa: E402
from ddp_compressors import CONFIG_TEXT as FMNIST_CONFIG  # noqa: E402

ROOT = HERE.parent
RUNS = HERE / "runs" / "greedylore_protocol"
SEEDS = [0, 1, 2]

STUDIES = {
    "fmnist": {
        "config": FMNIST_CONFIG,  # the earlier study's task and optimiser
        "steps": 1500, "eval_every": 250, "warmup": 300, "update_gap": 300,
        "methods": {"dense": ("none", 1), "PowerSGD r8": ("powersgd", 8), "random r11": ("random", 11), "GreedyLore r11": ("greedylore", 11)},
        "title": "Fashion-MNIST 2NN (784-200-200-10; fc1, fc2 compressed, the classifier dense), SGD momentum 0.9, lr 0.05",
    },
    "shakespeare": {
        "config": """# written by benchmarks/greedylore_protocol.py
[task]
dataset = "shakespeare"
data_dir = "../shared/data/tinyshakespeare.txt"
model = "transformer"
model_options = { d_model = 256, n_heads = 4, n_layers = 1, ff = 1024 }
dataset_options = { seq_len = 32, stride = 96 }
[federation]
seed = 0
[client]
optimizer = "adamw"
lr = 0.001
batch_size = 32
""",
        "steps": 400, "eval_every": 100, "warmup": 100, "update_gap": 100,
        "methods": {"dense": ("none", 1), "PowerSGD r8": ("powersgd", 8), "random r12": ("random", 12), "GreedyLore r12": ("greedylore", 12)},
        "title": "character transformer (d_model 256, 1 block, ff 1024; embeddings and head dense), tinyshakespeare windows of 32, AdamW lr 1e-3",
    },
}


def run(study: str, label: str, seed: int, args) -> dict:
    spec = STUDIES[study]
    comp, rank = spec["methods"][label]
    out = RUNS / study / f"{label.replace(' ', '-')}-seed{seed}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cfg = RUNS / study / "config.toml"
    cmd = [sys.executable, "-m", "rankfed", "-q", "ddp", os.path.relpath(cfg, ROOT), "--workers", str(args.workers), "--compressor", comp, "--rank", str(rank),
           "--steps", str(spec["steps"]), "--eval-every", str(spec["eval_every"]), "--warmup", str(spec["warmup"]), "--update-gap", str(spec["update_gap"]),
           "--set", f"federation.seed={seed}", "--out", os.path.relpath(out, ROOT), "--overwrite"]  # fmt: skip
    print("$", " ".join(shlex.quote(a) for a in ["rankfed", *cmd[3:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "summary.json").read_text())


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ms(xs, scale=1.0, fmt=".2f") -> str:
    xs = [scale * x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):{fmt}} +- {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def report(study: str, args) -> str:
    spec = STUDIES[study]
    res = {(m, s): run(study, m, s, args) for m in spec["methods"] for s in SEEDS}
    lines = ["| method | compressor, rank | final test loss | final acc | best acc | bytes per step per worker (median after warm-up) | vs dense | mean over the run, warm-up and refreshes included | mean captured fraction | mean residual ratio | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    curves = {}
    for m, (comp, rank) in spec["methods"].items():
        finals, accs, bests, sent, mean_sent, cap, resid, div = [], [], [], [], [], [], [], 0
        for s in SEEDS:
            sm = res[(m, s)]
            out = RUNS / study / f"{m.replace(' ', '-')}-seed{s}"
            rows = rows_of(out)
            evals = [r for r in rows if r.get("accuracy") is not None]
            diag = [r for r in rows if r.get("captured_fraction") is not None and r["round"] > spec["warmup"]]
            if sm.get("status") == "diverged":
                div += 1
                continue
            finals.append(evals[-1]["loss"])
            accs.append(evals[-1]["accuracy"])
            bests.append(sm["best_accuracy"])
            after = [r["bytes_per_step"] for r in (diag or evals) if r["round"] > spec["warmup"]]
            sent.append(statistics.median(after) if after else sm["mean_bytes_per_step"])
            mean_sent.append(sm["mean_bytes_per_step"])
            if diag:
                cap.append(statistics.mean(r["captured_fraction"] for r in diag))
                resid.append(statistics.mean(r["residual_ratio"] for r in diag if r.get("residual_ratio") is not None))
            curves.setdefault(m, []).append([(r["round"], r["loss"]) for r in evals])
        dense_bytes = res[(m, SEEDS[0])]["dense_bytes_per_step"]
        lines.append(
            f"| {m} | {comp}{'' if comp == 'none' else f', r{rank}'} | {ms(finals, fmt='.3f')} | {ms(accs, 100)}% | {ms(bests, 100)}% | {ms(sent, 1e-3, '.1f')} kB | "
            f"{ms([x / dense_bytes for x in sent], 100, '.1f')}% | {ms([x / dense_bytes for x in mean_sent], 100, '.1f')}% | {ms(cap, fmt='.3f')} | {ms(resid, fmt='.3f')} | {div}/{len(SEEDS)} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (m, cs) in enumerate(curves.items()):
        for j, c in enumerate(cs):
            ax.plot(*zip(*c), color=f"C{i}", alpha=0.8, marker="o", ms=3, label=m if j == 0 else None)
    ax.axvline(spec["warmup"], color="k", lw=0.6, ls=":", label="end of dense warm-up")
    ax.set_xlabel("step")
    ax.set_ylabel("test loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{study}: {args.workers} gloo workers, seeds {SEEDS}", fontsize=9)
    fig.tight_layout()
    png = HERE / "results" / f"greedylore_protocol_{study}.png"
    fig.savefig(png, dpi=120)
    return f"""### ({'a' if study == 'fmnist' else 'b'}) {spec['title']}

{args.workers} gloo workers, batch 32 per worker, {spec['steps']} steps, dense warm-up {spec['warmup']} steps, GreedyLore
refresh every {spec['update_gap']} steps, error feedback for every low-rank method, seeds {SEEDS} (mean +- sd). Loss and
accuracy on the test split at the last step; bytes are what each worker puts into all-reduces in a compressed step
(x 4 bytes per number; equal to what it receives). Captured fraction = ||P R||^2 / ||X||^2 and residual ratio =
||e|| / ||g||, means over the compressed steps (diagnostics of rankfed ddp, worker 0).

{chr(10).join(lines)}

![test loss]({png.relative_to(HERE)})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=["fmnist", "shakespeare", "all"])
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    studies = list(STUDIES) if args.study == "all" else [args.study]
    for st in studies:
        (RUNS / st).mkdir(parents=True, exist_ok=True)
        (RUNS / st / "config.toml").write_text(STUDIES[st]["config"])
    parts = [report(st, args) for st in studies]
    body = "\n".join(parts)
    print(body)
    write_result("greedylore_protocol" if args.study == "all" else f"greedylore_protocol_{args.study}", "GreedyLore on its own protocol: dense, PowerSGD, random subspace, GreedyLore at equal bytes, 3 seeds", body)


if __name__ == "__main__":
    main()
