"""Simulator speed (issue 10): a bare PyTorch loop, rankfed sequential, rankfed vectorised (eager
and torch.compile'd), Flower's simulation engine and pfl-research, on one task in one run.

The task: FedAvg on Fashion-MNIST (all 60,000 images over 100 IID clients, about 540 training
samples each after the 10% holdout), cnn2, 1 local epoch, batch 32, SGD momentum 0.9, a fixed
number of rounds, 10% and 100% participation. Every engine gets the same client tensors and the
same initial model (from ``rankfed.app.experiment.build_experiment``).

In-process engines run round by round alternately (so drift in the machine's speed hits all of
them); reported: median seconds per round over rounds 2..R (training and communication,
evaluation excluded; round 1 holds warm-up and, compiled, the compile), rounds per second,
client-samples per second, and ratios. Flower and pfl run in their own virtualenvs
(``benchmarks/baselines/setup.sh``) as subprocesses, one after another, after the in-process
engines; they are left out when their interpreter is missing.

A ceiling on what any batching of the cohort can gain here is measured too: one model trained
on the cohort's C x 32 samples at once (shared weights, so less work than C clients' own
weights) against C separate batch-32 steps.

    python benchmarks/sim_speed.py --rounds 10 --full-rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402

from rankfed.app.config import load_config  # noqa: E402
from rankfed.data import ClientData  # noqa: E402
from rankfed.app.experiment import build_experiment  # noqa: E402
from rankfed.server import sample_clients  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"flower-sim": ("flower_sim.py", ".bench-venvs/flowersim/bin/python"), "pfl": ("pfl_sim.py", ".bench-venvs/pfl/bin/python")}


class BareLoop:
    """The limit: a hand-written PyTorch FedAvg loop over the same tensors, nothing else (no
    serialisation, no checks, no byte counting)."""

    def __init__(self, exp, device: str = "cpu"):
        self.exp, self.cfg = exp, exp.cfg
        self.device = torch.device(device)
        self.model = copy.deepcopy(exp.model).to(self.device)
        self.clients = [ClientData(c.x.to(self.device), c.y.to(self.device), c.val_x, c.val_y) for c in exp.clients]
        self.glob = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def run_round(self, rnd: int) -> float:
        t0 = time.perf_counter()
        fed, cl = self.cfg.federation, self.cfg.client
        ids = sample_clients(fed.seed, rnd, fed.clients, fed.clients_per_round)
        acc = {k: torch.zeros_like(v) for k, v in self.glob.items()}
        total = 0
        for cid in ids:
            data = self.clients[cid]
            self.model.load_state_dict(self.glob)
            opt = torch.optim.SGD(self.model.parameters(), lr=cl.lr, momentum=cl.momentum)
            perm = torch.randperm(data.num_samples, generator=torch.Generator().manual_seed(rnd * 1000 + cid)).to(self.device)
            for start in range(0, data.num_samples, cl.batch_size):
                idx = perm[start : start + cl.batch_size]
                loss = F.cross_entropy(self.model(data.x[idx]), data.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    acc[k] += data.num_samples * v
            total += data.num_samples
        self.glob = {k: v / total for k, v in acc.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class RankfedEngine:
    def __init__(self, exp):
        self.sim = exp.simulator()

    def run_round(self, rnd: int) -> float:
        return self.sim.run_round(rnd).round_s  # training and communication, not evaluation


def batching_ceiling(exp, cohort: int, reps: int = 20) -> tuple[float, float]:
    """(ms for `cohort` separate batch-32 steps, ms for one batch-(cohort*32) step) of one model."""
    model = copy.deepcopy(exp.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bs = exp.cfg.client.batch_size
    x, y = exp.clients[0].x[: bs * cohort].repeat(2, 1, 1, 1)[: bs * cohort], exp.clients[0].y[: bs * cohort].repeat(2)[: bs * cohort]

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def separate():
        for i in range(cohort):
            step(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs])

    out = []
    for f in (separate, lambda: step(x, y)):
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out.append((time.perf_counter() - t0) / reps * 1000)
    return out[0], out[1]


def run_baseline(name: str, part: float, rounds: int, python: str | None) -> dict | None:
    script, default_python = BASELINES[name]
    python = python or str(ROOT / default_python)
    if not Path(python).exists():
        print(f"{name}: {python} missing (benchmarks/baselines/setup.sh builds it); left out", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        cmd = [python, str(ROOT / "benchmarks" / "baselines" / script), "--participation", str(part), "--rounds", str(rounds), "--json", str(out)]
        if part >= 1:
            cmd.append("--no-bare")  # its bare-loop replay (a correctness check) would double a long run
        print("running", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.exists():
            print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"}
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds at 10%% participation")
    ap.add_argument("--full-rounds", type=int, default=3, help="rounds at 100%% participation")
    ap.add_argument("--participation", default="0.1,1.0")
    ap.add_argument("--model", default="cnn2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", default="bare,sequential,threads,vectorized,compiled,flower-sim,pfl")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more experiment overrides (repeatable), e.g. client.lr=0.01")
    ap.add_argument("--flower-python", default=None)
    ap.add_argument("--pfl-python", default=None)
    args = ap.parse_args()
    engines = args.engines.split(",")
    rows = []
    for part in [float(p) for p in args.participation.split(",")]:
        rounds = args.rounds if part < 1 else args.full_rounds
        base = ["task.dataset=fmnist", f"task.model={args.model}", "federation.clients=100", f"federation.participation={part}", f"federation.rounds={rounds}", "client.momentum=0.9", "client.batch_size=32", "federation.eval_every=100000", f"federation.device={args.device!r}", *args.set]
        built = {}
        for name in engines:
            if name == "bare":
                built[name] = BareLoop(build_experiment(load_config(None, base)), args.device)
            elif name in ("sequential", "threads", "vectorized", "compiled"):
                mode = "sequential" if name in ("sequential", "threads") else "vectorized"
                extra = {"compiled": ["federation.compile=true"], "threads": [f"federation.workers={os.cpu_count()}"]}.get(name, [])
                built[name] = RankfedEngine(build_experiment(load_config(None, [*base, f"federation.execution={mode!r}", *extra])))
        any_exp = build_experiment(load_config(None, base))
        samples = None
        times = {n: [] for n in built}
        for rnd in range(1, rounds + 1):
            ids = sample_clients(0, rnd, 100, any_exp.cfg.federation.clients_per_round)
            samples = sum(any_exp.clients[c].num_samples for c in ids)
            for name, eng in built.items():
                times[name].append(eng.run_round(rnd))
            print(part, rnd, {n: round(t[-1], 3) for n, t in times.items()}, flush=True)
        med = {n: statistics.median(t[1:] if len(t) > 1 else t) for n, t in times.items()}
        first = {n: t[0] for n, t in times.items()}
        diffs = {}
        if "sequential" in built:
            ref = built["sequential"].sim.server.global_model_state()
            for n in ("threads", "vectorized", "compiled"):
                if n in built:
                    other = built[n].sim.server.global_model_state()
                    diffs[n] = max(float((ref[k] - other[k]).abs().max()) for k in ref)
        external = {}
        for name in ("flower-sim", "pfl"):
            if name in engines and (args.model != "cnn2" or args.device != "cpu" or args.set):
                print(f"{name}: its baseline script runs the default task (cnn2 on the CPU) only; left out", flush=True)
            elif name in engines:
                external[name] = run_baseline(name, part, rounds, args.flower_python if name == "flower-sim" else args.pfl_python)
        ceiling = batching_ceiling(any_exp, any_exp.cfg.federation.clients_per_round) if part < 1 and args.device == "cpu" else None
        rows.append(dict(part=part, rounds=rounds, med=med, first=first, samples=samples, diffs=diffs, external=external, ceiling=ceiling))
    body = report(rows, args)
    print(body)
    print("wrote", write_result("sim_speed", "Simulator speed: bare loop, rankfed sequential and vectorised, Flower simulation, pfl", body))


def report(rows, args) -> str:
    out = [
        f"FedAvg, Fashion-MNIST over 100 IID clients (about 540 training samples each), {args.model}, 1 local epoch, batch 32, SGD momentum 0.9, "
        f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads. Seconds per round: median over rounds 2..R "
        "(training and communication, no evaluation). `threads` = sequential with federation.workers = the core count (clients trained by that many "
        "threads at once, 1 torch thread each); `compiled` = vectorised with federation.compile = true (its round 1 holds the compile; a warm "
        "inductor cache makes it seconds, a cold one about 20 s).",
        "",
    ]
    for r in rows:
        k = round(100 * r["part"])
        out += [f"### {k} clients per round ({r['rounds']} rounds, {r['samples']:,} client-samples per round)", ""]
        out += ["| engine | s/round | rounds/s | client-samples/s | time vs bare loop | time vs rankfed sequential | round 1 s |", "|---|---|---|---|---|---|---|"]
        bare = r["med"].get("bare")
        seq = r["med"].get("sequential")
        entries = list(r["med"].items())
        for name, res in r["external"].items():
            if res and "median_round_s" in res:
                entries.append((f"{name} ({res.get('version', '?')})", res["median_round_s"]))
        for name, s in entries:
            first = r["first"].get(name)
            out.append(
                f"| {name} | {s:.3f} | {1 / s:.2f} | {r['samples'] / s:,.0f} | {s / bare:.2f}x |" if bare else f"| {name} | {s:.3f} | {1 / s:.2f} | {r['samples'] / s:,.0f} | - |"
            )
            out[-1] += (f" {s / seq:.2f}x |" if seq else " - |") + (f" {first:.2f} |" if first is not None else " - |")
        for name, res in r["external"].items():
            if res is None:
                out.append(f"| {name} | not run (its virtualenv is missing) | | | | | |")
            elif "error" in res:
                out.append(f"| {name} | failed: {res['error']} | | | | | |")
        out.append("")
        if r["diffs"]:
            out.append("Max abs weight difference from sequential after the run: " + ", ".join(f"{n} {d:.1e}" for n, d in r["diffs"].items()) + ".")
        if r["ceiling"]:
            sep, one = r["ceiling"]
            out.append(f"Batching ceiling: {k} separate batch-32 steps of one {args.model} take {sep:.1f} ms, one batch-{32 * k} step {one:.1f} ms: **{sep / one:.2f}x** is the most any cohort batching can gain on this machine.")
        for name, res in r["external"].items():
            if res and res.get("notes"):
                out.append(f"{name} notes: {res['notes']}")
        out.append("")
    out += targets(rows)
    return "\n".join(out)


def targets(rows) -> list[str]:
    lines = ["### Targets (issue 10)", ""]
    for r in rows:
        k = round(100 * r["part"])
        med = r["med"]
        if "sequential" in med and "bare" in med:
            v = med["sequential"] / med["bare"]
            lines.append(f"- {k} clients: sequential within 1.15x of the bare loop: {'met' if v <= 1.15 else '**missed**'} ({v:.2f}x).")
        for n in ("threads", "vectorized", "compiled"):
            if n in med and "sequential" in med and k == 10:
                v = med["sequential"] / med[n]
                if n == "threads":
                    lines.append(f"- 10 clients: client threads are {v:.2f}x faster than sequential (no target; not vectorisation).")
                else:
                    lines.append(f"- 10 clients: {n} >= 2.5x faster than sequential on the CPU: {'met' if v >= 2.5 else '**missed**'} ({v:.2f}x).")
        fl = r["external"].get("flower-sim")
        if fl and "median_round_s" in fl and "sequential" in med:
            best = min(med[n] for n in ("sequential", "threads", "vectorized", "compiled") if n in med)
            v = fl["median_round_s"] / best
            lines.append(f"- {k} clients: >= 8x the rounds per second of Flower's simulation engine: {'met' if v >= 8 else '**missed**'} ({v:.1f}x, fastest rankfed mode).")
    return lines


if __name__ == "__main__":
    main()
