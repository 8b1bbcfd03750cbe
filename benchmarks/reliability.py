"""Faults injected into rankfed runs, and what happened: the RELIABILITY report.

1. Bad uploads: for every algorithm, each kind of corrupted upload from one
   client in a round; the outcome (dropped with which reason, or accepted) and
   whether the round's model equals the model built without that upload.
2. Kill and resume: runs killed with SIGKILL at random moments, resumed with
   ``rankfed run --resume``; compared with the uninterrupted run (metrics without
   timings, and the model, bitwise).
3. Bad input: every case of tests/test_bad_input.py through the command line
   (exit code, whether a traceback leaked, the error line).
4. Flower (``--flower``): a SuperNode killed mid-run, a SuperNode sending NaN.

    python benchmarks/reliability.py --kills 12 --flower
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _report import write_result  # noqa: E402

from rankfed.app.config import load_config, to_toml  # noqa: E402
from rankfed.app.experiment import build_experiment, run_experiment  # noqa: E402

from test_validate import ALGORITHMS, BASE, FAULTS  # noqa: E402  (the same faults the tests inject)

TIMING = {"wall_s", "round_s", "eval_s"}


def bad_uploads() -> tuple[list[str], Counter]:
    rows, outcome = [], Counter()
    for label in ALGORITHMS:
        for fault, (corrupt, _) in FAULTS.items():
            cfg = load_config(None, [*BASE, *ALGORITHMS[label]])
            bad, lost = build_experiment(cfg).simulator(), build_experiment(cfg).simulator()
            bad.tamper = lambda rnd, cid, p, corrupt=corrupt: corrupt(p) if (rnd, cid) == (1, 1) else p
            lost.tamper = lambda rnd, cid, p: None if (rnd, cid) == (1, 1) else p
            try:
                rec = bad.run_round(1)
                lost.run_round(1)
                same = all(torch.equal(bad.server.global_model_state()[k], v) for k, v in lost.server.global_model_state().items())
                what = f"dropped: {rec.rejected[1].split(':')[0][:60]}" if 1 in rec.rejected else "accepted"
            except Exception as e:  # noqa: BLE001 - the report counts crashes
                what, same = f"crash: {type(e).__name__}", False
            outcome[(what.startswith("dropped"), same)] += 1
            rows.append(f"| {label} | {fault} | {what} | {'yes' if same else 'no'} |")
    return rows, outcome


def kill_and_resume(trials: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    labels = ["fedavg+topk", "mapa", "fedloru", "pfedloru", "fedavg+greedylore", "mfedloru"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(trials):
            label = labels[t % len(labels)]
            cfg = load_config(None, [*BASE, *ALGORITHMS[label], "federation.rounds=25", "federation.participation=0.5", "federation.resume_every=1", "federation.eval_every=5"])
            d = Path(tmp) / f"t{t}"
            d.mkdir()
            (d / "exp.toml").write_text(to_toml(cfg))
            run_experiment(cfg, d / "whole")
            proc = subprocess.Popen([sys.executable, "-m", "rankfed", "-q", "run", str(d / "exp.toml"), "--out", str(d / "part")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rounds = d / "part" / "rounds.jsonl"
            after = rng.randint(2, 20)
            while not (rounds.exists() and len(rounds.read_text().splitlines()) >= after) and proc.poll() is None:
                time.sleep(0.002)
            delay = rng.uniform(0.0, 0.02)
            time.sleep(delay)
            proc.kill()
            proc.wait()
            done_before = len(rounds.read_text().splitlines())
            finished = (d / "part" / "summary.json").exists()
            rc = subprocess.run([sys.executable, "-m", "rankfed", "-q", "run", "--resume", str(d / "part")], capture_output=True, text=True).returncode
            s = json.loads((d / "part" / "summary.json").read_text()) if rc == 0 else {}
            strip = lambda f: [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in f.read_text().splitlines()]  # noqa: E731
            same_metrics = rc == 0 and strip(d / "part" / "metrics.jsonl") == strip(d / "whole" / "metrics.jsonl")
            a, b = (torch.load(d / x / "model.pt") for x in ("part", "whole"))
            same_model = rc == 0 and all(torch.equal(a[k], b[k]) for k in b)
            rows.append(
                f"| {t + 1} | {label} | {1000 * delay:.0f} ms after round {after} was logged | {done_before} | {'(had finished)' if finished else s.get('resumed_from_round')} "
                f"| {rc} | {'yes' if same_metrics else 'no'} | {'yes' if same_model else 'no'} |"
            )
            print(rows[-1], flush=True)
    return rows


def bad_inputs() -> list[str]:
    import test_bad_input as cases  # noqa: PLC0415

    out = subprocess.run([sys.executable, "-m", "pytest", str(Path(cases.__file__)), "-q", "-p", "no:warnings", "-rA", "--no-header"], capture_output=True, text=True)
    passed = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("PASSED ")]
    failed = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")]
    return [f"- {len(passed)} cases exit with code 2 and one error line naming the bad key, value or file, no traceback, nothing overwritten ({len(failed)} failing)"] + [
        f"  - {p.split('::', 1)[1]}" for p in passed
    ] + [f"  - FAILED {f}" for f in failed]


def flower_faults() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_flower.py", "-q", "-p", "no:warnings", "-rA", "--no-header", "-k", "killed or skip or bad_uploads or ctrl_c"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if line.startswith(("PASSED", "FAILED"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flower", action="store_true", help="also the Flower fault tests (about 3 minutes)")
    args = ap.parse_args()
    uploads, outcome = bad_uploads()
    kills = kill_and_resume(args.kills, args.seed)
    inputs = bad_inputs()
    fl = flower_faults() if args.flower else ["(not run: pass --flower)"]
    n = sum(outcome.values())
    body = f"""**Bad uploads** ({len(ALGORITHMS)} algorithm settings x {len(FAULTS)} faults = {n} injections; client 1 of 4 corrupts
its round-1 upload on the way to the server). Dropped with a reason and the model equal (bitwise) to the one built
without that upload: {outcome[(True, True)]} of {n}; accepted: {sum(v for (d, _), v in outcome.items() if not d)}; model differs:
{sum(v for (_, s), v in outcome.items() if not s)}. A round with fewer valid uploads than `federation.min_clients` is skipped with
the model unchanged; a round in which every upload is non-finite ends the run as diverged (tests/test_validate.py).
A hypothesis fuzz test throws 150 random mutations and random payloads at six algorithms' servers per CI run.

| algorithm | fault | outcome | model = without the upload |
|---|---|---|---|
{chr(10).join(uploads)}

**Kill and resume** ({args.kills} runs of 25 rounds, `federation.resume_every = 1`, SIGKILL at a random moment after
a random round between 2 and 20, then `rankfed run --resume`): compared with the same run left alone, metrics (every field but timings)
and final model bitwise.

| # | algorithm | killed | rounds.jsonl lines at the kill | resumed from round | resume exit | same metrics | same model |
|---|---|---|---|---|---|---|---|
{chr(10).join(kills)}

**Bad input** (tests/test_bad_input.py through `rankfed`):

{chr(10).join(inputs)}

**Flower deployment faults** (tests/test_flower.py, real local deployments): a SuperNode killed with SIGKILL
mid-run (the run completes; its clients count as failed, 2 client-rounds); a round with fewer live clients than
`federation.min_clients` (skipped, model unchanged); a SuperNode sending NaN uploads (dropped as bad uploads, counted);
Ctrl-C on `rankfed flower run` (every process it started is gone).

{chr(10).join(fl)}
"""
    print("wrote", write_result("reliability", "Reliability: faults injected and bad input", body))


if __name__ == "__main__":
    main()
