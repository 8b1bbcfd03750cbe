"""pFedLoRU vs pFedLoRA(1)/(2) (FedLoRU paper Table 3) and mFedLoRU vs heterogeneous FedHM (Table 4), scaled.

The task is the client-scaling study's (benchmarks/fedloru_fmnist.py): Fashion-MNIST,
the 2NN (784-200-200-10) with fc1 and fc2 factorised, 20 clients, 50% per round,
batch 32, SGD momentum 0.9, cosine lr, 30 rounds, seed 0; the learning
rates are the ones tuned there (run that first): pFedLoRA takes FedAvg's, pFedLoRU and mFedLoRU
FedLoRU r64's, FedHM FedHM r64's.

* Table 3 setting: Dirichlet(0.1) and Dirichlet(0.5) labels, 20% of each client's
  data held out for its personalised accuracy; 1 personal epoch and 4 global epochs
  (pFedLoRA(2): 5 epochs on both together). pFedLoRU: global rank 64 with alpha 16,
  personal rank 16 with alpha 4 (the same scale alpha / rank = 0.25 as the global pair,
  which the lr was tuned for), tau 10; pFedLoRA: personal rank 16, alpha 16, full model shared.
* Table 4 setting: IID, 5 local epochs, two tier tables of clients (the paper's
  Table A1 is not in our copy, so these are ours): setting 1, half the clients
  nested rank 8 and half plain FedLoRU rank 64; setting 2, a quarter each nested
  rank 4 and 16, half plain. FedHM's tier ranks are chosen, as the paper does, to
  match each tier's trainable parameters.

    python benchmarks/fedloru_variants.py all --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import Jobs, diverged, fallback, standing  # noqa: E402
from _report import HERE, write_result  # noqa: E402

ROOT = HERE.parent
CONFIG = ROOT / "configs" / "fedloru_fmnist.toml"
RUNS = HERE / "runs" / "fedloru_variants"
TUNE = HERE / "runs" / "fedloru_fmnist" / "tune"
LOWRANK = {"algorithm.patterns": ["fc1", "fc2"], "algorithm.exclude": []}
BASE = {"task.model": "mlp", "task.dataset": "fmnist", "federation.clients": 20}

PERSONAL = {
    "pFedLoRA(1)": ("FedAvg", {"algorithm.name": "pfedlora", "algorithm.variant": 1, "algorithm.rank": 16, "algorithm.alpha": 16.0, **LOWRANK}),
    "pFedLoRA(2)": ("FedAvg", {"algorithm.name": "pfedlora", "algorithm.variant": 2, "algorithm.rank": 16, "algorithm.alpha": 16.0, **LOWRANK}),
    "pFedLoRU": ("FedLoRU r64", {"algorithm.name": "pfedloru", "algorithm.rank": 64, "algorithm.alpha": 16.0, "algorithm.tau": 10, "algorithm.personal_rank": 16, "algorithm.personal_alpha": 4.0, **LOWRANK}),
}
# The paper's Table 3 (CIFAR-100): its alpha column is lost in our copy; the rows in order.
PAPER_TABLE3 = [{"pFedLoRA(1)": 45.36, "pFedLoRA(2)": 47.45, "pFedLoRU": 49.65}, {"pFedLoRA(1)": 42.14, "pFedLoRA(2)": 42.28, "pFedLoRU": 46.50}]

SETTINGS = {
    "setting 1": [{"fraction": 0.5, "rank_a": 8, "rank_b": 8}, {"fraction": 0.5, "rank_a": 0, "rank_b": 0}],
    "setting 2": [{"fraction": 0.25, "rank_a": 4, "rank_b": 4}, {"fraction": 0.25, "rank_a": 16, "rank_b": 16}, {"fraction": 0.5, "rank_a": 0, "rank_b": 0}],
}
PAPER_TABLE4 = {"setting 1": {"FedHM": (88.09, 49.84), "mFedLoRU": (84.81, 51.16)}, "setting 2": {"FedHM": (88.68, 50.52), "mFedLoRU": (84.36, 50.89)}}
RANK = 64
# 2NN factorised layers as (out, in): fc1 784 -> 200, fc2 200 -> 200; the rest (fc3, biases) is sent in full.
LAYERS = [(200, 784), (200, 200)]


def mfedloru_params(rank_a: int, rank_b: int) -> int:
    """Numbers a tier trains and sends for the factorised layers: nested r_A (m + r) + r_B (r + n),
    or r (m + n) for a factor that is not nested."""
    total = 0
    for m, n in LAYERS:
        total += rank_a * (m + RANK) if rank_a else m * RANK
        total += rank_b * (RANK + n) if rank_b else RANK * n
    return total


def fedhm_rank_matching(target: int) -> int:
    """FedHM's rank whose factors r (m + n) come closest to ``target`` numbers."""
    per_rank = sum(m + n for m, n in LAYERS)
    return max(1, round(target / per_rank))


