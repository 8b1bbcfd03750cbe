"""Peak memory of one FedAvg round at 100 and 1,000 clients per round: uploads folded in as they
arrive (streaming aggregation, issue 18 item 2) against the code before it, which held every
sampled client's decoded upload until the round aggregated.

Each (code, model, clients) runs in a fresh subprocess, so its peak RSS (VmHWM) is its own.
"Before" is the library at git revision ``--before`` (checked out with ``git worktree`` into a
temporary folder and put first on the child's PYTHONPATH); "after" is this checkout. The child
builds a :class:`rankfed.Federation` of an MLP (784 inputs, the ``--models`` hidden widths, 10
classes) over N clients of 8 synthetic samples each, runs one round with every client sampled
(one local step each, batch 8), and reports VmHWM after building the simulator and at the end,
and the final model, so the two codes' results are compared (max absolute difference).

    .venv/bin/python benchmarks/round_memory.py                     # 2.5 MB MLP at 100 and 1,000; 45 MB MLP at 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _report import peak_rss_mib, publish, run_child  # noqa: E402

MiB = 1 << 20




def child(spec: dict) -> dict:
    import torch
    from torch import nn

    import rankfed as rf

    torch.set_num_threads(1)
    hidden = spec["hidden"]

    def make_model():
        layers, width = [], 784
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, 10))

    gen = torch.Generator().manual_seed(0)
    n = spec["clients"]
    clients = [(torch.randn(8, 784, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]
    fed = rf.Federation(model=make_model, clients=clients, algorithm=rf.FedAvg(), local=rf.LocalTraining(lr=0.05, batch_size=8, epochs=1), seed=0)
    sim = fed.simulator(rounds=1, clients_per_round=n)
    built = peak_rss_mib()
    sim.run()
    state = sim.server.global_model_state()
    params = sum(v.numel() for v in state.values())
    out = Path(spec["out"])
    torch.save(state, out)
    return {"built_mib": built, "peak_mib": peak_rss_mib(), "params": params}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="2bf8101", help="git revision of the code before streaming aggregation")
    ap.add_argument("--runs", default="784:100,784:1000,3000x3000:100", help="HIDDEN:CLIENTS pairs (hidden widths joined by x)")
    ap.add_argument("--out", help="write the report here only (not results/ nor RESULTS.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="rankfed-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True, capture_output=True)
        try:
            for item in args.runs.split(","):
                hidden_s, clients_s = item.split(":")
                hidden = [int(h) for h in hidden_s.split("x")]
                res = {}
                for code, src in (("before", before / "src"), ("after", ROOT / "src")):
                    spec = {"hidden": hidden, "clients": int(clients_s), "out": str(Path(tmp) / f"{code}.pt")}
                    res[code] = run_child(__file__, spec, {"PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}, timeout=3600)
                    print(f"{code:6s} mlp {hidden_s} x {clients_s} clients: {res[code]}", flush=True)
                a, b = torch.load(Path(tmp) / "before.pt"), torch.load(Path(tmp) / "after.pt")
                diff = max(float((a[k] - b[k]).abs().max()) for k in a)
                model_mib = res["after"]["params"] * 4 / MiB
                rows.append((hidden_s, model_mib, int(clients_s), res["before"], res["after"], diff))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False, capture_output=True)

    lines = [
        "| MLP hidden | model | clients per round | round peak before (MiB) | round peak after (MiB) | after / before | "
        "growth over the built simulator, before | after | max abs difference of the models |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for hidden_s, model_mib, clients, b, a, diff in rows:
        lines.append(
            f"| {hidden_s} | {model_mib:.1f} MiB | {clients:,} | {b['peak_mib']:,.0f} | {a['peak_mib']:,.0f} | {a['peak_mib'] / b['peak_mib']:.2f}x | "
            f"{b['peak_mib'] - b['built_mib']:,.0f} MiB ({(b['peak_mib'] - b['built_mib']) / model_mib:.1f} models) | "
            f"{a['peak_mib'] - a['built_mib']:,.0f} MiB ({(a['peak_mib'] - a['built_mib']) / model_mib:.1f} models) | {diff:.1e} |"
        )
    body = "\n".join(lines) + (
        "\n\nOne FedAvg round, every client sampled, one local step of batch 8 each, sequential execution, one thread. "
        f"Before: revision {args.before} (every decoded upload held until the round aggregates); after: this checkout "
        "(each upload checked and folded into the round's running sums as it arrives, then dropped). Growth: the peak "
        "over the RSS after building the simulator (data and models), in MiB and in model sizes. The models of the two "
        "codes differ by float rounding only: the mean is now sum_i n_i d_i / sum_i n_i instead of sum_i (n_i / n) d_i.\n"
    )
    publish("round_memory", "Streaming aggregation: peak memory of a round at 100 and 1,000 clients (issue 18, item 2)", body, args.out)


if __name__ == "__main__":
    main()
