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

Options that make the FedLoRU authors' released code (``haemPark/fedloru_official``) a
setting, the paper's text staying the default (``preset = "fedloru-code"`` in an experiment
file sets them all but ``scale``, with ``task.batchnorm = "batch"`` and the code's weight
decay and gradient clipping: :data:`rankfed.app.config.PRESETS`):

* ``base_init = "zero"`` (default ``"model"``): every factorised layer's frozen base weight
  starts at zero and both factors are drawn Kaiming-uniform (``down`` from the run's factor
  seed as always, ``up`` from a second seed of the run), so the model starts as a pure
  rank-r network and is the sum of the merged updates and the live pair (the code's
  ``keep_original_weights=False``). A factorised layer's bias stays the model's (the code
  zeroes it too; its convolutions have none). Every party builds the same zero base and the
  same factors from the seed, so nothing more travels.
* ``factor_dropout = p`` (default 0): dropout between ``down`` and ``up``, train mode only.
* ``scale = "alpha/sqrt(r)"`` (default ``"alpha/r"``, the paper's and the code's): rsLoRA's
  update scale, so one learning rate serves every rank (needs ``alpha > 0``).
* FedLoRU: ``merge_rounds = [...]`` (an explicit schedule, instead of every ``tau`` rounds,
  as the code's ``--accumulate`` lists) and ``eval_before_merge = true`` (the round's
  evaluation is of the model before that round's merge, as the code evaluates and then
  merges).

``reinit = "momentum"`` keeps the factors after a merge, so the merged update is in the base
*and* still in the live pair: the model jumps from W + d to W + 2 d at every merge (d the
scaled product of the factors then). The authors' code does exactly this (``merge()`` adds
d into the weight and leaves the factor path on), and so does rankfed; a merge that kept the
function while keeping the factors would leave the base unchanged, i.e. be no merge.
After T rounds the model is W_0 + d_{t1} + ... + d_{tm} + d_T (merges at t1..tm, each d the
factors' product at that round, which already holds the earlier ones' progress). With
``eval_before_merge`` the jump is never what a merge round reports.

A model under PEFT adapters (``peft.get_peft_model``) keeps PEFT's LoRA layers: its
``LoraConfig`` chooses the layers, rank and scale (``use_rslora``) and dropout
(``lora_dropout``); the active adapter's ``lora_A`` / ``lora_B``
are the factors, merged with PEFT's merge (:mod:`rankfed.lowrank.peft_lora`); the global
model is the PeftModel's own state dict (``save_pretrained`` writes the adapter folder).
``base_init = "zero"`` is refused there (a pretrained base is the point of adapters).

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
from rankfed.local import TrainStats, has_dropout
from rankfed.lowrank import SCALES, apply_lora, dense_state_dict, lora_layers, merge_all
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
    scale: str = "alpha/r"  # the update scale: "alpha/r" (LoRA, the paper) or "alpha/sqrt(r)" (rsLoRA)
    factor_dropout: float = 0.0  # dropout between down and up (train mode only), the FedLoRU code's 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigError(f"algorithm.rank = {self.rank}: must be >= 1")
        if not 0 <= self.alpha < math.inf:
            raise ConfigError(f"algorithm.alpha = {self.alpha}: must be >= 0 and finite (0 = rank)")
        if self.scale not in SCALES:
            raise ConfigError(f"algorithm.scale = {self.scale!r}: must be one of {', '.join(SCALES)}")
        if self.scale == "alpha/sqrt(r)" and not self.alpha:
            raise ConfigError(
                "algorithm.scale = 'alpha/sqrt(r)': give algorithm.alpha > 0 (alpha = 0 means alpha = rank, "
                "which makes the scale sqrt(rank) and grow with the rank)"
            )
        if not 0 <= self.factor_dropout < 1:
            raise ConfigError(f"algorithm.factor_dropout = {self.factor_dropout}: must be in [0, 1)")
        for key in ("patterns", "exclude"):
            value = getattr(self, key)
            if not all(isinstance(p, str) for p in value):
                raise ConfigError(f"algorithm.{key} = {value!r}: must be a list of strings")
        if not self.patterns:
            raise ConfigError("algorithm.patterns = []: give at least one module-name pattern")


def _factor_seed(run_seed: int) -> int:
    return derive_seed(run_seed, 0x4641)


