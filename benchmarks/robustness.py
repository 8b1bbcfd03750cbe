"""Malicious clients against the defences of the round, and the accuracy cost of differential privacy.

``attacks``: digits as the embedded demo has it (20 clients with Dirichlet(0.5) label skew,
half of them a round, the MLP with 128 hidden units, 2 local epochs, SGD momentum 0.9),
``--rounds`` rounds, FedAvg (lr 0.05) and MAPA (k = 1024, lr 0.2, as the demo). The first
10% or 20% of the clients are malicious; each of their uploads is replaced (the simulator's
fault-injection hook, where a real client would send it) by

* ``takeover``: the update reversed and scaled by 5, claiming 10**12 samples (issue 21);
* ``sign-flip``: the update reversed (x -1), an honest sample count;
* ``noise``: every entry Gaussian noise with 10x the root-mean-square of the real update.

Defences: none (the weighted mean); ``recorded weights + adaptive clip`` (weights at most the
server's record of each client's data, uploads clipped to the median norm of the last 5
rounds, the first round's bound the clean run's median round-1 norm); coordinate-wise
``median``; ``trimmed mean`` (beta 0.2); multi-``krum`` (f = the malicious clients a round can
hold on average, rounded up, keep 10 - f; alone and with the recorded weights, since it
averages what it keeps by weight, as Flower's does). Final accuracy, mean over ``--seeds``, beside the
clean run with the same defence.

``dp``: central DP (clip each upload, uniform weights, Gaussian noise on the sum) at
epsilon 1, 4, 8 (delta 1e-5, Opacus RDP accountant; the noise multiplier that spends epsilon
by the last round) for FedAvg, MAPA (noise on B) and FedLoRU (noise on the factors' updates),
at equal rounds, beside the same algorithm without DP. 100 clients (iid, about 16 digits
each), 10 a round (q = 0.1). Each algorithm's bound is the median upload norm of its own
non-private run. Also reported: the noise's expected L2 norm on the mean of a round
(sigma C sqrt(numbers sent) / 10): what "low-rank updates need less noise in total" predicts.

    python benchmarks/robustness.py all --rounds 30 --seeds 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402

from rankfed.app.config import load_config  # noqa: E402
from rankfed.app.experiment import build_experiment  # noqa: E402
from rankfed.errors import Diverged  # noqa: E402
from rankfed.sim import Simulator  # noqa: E402

DEMO = ["task.partition=dirichlet", "task.alpha=0.5", "task.model=mlp", "task.model_options={hidden=[128]}", "federation.clients=20", "federation.participation=0.5",
        "client.optimizer=sgd", "client.lr=0.05", "client.momentum=0.9", "client.epochs=2", "client.batch_size=16"]  # fmt: skip
ALGORITHMS = {"FedAvg": ["algorithm.name=fedavg"], "MAPA": ["algorithm.name=mapa", "algorithm.k=1024", "client.lr=0.2"]}
# FedLoRU's lr: the best of 0.1 / 0.3 / 0.5 on this setting's non-private run at seed 0 (26.9 / 70.8 / 85.8%)
DP_ALGORITHMS = {**ALGORITHMS, "FedLoRU": ["algorithm.name=fedloru", "algorithm.rank=8", "algorithm.tau=5", 'algorithm.patterns=["*"]', "client.lr=0.5"]}
EPSILONS = [1.0, 4.0, 8.0]


def _takeover(u):
    return {k: (-5 * v if _is_tensor(v) else v) for k, v in u.items()} | {"@num_samples": 10**12}


def _sign_flip(u):
    return {k: (-v if _is_tensor(v) else v) for k, v in u.items()}


def _noise(u, rnd, cid):
    g = torch.Generator().manual_seed(rnd * 1000 + cid)
    out = dict(u)
    for k, v in u.items():
        if _is_tensor(v):
            rms = float(v.double().pow(2).mean().sqrt())
            out[k] = torch.randn(v.shape, generator=g).to(v.dtype) * 10 * rms
    return out


def _is_tensor(v):
    return isinstance(v, torch.Tensor) and v.is_floating_point()


ATTACKS = {"takeover": lambda u, r, c: _takeover(u), "sign-flip": lambda u, r, c: _sign_flip(u), "noise": _noise}


def run(overrides, rounds, tamper=None):
    """(final accuracy, the simulator); accuracy 0.0 for a run that diverged."""
    cfg = load_config(None, [*overrides, f"federation.rounds={rounds}", f"federation.eval_every={rounds}"])
    sim = Simulator(build_experiment(cfg))
    sim.tamper = tamper
    try:
        for rnd in range(1, rounds + 1):
            rec = sim.run_round(rnd)
    except Diverged:
        return 0.0, sim
    return rec.accuracy, sim


def defences(fraction, bound):
    """name -> overrides of each defence, for ``fraction`` of the clients malicious."""
    f = math.ceil(10 * fraction)  # malicious clients in a round of 10, on average
    return {
        "none": [],
        "recorded weights + adaptive clip": ["federation.sample_weights=recorded", f"federation.clip_norm={bound}", "federation.clip_quantile=0.5"],
        "median": ["federation.aggregator=median"],
        "trimmed mean (0.2)": ["federation.aggregator=trimmed_mean", "federation.trim_beta=0.2"],
        "multi-krum (f = 1 / 2, keep 9 / 8)": ["federation.aggregator=krum", f"federation.krum_malicious={f}", f"federation.krum_keep={10 - f}"],
        # multi-Krum averages what it keeps by weight (as Flower's): with the server's record as the weights
        "recorded weights + multi-krum": ["federation.sample_weights=recorded", "federation.aggregator=krum", f"federation.krum_malicious={f}", f"federation.krum_keep={10 - f}"],
    }


def attacks(args) -> str:
    lines = ["| algorithm | defence | clean | " + " | ".join(f"{a} {int(p * 100)}%" for a in ATTACKS for p in (0.1, 0.2)) + " |", "|---" * (3 + 2 * len(ATTACKS)) + "|"]
    t0 = time.time()
    for alg, opts in ALGORITHMS.items():
        seeds = [[*DEMO, *opts, f"federation.seed={s}"] for s in range(args.seeds)]
        # round-1 norms of the clean run: the adaptive bound's first value (a bound no upload reaches only records norms)
        probe = [run([*o, "federation.clip_norm=1e30"], 1)[1].history[0].defence["upload_norm_median"] for o in seeds]
        bound = float(f"{statistics.median(probe):.3g}")
        for name, clean_opts in defences(0.1, bound).items():
            clean = [run([*o, *clean_opts], args.rounds)[0] for o in seeds]
            cells = []
            for attack, fn in ATTACKS.items():
                for frac in (0.1, 0.2):
                    bad = set(range(int(20 * frac)))
                    tamper = lambda r, c, u, fn=fn, bad=bad: fn(u, r, c) if c in bad else u  # noqa: E731
                    cells.append(statistics.mean(run([*o, *defences(frac, bound)[name]], args.rounds, tamper)[0] for o in seeds))
            lines.append(f"| {alg} | {name} | {statistics.mean(clean) * 100:.1f} | " + " | ".join(f"{c * 100:.1f}" for c in cells) + " |")
            print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
        lines.append(f"| {alg} | (first adaptive bound: {bound}) |" + " |" * (1 + 2 * len(ATTACKS)))
    return "\n".join(lines)


def dp(args) -> str:
    base = ["task.model=mlp", "task.model_options={hidden=[128]}", "federation.clients=100", "federation.participation=0.1", "client.optimizer=sgd", "client.lr=0.05", "client.momentum=0.9", "client.epochs=2", "client.batch_size=16"]
    lines = ["| algorithm | numbers sent | bound C | no DP | " + " | ".join(f"eps {e:g}: acc (sigma, noise norm / C)" for e in EPSILONS) + " |", "|---" * (4 + len(EPSILONS)) + "|"]
    for alg, opts in DP_ALGORITHMS.items():
        seeds = [[*base, *opts, f"federation.seed={s}"] for s in range(args.seeds)]
        plain = [run([*o, "federation.clip_norm=1e30"], args.rounds) for o in seeds]
        norms = [r.defence["upload_norm_median"] for _, sim in plain for r in sim.history]
        bound = float(f"{statistics.median(norms):.3g}")
        sent = plain[0][1].history[0].uplink_bytes_per_client[0] // 4  # float32 numbers (metadata aside)
        cells = []
        for eps in EPSILONS:
            got = [run([*o, "federation.dp=central", f"federation.clip_norm={bound}", f"federation.dp_epsilon={eps}"], args.rounds) for o in seeds]
            sigma = got[0][1].history[-1].defence["dp_noise"]
            spent = got[0][1].history[-1].defence["epsilon"]
            noise = sigma * math.sqrt(sent) / 10  # E||noise on the mean||, in units of C, 10 uploads a round
            cells.append(f"{statistics.mean(a for a, _ in got) * 100:.1f} (sigma {sigma:.2f}, {noise:.1f}; eps spent {spent:.2f})")
        lines.append(f"| {alg} | {sent:,} | {bound} | {statistics.mean(a for a, _ in plain) * 100:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["attacks", "dp", "all"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what in ("attacks", "all"):
        body = attacks(args)
        write_result("robustness_attacks", f"Malicious clients against the round's defences (issue 21): digits, FedAvg and MAPA, {args.rounds} rounds, {args.seeds} seeds", body + "\n\nFinal accuracy (%), mean over seeds; 0.0 is a run that diverged. Malicious: the first 10% (2) or 20% (4) of 20 clients. See the script's docstring for the attacks and defences.")
    if args.what in ("dp", "all"):
        body = dp(args)
        write_result("robustness_dp", f"The accuracy cost of central DP at epsilon 1, 4, 8: FedAvg vs MAPA vs FedLoRU, {args.rounds} rounds, {args.seeds} seeds", body + "\n\nFinal accuracy (%), mean over seeds; delta = 1e-5; noise norm / C is the expected L2 norm of the noise on a round's mean (10 uploads), in units of the bound.")


if __name__ == "__main__":
    main()
