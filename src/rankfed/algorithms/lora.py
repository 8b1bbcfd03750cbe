"""Layer-wise LoRA in federated learning: FA-LoRA (freeze A, train and send only B).

Every selected ``nn.Linear`` / ``nn.Conv2d`` becomes base + (alpha / r) * up(down(x))
(:mod:`rankfed.lowrank`). In FA-LoRA (Sun et al. 2024; the MAPA paper's
layer-wise baseline) ``down`` (the reconstruction matrix A) is drawn at random
from the run's seed and frozen, the base weights stay at the seeded initial
model, and only ``up`` (the projection B, zero at the start) trains, together
with whatever was not factorised (biases, norms, unmatched layers), which is
trained and sent in full and counted.

Since base weights and A are rebuilt from the seed by every party, the
global state is just the trained tensors: that is the whole downlink of a
stateless client, and a stateful client's broadcast is their last averaged
update. Uplink: the client's change of the same tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.algorithms.base import Algorithm, ClientContext, ClientHalf, RunContext, ServerHalf, register
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec
from rankfed.algorithms.aggregate import add_present_, apply_mean_update, mean_train_loss, sample_weights
from rankfed.config import ConfigError
from rankfed.lowrank import apply_lora, dense_state_dict
from rankfed.wire import Payload

__all__ = ["FaLora", "FaLoraOptions", "build_lora_model"]


@dataclass
class FaLoraOptions(CompressionOptions):
    rank: int = 4
    alpha: float = 0.0  # update scale is alpha / rank; 0 = alpha equal to rank (scale 1)
    patterns: list = field(default_factory=lambda: ["*"])  # fnmatch on module names: which layers get factors
    exclude: list = field(default_factory=list)
    train_bias: bool = True  # biases of factorised layers train (and are sent)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigError(f"algorithm.rank = {self.rank}: must be >= 1")
        if self.alpha < 0:
            raise ConfigError(f"algorithm.alpha = {self.alpha}: must be >= 0 (0 = rank)")
        for key in ("patterns", "exclude"):
            value = getattr(self, key)
            if not all(isinstance(p, str) for p in value):
                raise ConfigError(f"algorithm.{key} = {value!r}: must be a list of strings")
        if not self.patterns:
            raise ConfigError("algorithm.patterns = []: give at least one module-name pattern")


def _factor_seed(run_seed: int) -> int:
    return int(np.random.SeedSequence([run_seed, 0x4641]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def build_lora_model(model: nn.Module, opts: FaLoraOptions, run_seed: int, freeze_down: bool) -> nn.Module:
    """A wrapped copy of the seeded initial ``model``; the factors' random draws come from
    the run's seed, so the server and every client build the same one."""
    wrapped = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(_factor_seed(run_seed))
    try:
        apply_lora(
            wrapped,
            opts.rank,
            float(opts.alpha or opts.rank),
            patterns=opts.patterns,
            exclude=opts.exclude,
            freeze_down=freeze_down,
            train_bias=opts.train_bias,
            generator=gen,
        )
    except ValueError as e:
        raise ConfigError(f"algorithm.rank = {opts.rank}, patterns = {opts.patterns}: {e}") from None
    # Factor init is drawn on the CPU generator; move the new modules next to the base.
    return wrapped.to(next(model.parameters()).device)


def _shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the parties exchange: trainable parameters and float buffers (live tensors)."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return out


class LoraServer(ServerHalf):
    def __init__(self, wrapped: nn.Module, codec: UplinkCodec):
        self.model, self.codec = wrapped, codec
        self.shared = _shared_state(wrapped)
        self.last_update: dict[str, torch.Tensor] = {}

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd, **{k: v.detach() for k, v in self.shared.items()}}
        return {cid: payload for cid in client_ids}

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, **self.last_update}

    def aggregate(self, rnd: int, replies: Sequence[tuple[int, Payload]]) -> dict[str, float]:
        self.last_update = {}
        if not replies:
            return {"clients": 0}
        weights = sample_weights(replies)
        deltas = [self.codec.decode(p) for _, p in replies]
        self.last_update = apply_mean_update(self.shared, deltas, weights)
        return {"clients": len(replies), "train_loss": mean_train_loss(replies, weights)}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return dense_state_dict(self.model)


class LoraClient(ClientHalf):
    def __init__(self, wrapped: nn.Module, codec: UplinkCodec):
        self.model, self.codec = wrapped, codec  # this client half's own wrapped model object
        self.shared = _shared_state(wrapped)

    def init_replica(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.shared.items()}

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        add_present_(replica, payload)

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        start = ctx.replica if ctx.replica is not None else payload
        with torch.no_grad():
            for name, value in self.shared.items():
                value.copy_(start[name])
        model = self.model
        model.train()
        stats = ctx.trainer.run(
            [p for p in model.parameters() if p.requires_grad],
            lambda x, y: F.cross_entropy(model(x), y),
            ctx.data,
            rnd=ctx.round,
            seed=ctx.seed,
        )
        with torch.no_grad():
            delta = {n: v.detach() - start[n].to(v.device) for n, v in self.shared.items()}
        up: Payload = {"@num_samples": ctx.data.num_samples, "@train_loss": stats.mean_loss}
        up.update(self.codec.encode(delta, ctx.state, ctx.seed))
        return up


@register
class FaLora(Algorithm):
    """Layer-wise FA-LoRA: A (``down``) frozen at random, only B (``up``) trained and sent."""

    name = "fa_lora"
    Options = FaLoraOptions

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        return LoraServer(build_lora_model(model, self.options, ctx.seed, freeze_down=True), UplinkCodec(self.options))

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        return LoraClient(build_lora_model(model, self.options, ctx.seed, freeze_down=True), UplinkCodec(self.options))