def _zero_base_seed(run_seed: int) -> int:
    return derive_seed(run_seed, 0x5A45524F)


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
    layers, rank, scale and dropout, so an option of rankfed's own layers that says otherwise
    is an error."""
    config = peft_config_of(model)
    if getattr(opts, "base_init", "model") != "model":
        raise ConfigError(
            f"algorithm.base_init = {opts.base_init!r}: the model is under PEFT adapters, whose base is the pretrained model; "
            "base_init = 'zero' is for rankfed's own layers (pass the plain model)"
        )
    if opts.scale != "alpha/r" and not getattr(config, "use_rslora", False):
        raise ConfigError(
            f"algorithm.scale = {opts.scale!r}: the model is under PEFT adapters, whose LoraConfig chooses the scale; "
            "set use_rslora = true in its LoraConfig (task.adapters) instead"
        )
    if opts.factor_dropout and opts.factor_dropout != getattr(config, "lora_dropout", None):
        raise ConfigError(
            f"algorithm.factor_dropout = {opts.factor_dropout}: the model is under PEFT adapters, whose LoraConfig chooses the dropout "
            f"(lora_dropout = {getattr(config, 'lora_dropout', '?')}, applied to the adapter's input); set lora_dropout there instead"
        )
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
    the run's seed, so the server and every client build the same one (``base_init =
    "zero"``: the bases zeroed and ``up`` drawn too, from a second seed of the run, in module
    order). A PEFT model keeps its own adapters (every party copies the same ones)."""
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
            scale=opts.scale,
            dropout=opts.factor_dropout,
        )
    except ValueError as e:
        raise ConfigError(f"algorithm.rank = {opts.rank}, patterns = {opts.patterns}: {e}") from None
    except (RuntimeError, MemoryError) as e:  # a rank so large the factors cannot be allocated
        raise ConfigError(f"algorithm.rank = {opts.rank}: the rank-{opts.rank} factors cannot be built ({type(e).__name__}: {e})") from None
    if getattr(opts, "base_init", "model") == "zero":
        zero_gen = torch.Generator().manual_seed(_zero_base_seed(run_seed))
        for layer in lora_layers(wrapped).values():  # module order: the same draws on every party
            layer.zero_base(zero_gen)
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
    """The LoRA family's server: averages every trained tensor (A and B separately) and, on
    the merge rounds (every ``tau``-th, or those of ``merge_rounds``), merges the factors into
    the bases. ``eval_before_merge``: a merge round's evaluation is of the model before the
    merge (:meth:`evaluation_state`)."""

    def __init__(self, wrapped: nn.Module, codec: UplinkCodec, run_seed: int = 0, tau: int = 0, reinit: str = "random", merge_rounds: Sequence[int] = (), eval_before_merge: bool = False):
        self.model, self.codec = wrapped, codec
        self.run_seed, self.tau, self.reinit = run_seed, tau, reinit
        self.merge_rounds = frozenset(int(r) for r in merge_rounds)
        self.eval_before_merge = eval_before_merge
        self.shared = shared_state(wrapped)
        self.base = _base_weights(wrapped)
        self.merges = 0
        self.last_update: Payload = {}
        self._pre_merge: dict[str, torch.Tensor] | None = None

    def merge_due(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with a merge: listed in ``merge_rounds``, or a multiple of ``tau``."""
        if self.merge_rounds:
            return rnd in self.merge_rounds
        return bool(self.tau) and rnd % self.tau == 0

    def evaluation_state(self) -> dict[str, torch.Tensor] | None:
        """With ``eval_before_merge``, after a merge round: the global model just before the
        merge; else None (the round's evaluation is of :meth:`global_model_state`)."""
        return self._pre_merge

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        self._pre_merge = None  # the last round's evaluation is over
        payload: Payload = {"@round": rnd, **{k: v.detach() for k, v in self.shared.items()}}
        if self.merges:  # the base moved: a client without memory must download it
            payload.update({k: v.detach() for k, v in self.base.items()})
        return {cid: payload for cid in client_ids}

    def broadcast(self, rnd: int) -> Payload:
        self._pre_merge = None  # the last round's evaluation is over
        return {"@round": rnd, **self.last_update}

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        return expect_entries(self.codec.decode(payload), self.shared)  # the factors' (and other trained tensors') updates

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        self.last_update = {}
        self._pre_merge = None
        if not sums.count:
            return {"clients": 0}
        # A and B (and everything else trained) are averaged separately, as the paper does.
        self.last_update = add_means_(self.shared, sums)
        if self.merge_due(rnd):
            if self.eval_before_merge:
                self._pre_merge = global_state(self.model)
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
        if has_dropout(self.model):  # factor_dropout: its masks would differ under vmap
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


BASE_INITS = ("model", "zero")


@dataclass
class _LoraFamily(LoraOptions, Algorithm):
    freeze_down = False  # a class attribute (no annotation): not an option

    # "model": the factorised layers' frozen bases are the seeded model's (the paper);
    # "zero": zero, with both factors drawn (the FedLoRU code's keep_original_weights=False)
    base_init: str = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_init not in BASE_INITS:
            raise ConfigError(f"algorithm.base_init = {self.base_init!r}: must be one of {', '.join(BASE_INITS)}")

    def _merge_options(self) -> dict:
        """The server's merge schedule and re-initialisation (none without ``tau``)."""
        return {
            "tau": getattr(self, "tau", 0),
            "reinit": getattr(self, "reinit", "random"),
            "merge_rounds": tuple(getattr(self, "merge_rounds", ())),
            "eval_before_merge": getattr(self, "eval_before_merge", False),
        }

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=self.freeze_down)
        warn_large_factors(wrapped)
        codec = UplinkCodec(self)
        codec.warn_dense(shared_state(wrapped))
        return LoraServer(wrapped, codec, ctx.seed, **self._merge_options())

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=self.freeze_down)
        return LoraClient(wrapped, UplinkCodec(self), self._merge_options()["reinit"])


