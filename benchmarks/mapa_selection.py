"""MAPA by the paper's own selection rule: Figure 6 (k vs communication to reach an accuracy),
Table 2's Fashion-MNIST row at the chosen k over 3 seeds, and the centralised claim of Figure 2.

Setting (paper Section 5, Table 4; configs/fmnist_fedavg.toml): 100 clients with 2-class
shards, 10% of them per round, cnn2 (11,274 parameters), batch 32, SGD momentum 0.9, one
local epoch, evaluation every 10 rounds on the 10,000 test images.

``fig6``: k from 2^6 to 2^13. MAPA's A has entries N(0, sigma^2) with sigma^2 = 1/ceil(d/k)
(rankfed's default, E||A||^2 = 1), and the step SGD takes on the model is about
sigma^2 * lr times the gradient, so the lr is tuned per k on a grid of sigma^2 * lr
(``EFF_GRID``) by the best accuracy of short runs (a diverged run is not a candidate); each k
then runs ``--rounds`` rounds at its tuned lr. Reported: accuracy curves, and the uplink
(the paper's measure) and total bytes each k needs to first reach each accuracy level
(Figure 6 b/c). The chosen k is the one needing the least uplink to reach ``--target``.

``table2``: every Table 2 method at seeds 0, 1, 2 (FedAvg, Sparse = top-k 10% with error
feedback, Quantize = 8-bit QSGD, FA-LoRA rank 8, MAPA at the chosen k and its tuned lr);
the baselines' lrs are those tuned in benchmarks/mapa_fmnist.py (RESULTS.md, "MAPA paper
Table 2"). Mean +- sd over seeds of the maximum accuracy, and of the uplink and total bytes
to first reach the target (the worst method's mean maximum, as the paper defines it), as
a percentage of FedAvg's.

``centralised``: Figure 2's claim on FMNIST: one client holding all 60,000 training images
(one "round" = one epoch), MAPA with k = 2, 4, 16 and 64 trainable numbers.

    python benchmarks/mapa_selection.py all --rounds 200 --tune-rounds 50 --workers 2

Finished runs (summary.json present) are not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import Jobs  # noqa: E402
from _report import HERE, write_result  # noqa: E402

ROOT = HERE.parent
CONFIG = ROOT / "configs" / "fmnist_fedavg.toml"
RUNS = HERE / "runs" / "mapa_selection"
D = 11_274  # cnn2's parameters
K_GRID = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
EFF_GRID = [0.0003, 0.001, 0.003, 0.01]  # sigma^2 * lr
LEVELS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85]
SEEDS = [0, 1, 2]
# The paper's Table 2, FMNIST: (communication % of FedAvg, max accuracy %).
PAPER = {"FedAvg": (100.0, 89.2), "Sparse": (24.1, 81.1), "Quantize": (24.1, 87.1), "FA-LoRA": (17.9, 74.1), "MAPA": (3.1, 88.0)}
BASELINES = {  # options, lr tuned in benchmarks/mapa_fmnist.py table2 (100-round tuning)
    "FedAvg": ({"algorithm.name": "fedavg"}, 0.01),
    "Sparse": ({"algorithm.name": "fedavg", "algorithm.compressor": "topk", "algorithm.topk_ratio": 0.1, "algorithm.error_feedback": True}, 0.01),
    "Quantize": ({"algorithm.name": "fedavg", "algorithm.compressor": "qsgd", "algorithm.qsgd_bits": 8}, 0.05),
    "FA-LoRA": ({"algorithm.name": "fa_lora", "algorithm.rank": 8}, 0.05),
}


def sigma2(k: int) -> float:
    return 1.0 / math.ceil(D / k)


def lr_for(k: int, eff: float) -> float:
    return float(f"{eff / sigma2(k):.6g}")


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("accuracy") is not None]


def summary(run: Path) -> dict | None:
    f = run / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def first_reach(rows: list[dict], level: float) -> dict | None:
    return next((r for r in rows if r["accuracy"] >= level), None)


def total(r: dict) -> int:
    return r["cum_uplink_bytes"] + r["cum_downlink_bytes"]


def mapa_sets(k: int, lr: float) -> dict:
    return {"algorithm.name": "mapa", "algorithm.k": k, "client.lr": lr}


def _jobs(args) -> Jobs:
    return Jobs(CONFIG, {"federation.eval_every": 10}, args.workers, args.deadline)


def tuned(args) -> dict[int, tuple[float, float]]:
    """k -> (eff, best accuracy in the tuning runs), running what is missing."""
    jobs = _jobs(args)
    futs = {(k, e): jobs.submit(RUNS / "tune" / f"k{k}-eff{e:g}-r{args.tune_rounds}", {**mapa_sets(k, lr_for(k, e)), "federation.rounds": args.tune_rounds}) for k in K_GRID for e in EFF_GRID}
    best: dict[int, tuple[float, float]] = {}
    for (k, e), fut in futs.items():
        s = fut.result()
        if not s or s.get("status") == "diverged" or s.get("best_accuracy") is None:
            continue
        if k not in best or s["best_accuracy"] > best[k][1]:
            best[k] = (e, s["best_accuracy"])
    return best


def fig6(args) -> tuple[int, float]:
    best = tuned(args)
    jobs = _jobs(args)
    final = {k: RUNS / "fig6" / f"k{k}-eff{best[k][0]:g}-r{args.rounds}" for k in K_GRID if k in best}
    for f in [jobs.submit(out, {**mapa_sets(k, lr_for(k, best[k][0])), "federation.rounds": args.rounds}) for k, out in final.items()]:
        f.result()
    rows = {k: metrics(out) for k, out in final.items() if summary(out)}
    head = "| k | % of d | sigma^2 | sigma^2 * lr (tuned) | lr | tuning best | max acc | " + " | ".join(f"uplink to {100 * v:.0f}%" for v in LEVELS) + " |"
    lines = [head, "|" + "---|" * (7 + len(LEVELS))]
    reach: dict[int, dict[float, dict | None]] = {}
    for k, rs in rows.items():
        reach[k] = {v: first_reach(rs, v) for v in LEVELS}
        cells = " | ".join("-" if reach[k][v] is None else f"{reach[k][v]['cum_uplink_bytes'] / 1e6:.2f} MB (r{reach[k][v]['round']})" for v in LEVELS)
        e = best[k][0]
        lines.append(f"| {k} | {100 * k / D:.2f}% | {sigma2(k):.4g} | {e:g} | {lr_for(k, e):g} | {100 * best[k][1]:.2f}% | {100 * max(r['accuracy'] for r in rs):.2f}% | {cells} |")
    tot_lines = ["| k | " + " | ".join(f"total to {100 * v:.0f}%" for v in LEVELS) + " |", "|" + "---|" * (1 + len(LEVELS))]
    for k in rows:
        tot_lines.append(f"| {k} | " + " | ".join("-" if reach[k][v] is None else f"{total(reach[k][v]) / 1e6:.2f} MB" for v in LEVELS) + " |")
    tuning = [f"- k = {k}: " + ", ".join(_tune_cell(k, e, args) for e in EFF_GRID) for k in K_GRID]
    reached = {k: reach[k][args.target] for k in rows if reach[k][args.target] is not None}
    if not reached:
        raise SystemExit(f"no k reached the target {args.target}; lower --target")
    chosen = min(reached, key=lambda k: reached[k]["cum_uplink_bytes"])
    _plot_fig6(rows, reach, HERE / "results" / "mapa_fig6.png")
    body = f"""MAPA, Fashion-MNIST (Table 2 setting), seed 0, {args.rounds} rounds per k at its tuned lr; tuning:
{args.tune_rounds} rounds per (k, sigma^2 * lr), sigma^2 * lr in {EFF_GRID} (lr = that / sigma^2), best accuracy,
diverged runs excluded. Uplink = the 10 sampled clients' uploads (the paper's measure); total adds the stateful
broadcast to all 100 clients. Cells: cumulative bytes when the accuracy first reached the level (at round r).

