"""Layer-wise LoRA in federated learning: FA-LoRA, FedLoRA and FedLoRU.

Every selected ``nn.Linear`` / ``nn.Conv2d`` becomes base + (alpha / r) * up(down(x))
(:mod:`rankfed.lowrank`). In FA-LoRA (Sun et al. 2024; the MAPA paper's
layer-wise baseline) ``down`` (the reconstruction matrix A) is drawn at random
from the run's seed and frozen, the base weights stay at the seeded initial
model, and only ``up`` (the projection B, zero at the start) trains, together
with whatever was not factorised (biases, norms, unmatched layers), which is
trained and sent in full and counted.

FedLoRA (the FedLoRU paper's baseline) trains both factors; the server
averages A and B separately. FedLoRU (Park & Klabjan, Algorithm 1) does the
same and every ``tau`` rounds the server and the clients merge
(alpha / r) * up @ down into the base weights and re-initialise the factors
(``random``: down Kaiming-uniform from a seed both sides derive, up zero; or
``momentum``: keep them), so the global model's rank grows with each merge.

A model under PEFT adapters (``peft.get_peft_model``) keeps PEFT's LoRA layers: its
``LoraConfig`` chooses the layers, rank and scale; the active adapter's ``lora_A`` / ``lora_B``
are the factors, merged with PEFT's merge (:mod:`rankfed.lowrank.peft_lora`); the global
model is the PeftModel's own state dict (``save_pretrained`` writes the adapter folder).

Base weights and the initial factors are rebuilt from the run's seed by every
party, so the global state is the trained tensors: that is the downlink of a
stateless client until the first merge (after it, the moved base weights of
the factorised layers are added: a stateless client has no other way to know
them). A stateful client's broadcast is the last averaged update, plus a flag
and a seed when the server merged after that round: the client merges its own
replica the same way, and no base weight is ever sent. Uplink: the client's
change of the trained tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rankfed.algorithms.aggregate import add_means_, add_present_, expect_entries
from rankfed.algorithms.base import Algorithm, register
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec, describe_bytes
from rankfed.compress import low_rank_pays
from rankfed.errors import ConfigError
from rankfed.local import TrainStats
from rankfed.lowrank import apply_lora, dense_state_dict, lora_layers, merge_all
from rankfed.lowrank.peft_lora import active_adapter, is_peft_model, merge_adapter, peft_config_of, peft_lora_layers
from rankfed.protocol import ClientContext, ClientHalf, RoundSums, RunContext, ServerHalf, client_uplink, derive_seed, shared_state
from rankfed.wire import Payload

__all__ = ["FALoRA", "FedLoRA", "FedLoRU", "LoraOptions", "build_lora_model", "factor_pairs", "global_state", "warn_large_factors"]


@dataclass
class LoraOptions(CompressionOptions):
    """Options of every algorithm with layer-wise factors (the LoRA family)."""

    rank: int = 4
    alpha: float = 0.0  # update scale is alpha / rank; 0 = alpha equal to rank (scale 1)
    patterns: list = field(default_factory=lambda: ["*conv*"])  # fnmatch on module names: which layers get factors
    # The stem convolution (named conv1 in the reference CNNs) is trained in full, as in the
    # FedLoRU and FedHM code: with it excluded, ResNet-18's factors at rank 128/96/64 are the
    # paper's 4.59M/3.44M/2.30M communicated parameters (Table 1).
    exclude: list = field(default_factory=lambda: ["conv1"])
    train_bias: bool = True  # biases of factorised layers train (and are sent)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigError(f"algorithm.rank = {self.rank}: must be >= 1")
        if not 0 <= self.alpha < math.inf:
            raise ConfigError(f"algorithm.alpha = {self.alpha}: must be >= 0 and finite (0 = rank)")
        for key in ("patterns", "exclude"):
            value = getattr(self, key)
            if not all(isinstance(p, str) for p in value):
                raise ConfigError(f"algorithm.{key} = {value!r}: must be a list of strings")
        if not self.patterns:
            raise ConfigError("algorithm.patterns = []: give at least one module-name pattern")


def _factor_seed(run_seed: int) -> int:
    return derive_seed(run_seed, 0x4641)


def _merge_seed(run_seed: int, rnd: int) -> int:
    return derive_seed(run_seed, rnd, 0x4C4F5255)


def _merge(model: nn.Module, reinit: str, seed: int) -> None:
    """Merge every wrapper's factors into its base and re-initialise them (same draws on every party)."""
    gen = torch.Generator().manual_seed(seed)
    if is_peft_model(model):
        merge_adapter(model, active_adapter(model), reinit, gen)
    else:
        merge_all(model, reinit, generator=gen)


