"""Seconds per round: the in-process simulator, Flower's simulation runtime and a local Flower deployment.

One small task (scikit-learn's digits over 4 clients, 3 per round, an MLP with one hidden layer
of 32: almost no training work, so what is measured is each engine's own cost per round), the
same experiment on four engines, in one run on one machine:

* ``simulator``: ``rankfed run`` (one process);
* ``flower simulate``: ``rankfed flower simulate --supernodes 2 --num-cpus 1`` (Ray on this
  machine: as many workers as CPUs, each a long-lived process that runs message after message);
* ``flower run``: ``rankfed flower run --supernodes 2`` (a flower-superlink and 2 flower-supernode
  processes on 127.0.0.1; every message runs in a fresh ``flwr-clientapp`` process);
* ``flower run, process isolation``: the same deployment with ``flower-supernode --isolation
  process`` and a separately started ``flower-superexec`` per SuperNode (Flower 1.41's way of
  running the ClientApps outside the SuperNode).

Reported per algorithm and engine: round 1 (which pays each engine's start of its client
processes and the first load of the data), the mean of the rounds after it, the whole call's
wall time (process and Ray start-up included), and whether the final model and payload bytes
are the simulator's.

    python benchmarks/flower_engines.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402

from rankfed.app.config import load_config  # noqa: E402
from rankfed.app.experiment import run_experiment  # noqa: E402
from rankfed.app.flower import run_flower, simulate_flower  # noqa: E402
from rankfed.flower.deploy import LocalDeployment, _free_port  # noqa: E402

HERE = Path(__file__).resolve().parent

BASE = [
    "task.dataset=digits",
    "task.model=mlp",
    "task.model_options={hidden=[32]}",
    "federation.clients=4",
    "federation.participation=0.75",
    "federation.seed=5",
    "federation.eval_every=1",
    "client.lr=0.05",
    "client.batch_size=32",
]
ALGORITHMS = {
    "fedavg": ["algorithm.name=fedavg"],
    "mapa": ["algorithm.name=mapa", "algorithm.k=64"],
    "fedloru": ["algorithm.name=fedloru", "algorithm.rank=4", "algorithm.tau=5", 'algorithm.patterns=["*"]'],
}
ENGINES = ("simulator", "flower simulate", "flower run", "flower run, process isolation")


class ProcessIsolationDeployment(LocalDeployment):
    """A LocalDeployment whose SuperNodes run with ``--isolation process``, each with its own
    ``flower-superexec`` (started here, pointed at the SuperNode's runtime API port), which
    starts the ``flwr-clientapp`` processes the SuperNode would otherwise start itself."""

    def start(self) -> ProcessIsolationDeployment:
        bindir = Path(sys.executable).parent
        real_spawn = self._spawn
        ports: list[int] = []

        def spawn(args, log_name):
            if log_name.startswith("supernode-"):
                port = _free_port()
                ports.append(port)
                args = [*args[: args.index("--port")], "--port", str(port), "--isolation", "process"]
            return real_spawn(args, log_name)

        self._spawn = spawn
        try:
            super().start()
        finally:
            self._spawn = real_spawn
        for i, port in enumerate(ports):
            self.nodes.append(self._spawn([str(bindir / "flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{port}"], f"superexec-{i}.log"))
        return self


def _rounds_s(run_dir: Path) -> list[float]:
    return [json.loads(x)["round_s"] for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--out", default=str(HERE / "runs" / "flower_engines"))
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/rows.json without running")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = json.loads((out / "rows.json").read_text()) if args.report_only else []
    for label in [] if args.report_only else args.algorithms.split(","):
        cfg = load_config(None, [*BASE, f"federation.rounds={args.rounds}", *ALGORITHMS[label]])
        runs = {
            "simulator": lambda d: run_experiment(cfg, d),
            "flower simulate": lambda d: simulate_flower(cfg, d, supernodes=2, num_cpus=1, timeout=3600),
            "flower run": lambda d: run_flower(cfg, d, supernodes=2, timeout=3600),
        }

        def isolated(d: Path) -> dict:
            d.mkdir(parents=True, exist_ok=True)
            with ProcessIsolationDeployment(2, d / "flower-logs") as dep:
                return run_flower(cfg, d / "run", superlink=dep.address, insecure=True, timeout=3600)

        runs["flower run, process isolation"] = isolated
        reference = None
        for engine in ENGINES:
            d = out / label / engine.replace(" ", "-").replace(",", "")
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            s = runs[engine](d)
            wall = time.perf_counter() - t0
            run_dir = d / "run" if engine == "flower run, process isolation" else d
            assert s["status"] == "completed", s
            state = torch.load(run_dir / "model.pt")
            reference = reference or (state, s)
            rs = _rounds_s(run_dir)
            row = {
                "algorithm": label,
                "engine": engine,
                "round1_s": rs[0],
                "later_round_s": sum(rs[1:]) / len(rs[1:]),
                "wall_s": wall,
                "max_weight_diff": max(float((state[k] - reference[0][k]).abs().max()) for k in state),
                "same_payload_bytes": all(s[k] == reference[1][k] for k in ("total_uplink_bytes", "total_downlink_bytes")),
                "ray_start_s": (s.get("simulation") or {}).get("ray_start_s"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.report_only:  # the report names the command that measured the rows
        sys.argv = json.loads((out / "argv.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "argv.json").write_text(json.dumps(sys.argv) + "\n")
    sim = {x["algorithm"]: x["later_round_s"] for x in rows if x["engine"] == "simulator"}
    lines = [
        "| algorithm | engine | round 1 s | rounds 2+ s (mean) | vs simulator, rounds 2+ | run s (start-up incl.) | max abs weight diff vs simulator | same payload bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['algorithm']} | {x['engine']} | {x['round1_s']:.3f} | {x['later_round_s']:.3f} | {x['later_round_s'] / sim[x['algorithm']]:.0f}x "
            f"| {x['wall_s']:.1f} | {x['max_weight_diff']:.1e} | {'yes' if x['same_payload_bytes'] else 'no'} |"
        )
    ray = [x["ray_start_s"] for x in rows if x["ray_start_s"] is not None]
    r = json.loads((out / "argv.json").read_text()) if args.report_only else sys.argv
    rounds = next((int(v) for k, v in zip(r, r[1:]) if k == "--rounds"), 10)
    body = f"""scikit-learn's digits over 4 clients (IID), 3 sampled per round, an MLP 64-32-10, 1 local epoch of batch 32, {rounds}
rounds, evaluation every round (excluded from round s). FedAvg, MAPA k = 64 (stateful: every virtual SuperNode or
SuperNode gets every round's broadcast), FedLoRU rank 4 on both layers, merged every 5 rounds. 2 virtual SuperNodes
or SuperNodes (clients 0, 2 on one, 1, 3 on the other); flwr 1.41.0, Ray {_ray_version()}; torch at 1 thread in
every process (OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}). "Round s" is a round's training and
communication, from rounds.jsonl.

{chr(10).join(lines)}

Ray started in {min(ray):.1f}-{max(ray):.1f} s in each `flower simulate` run (included in its run s, with the start
of the child process and of the 2 Ray workers, which import torch and rankfed on their first message: round 1).

Where the time goes. The simulator runs a round in 25-50 ms here (its FedAvg round 1 pays torch's first use in the
benchmark process). `flower simulate` keeps its Ray workers (processes)
across messages, so a later round costs what Flower's simulation runtime adds around the same client work: it looks
for new messages every 0.1 s and rankfed's ServerApp for replies every 0.1 s, each message ships its virtual
SuperNode's Context (the cached client data, a replica) to a worker and back through Ray, and the ClientApp builds
the federation and model for the message: 0.17-0.24 s a round, 5-7x the simulator. A deployment's round is bounded
below by Flower's process model: an idle SuperNode polls the SuperLink every 3 s, and every message runs in a fresh
`flwr-clientapp` process (Python start, flwr's runtime, then torch and rankfed: `import rankfed.app.flower` alone
takes 2.5-3 s of CPU on this machine), two of them at once on the 2 cores. Flower 1.41 has no long-running
ClientApp: `flwr-clientapp` takes a `--token` for one app execution and exits after it, and `--isolation process`
only moves the start of those processes from the SuperNode's own `flower-superexec` to one started separately (the
very command the SuperNode starts itself), so its rounds cost the same (within run-to-run noise; the last rows of
each algorithm). LocalDeployment therefore keeps the default `--isolation subprocess`, and the floor of a deployment
round measured here is the "flower run" figure: 15-17 s, with the 2 cores also busy with another workload during
this run (load average about 3.4; the 9-11 s of "Flower deployment vs the simulator" were measured on a quieter
machine). On separate machines the ClientApp starts would not share two cores.
"""
    if not args.no_write:
        print("wrote", write_result("flower_engines", "Flower engines: simulator vs Flower simulation (Ray) vs a local Flower deployment (seconds per round)", body))


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