def fedhm_tiers(tiers: list[dict]) -> list[dict]:
    return [{"fraction": t["fraction"], "rank": fedhm_rank_matching(mfedloru_params(t["rank_a"], t["rank_b"]))} for t in tiers]


def tuned_lr(method: str) -> float:
    """The lr benchmarks/fedloru_fmnist.py picked for a method (best non-diverged tuning run)."""
    best = None
    for d in TUNE.glob(f"{method.replace(' ', '-')}-lr*"):
        s = json.loads((d / "summary.json").read_text())
        if s.get("status") == "diverged" or s.get("best_accuracy") is None:
            continue
        lr = float(d.name.split("-lr")[1].split("-r")[0])
        if best is None or s["best_accuracy"] > best[1]:
            best = (lr, s["best_accuracy"])
    if best is None:
        raise SystemExit(f"no tuning runs for {method} under {TUNE}: run benchmarks/fedloru_fmnist.py first")
    return best[0]


def _jobs_table3(args):
    out = {}
    for alpha in (0.1, 0.5):
        for m, (family, sets) in PERSONAL.items():
            local = {"client.epochs": 4, "algorithm.personal_epochs": 1}
            out[(m, alpha)] = (
                RUNS / "table3" / f"{m.replace('(', '').replace(')', '')}-dir{alpha}-r{args.rounds}",
                {**sets, **local, "client.lr": tuned_lr(family), "task.partition": "dirichlet", "task.alpha": alpha, "task.holdout": 0.2, "federation.rounds": args.rounds},
            )
    return out


def _jobs_table4(args):
    out = {}
    for setting, tiers in SETTINGS.items():
        common = {"task.partition": "iid", "federation.rounds": args.rounds, **LOWRANK}
        out[("mFedLoRU", setting)] = (
            RUNS / "table4" / f"mFedLoRU-{setting.replace(' ', '')}-r{args.rounds}",
            {**common, "algorithm.name": "mfedloru", "algorithm.rank": RANK, "algorithm.alpha": 16.0, "algorithm.tau": 10, "algorithm.tiers": tiers, "client.lr": tuned_lr("FedLoRU r64")},
        )
        out[("FedHM", setting)] = (
            RUNS / "table4" / f"FedHM-{setting.replace(' ', '')}-r{args.rounds}",
            {**common, "algorithm.name": "fedhm", "algorithm.tiers": fedhm_tiers(tiers), "client.lr": tuned_lr("FedHM r64")},
        )
    return out


def run_all(args) -> None:
    jobs = Jobs(CONFIG, BASE, args.workers, args.deadline)
    todo = [*_jobs_table3(args).values(), *_jobs_table4(args).values()]
    futures = [jobs.submit(folder, sets) for folder, sets in todo]
    done = sum(f.result() is not None for f in futures)
    retries = [jobs.submit(*fallback(folder, sets)) for folder, sets in todo if diverged(folder)]
    done -= sum(f.result() is None for f in retries)
    print(f"{done}/{len(futures)} runs finished", flush=True)
    if done == len(futures):
        report(args)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _final(job: tuple[Path, dict]) -> tuple[dict, str]:
    """The summary standing for a job, and its mark (the fallback lr, if it took one)."""
    folder, sets, fell_back = standing(*job)
    return _summary(folder), (f" †lr {sets['client.lr']:.3g}" if fell_back else "")


def _acc_cell(s: dict) -> str:
    if s.get("final_accuracy") is None:
        return f"diverged in round {s.get('diverged_at_round')}"
    return f"{100 * s['final_accuracy']:.2f} ({100 * s['best_accuracy']:.2f})"