def factor_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(base weight, down, up) of every factorised layer by name: rankfed's wrappers or the
    active PEFT adapter's ``lora_A`` / ``lora_B``."""
    if is_peft_model(model):
        adapter = active_adapter(model)
        return {n: (layer.get_base_layer().weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) for n, layer in peft_lora_layers(model).items() if adapter in layer.lora_A}
    return {n: (layer.base_layer.weight, layer.down.weight, layer.up.weight) for n, layer in lora_layers(model).items()}


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live base weights of the factorised layers, by state-dict name."""
    return {f"{n}.base_layer.weight": base for n, (base, _, _) in factor_pairs(model).items()}


def global_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global model's state under the user's model's keys: a PEFT model's own state dict
    (base and adapters), or the plain model equivalent to rankfed's wrappers."""
    if is_peft_model(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dense_state_dict(model)


_PEFT_CHOSEN = ("rank", "alpha", "patterns", "exclude")


def _peft_copy(model: nn.Module, opts: LoraOptions, freeze_down: bool) -> nn.Module:
    """A copy of a PEFT model with its own adapters as the factors: the LoraConfig chooses the
    layers, rank and scale, so an option of rankfed's own layers that says otherwise is an error."""
    config = peft_config_of(model)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for f in dataclasses.fields(opts)}
    for key in _PEFT_CHOSEN:
        value = getattr(opts, key)
        if value == defaults[key]:
            continue
        if key == "rank" and config is not None and value == config.r:
            continue
        if key == "alpha" and config is not None and value == config.lora_alpha:
            continue
        raise ConfigError(
            f"algorithm.{key} = {value!r}: the model is under PEFT adapters, whose LoraConfig chooses the layers, rank and scale "
            f"(r = {getattr(config, 'r', '?')}, lora_alpha = {getattr(config, 'lora_alpha', '?')}, target_modules = {sorted(getattr(config, 'target_modules', None) or [])}); "
            "leave it unset or pass a plain model"
        )
    wrapped = copy.deepcopy(model)
    try:
        active_adapter(wrapped)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if freeze_down:  # FA-LoRA: A stays at its (shared) draw; only B trains and travels
        for _, down, _ in factor_pairs(wrapped).values():
            down.requires_grad_(False)
    return wrapped


def build_lora_model(model: nn.Module, opts: LoraOptions, run_seed: int, freeze_down: bool) -> nn.Module:
    """A wrapped copy of the seeded initial ``model``; the factors' random draws come from
    the run's seed, so the server and every client build the same one. A PEFT model keeps
    its own adapters (every party copies the same ones)."""
    if is_peft_model(model):
        return _peft_copy(model, opts, freeze_down)
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
    except (RuntimeError, MemoryError) as e:  # a rank so large the factors cannot be allocated
        raise ConfigError(f"algorithm.rank = {opts.rank}: the rank-{opts.rank} factors cannot be built ({type(e).__name__}: {e})") from None
    # Factor init is drawn on the CPU generator; move the new modules next to the base.
    return wrapped.to(next(model.parameters()).device)


