"""Vectorised cohort training: the round's clients train together in one batched computation.

Each sampled client keeps its own copy of the trained parameters, stacked along a
leading client dimension, and every local step is one ``torch.func.vmap`` of
``torch.func.grad`` over the cohort. Clients keep the minibatch order
:class:`~rankfed.sim.trainer.LocalTrainer` gives them (the same seeded
generator), so the result equals sequential training up to float summation
order. Steps are aligned by index: a client with a smaller last batch is padded
(padded samples weigh 0), and a client with fewer steps sits the remaining steps
out (its parameters and momentum unchanged).

Applies to SGD (momentum, Nesterov, weight decay, gradient clipping) on models
without buffers or dropout (their state or randomness would differ under vmap);
:func:`cohort_supported` says whether it does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from rankfed.config import ClientConfig
from rankfed.data import ClientData
from rankfed.sim.trainer import LocalTrainer, TrainStats

__all__ = ["cohort_supported", "train_cohort"]


def cohort_supported(model: nn.Module, cfg: ClientConfig) -> str | None:
    """Why the model or client settings cannot train as a vectorised cohort (None if they can)."""
    if cfg.optimizer != "sgd":
        return f"client.optimizer = {cfg.optimizer!r} (vectorised training implements sgd)"
    if any(True for _ in model.buffers()):
        return "the model has buffers (BatchNorm statistics would differ under vmap)"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model has dropout (its randomness would differ under vmap)"
    return None


def train_cohort(
    model: nn.Module,
    starts: Sequence[dict[str, torch.Tensor]],
    datas: Sequence[ClientData],
    seeds: Sequence[int],
    trainer: LocalTrainer,
    rnd: int,
) -> tuple[list[dict[str, torch.Tensor]], list[TrainStats]]:
    """Train one copy of ``model``'s parameters per client, starting from ``starts[i]`` (a
    state dict of at least the parameters), on ``datas[i]`` with minibatch seed ``seeds[i]``.
    Returns each client's trained parameters and its :class:`TrainStats`."""
    cfg = trainer.cfg
    names = [n for n, _ in model.named_parameters()]
    device = datas[0].x.device
    c = len(datas)
    params = {n: torch.stack([s[n].detach().to(device) for s in starts]) for n in names}
    # every client's minibatches, in LocalTrainer's order
    plans = []
    for data, seed in zip(datas, seeds):
        gen = torch.Generator().manual_seed(seed)
        plans.append(list(trainer.batches(data.num_samples, gen, device)) if data.num_samples else [])
    steps = max((len(p) for p in plans), default=0)
    bs = cfg.batch_size
    lr = trainer.lr_at(rnd)
    mom, wd, clip = cfg.momentum, cfg.weight_decay, cfg.grad_clip
    bufs = {n: torch.zeros_like(p) for n, p in params.items()} if mom else None

    def loss_of(p, x, y, w):
        ce = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        loss = (ce * w).sum() / w.sum().clamp_min(1.0)
        return loss, loss.detach()

    grads_of = vmap(grad(loss_of, has_aux=True), in_dims=(0, 0, 0, 0))
    loss_sum = torch.zeros(c, device=device)
    samples = torch.zeros(c, device=device)
    nsteps = [len(p) for p in plans]
    xs_shape = datas[0].x.shape[1:]
    for s in range(steps):
        x = torch.zeros((c, bs, *xs_shape), dtype=datas[0].x.dtype, device=device)
        y = torch.zeros((c, bs), dtype=datas[0].y.dtype, device=device)
        w = torch.zeros((c, bs), device=device)
        active = torch.zeros(c, dtype=torch.bool, device=device)
        for i, plan in enumerate(plans):
            if s < len(plan):
                idx = plan[s]
                k = idx.numel()
                x[i, :k], y[i, :k], w[i, :k] = datas[i].x[idx], datas[i].y[idx], 1.0
                active[i] = True
        g, losses = grads_of(params, x, y, w)
        with torch.no_grad():
            if clip > 0:  # per client, as clip_grad_norm_ over that client's parameters
                norms = torch.sqrt(sum(v.reshape(c, -1).pow(2).sum(1) for v in g.values()))
                coef = (clip / (norms + 1e-6)).clamp(max=1.0)
                g = {n: v * coef.view(-1, *[1] * (v.dim() - 1)) for n, v in g.items()}
            for n, p in params.items():
                step_mask = active.view(-1, *[1] * (p.dim() - 1))
                d = g[n] + wd * p if wd else g[n]
                if mom:
                    new_buf = mom * bufs[n] + d
                    bufs[n] = torch.where(step_mask, new_buf, bufs[n])
                    d = d + mom * new_buf if cfg.nesterov else new_buf
                params[n] = torch.where(step_mask, p - lr * d, p)
            counts = w.sum(1)
            loss_sum += losses * counts
            samples += counts
    out = [{n: params[n][i] for n in names} for i in range(c)]
    stats = [
        TrainStats(steps=nsteps[i], samples=int(samples[i]), mean_loss=float(loss_sum[i] / samples[i]) if samples[i] > 0 else float("nan"))
        for i in range(c)
    ]
    return out, stats
