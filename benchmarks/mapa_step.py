"""A MAPA client step vs a FedAvg client step: time and peak memory.

Both run through the algorithms' real client halves (``fit``) on the same
model, data, batch size and number of local steps; the time per step is the
fit time over the steps (load, train, build the uplink included). Memory is
the process's peak resident set (CPU) or peak allocated CUDA memory above what
the model and data already take, measured in a fresh subprocess per case.
Target: MAPA <= 1.3x FedAvg's time.

    python benchmarks/mapa_step.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402

CASES = {
    "cnn2": {"shape": (1, 28, 28), "k": 512},
    "resnet18": {"shape": (3, 32, 32), "k": 4096},
}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(model_name: str, algo: str, steps: int, device: str, repeats: int) -> dict:
    """Runs in a child process: one case, returns seconds per step and extra peak memory."""
    import torch

    from rankfed.algorithms import get_algorithm
    from rankfed.protocol import ClientContext, RunContext, float_state
    from rankfed.local import LocalTraining
    from rankfed.data import ClientData
    from rankfed.models import build_model
    from rankfed.local import LocalTrainer

    case = CASES[model_name]
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_name, case["shape"], 10).to(dev)
    n = 32 * steps
    x = torch.randn(n, *case["shape"], device=dev)
    y = torch.randint(0, 10, (n,), device=dev)
    data = ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0])
    cfg = LocalTraining(lr=0.01, momentum=0.9, batch_size=32, steps=steps)
    ctx = RunContext(num_clients=1, rounds=1, seed=0, local=cfg, device=dev)
    options = {"k": case["k"]} if algo == "mapa" else {}
    client = get_algorithm(algo, options).make_client(model, ctx)
    payload = {"@round": 1, "@seed": 1, **{k: v.detach().clone() for k, v in float_state(model).items()}}
    trainer = LocalTrainer(cfg, 1, 0)

    def fit() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        client.fit(payload, ClientContext(0, 1, model, data, trainer))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb("VmRSS") * 1024
    fit()  # warm-up (allocator, kernels) - also where the peak is set
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kb("VmHWM") * 1024) - base
    times = [fit() / steps for _ in range(repeats)]
    return {"s_per_step": statistics.median(times), "extra_peak_bytes": peak, "k": case["k"], "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ALGO"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.device, args.repeats)))
        return

    res = {}
    for model_name in CASES:
        for algo in ("fedavg", "mapa"):
            cmd = [sys.executable, __file__, "--child", model_name, algo, "--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[(model_name, algo)] = json.loads(out.strip().splitlines()[-1])
            print(model_name, algo, res[(model_name, algo)], flush=True)
    lines = ["| model | d | MAPA k | FedAvg s/step | MAPA s/step | time ratio | FedAvg extra peak MB | MAPA extra peak MB |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for model_name in CASES:
        f, m = res[(model_name, "fedavg")], res[(model_name, "mapa")]
        ratio = m["s_per_step"] / f["s_per_step"]
        verdicts.append(f"{model_name}: {ratio:.2f}x ({'met' if ratio <= 1.3 else 'NOT met'})")
        lines.append(
            f"| {model_name} | {f['params']:,} | {m['k']} | {f['s_per_step'] * 1e3:.2f} ms | {m['s_per_step'] * 1e3:.2f} ms | **{ratio:.2f}** | "
            f"{f['extra_peak_bytes'] / 1e6:.1f} | {m['extra_peak_bytes'] / 1e6:.1f} |"
        )
    body = f"""Client `fit` of each algorithm, batch 32, {args.steps} local steps, SGD momentum 0.9, device {args.device};
median of {args.repeats} fits after a warm-up; memory = peak above the model and data (fresh process per case).

{chr(10).join(lines)}

Target MAPA <= 1.3x FedAvg time: {'; '.join(verdicts)}."""
    print(body)
    if not args.no_write:
        write_result(f"mapa_step_{args.device}", f"MAPA vs FedAvg client step ({args.device})", body)


if __name__ == "__main__":
    main()