{chr(10).join(lines)}

{chr(10).join(tot_lines)}

Tuning runs (best accuracy within {args.tune_rounds} rounds; "div" = diverged):

{chr(10).join(tuning)}

**Chosen by the paper's rule** (least uplink to first reach {100 * args.target:.0f}%): **k = {chosen}**
(sigma^2 * lr = {best[chosen][0]:g}, lr = {lr_for(chosen, best[chosen][0]):g}).

![MAPA Figure 6](results/mapa_fig6.png)
"""
    print(body)
    write_result("mapa_fig6", "MAPA paper Figure 6: k against the communication needed to reach an accuracy (Fashion-MNIST)", body)
    return chosen, lr_for(chosen, best[chosen][0])


def _tune_cell(k: int, e: float, args) -> str:
    s = summary(RUNS / "tune" / f"k{k}-eff{e:g}-r{args.tune_rounds}")
    if not s:
        return f"{e:g}: not run"
    if s.get("status") == "diverged":
        return f"{e:g}: div"
    return f"{e:g}: {100 * s['best_accuracy']:.2f}%"


def _plot_fig6(rows, reach, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    ks = sorted(rows)
    for i, k in enumerate(ks):
        rs = rows[k]
        a.plot([r["round"] for r in rs], [100 * r["accuracy"] for r in rs], color=cmap(i / max(len(ks) - 1, 1)), label=f"k={k}")
    a.set_xlabel("round")
    a.set_ylabel("test accuracy (%)")
    a.grid(True, alpha=0.3)
    a.legend(fontsize=7, ncol=2)
    for v in LEVELS:
        pts = [(k, reach[k][v]["cum_uplink_bytes"] / 1e6) for k in ks if reach[k][v] is not None]
        if pts:
            b.plot(*zip(*pts), "o-", label=f"{100 * v:.0f}%")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("k")
    b.set_ylabel("uplink to first reach the accuracy (MB)")
    b.grid(True, alpha=0.3)
    b.legend(title="accuracy level", fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png, dpi=120)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f}"


def table2(args, chosen_k: int, mapa_lr: float) -> None:
    methods = {**{m: (o, lr) for m, (o, lr) in BASELINES.items()}, "MAPA": ({"algorithm.name": "mapa", "algorithm.k": chosen_k}, mapa_lr)}
    jobs = _jobs(args)
    folders = {(m, s): RUNS / "table2" / f"{m}-seed{s}-r{args.rounds}" for m in methods for s in SEEDS}
    futs = [jobs.submit(out, {**methods[m][0], "client.lr": methods[m][1], "federation.seed": s, "federation.rounds": args.rounds}) for (m, s), out in folders.items()]
    for f in futs:
        f.result()
    rows = {key: metrics(out) for key, out in folders.items() if summary(out)}
    maxacc = {m: [max(r["accuracy"] for r in rows[(m, s)]) for s in SEEDS if (m, s) in rows] for m in methods}
    target = min(statistics.mean(v) for v in maxacc.values() if v)
    worst = min((m for m in methods if maxacc[m]), key=lambda m: statistics.mean(maxacc[m]))
    lines = [
        "| method | options | lr | max acc (mean +- sd) | paper max acc | seeds reaching target | uplink to target, % of FedAvg | total to target, % of FedAvg | paper com. | uplink per client-round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {}
    for s in SEEDS:
        hit = first_reach(rows.get(("FedAvg", s), []), target)
        ref[s] = hit
    for m, (opts, lr) in methods.items():
        up, tot = [], []
        for s in SEEDS:
            hit = first_reach(rows.get((m, s), []), target)
            if hit is not None and ref[s] is not None:
                up.append(100 * hit["cum_uplink_bytes"] / ref[s]["cum_uplink_bytes"])
                tot.append(100 * total(hit) / total(ref[s]))
        s0 = summary(folders[(m, SEEDS[0])]) or {}
        shown = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in opts.items() if k != "algorithm.name")
        pc, pa = PAPER[m]
        lines.append(
            f"| {m} | {opts['algorithm.name']}{' ' + shown if shown else ''} | {lr:g} | {_ms([100 * a for a in maxacc[m]])}% | {pa}% | {len(up)}/{len(SEEDS)} | {_ms(up)}% | {_ms(tot)}% | {pc}% | {s0.get('mean_uplink_bytes_per_upload', 0):.0f} B |"
        )
    per_seed = ["| method | " + " | ".join(f"seed {s}: max acc" for s in SEEDS) + " |", "|" + "---|" * (1 + len(SEEDS))]
    for m in methods:
        per_seed.append(f"| {m} | " + " | ".join(f"{100 * max(r['accuracy'] for r in rows[(m, s)]):.2f}%" if (m, s) in rows else "-" for s in SEEDS) + " |")
    from rankfed.plot import plot_runs

    png = HERE / "results" / "mapa_table2_seeds.png"
    plot_runs([folders[(m, 0)] for m in methods if (m, 0) in rows], png, bytes_kind="uplink", title="Fashion-MNIST, seed 0")
    body = f"""{args.rounds} rounds per run, seeds {SEEDS}, evaluation every 10 rounds. MAPA at the k chosen by Figure 6's rule