def report(args) -> None:
    t3 = _jobs_table3(args)
    lines3 = [
        "| method | params sent per upload | Dir(0.1) personalised: final (best) | Dir(0.1) global test | Dir(0.5) personalised: final (best) | Dir(0.5) global test | paper row 1 | paper row 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in PERSONAL:
        cells = []
        for alpha in (0.1, 0.5):
            s, fell = _final(t3[(m, alpha)])
            status = fell + ("" if s.get("status", "completed") == "completed" else f" ({s['status']} at round {s.get('diverged_at_round')})")
            if s.get("final_personal_accuracy") is None:
                cells += [f"diverged{status}", "-"]
                continue
            cells.append(f"{100 * s['final_personal_accuracy']:.2f} ({100 * s['best_personal_accuracy']:.2f}){status}")
            cells.append(f"{100 * s['final_accuracy']:.2f}")
        params = _final(t3[(m, 0.1)])[0]["mean_uplink_bytes_per_upload"] / 4
        lines3.append(f"| {m} | {params / 1e3:.1f}k | " + " | ".join(cells) + f" | {PAPER_TABLE3[0][m]} | {PAPER_TABLE3[1][m]} |")

    verdict3 = []
    for alpha in (0.1, 0.5):
        acc = {m: _final(t3[(m, alpha)])[0].get("final_personal_accuracy") for m in PERSONAL}
        best_lora = max(acc["pFedLoRA(1)"] or 0, acc["pFedLoRA(2)"] or 0)
        if acc["pFedLoRU"] is not None:
            verdict3.append(f"Dir({alpha}): pFedLoRU {100 * acc['pFedLoRU']:.2f}% vs the better pFedLoRA {100 * best_lora:.2f}% ({'above' if acc['pFedLoRU'] > best_lora else 'below'})")
    t4 = _jobs_table4(args)
    lines4 = ["| setting | tiers (mFedLoRU) | FedHM tier ranks | FedHM final (best) | mFedLoRU final (best) | uplink per upload by tier: FedHM / mFedLoRU | paper CIFAR-10 FedHM / mFedLoRU | paper CIFAR-100 FedHM / mFedLoRU |", "|---|---|---|---|---|---|---|---|"]
    for setting, tiers in SETTINGS.items():
        (fh, fh_mark), (mf, mf_mark) = _final(t4[("FedHM", setting)]), _final(t4[("mFedLoRU", setting)])
        tier_txt = "; ".join(f"{t['fraction']:g}: " + (f"r_A = r_B = {t['rank_a']}" if t["rank_a"] else "plain FedLoRU") for t in tiers)
        fh_ranks = ", ".join(f"{t['fraction']:g}: {t['rank']}" for t in fedhm_tiers(tiers))
        kb = lambda d: ", ".join(f"{v / 1e3:.0f} kB" for v in d.values())  # noqa: E731
        p = PAPER_TABLE4[setting]
        lines4.append(
            f"| {setting} | {tier_txt} | {fh_ranks} | {_acc_cell(fh)}{fh_mark} | {_acc_cell(mf)}{mf_mark} | "
            f"{kb(fh['uplink_bytes_per_upload_by_tier'])} / {kb(mf['uplink_bytes_per_upload_by_tier'])} | {p['FedHM'][0]} / {p['mFedLoRU'][0]} | {p['FedHM'][1]} / {p['mFedLoRU'][1]} |"
        )
    verdict4 = []
    for setting in SETTINGS:
        fh, mf = _final(t4[("FedHM", setting)])[0], _final(t4[("mFedLoRU", setting)])[0]
        if fh.get("final_accuracy") is not None and mf.get("final_accuracy") is not None:
            verdict4.append(f"{setting}: mFedLoRU {'above' if mf['final_accuracy'] > fh['final_accuracy'] else 'below'} FedHM by {100 * abs(mf['final_accuracy'] - fh['final_accuracy']):.2f} points")
    machines = sorted({f"{s['machine']} ({s['device']}, torch {s['torch']})" for s in (_final(j)[0] for j in [*t3.values(), *t4.values()])})
    body = f"""Fashion-MNIST, 2NN with fc1 and fc2 factorised, 20 clients, 50% per round, {args.rounds} rounds, batch 32,
SGD momentum 0.9, cosine lr (the lr tuned in the scaling study for the nearest method there: pFedLoRA FedAvg's
{tuned_lr('FedAvg')}, pFedLoRU and mFedLoRU FedLoRU r64's {tuned_lr('FedLoRU r64')}, FedHM FedHM r64's {tuned_lr('FedHM r64')}), seed 0. Runs: `rankfed run configs/fedloru_fmnist.toml --set ...`,
commands in each summary.json under benchmarks/runs/fedloru_variants/. Executed on: {'; '.join(machines)}.

### pFedLoRU vs pFedLoRA (paper Table 3 setting, scaled)

Personalised accuracy: the mean over all 20 clients of each client's model (shared part plus its personal
pair) on its own held-out 20%; global test: the shared model on the 10,000 test images.

{chr(10).join(lines3)}

The paper's figures are CIFAR-100 / ResNet-18 (its alpha column is lost in our copy; row 1 and row 2 in its order).
†: the run diverged at its lr and was run again at a third of it (the lr given).
**Here:** {'; '.join(verdict3)}. The paper has pFedLoRU above both pFedLoRA variants in both rows.

### mFedLoRU vs heterogeneous FedHM (paper Table 4 setting, scaled)

IID, 5 local epochs; test accuracy of the shared model. FedHM's tier ranks match each mFedLoRU tier's trained
and sent numbers for fc1 and fc2 (the paper matches trainable parameters).

{chr(10).join(lines4)}

**Here:** {'; '.join(verdict4)}. The paper has mFedLoRU below FedHM on CIFAR-10 and above it on CIFAR-100.
"""
    print(body)
    write_result("fedloru_variants", "pFedLoRU and mFedLoRU (FedLoRU paper Tables 3 and 4) on Fashion-MNIST", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("all", "report"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new run starts (0 = none)")
    args = ap.parse_args()
    {"all": run_all, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
