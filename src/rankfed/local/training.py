"""How a client trains: :class:`LocalTraining`, the optimiser factory and the lr schedule.

``LocalTraining`` is the ``[client]`` table of an experiment file as a Python object; every
key of that table is a keyword here and is checked the same way. The optimiser is
``"sgd"`` / ``"adamw"`` (the experiment file's spelling), any ``torch.optim.Optimizer``
class (``torch.optim.Adam``; in a file ``"torch.optim:Adam"``), or any callable
``(params, lr=..., **kwargs) -> Optimizer``. The same factory builds the optimiser of
every client and of every data-parallel worker (``rankfed ddp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from rankfed.checks import accepts_keyword, bad, check_fields, choice, describe_object, load_object

__all__ = ["LocalTraining", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw")  # the names an experiment file may give; or an import path "module:Class"
_DEFAULT_BETAS = [0.9, 0.999]


@dataclass
class LocalTraining:
    """A client's local optimisation for one round.

    Args:
        optimizer: ``"sgd"``, ``"adamw"``, an optimiser class (``torch.optim.Adam``), an
            import path (``"torch.optim:Adam"``) or a callable ``(params, lr=..., **kw)``.
            A class gets ``lr``, ``weight_decay`` (if not 0), ``momentum``/``nesterov``/
            ``betas`` (if changed from their defaults) and ``optimizer_options``; a keyword
            it does not take is an error naming it. A fresh optimiser is built for every
            client and round (optimiser state does not persist across rounds).
        lr: learning rate (> 0).
        momentum, nesterov: SGD's (momentum in [0, 1)).
        weight_decay: L2 penalty (>= 0).
        betas: AdamW's (two numbers in [0, 1)).
        epochs: passes over the client's data per round.
        steps: > 0: this many minibatch steps per round instead of ``epochs``.
        batch_size: minibatch size; the last batch of an epoch may be smaller.
        lr_schedule: ``"constant"`` or ``"cosine"`` (over rounds, from ``lr`` down to ``lr_min``).
        lr_min: the cosine schedule's floor.
        grad_clip: > 0: clip each step's gradient to this L2 norm.
        optimizer_options: more keyword arguments for the optimiser (``{"amsgrad": True}``).
    """

    optimizer: Any = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: list(_DEFAULT_BETAS))
    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    grad_clip: float = 0.0
    optimizer_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "client")
        choice("client.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if not 0 < self.lr < math.inf:
            raise bad("client.lr", self.lr, "must be > 0 and finite")
        if not 0 <= self.momentum < 1:
            raise bad("client.momentum", self.momentum, "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise bad("client.nesterov", self.nesterov, "needs client.momentum > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise bad("client.weight_decay", self.weight_decay, "must be >= 0 and finite")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas):
            raise bad("client.betas", self.betas, "must be two numbers in [0, 1)")
        if self.epochs < 1:
            raise bad("client.epochs", self.epochs, "must be >= 1")
        if self.steps < 0:
            raise bad("client.steps", self.steps, "must be >= 0 (0 = client.epochs)")
        if self.batch_size < 1:
            raise bad("client.batch_size", self.batch_size, "must be >= 1")
        if not 0 <= self.lr_min <= self.lr:
            raise bad("client.lr_min", self.lr_min, f"must be in [0, client.lr = {self.lr}]")
        if not 0 <= self.grad_clip < math.inf:
            raise bad("client.grad_clip", self.grad_clip, "must be >= 0 and finite (0 = off)")
        self._factory = self._resolve_optimizer()

    # -- the optimiser -----------------------------------------------------------------------
    def _resolve_optimizer(self) -> Callable[..., torch.optim.Optimizer]:
        opt = self.optimizer
        if isinstance(opt, str):
            if opt in OPTIMIZERS:
                return torch.optim.SGD if opt == "sgd" else torch.optim.AdamW
            if ":" not in opt:
                raise bad("client.optimizer", opt, f"must be one of {', '.join(OPTIMIZERS)}, an import path 'module:Class' or an optimizer class")
            opt = load_object(opt, "client.optimizer")
        if not callable(opt):
            raise bad("client.optimizer", self.optimizer, "must be 'sgd', 'adamw', a torch.optim.Optimizer class or a callable (params, lr=...)")
        for key, value in self._kwargs(opt, self.lr).items():
            if not accepts_keyword(opt, key):
                where = "client.optimizer_options" if key in self.optimizer_options else f"client.{key}"
                raise bad(where, value, f"{describe_object(opt)} takes no keyword {key!r}")
        return opt

    @property
    def optimizer_name(self) -> str:
        """``"sgd"`` / ``"adamw"`` for torch's SGD / AdamW (however given), else the class's name."""
        if self._factory is torch.optim.SGD:
            return "sgd"
        if self._factory is torch.optim.AdamW:
            return "adamw"
        return getattr(self._factory, "__name__", type(self._factory).__name__)

    def _kwargs(self, factory: Any, lr: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"lr": lr}
        if factory is torch.optim.SGD:
            kwargs |= {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}
        elif factory is torch.optim.AdamW:
            kwargs |= {"betas": tuple(self.betas), "weight_decay": self.weight_decay}
        else:  # another optimiser: what was set away from the defaults
            if self.weight_decay:
                kwargs["weight_decay"] = self.weight_decay
            if self.momentum:
                kwargs["momentum"] = self.momentum
            if self.nesterov:
                kwargs["nesterov"] = self.nesterov
            if list(self.betas) != _DEFAULT_BETAS:
                kwargs["betas"] = tuple(self.betas)
        return kwargs | dict(self.optimizer_options)

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh optimiser over ``params`` at ``lr`` (default: ``self.lr``)."""
        return self._factory(list(params), **self._kwargs(self._factory, self.lr if lr is None else lr))

    # -- schedule and steps --------------------------------------------------------------------
    def lr_at(self, rnd: int, total_rounds: int) -> float:
        """Learning rate of round ``rnd`` (1-based) of ``total_rounds``: constant, or cosine."""
        if self.lr_schedule == "constant" or total_rounds <= 1:
            return self.lr
        frac = (rnd - 1) / (total_rounds - 1)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * frac))

    def num_steps(self, num_samples: int) -> int:
        """Minibatch steps one client with ``num_samples`` samples takes in a round."""
        if self.steps > 0:
            return self.steps
        return math.ceil(num_samples / self.batch_size) * self.epochs

    @property
    def plain_sgd(self) -> bool:
        """torch's SGD with no options beyond those this class models (what a vectorised cohort
        implements)."""
        return self.optimizer_name == "sgd" and not self.optimizer_options

    def describe(self) -> dict[str, Any]:
        """The options as an experiment file's ``[client]`` table (the optimiser by name or path)."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if not isinstance(self.optimizer, str):
            out["optimizer"] = describe_object(self.optimizer)
        out["betas"] = list(self.betas)
        return out
