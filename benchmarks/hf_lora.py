"""FedLoRU paper Figure 3 at CPU scale on a Hugging Face GPT-2 with PEFT adapters (issue 17).

Runs ``examples/hf_lora.py`` (unless ``--from`` names its output folder already), then writes the
train and test loss curves of every algorithm it ran (``results/hf_lora.png``) and a markdown
table (``results/hf_lora.md``) beside the paper's claim: FedLoRU's test loss below FedLoRA's after
round 25 (LLaMA2-3B on Alpaca, rank 8, 10 clients, 50% participation, 1 local epoch, AdamW,
merges every 15 rounds).

    python benchmarks/hf_lora.py -- --rounds 40 --max-blocks 0 --pretrain-steps 1500 --pretrain-lr 2e-3 --lr 3e-3 --algorithms fedlora,fedloru
    python benchmarks/hf_lora.py --from benchmarks/runs/hf_lora --name hf_lora
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def report(folder: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = json.loads((folder / "summary.json").read_text())
    runs = s["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (algo, r) in enumerate(runs.items()):
        color = f"C{i}"
        axes[0].plot(*zip(*r["train_loss"]), color=color, label=algo)
        axes[1].plot(*zip(*r["test_loss"]), color=color, marker=".", label=algo)
    for ax, title in zip(axes, ("train loss (sampled clients' mean)", "test loss (global model)")):
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    png = HERE / "results" / f"{name}.png"
    fig.savefig(png, dpi=110)
    lines = [
        f"Command: `{s['command']}` (then `python benchmarks/hf_lora.py --from {folder.relative_to(HERE.parent) if folder.is_relative_to(HERE.parent) else folder} --name {name}`)  ",
        f"Machine: {platform.machine()}, 2 cores, no GPU, Python {platform.python_version()}, torch {torch.__version__}; wall {s['wall_s']:.0f} s for everything (shared machine: s/round is not a speed figure)",
        "",
        f"GPT-2 of {s['parameters']:,} parameters built from a GPT2Config; {len(s['clients'])} clients = the largest roles ({', '.join(s['clients'][:3])}, ...); "
        f"saved PEFT output reloads with max |logit diff| {s['reload_max_abs_diff']:.1e}.",
        "",
        "| method | adapter numbers sent | uplink per upload | total uplink | total downlink | test loss r1 | r25 | final (round) | final perplexity | personal accuracy | s/round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for algo, r in runs.items():
        test = dict(r["test_loss"])
        last = max(test)
        run = json.loads((folder / algo / "summary.json").read_text())  # the run folder's own summary
        per_upload = run["mean_uplink_bytes_per_upload"]
        sent = f"k = {run['algorithm_options']['k']}" if algo == "mapa" else f"{r['adapter_numbers']:,}"
        pa = "" if r.get("personal_accuracy") is None else f"{r['personal_accuracy']:.2%}"
        lines.append(
            f"| {algo} | {sent} | {per_upload / 1e3:.1f} kB | {r['uplink_bytes'] / 1e6:.2f} MB | {r['downlink_bytes'] / 1e6:.2f} MB | "
            f"{test[min(test)]:.4f} | {test.get(25, float('nan')):.4f} | {test[last]:.4f} ({last}) | {r['final_perplexity']:.1f} | {pa} | {r['s_per_round']:.2f} |"
        )
    lines += ["", f"![train and test loss](results/{name}.png)"]
    text = "\n".join(lines) + "\n"
    (HERE / "results" / f"{name}.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", help="an examples/hf_lora.py output folder to report (no run)")
    p.add_argument("--name", default="hf_lora")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="after --: examples/hf_lora.py's arguments")
    args = p.parse_args()
    folder = Path(args.source) if args.source else HERE / "runs" / args.name
    if not args.source:
        import hf_lora

        rest = [a for a in args.rest if a != "--"]
        hf_lora.main([*rest, "--out", str(folder)])
    print(report(folder, args.name))


if __name__ == "__main__":
    main()
