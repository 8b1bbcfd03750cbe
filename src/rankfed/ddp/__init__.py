"""DDP communication hooks for low-rank gradient compression (PowerSGD, GreedyLore).

    state = LowRankHookState.for_model(model, "greedylore", rank=4, update_gap=100, warmup_steps=10)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, lowrank_hook)

The hook hands each bucket's gradients, by parameter name, to the compressor of
:mod:`rankfed.compress.lowrank` with a blocking all-reduce of the process group
(sum, then divide by the world size), and returns the reduced gradients as the
bucket's result, so momentum SGD and AdamW step on them unchanged. Works on gloo
(CPU) and NCCL (GPU). The state pickles (its parameter-name map is rebuilt by
:meth:`LowRankHookState.attach`) and keeps the compression statistics:
``state.lowrank.stats`` (numbers all-reduced per step and what dense sends).
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations are the real
# dist.GradBucket / torch.futures.Future objects.
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rankfed.compress.lowrank import LOWRANK_COMPRESSORS, LowRankState

__all__ = ["LowRankHookState", "lowrank_hook", "greedylore_hook", "powersgd_hook"]


@dataclass
class LowRankHookState:
    compressor: str = "greedylore"  # none | powersgd | greedylore
    options: dict = field(default_factory=dict)  # rank, update_gap, warmup_steps, min_saving
    seed: int = 0
    lowrank: LowRankState = field(default_factory=LowRankState)
    process_group: Any = None  # None: the default group
    _names: dict[int, str] = field(default_factory=dict, repr=False)  # id(parameter) -> name

    def __post_init__(self) -> None:
        if self.compressor not in LOWRANK_COMPRESSORS:
            raise ValueError(f"compressor {self.compressor!r}: must be one of {', '.join(LOWRANK_COMPRESSORS)}")
        self._comp = LOWRANK_COMPRESSORS[self.compressor](**self.options)

    @classmethod
    def for_model(cls, model: nn.Module, compressor: str = "greedylore", *, seed: int = 0, process_group: Any = None, **options: Any) -> "LowRankHookState":
        return cls(compressor, dict(options), seed, process_group=process_group).attach(model)

    def attach(self, model: nn.Module) -> "LowRankHookState":
        """Learn the parameter names of ``model`` (the DDP module's ``.module`` or the model itself)."""
        self._names = {id(p): n for n, p in model.named_parameters()}
        return self

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_names"], d["process_group"] = {}, None  # identities and groups do not travel
        d.pop("_comp", None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._comp = LOWRANK_COMPRESSORS[self.compressor](**self.options)


def lowrank_hook(state: LowRankHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Reduce one bucket through the state's compressor; a completed future of the flat result."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous().clone()
        dist.all_reduce(t, group=group)
        return t / world

    params, grads = bucket.parameters(), bucket.gradients()
    if not state._names:
        raise RuntimeError("lowrank_hook: the state knows no parameter names; build it with LowRankHookState.for_model(model, ...)")
    named = {state._names[id(p)]: g for p, g in zip(params, grads)}
    out, state.lowrank = state._comp.reduce(named, state.lowrank, allreduce, state.seed, count_step=bucket.is_last())
    flat = torch.cat([out[state._names[id(p)]].reshape(-1) for p in params])
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(flat.to(bucket.buffer().dtype))
    return fut


def greedylore_hook(state: LowRankHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """:func:`lowrank_hook` for a GreedyLore state (the name the issue and the docs use)."""
    if state.compressor != "greedylore":
        raise ValueError(f"greedylore_hook needs a greedylore state, got {state.compressor!r}")
    return lowrank_hook(state, bucket)


def powersgd_hook(state: LowRankHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """:func:`lowrank_hook` for rankfed's PowerSGD state."""
    if state.compressor != "powersgd":
        raise ValueError(f"powersgd_hook needs a powersgd state, got {state.compressor!r}")
    return lowrank_hook(state, bucket)
