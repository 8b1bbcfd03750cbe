"""DDP communication hooks for low-rank gradient compression (PowerSGD, GreedyLore, random subspace).

    state = LowRankHookState.for_model(model, "greedylore", rank=4, update_gap=100, warmup_steps=10)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, lowrank_hook)

The hook hands each bucket's gradients, by parameter name, to the compressor of
:mod:`rankfed.compress.lowrank` with a blocking all-reduce of the process group
(sum, then divide by the world size), and returns the reduced gradients as the
bucket's result, so momentum SGD and AdamW step on them unchanged. Works on gloo
(CPU) and NCCL (GPU). The state pickles (its parameter-name map is rebuilt by
:meth:`LowRankHookState.attach`), saves and restores with
:meth:`~LowRankHookState.state_dict` / :meth:`~LowRankHookState.load_state_dict`, and
keeps the compression statistics: ``state.lowrank.stats`` (numbers all-reduced per step,
what dense sends, and the last step's ``last_captured`` / ``last_residual``).

:meth:`LowRankHookState.for_model` all-reduces embeddings and the output head dense by
default, as GreedyLore's authors' code does: parameters matching
:data:`~rankfed.compress.lowrank.DEFAULT_DENSE_PATTERNS` (``*embed*``, ``*wte*``,
``*wpe*``, ``*lm_head*``) and those of :func:`output_head` (the last ``nn.Linear`` in
``model.modules()`` order). ``dense_patterns=[]`` and ``dense_head=False`` compress them too.
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations are the real
# dist.GradBucket / torch.futures.Future objects.
from dataclasses import dataclass, field
import glob
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from rankfed.compress.lowrank import DEFAULT_DENSE_PATTERNS, LOWRANK_COMPRESSORS, LowRankState

__all__ = ["LowRankHookState", "lowrank_hook", "greedylore_hook", "powersgd_hook", "output_head", "dense_patterns_for", "DEFAULT_DENSE_PATTERNS"]


def output_head(model: nn.Module) -> Optional[str]:
    """The module name of ``model``'s output head: its last ``nn.Linear`` in ``model.modules()``
    (registration) order, e.g. rankfed's CharTransformer's ``fc`` or an MLP's last layer; None if
    it has none. A head of another kind (a 1x1 convolution) is not found: name it in ``dense_patterns``."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def dense_patterns_for(model: nn.Module, dense_patterns=None, dense_head: bool = True) -> list:
    """The ``dense_patterns`` :meth:`LowRankHookState.for_model` and ``rankfed ddp`` use:
    ``dense_patterns`` (None: :data:`DEFAULT_DENSE_PATTERNS`) plus, with ``dense_head``, the
    parameter names of :func:`output_head` (escaped, matched exactly)."""
    if isinstance(dense_patterns, str):
        raise ValueError(f"dense_patterns must be a list of fnmatch patterns, got the string {dense_patterns!r}")
    out = list(DEFAULT_DENSE_PATTERNS if dense_patterns is None else dense_patterns)
    head = output_head(model) if dense_head else None
    if head is not None:
        prefix = f"{head}." if head else ""
        out += [glob.escape(prefix + n) for n, _ in model.get_submodule(head).named_parameters() if glob.escape(prefix + n) not in out]
    return out


@dataclass
class LowRankHookState:
    compressor: str = "greedylore"  # none | powersgd | greedylore | random
    options: dict = field(default_factory=dict)  # rank, update_gap, warmup_steps, probes, min_saving, dense_patterns
    seed: int = 0
    lowrank: LowRankState = field(default_factory=LowRankState)
    process_group: Any = None  # None: the default group
    _names: dict[int, str] = field(default_factory=dict, repr=False)  # id(parameter) -> name

    def __post_init__(self) -> None:
        if self.compressor not in LOWRANK_COMPRESSORS:
            raise ValueError(f"compressor {self.compressor!r}: must be one of {', '.join(LOWRANK_COMPRESSORS)}")
        self._comp = LOWRANK_COMPRESSORS[self.compressor](**self.options)

    @classmethod
    def for_model(
        cls, model: nn.Module, compressor: str = "greedylore", *, seed: int = 0, process_group: Any = None, dense_patterns=None, dense_head: bool = True, **options: Any
    ) -> "LowRankHookState":
        """A state for ``model``'s parameters. ``options`` go to the compressor (``rank``,
        ``update_gap``, ``warmup_steps``, ``probes``, ``min_saving``, ...); ``dense_patterns``
        (None: :data:`DEFAULT_DENSE_PATTERNS`) and ``dense_head`` (the parameters of
        :func:`output_head`) are resolved by :func:`dense_patterns_for` into the compressor's
        ``dense_patterns`` option (``state.options["dense_patterns"]``)."""
        options = dict(options, dense_patterns=dense_patterns_for(model, dense_patterns, dense_head))
        return cls(compressor, options, seed, process_group=process_group).attach(model)

    def state_dict(self) -> dict:
        """The worker's compressor state as plain ints, dicts and tensors (clones): ``compressor``,
        ``step``, ``error`` (this worker's buffers: they differ between workers), ``q`` (PowerSGD),
        ``basis`` (GreedyLore), ``stats``. Save one per worker."""
        return {"compressor": self.compressor, **self.lowrank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output (tensors are cloned; move them to the
        device first, e.g. ``torch.load(..., map_location=device)``)."""
        if state.get("compressor") != self.compressor:
            raise ValueError(f"load_state_dict: the state is {state.get('compressor')!r}'s, this hook's compressor is {self.compressor!r}")
        self.lowrank = LowRankState.from_state_dict(state)

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
