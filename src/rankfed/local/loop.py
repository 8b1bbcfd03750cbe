"""The local optimisation loop every algorithm shares.

A minibatch is one index gather on the device (in-memory data) or one collation of a
streamed dataset's items at the same indices. What is trained is the caller's business: it
passes the parameters to optimise, and either the model (the loss is the task's) or its own
``loss_fn(x, y)`` closure (an algorithm that trains a reparametrisation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rankfed.local.data import ClientData
from rankfed.local.task import Task
from rankfed.local.training import LocalTraining

__all__ = ["LocalTrainer", "TrainStats"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class TrainStats:
    """What one client's local work did: optimiser steps, samples seen (with repeats), mean loss."""

    steps: int
    samples: int
    mean_loss: float


class LocalTrainer:
    """Runs a client's local optimisation as :class:`LocalTraining` says, with ``task``'s loss.

    ``total_rounds`` sets the lr schedule; ``seed`` is the run's seed (a client's minibatch
    order comes from the seed it is handed for the round)."""

    def __init__(self, local: LocalTraining, total_rounds: int, seed: int = 0, task: Task | None = None):
        self.cfg = local
        self.total_rounds = total_rounds
        self.seed = seed
        self.task = task if task is not None else Task()

    def lr_at(self, rnd: int) -> float:
        """Learning rate for round ``rnd`` (1-based)."""
        return self.cfg.lr_at(rnd, self.total_rounds)

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], rnd: int, lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh optimiser for one client's round (optimiser state does not persist)."""
        return self.cfg.make_optimizer(params, self.lr_at(rnd) if lr is None else lr)

    def num_steps(self, num_samples: int) -> int:
        return self.cfg.num_steps(num_samples)

    def batches(self, n: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
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

    def train(self, model: torch.nn.Module, data: ClientData, rnd: int, seed: int, params: list[torch.Tensor] | None = None, **hooks) -> TrainStats:
        """Minimise the task's loss of ``model`` on ``data`` over ``params`` (default: every
        parameter that requires grad), in train mode; ``hooks`` as in :meth:`run`."""
        model.train()
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        task = self.task
        return self.run(params, lambda x, y: task.batch_loss(model, x, y), data, rnd=rnd, seed=seed, **hooks)

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
        """Optimise ``params`` with ``loss_fn(x, y)`` on ``data`` for the round's epochs (or steps).

        ``seed`` fixes the minibatch order (and any randomness inside the model, such as
        dropout), so a client's work is reproducible alone. ``after_backward`` runs between
        ``loss.backward()`` and gradient clipping (an algorithm that trains a
        reparametrisation fills ``params``' grads there); ``after_step`` after each step.
        """
        params = list(params)
        opt = optimizer if optimizer is not None else self.make_optimizer(params, rnd)
        n = data.num_samples
        if n == 0:
            return TrainStats(steps=0, samples=0, mean_loss=float("nan"))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # model-internal randomness (dropout) for this client and round
        loss_sum = torch.zeros((), device=data.device)
        steps = samples = 0
        clip = self.cfg.grad_clip
        for idx in self.batches(n, gen, data.device if data.in_memory else torch.device("cpu")):
            x, y = data.batch(idx)
            loss = loss_fn(x, y)
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
