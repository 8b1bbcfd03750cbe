"""Simulator overhead: rankfed's FedAvg rounds vs a bare hand-written PyTorch loop.

Both do the same client steps on the same data in the same process: the same
sampled clients, the same minibatch order, the same SGD; the bare loop just
has no payloads, no serialisation, no algorithm objects. The ratio
(rankfed time / bare time per round) is the price of the simulator's
structure. Target: <= 1.15.

The two are run alternately, round by round, and compared on the median
round time, so drift in the machine's speed hits both alike. As a check that
the work really is the same, the two global models must end up equal.

    python benchmarks/sim_overhead.py --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402

from rankfed.app.config import parse_config  # noqa: E402
from rankfed.app.experiment import build_experiment  # noqa: E402
from rankfed.server import sample_clients  # noqa: E402
from rankfed.protocol import derive_seed  # noqa: E402


def bare_round(model, global_state, clients, ids, cfg, seed, rnd):
    """FedAvg by hand: load, train with SGD in minibatches, average the weights."""
    acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
    total = sum(clients[c].num_samples for c in ids)
    bs = cfg.batch_size
    for cid in ids:
        data = clients[cid]
        model.load_state_dict(global_state)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        s = derive_seed(seed, rnd, cid, 0x5EED)  # the client's seed, as rankfed derives it
        gen = torch.Generator().manual_seed(s)
        torch.manual_seed(s)
        n = data.num_samples
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        w = n / total
        for k, v in model.state_dict().items():
            acc[k].add_(v, alpha=w)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fmnist", help="fmnist (default) or digits when Fashion-MNIST is absent")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--participation", type=float, default=0.1)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = ap.parse_args()

    model = "cnn2" if args.dataset in ("fmnist", "mnist") else "mlp"
    cfg = parse_config(
        {
            "task": {"dataset": args.dataset, "partition": "shards", "classes_per_client": 2, "model": model, "holdout": 0.0},
            "federation": {"clients": args.clients, "participation": args.participation, "rounds": args.rounds, "seed": 0, "eval_every": 10**6},
            "client": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 32, "epochs": 1},
            "algorithm": {"name": "fedavg"},
        }
    )
    exp = build_experiment(cfg)
    sim = exp.simulator()
    bare_model = copy.deepcopy(exp.model)
    bare_state = {k: v.clone() for k, v in exp.model.state_dict().items()}
    fed = cfg.federation

    t_sim, t_bare = [], []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        sim.run_round(rnd)
        t_sim.append(time.perf_counter() - t0)
        ids = sample_clients(fed.seed, rnd, fed.clients, fed.clients_per_round)
        t0 = time.perf_counter()
        bare_state = bare_round(bare_model, bare_state, exp.clients, ids, cfg.client, fed.seed, rnd)
        t_bare.append(time.perf_counter() - t0)
        if rnd == 1:
            # Same work: after one round the two global models agree up to float rounding
            # (the simulator averages deltas, the bare loop weights). Later rounds amplify
            # that rounding chaotically, so the check is made here.
            got = sim.server.global_model_state()
            max_diff = max((got[k] - bare_state[k]).abs().max().item() for k in bare_state if bare_state[k].is_floating_point())
            assert max_diff < 1e-5, f"simulator and bare loop differ after round 1 (max |diff| = {max_diff})"

    warm = 2  # first rounds include allocator warm-up
    med_sim, med_bare = statistics.median(t_sim[warm:]), statistics.median(t_bare[warm:])
    ratio = med_sim / med_bare
    steps = sum(exp.clients[c].num_samples for c in sample_clients(fed.seed, 1, fed.clients, fed.clients_per_round))
    body = f"""FedAvg, {args.dataset}, {model}, {fed.clients} clients (2-class shards), {fed.clients_per_round} per round,
batch 32, 1 local epoch, SGD momentum 0.9; {args.rounds} rounds, each measured for both, alternating; first {warm} dropped.

| | median s / round | mean s / round |
|---|---|---|
| bare PyTorch loop | {med_bare:.4f} | {statistics.mean(t_bare[warm:]):.4f} |
| rankfed simulator | {med_sim:.4f} | {statistics.mean(t_sim[warm:]):.4f} |
| **ratio (rankfed / bare)** | **{ratio:.3f}** | {statistics.mean(t_sim[warm:]) / statistics.mean(t_bare[warm:]):.3f} |

Target: ratio <= 1.15 ({'met' if ratio <= 1.15 else 'NOT met'}). After round 1 the two global models agree to max |diff| = {max_diff:.2e}
(about {steps} samples per round in round 1)."""
    print(body)
    if not args.no_write:
        print("wrote", write_result("sim_overhead", "Simulator overhead vs a bare PyTorch loop", body))


if __name__ == "__main__":
    main()
