"""Baseline: the rankfed benchmark task on Flower 1.41's simulation engine (Ray backend).

FedAvg, Fashion-MNIST over 100 IID clients (rankfed's split and seeded initial cnn2), 1 local
epoch, batch 32, SGD momentum 0.9, rankfed's lr. Flower's Message API: a ServerApp running
``flwr.serverapp.strategy.FedAvg`` and a ClientApp with ``@app.train()``, launched by
``flwr.simulation.run_simulation`` with 100 virtual SuperNodes (partition-id = rankfed client).

Run in the Flower venv (``bash benchmarks/baselines/setup.sh flowersim``)::

    .bench-venvs/flowersim/bin/python benchmarks/baselines/flower_sim.py --participation 0.1 --rounds 5 --json out.json

Round time = time between consecutive calls of the strategy's ``evaluate_fn`` (called before
round 1 and after each round), so Ray's start-up is outside every round but the first; the
median is over rounds 2..R.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # Ray passes sys.path on to its workers

import flwr  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import _task  # noqa: E402
from _flower_apps import client_app, make_server_app  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--participation", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="client_resources.num_cpus (Ray actors = cores / this)")
    ap.add_argument("--no-interleave", action="store_true", help="replay the bare rounds after the run, not between Flower's rounds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the driver (server and the bare loop; Ray workers get theirs from num_cpus); 0 = torch's default")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-loop check and reference (saves time at full participation)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    sink: dict = {"watch": _task.Stopwatch(), "interleave": not (args.no_interleave or args.no_bare)}
    load_before = _task.load_average()
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(args.participation, args.rounds, sink),
        client_app=client_app,
        num_supernodes=_task.NUM_CLIENTS,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": args.num_cpus, "num_gpus": 0.0}},
    )
    total = time.perf_counter() - t0
    load_after = _task.load_average()
    watch = sink["watch"]
    round_s = watch.laps
    if len(round_s) != args.rounds or "final_state" not in sink:
        raise SystemExit(f"the simulation did not complete: {len(round_s)} of {args.rounds} rounds timed")
    if any(sink["errors"]):
        raise SystemExit(f"client errors per round: {sink['errors']}")
    k = max(1, round(args.participation * _task.NUM_CLIENTS))
    samples = sink["samples"]
    acc = _task.test_accuracy(sink["final_state"])
    # Check the work: the same clients and shuffles in a bare loop (interleaved with Flower's rounds
    # unless --no-interleave), in this driver process, never inside Flower's round times.
    bare = sink["bare"]
    if bare is None and not args.no_bare:
        bare = _task.Replayer(sink["initial_state"])
        for cohort in sink["cohorts"]:
            bare.step(cohort)
    diff = _task.max_abs_diff(bare.state, sink["final_state"]) if bare else float("nan")
    bare_med = _task.median_after_first(bare.times) if bare else float("nan")
    startup = watch.first_start - t0
    med = _task.median_after_first(round_s)
    notes = (
        f"Flower {flwr.__version__} simulation engine, Ray {ray.__version__} backend, Message API (ServerApp + "
        f"flwr.serverapp.strategy.FedAvg, ClientApp @train), 100 virtual SuperNodes, client_resources num_cpus="
        f"{args.num_cpus}: {len(sink['pids'])} Ray worker processes trained clients, torch threads per worker "
        f"{sorted(sink['threads'])}. Client data: rankfed's split built once per worker process and cached "
        f"(lru_cache in the worker's imported module); the model object is reused per worker, weights loaded from "
        f"each message. Round time = from the strategy's evaluate_fn call before the round to the one after it "
        f"(configure, Ray dispatch, training, replies, aggregation); median over rounds 2..R (round 1 carries the "
        f"workers' data loading and Ray's warm-up). Not timed: start-up to round 1 {startup:.1f} s; whole "
        f"run_simulation {total:.1f} s. Client sampling: Flower's random.sample, seeded. Test accuracy after "
        f"{args.rounds} rounds: {acc:.4f}. " + ("No bare-loop check (--no-bare). " if bare is None else f"Check: a bare PyTorch loop over the same clients and shuffles "
        f"({'interleaved with' if sink['bare'] is not None else 'after'} Flower's rounds, in the driver, "
        f"{torch.get_num_threads()} torch threads) ends {diff:.1e} (max abs weight difference) from Flower's model and "
        f"took a median {bare_med:.3f} s/round: Flower/bare = {med / bare_med:.2f}x. ") + f"Load average before/after: "
        f"{load_before} / {load_after} on {os.cpu_count()} cores."
    )
    res = _task.result(
        engine="flower-simulation",
        version=flwr.__version__,
        participation=args.participation,
        clients_per_round=k,
        rounds=args.rounds,
        round_s=round_s,
        samples_per_round=_task.mean_samples_per_round(samples),
        notes=notes,
        ray_version=ray.__version__,
        torch_version=torch.__version__,
        startup_s=startup,
        total_s=total,
        worker_processes=len(sink["pids"]),
        worker_torch_threads=sorted(sink["threads"]),
        driver_torch_threads=torch.get_num_threads(),
        test_accuracy=acc,
        **_task.bare_check(bare, med, diff, sink["bare"] is not None, load_before, load_after),
    )
    _task.emit(res, args.json)


if __name__ == "__main__":
    main()
