"""Federated LoRA fine-tuning of a Hugging Face GPT-2 with PEFT adapters (FedLoRU, Figure 3 at CPU scale).

Nothing is downloaded: the model is built from a ``transformers.GPT2Config``, the tokenizer is a
byte-level BPE trained here with ``tokenizers``, and the text is a play-format file split by
speaking role (``../shared/data/tinyshakespeare.txt`` by default). The largest ``--clients``
roles are the clients (90% of each role's blocks to train, 10% pooled as the test set); every
other role is the central corpus the model is pretrained on first. Then each algorithm fine-tunes
PEFT LoRA adapters (rank 8 on the attention and MLP projections) from that pretrained model:

    python examples/hf_lora.py                                  # FedLoRU, 30 rounds
    python examples/hf_lora.py --algorithms fedlora,fedloru,pfedloru,mapa --rounds 40

The run folders go under ``--out``; the first algorithm's result is saved as PEFT output
(``peft/adapter``: the adapter folder; ``peft/base``: the base model, whose weights FedLoRU's merges
moved) and loaded back with ``PeftModel.from_pretrained`` to check it gives the same outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

import rankfed as rf
from rankfed.data.hf import lm_blocks, shakespeare_roles, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's attention (qkv, out) and MLP (in, out) projections


def split_blocks(x: dict, y: torch.Tensor, test_frac: float) -> tuple[tuple, tuple]:
    n_test = max(1, int(round(len(y) * test_frac)))
    cut = len(y) - n_test  # the role's last blocks are its test part
    return ({k: v[:cut] for k, v in x.items()}, y[:cut]), ({k: v[cut:] for k, v in x.items()}, y[cut:])


def concat(parts: list[tuple]) -> tuple:
    return {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}, torch.cat([p[1] for p in parts])


def pretrain(model: torch.nn.Module, data: tuple, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """The user's own central pretraining (plain PyTorch): AdamW on the non-client roles."""
    x, y = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = model(input_ids=x["input_ids"][idx], attention_mask=x["attention_mask"][idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def algorithm(name: str, rank: int, tau: int, k: int):
    return {
        "fedlora": lambda: rf.FedLoRA(),
        "fedloru": lambda: rf.FedLoRU(tau=tau),
        "pfedloru": lambda: rf.PFedLoRU(tau=tau, personal_rank=rank, personal_epochs=1),
        "fa_lora": lambda: rf.FALoRA(),
        "mapa": lambda: rf.MAPA(k=k),
        "fedavg": lambda: rf.FedAvg(),
    }[name]()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"), help="play-format text (NAME: then lines)")
    p.add_argument("--out", default="runs/hf_lora")
    p.add_argument("--algorithms", default="fedloru", help="comma list of fedlora, fedloru, pfedloru, fa_lora, mapa, fedavg")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--participation", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tau", type=int, default=15, help="FedLoRU's merge period (the paper merges every 15 rounds here)")
    p.add_argument("--mapa-k", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3, help="clients' AdamW learning rate (cosine over the rounds)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block", type=int, default=64, help="tokens per sample")
    p.add_argument("--max-blocks", type=int, default=48, help="at most this many blocks per client role (CPU time; 0: all)")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    roles = shakespeare_roles(args.text)
    if len(roles) <= args.clients:
        raise SystemExit(f"{args.text}: {len(roles)} roles, need more than --clients {args.clients} (the rest pretrain)")
    names = list(roles)
    client_roles, central_roles = names[: args.clients], names[args.clients :]
    tokenizer = train_tokenizer((roles[r] for r in central_roles), "bpe", args.vocab)  # trained on the central text only
    central = lm_blocks([roles[r] for r in central_roles], tokenizer, args.block)
    splits = [split_blocks(*lm_blocks(roles[r], tokenizer, args.block, max_blocks=args.max_blocks or None), 0.1) for r in client_roles]
    clients, test = [s[0] for s in splits], concat([s[1] for s in splits])

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = GPT2LMHeadModel(config).to(args.device)
    n_params = sum(t.numel() for t in base.parameters())
    central = ({k: v.to(args.device) for k, v in central[0].items()}, central[1].to(args.device))
    losses = pretrain(base, central, args.pretrain_steps, args.pretrain_lr, 32, args.seed)
    base = base.cpu()
    print(f"GPT-2 {n_params / 1e6:.2f}M parameters; pretrained {args.pretrain_steps} steps on {len(central_roles)} roles "
          f"({len(central[1])} blocks): loss {losses[0]:.3f} -> {sum(losses[-20:]) / min(20, len(losses)):.3f}" if losses else "no pretraining")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True)

    def model():  # every party builds the same adapters: rankfed seeds torch before calling this
        return get_peft_model(copy.deepcopy(base), lora)

    local = rf.LocalTraining(optimizer="adamw", lr=args.lr, epochs=1, batch_size=args.batch_size, lr_schedule="cosine", lr_min=args.lr / 10)
    summary: dict = {"command": "python examples/hf_lora.py " + " ".join(sys.argv[1:] if argv is None else argv), "parameters": n_params, "clients": client_roles,
                     "pretrain": {"steps": args.pretrain_steps, "first_loss": losses[0] if losses else None, "last20_loss": sum(losses[-20:]) / min(20, len(losses)) if losses else None}, "runs": {}}
    per_round = max(1, round(args.participation * args.clients))
    first = None
    for name in args.algorithms.split(","):
        fed = rf.Federation(model, clients, test=test, algorithm=algorithm(name, args.rank, args.tau, args.mapa_k), local=local, seed=args.seed, device=args.device,
                            holdout=0.1 if name == "pfedloru" else 0.0)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PEFT's fan_in_fan_out notes on GPT-2's Conv1D
            result = fed.run(rounds=args.rounds, clients_per_round=per_round, out=out / name, overwrite=True)
        first = first or (name, result)
        h = [r for r in result.history if r.get("loss") is not None]
        adapters = sum(t.numel() for n, t in result.model.named_parameters() if "lora_" in n)
        summary["runs"][name] = {
            "test_loss": [(r["round"], r["loss"]) for r in h],
            "train_loss": [(r["round"], r.get("train_loss")) for r in result.history if r.get("train_loss") is not None],
            "final_test_loss": h[-1]["loss"], "final_perplexity": h[-1].get("perplexity"),
            "personal_accuracy": h[-1].get("personal_accuracy"),
            "uplink_bytes": result.bytes["uplink"], "downlink_bytes": result.bytes["downlink"],
            "adapter_numbers": adapters, "s_per_round": (time.perf_counter() - t) / args.rounds,
        }
        print(f"{name}: test loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f} (perplexity {h[-1].get('perplexity', math.nan):.2f}), "
              f"uplink {result.bytes['uplink'] / 1e6:.2f} MB, {summary['runs'][name]['s_per_round']:.2f} s/round")

    name, result = first
    saved = rf.save_peft(result.model, out / "peft")  # PEFT output: adapter folder + the (merged-into) base
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(saved["base"]), saved["adapter"]).eval()
    result.model.eval()
    with torch.no_grad():
        ids = test[0]["input_ids"][:4]
        diff = float((reloaded(input_ids=ids).logits - result.model(input_ids=ids).logits).abs().max())
    summary["reload_max_abs_diff"] = diff
    summary["wall_s"] = time.perf_counter() - t0
    print(f"saved {name}'s adapters to {saved['adapter']} (base: {saved['base']}); reloaded max |logit diff| {diff:.2e}; {summary['wall_s']:.0f} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