above (k = {chosen_k}, lr {mapa_lr:g}); the baselines at their lrs tuned in the 600-round study above. Target (the
worst method's mean maximum accuracy, {worst}): **{100 * target:.2f}%**. Communication to the target is per seed,
relative to FedAvg's on the same seed, then mean +- sd over the seeds that reached it.

{chr(10).join(lines)}

{chr(10).join(per_seed)}

![accuracy vs uplink, seed 0](results/mapa_table2_seeds.png)
"""
    print(body)
    write_result("mapa_table2_seeds", "MAPA paper Table 2, Fashion-MNIST row, k by the paper's rule, 3 seeds", body)


def centralised(args) -> None:
    """Fresh A every epoch (the paper's words) and, beside it, every ``--central-steps`` steps."""
    jobs = _jobs(args)
    ks = [2, 4, 16, 64]
    steps_per_epoch = 60_000 // 32 + 1
    variants = {0: args.epochs}  # steps per round (0 = one epoch) -> rounds
    for n in args.central_steps:
        variants[n] = args.epochs * steps_per_epoch // n
    folders = {}
    for steps, rounds in variants.items():
        base = {"federation.clients": 1, "federation.participation": 1.0, "task.partition": "iid", "federation.rounds": rounds, "client.momentum": 0.9,
                "federation.eval_every": 1 if not steps else max(1, rounds // 10), **({"client.steps": steps} if steps else {})}
        tag = f"e{args.epochs}" if not steps else f"s{steps}-e{args.epochs}"
        for k in ks:
            for e in args.central_eff:
                folders[(steps, k, e)] = (RUNS / "central" / f"k{k}-eff{e:g}-{tag}", {**base, **mapa_sets(k, lr_for(k, e))})
    futs = [jobs.submit(out, sets) for out, sets in folders.values()]
    base0 = {"federation.clients": 1, "federation.participation": 1.0, "task.partition": "iid", "federation.eval_every": 1, "federation.rounds": args.epochs, "client.momentum": 0.9}
    futs.append(jobs.submit(RUNS / "central" / f"fedavg-e{args.epochs}", {**base0, "algorithm.name": "fedavg", "client.lr": 0.01}))
    for f in futs:
        f.result()
    lines = ["| A refreshed | k | % of d | sigma^2 * lr | lr | best accuracy | final accuracy |", "|---|---|---|---|---|---|---|"]
    for (steps, k, e), (out, _) in folders.items():
        s = summary(out)
        when = "every epoch" if not steps else f"every {steps} steps"
        if not s:
            continue
        if s.get("status") == "diverged":
            lines.append(f"| {when} | {k} | {100 * k / D:.3f}% | {e:g} | {lr_for(k, e):g} | diverged | - |")
            continue
        lines.append(f"| {when} | {k} | {100 * k / D:.3f}% | {e:g} | {lr_for(k, e):g} | {100 * s['best_accuracy']:.2f}% | {100 * (s['final_accuracy'] or 0):.2f}% |")
    fs = summary(RUNS / "central" / f"fedavg-e{args.epochs}")
    body = f"""One client holding all 60,000 training images (IID), SGD momentum 0.9, batch 32, {args.epochs} epochs, seed 0, accuracy on
the 10,000 test images. MAPA draws a fresh A each round: a round is one epoch (the paper's "randomization at each training
epoch"){f", or every {', '.join(str(n) for n in args.central_steps)} steps (more subspaces in the same number of steps; not the paper's wording)" if args.central_steps else ""}.
Chance is 10%. Full training (FedAvg with one client, i.e. plain SGD, lr 0.01, same epochs) reached
{100 * fs['best_accuracy']:.2f}%.

{chr(10).join(lines)}
"""
    print(body)
    write_result("mapa_centralised", "MAPA paper Figure 2: centralised training with 2-64 trainable numbers (Fashion-MNIST)", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["fig6", "table2", "centralised", "all"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--tune-rounds", type=int, default=50)
    ap.add_argument("--target", type=float, default=0.7, help="accuracy level that picks k (fig6)")
    ap.add_argument("--epochs", type=int, default=5, help="centralised: epochs")
    ap.add_argument("--central-eff", type=float, nargs="+", default=[0.0003, 0.001, 0.01])
    ap.add_argument("--central-steps", type=int, nargs="*", default=[50], help="centralised: also refresh A every n steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new run starts (a report of what has finished)")
    args = ap.parse_args()
    if args.cmd in ("fig6", "table2", "all"):
        k, lr = fig6(args)
        if args.cmd in ("table2", "all"):
            table2(args, k, lr)
    if args.cmd in ("centralised", "all"):
        centralised(args)


if __name__ == "__main__":
    main()
