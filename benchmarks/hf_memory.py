"""Peak memory of PEFT fine-tuning at 10 and 100 clients (issue 17): the frozen base exists once
per process, never per client, and client state is adapters only.

Each (algorithm, number of clients) runs in a fresh subprocess, so its peak RSS (VmHWM from
``/proc/self/status``) is its own. The child builds a GPT-2 (``--n-embd``, ``--n-layer``) under
PEFT LoRA adapters (rank 8 on c_attn, c_proj, c_fc), gives every client ``--blocks`` blocks of
``--block`` random tokens, and runs ``--rounds`` rounds of ``--per-round`` clients (the same
work at either client count) as stateful clients, the paper's setting. It reports the peak,
the model's and the adapters' bytes, and the bytes of the clients' own state
(``sim.client_states``). The marginal bytes of one more client, (peak at 100 - peak at 10) / 90,
are compared with the model's bytes: a copy of the model per client would cost about 1.0 of it.

    .venv/bin/python benchmarks/hf_memory.py            # writes results/hf_memory.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args) -> dict:
    warnings.filterwarnings("ignore")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    import rankfed as rf

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    floor = vm("VmHWM")
    cfg = GPT2Config(vocab_size=2000, n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer, n_head=4, bos_token_id=1, eos_token_id=1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)

    def model():
        return get_peft_model(GPT2LMHeadModel(cfg), lora)

    g = torch.Generator().manual_seed(0)

    def data(n):
        ids = torch.randint(2, 2000, (n, args.block), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids

    clients = [data(args.blocks) for _ in range(args.clients)]
    algo = {"fedloru": rf.FedLoRU(tau=1), "pfedloru": rf.PFedLoRU(tau=1, personal_rank=8)}[args.algorithm]
    fed = rf.Federation(model, clients, test=data(8), algorithm=algo, local=rf.LocalTraining(optimizer="adamw", lr=1e-3, batch_size=8),
                        holdout=0.25 if args.algorithm == "pfedloru" else 0.0)
    sim = fed.simulator(rounds=args.rounds, clients_per_round=args.per_round, client_kind="stateful")
    m = fed.initial_model()
    model_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "lora_" in n)
    del m
    t = time.perf_counter()
    for r in range(1, args.rounds + 1):
        sim.run_round(r)
    state_bytes = sum(v.numel() * v.element_size() for s in sim.client_states.values() for part in s.values() if isinstance(part, dict) for v in part.values())
    return {"algorithm": args.algorithm, "clients": args.clients, "peak": vm("VmHWM"), "floor": floor, "model_bytes": model_bytes, "adapter_bytes": adapter_bytes,
            "clients_with_state": len(sim.client_states), "state_bytes": state_bytes, "s": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true")
    p.add_argument("--algorithm", default="fedloru")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--counts", default="10,100")
    p.add_argument("--algorithms", default="fedloru,pfedloru")
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30, help="rounds (30 x 5 clients: pFedLoRU's 100 clients mostly take part)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--out", default=str(HERE / "results" / "hf_memory.md"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for algo in args.algorithms.split(","):
        for n in (int(c) for c in args.counts.split(",")):
            cmd = [sys.executable, __file__, "--child", "--algorithm", algo, "--clients", str(n), "--per-round", str(args.per_round), "--rounds", str(args.rounds),
                   "--blocks", str(args.blocks), "--block", str(args.block), "--n-embd", str(args.n_embd), "--n-layer", str(args.n_layer)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    mb = 1 << 20
    lines = [
        "# PEFT fine-tuning memory at 10 and 100 clients (issue 17)", "",
        f"Command: `{' '.join([Path(sys.executable).name, 'benchmarks/hf_memory.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}; one torch thread per child; {time.strftime('%Y-%m-%d')}",
        "", f"GPT-2 n_embd {args.n_embd}, {args.n_layer} layers, vocabulary 2000, PEFT LoRA r = 8 on c_attn/c_proj/c_fc; stateful clients; "
        f"{args.rounds} rounds of {args.per_round} clients; {args.blocks} blocks of {args.block} tokens per client.", "",
        "| algorithm | clients | peak RSS MB | model MB | adapters MB | clients with state | their state MB | marginal per extra client (x model) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = next((b for b in rows if b["algorithm"] == r["algorithm"] and b["clients"] < r["clients"]), None)
        marginal = "" if base is None else f"{(r['peak'] - base['peak']) / (r['clients'] - base['clients']) / mb:.3f} MB ({(r['peak'] - base['peak']) / (r['clients'] - base['clients']) / r['model_bytes']:.4f})"
        lines.append(f"| {r['algorithm']} | {r['clients']} | {r['peak'] / mb:.0f} | {r['model_bytes'] / mb:.1f} | {r['adapter_bytes'] / mb:.2f} | {r['clients_with_state']} | {r['state_bytes'] / mb:.2f} | {marginal} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