def warn_large_factors(wrapped: nn.Module, option: str = "algorithm.rank") -> None:
    """One warning naming the wrapped layers whose factor pair has more numbers than the dense
    layer it updates (a rank above what saves anything): sent every round, they cost more than
    FedAvg would for that layer."""
    big = []
    pairs = factor_pairs(wrapped)
    for name, (weight, down, up) in pairs.items():
        factors = down.numel() + up.numel()
        if not low_rank_pays(weight.shape, factors, min_saving=1.0):
            big.append((name, factors * down.element_size(), weight.numel() * weight.element_size()))
    if big:
        rank = next(iter(pairs.values()))[1].shape[0]
        shown = "; ".join(f"{n}: factors {describe_bytes(f)} vs dense {describe_bytes(d)}" for n, f, d in big[:4]) + ("; ..." if len(big) > 4 else "")
        total_f, total_d = sum(f for _, f, _ in big), sum(d for _, _, d in big)
        warnings.warn(
            f"{option} = {rank}: the factors of {len(big)} layer(s) are bigger than the dense layer they update "
            f"({describe_bytes(total_f)} against {describe_bytes(total_d)} dense, sent every round): {shown}",
            stacklevel=3,
        )


class LoraServer(ServerHalf):
    def __init__(self, wrapped: nn.Module, codec: UplinkCodec, run_seed: int = 0, tau: int = 0, reinit: str = "random"):
        self.model, self.codec = wrapped, codec
        self.run_seed, self.tau, self.reinit = run_seed, tau, reinit
        self.shared = shared_state(wrapped)
        self.base = _base_weights(wrapped)
        self.merges = 0
        self.last_update: Payload = {}

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd, **{k: v.detach() for k, v in self.shared.items()}}
        if self.merges:  # the base moved: a client without memory must download it
            payload.update({k: v.detach() for k, v in self.base.items()})
        return {cid: payload for cid in client_ids}

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, **self.last_update}

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        return expect_entries(self.codec.decode(payload), self.shared)  # the factors' (and other trained tensors') updates

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        self.last_update = {}
        if not sums.count:
            return {"clients": 0}
        # A and B (and everything else trained) are averaged separately, as the paper does.
        self.last_update = add_means_(self.shared, sums)
        if self.tau and rnd % self.tau == 0:
            seed = _merge_seed(self.run_seed, rnd)
            _merge(self.model, self.reinit, seed)
            self.merges += 1
            self.last_update.update({"@merge": True, "@merge_seed": seed})
        return {"clients": sums.count, "train_loss": sums.train_loss}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return global_state(self.model)

    def replica_state(self) -> Payload:
        return {k: v.detach() for k, v in {**self.shared, **self.base}.items()}

    def upload_tensors(self) -> dict[str, torch.Tensor]:
        """What an honest upload holds (its size bounds the uploads the server accepts)."""
        return self.shared


class LoraClient(ClientHalf):
    def __init__(self, wrapped: nn.Module, codec: UplinkCodec, reinit: str = "random"):
        self.model, self.codec, self.reinit = wrapped, codec, reinit  # this client half's own wrapped model object
        self.shared = shared_state(wrapped)
        self.base = _base_weights(wrapped)
        # The seeded initial base: what a stateless client knows without downloading anything.
        self.base0 = {k: v.detach().clone() for k, v in self.base.items()}

    def init_replica(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in {**self.shared, **self.base}.items()}

    def _load(self, source: dict) -> None:
        with torch.no_grad():
            for name, value in self.shared.items():
                value.copy_(source[name])
            for name, value in self.base.items():
                value.copy_(source[name] if name in source else self.base0[name])

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        add_present_({k: v for k, v in replica.items() if k in self.shared}, payload)
        if payload.get("@merge"):
            # Merge the replica exactly as the server merged its model (same factors, same seed).
            self._load(replica)
            _merge(self.model, self.reinit, int(payload["@merge_seed"]))
            with torch.no_grad():
                for name, value in {**self.shared, **self.base}.items():
                    replica[name].copy_(value)

    def begin(self, payload: Payload, ctx: ClientContext) -> nn.Module:
        """This client half's wrapped model (frozen base, trainable factors) loaded from the
        downlink or the replica."""
        start = ctx.replica if ctx.replica is not None else payload
        self._load(start)
        self._remember_start(ctx, start)
        return self.model

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        start = self._start_of(ctx)
        with torch.no_grad():
            delta = {n: v.detach() - start[n].to(v.device) for n, v in self.shared.items()}
        return client_uplink(ctx, stats, self.codec.encode(delta, ctx.state, ctx.seed))

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        """The cohort trains its factors (and whatever else :meth:`fit` trains) from one shared
        start; the frozen base is passed once to all clients."""
        if type(self).fit is not LoraClient.fit:  # a subclass that trains differently (pFedLoRU, mFedLoRU)
            return None
        model, trainer = self.model, ctxs[0].trainer
        starts = [ctx.replica if ctx.replica is not None else p for p, ctx in zip(payloads, ctxs)]
        if any(s is not starts[0] for s in starts):
            return None
        start = starts[0]
        self._load(start)
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        cohort = self.cohort_trainer(model, trainer, compile=compile)
        first = {n: start[n] for n in self.shared}  # the trained parameters and BatchNorm statistics
        trained, stats = cohort.train([first] * len(ctxs), frozen, [c.data for c in ctxs], [c.seed for c in ctxs], trainer, ctxs[0].round)
        out = []
        with torch.no_grad():
            for params, st, ctx in zip(trained, stats, ctxs):
                delta = {n: params[n] - start[n].to(params[n].device) for n in self.shared}
                out.append(client_uplink(ctx, st, self.codec.encode(delta, ctx.state, ctx.seed)))
        return out