_LORA_ARGS = """
    Args:
        rank: rank r of every factor pair (may exceed a layer's full rank, as the paper's
            ResNet-18 at rank 128 does; a warning names layers whose factors outgrow them).
        alpha: the update is scaled by alpha / rank (0: alpha = rank, scale 1).
        patterns, exclude: fnmatch globs on module names choosing the nn.Linear / nn.Conv2d
            layers that get factors; every other trainable tensor trains and travels in full.
        train_bias: the biases of factorised layers train (and travel).
        scale: ``"alpha/r"`` (the paper's) or ``"alpha/sqrt(r)"`` (rsLoRA; needs alpha > 0).
        factor_dropout: dropout probability between down and up, train mode only (the FedLoRU
            code's 0.1; a model with it trains client by client, not as a vectorised cohort).
        base_init: ``"model"`` (the factorised layers' frozen bases are the seeded model's) or
            ``"zero"`` (bases zero, both factors Kaiming-uniform from the run's seed: the FedLoRU
            code's start, a pure rank-r network; biases stay the model's).
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
        merge_rounds: merge after exactly these rounds instead (the FedLoRU code's
            ``--accumulate`` list); replaces ``tau``: leave tau unset (it becomes 0).
        reinit: after a merge, ``"random"`` (down Kaiming-uniform, up zero) or ``"momentum"``
            (keep both factors: the model jumps from W + d to W + 2 d at each merge, as in
            the FedLoRU code; see the module docstring).
        eval_before_merge: a merge round's evaluation is of the model before its merge (the
            FedLoRU code evaluates, then merges); the model kept and saved is the merged one.
"""

    name = "fedloru"
    default_client_kind = "stateful"  # the paper's clients keep W and merge locally

    tau: int = 10
    reinit: str = "random"
    merge_rounds: list = field(default_factory=list)  # [r1, r2, ...]: merge after these rounds (instead of tau)
    eval_before_merge: bool = False  # evaluate a merge round's model before the merge

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_rounds:
            rounds = self.merge_rounds
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rounds) or len(set(rounds)) != len(rounds):
                raise ConfigError(f"algorithm.merge_rounds = {rounds!r}: must be a list of distinct round numbers >= 1")
            if self.tau not in (0, 10):  # 10: the default, left unset (a dataclass cannot tell it was given)
                raise ConfigError(
                    f"algorithm.tau = {self.tau} and algorithm.merge_rounds = {rounds!r}: give one merge schedule, not both "
                    "(every tau rounds, or after the listed rounds)"
                )
            self.merge_rounds = sorted(rounds)
            self.tau = 0  # the schedule is merge_rounds (and a resolved config reads back the same)
        elif self.tau < 1:
            raise ConfigError(f"algorithm.tau = {self.tau}: must be >= 1 (fedlora is FedLoRU without merges; or give merge_rounds)")
        if self.reinit not in ("random", "momentum"):
            raise ConfigError(f"algorithm.reinit = {self.reinit!r}: must be one of random, momentum")
