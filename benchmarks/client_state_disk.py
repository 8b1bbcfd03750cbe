"""Client state on disk (issue 18 item 3): top-k with error feedback on the 2.5 MB MLP at 1,000
and 10,000 clients, ``federation.client_state = "disk"`` with a bounded cache against the
state in memory.

Error feedback keeps a dense residual per client that has taken part (one model each): in
memory that is clients x 2.5 MB (25 GB at 10,000 clients, more than this machine has). On
disk the simulator holds at most ``--cache`` clients' states in memory, so its peak RSS is set
by the cache, not by the clients. Each configuration runs in a fresh subprocess (its own
VmHWM); the memory and disk runs at the same size must end with bitwise the same model.

The child builds a :class:`rankfed.Federation` of an MLP (784-784-10, 623,290 parameters)
over N clients of 8 synthetic samples each, FedAvg with ``compressor="topk"``,
``topk_ratio=0.01``, ``error_feedback=True``, and runs ``--rounds`` rounds with
``--participation`` of the clients each (one local step of batch 8 per client).

    .venv/bin/python benchmarks/client_state_disk.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import peak_rss_mib, publish, run_child  # noqa: E402

MiB = 1 << 20




def child(spec: dict) -> dict:
    import torch
    from torch import nn

    import rankfed as rf
    from rankfed.sim import Simulator

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = spec["clients"]
    clients = [(torch.randn(8, 784, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]
    fed = rf.Federation(
        model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.ReLU(), nn.Linear(784, 10)),
        clients=clients,
        algorithm=rf.FedAvg(compressor="topk", topk_ratio=0.01, error_feedback=True),
        local=rf.LocalTraining(lr=0.05, batch_size=8, epochs=1),
        seed=0,
    )
    per_round = max(1, round(spec["participation"] * n))
    opts = {"client_state": spec["state"], "client_state_cache": spec["cache"]}
    sim = Simulator(fed.experiment(spec["rounds"], per_round, **opts), spec["dir"])
    built = peak_rss_mib()
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    states = sim.client_states
    disk = sum(p.stat().st_size for p in Path(spec["dir"]).glob("*.pt")) if spec["state"] == "disk" else 0
    with_state = len(states)
    cached = states.cached if spec["state"] == "disk" else with_state
    torch.save(sim.server.global_model_state(), spec["out"])
    return {"built_mib": built, "peak_mib": peak_rss_mib(), "wall_s": wall, "with_state": with_state, "cached": cached, "disk_bytes": disk}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="memory:1000,disk:1000,disk:10000", help="STATE:CLIENTS pairs")
    ap.add_argument("--cache", type=int, default=64, help="federation.client_state_cache of the disk runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--participation", type=float, default=0.3)
    ap.add_argument("--out", help="write the report here only (not results/ nor RESULTS.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    rows, models = [], {}
    with tempfile.TemporaryDirectory(prefix="rankfed-state-bench-") as tmp:
        for item in args.runs.split(","):
            state, clients_s = item.split(":")
            clients = int(clients_s)
            out = Path(tmp) / f"{state}-{clients}.pt"
            spec = {"state": state, "clients": clients, "cache": args.cache, "rounds": args.rounds, "participation": args.participation, "dir": str(Path(tmp) / f"state-{state}-{clients}"), "out": str(out)}
            res = run_child(__file__, spec)
            print(f"{state:6s} {clients:6d} clients: {res}", flush=True)
            models[(state, clients)] = torch.load(out)
            rows.append((state, clients, res))
    lines = [
        "| client state | clients | clients with state | states in memory at the end | peak RSS (MiB) | over the built simulator (MiB) | state on disk | wall (s) | model equal to the memory run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for state, clients, r in rows:
        ref = models.get(("memory", clients))
        same = "-" if state == "memory" or ref is None else ("bitwise" if all(torch.equal(ref[k], models[(state, clients)][k]) for k in ref) else "NO")
        disk = f"{r['disk_bytes'] / MiB:,.0f} MiB" if state == "disk" else "-"
        lines.append(f"| {state}{f' (cache {args.cache})' if state == 'disk' else ''} | {clients:,} | {r['with_state']:,} | {r['cached']:,} | {r['peak_mib']:,.0f} | {r['peak_mib'] - r['built_mib']:,.0f} | {disk} | {r['wall_s']:.0f} | {same} |")
    body = "\n".join(lines) + (
        f"\n\nFedAvg + top-k 1% with error feedback, {args.rounds} rounds, {args.participation:.0%} of the clients a round, one local "
        "step of batch 8 per client, sequential, one thread. A residual is one model (623,290 float32 numbers, 2.4 MiB) per client "
        "with state. Over the built simulator: the peak minus the RSS after building it (data and models).\n"
    )
    publish("client_state_disk", "Client state on disk: error feedback at 10,000 clients (issue 18, item 3)", body, args.out)


if __name__ == "__main__":
    main()
