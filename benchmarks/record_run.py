"""Record finished run folders as a section of benchmarks/RESULTS.md.

For each run: the command that produced it (from its summary.json), rounds,
best accuracy and the round it was reached, final accuracy, accuracy at a few
milestones, bytes; plus one plot of all of them. The numbers are read from the
run folders, never typed in.

    python benchmarks/record_run.py fmnist_fedavg "FedAvg on Fashion-MNIST (MAPA setting)" RUN_DIR \
        --note "The MAPA paper reports 89.2% for FedAvg in this setting."
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import HERE, write_result  # noqa: E402

from rankfed.plot import plot_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("title")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--note", default="")
    ap.add_argument("--milestones", default="50,100,200,500,1000,1500")
    ap.add_argument("--keep", action="store_true", help="copy metrics.jsonl and summary.json to benchmarks/runs/NAME/")
    args = ap.parse_args()
    marks = [int(m) for m in args.milestones.split(",")]
    parts = []
    for run in map(Path, args.runs):
        s = json.loads((run / "summary.json").read_text())
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        by_round = {r["round"]: r for r in rows}
        at = ", ".join(f"{m}: {100 * by_round[m]['accuracy']:.2f}%" for m in marks if m in by_round)
        parts.append(
            f"**{run.name}**: `{s.get('command') or '(command not recorded)'}`\n\n"
            f"- {s['rounds']} rounds, {s['clients']} clients ({s['clients_per_round']} per round), {s['client_kind']} clients, model {s['model']} ({s['num_parameters']:,} parameters)\n"
            f"- best accuracy **{100 * s['best_accuracy']:.2f}%** at round {s['best_round']}; final {100 * s['final_accuracy']:.2f}%\n"
            f"- accuracy at rounds {at}\n"
            f"- uplink {s['total_uplink_bytes'] / 1e6:.1f} MB, downlink {s['total_downlink_bytes'] / 1e6:.1f} MB, wall time {s['wall_s'] / 60:.1f} min ({s['mean_round_s']:.3f} s per round of training)\n"
        )
        if args.keep:
            dst = HERE / "runs" / args.name / run.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("metrics.jsonl", "summary.json", "config.toml"):
                shutil.copy(run / f, dst / f)
    png = HERE / "results" / f"{args.name}.png"
    plot_runs([Path(r) for r in args.runs], png, bytes_kind="uplink", title=args.title)
    body = "\n".join(parts) + (f"\n{args.note}\n" if args.note else "") + f"\n![{args.title}](results/{png.name})\n"
    print(body)
    write_result(args.name, args.title, body)


if __name__ == "__main__":
    main()
