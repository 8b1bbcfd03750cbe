"""Local training on a client's tensors: the inner loop every algorithm shares.

Client data stays in tensors on the training device; a minibatch is one index
gather (no DataLoader, no per-step Python collation). What is trained and how
the loss is formed is the algorithm's business: it passes the parameters to
optimise and a ``loss_fn(x, y) -> loss`` closure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from rankfed.config import ClientConfig
from rankfed.data import ClientData

__all__ = ["LocalTrainer", "TrainStats"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainStats:
    steps: int
    samples: int  # samples processed (counting repeats over epochs)
    mean_loss: float


class LocalTrainer:
    """Runs a client's local optimisation as the experiment's ``[client]`` section says."""

    def __init__(self, cfg: ClientConfig, total_rounds: int, seed: int = 0):
        self.cfg = cfg
        self.total_rounds = total_rounds
        self.seed = seed

    def lr_at(self, rnd: int) -> float:
        """Learning rate for round ``rnd`` (1-based): constant, or cosine from lr to lr_min."""
        c = self.cfg
        if c.lr_schedule == "constant" or self.total_rounds <= 1:
            return c.lr
        frac = (rnd - 1) / (self.total_rounds - 1)
        return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1 + math.cos(math.pi * frac))

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], rnd: int, lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh optimiser for one client's round (optimiser state does not persist)."""
        c = self.cfg
        lr = self.lr_at(rnd) if lr is None else lr
        params = list(params)
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=lr, betas=tuple(c.betas), weight_decay=c.weight_decay)

    def num_steps(self, num_samples: int) -> int:
        """Minibatch steps one client takes in a round."""
        if self.cfg.local_steps > 0:
            return self.cfg.local_steps
        per_epoch = math.ceil(num_samples / self.cfg.batch_size)
        return per_epoch * self.cfg.local_epochs

    def batches(self, n: int, generator: torch.Generator, device: torch.device) -> Iterable[torch.Tensor]:
        """Index tensors of the round's minibatches: reshuffled every epoch, last batch partial."""
        bs = self.cfg.batch_size
        steps = self.num_steps(n)
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, bs):
                yield perm[start : start + bs]
                done += 1
                if done == steps:
                    return

    def run(
        self,
        params: Iterable[torch.nn.Parameter],
        loss_fn: LossFn,
        data: ClientData,
        rnd: int,
        seed: int,
        optimizer: torch.optim.Optimizer | None = None,
        after_backward: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> TrainStats:
        """Optimise ``params`` on ``data`` for the round's local epochs (or steps).

        ``seed`` fixes the minibatch order (and any randomness inside the
        model, such as dropout), so a client's work is reproducible alone.
        ``after_backward`` runs between ``loss.backward()`` and gradient clipping
        (an algorithm that trains a reparametrisation fills ``params``' grads
        there); ``after_step`` runs after each optimiser step.
        """
        params = list(params)
        opt = optimizer if optimizer is not None else self.make_optimizer(params, rnd)
        n = data.num_samples
        if n == 0:
            return TrainStats(steps=0, samples=0, mean_loss=float("nan"))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # model-internal randomness (dropout) for this client and round
        device = data.x.device
        loss_sum = torch.zeros((), device=device)
        steps = samples = 0
        clip = self.cfg.grad_clip
        for idx in self.batches(n, gen, device):
            loss = loss_fn(data.x[idx], data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.detach() * idx.numel()
            steps += 1
            samples += idx.numel()
        return TrainStats(steps=steps, samples=samples, mean_loss=float(loss_sum) / samples)