class _LoraFamily(LoraOptions, Algorithm):
    freeze_down = False  # a class attribute (no annotation): not an option

    def _tau_reinit(self) -> tuple[int, str]:
        return getattr(self, "tau", 0), getattr(self, "reinit", "random")

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        tau, reinit = self._tau_reinit()
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=self.freeze_down)
        warn_large_factors(wrapped)
        codec = UplinkCodec(self)
        codec.warn_dense(shared_state(wrapped))
        return LoraServer(wrapped, codec, ctx.seed, tau, reinit)

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        _, reinit = self._tau_reinit()
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=self.freeze_down)
        return LoraClient(wrapped, UplinkCodec(self), reinit)


_LORA_ARGS = """
    Args:
        rank: rank r of every factor pair (may exceed a layer's full rank, as the paper's
            ResNet-18 at rank 128 does; a warning names layers whose factors outgrow them).
        alpha: the update is scaled by alpha / rank (0: alpha = rank, scale 1).
        patterns, exclude: fnmatch globs on module names choosing the nn.Linear / nn.Conv2d
            layers that get factors; every other trainable tensor trains and travels in full.
        train_bias: the biases of factorised layers train (and travel).
        compressor, ...: an uplink compressor applied to what travels (see :class:`FedAvg`).
"""


@register
@dataclass
class FALoRA(_LoraFamily):
    __doc__ = """Layer-wise FA-LoRA (the MAPA paper's baseline): A (``down``) frozen at random from the
    run's seed, only B (``up``) trained and sent. Every layer is factorised by default.
    """ + _LORA_ARGS

    name = "fa_lora"
    freeze_down = True

    patterns: list = field(default_factory=lambda: ["*"])
    exclude: list = field(default_factory=list)


@register
@dataclass
class FedLoRA(_LoraFamily):
    __doc__ = """FedLoRA (the FedLoRU paper's baseline): both factors train and are averaged
    separately; no accumulation. The convolutions are factorised by default, the stem
    (``conv1``) trains in full, as in the paper's code.
    """ + _LORA_ARGS

    name = "fedlora"


@register
@dataclass
class FedLoRU(FedLoRA):
    __doc__ = """FedLoRU (Park & Klabjan, Algorithm 1): FedLoRA plus a merge of the factors into
    the base every ``tau`` rounds, so the global model's rank grows with each merge.
    """ + _LORA_ARGS + """        tau: merge every tau rounds (>= 1).
        reinit: after a merge, ``"random"`` (down Kaiming-uniform, up zero) or ``"momentum"``
            (keep both factors, after ReLoRA).
"""

    name = "fedloru"
    default_client_kind = "stateful"  # the paper's clients keep W and merge locally

    tau: int = 10
    reinit: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau < 1:
            raise ConfigError(f"algorithm.tau = {self.tau}: must be >= 1 (fedlora is FedLoRU without merges)")
        if self.reinit not in ("random", "momentum"):
            raise ConfigError(f"algorithm.reinit = {self.reinit!r}: must be one of random, momentum")
