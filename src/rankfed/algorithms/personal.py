"""pFedLoRU (FedLoRU paper, Algorithm 2) and pFedLoRA(1)/(2) (Algorithm 4): personal factors.

Every client k keeps personal low-rank factors L^(k), U^(k) on the selected
layers (the ``p_down`` / ``p_up`` pair of :meth:`LoRALayer.add_personal`, or
the wrapper's own pair for pFedLoRA). They live in the client's private state
between rounds, survive rounds in which the client is not sampled, and never
appear in a payload. What is shared:

* pFedLoRU: the global factors A, B (and the unfactorised layers), exactly as
  FedLoRU, merged into every client's base every ``tau`` rounds. Local work:
  ``personal_epochs`` epochs on L, U with A, B frozen (eq. 12), then the
  round's ``[client]`` epochs on A, B with L, U frozen (eq. 13).
* pFedLoRA(1): the full global model W. ``personal_epochs`` on L, U (eq. 38),
  then the round's epochs on W (eq. 39).
* pFedLoRA(2): W, L and U trained together for ``personal_epochs`` + the
  round's epochs (eq. 40).

A client's personalised model is W^(k) + alpha_per/r_per L U (plus, for
pFedLoRU, the current global factors): the simulator evaluates it on every
client's own held-out split (``personal_accuracy``, the mean over clients), the
shared model on the test set as usual. A client's first personal factors are
drawn from (run seed, client id): L Kaiming-uniform, U zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from rankfed.algorithms.base import Algorithm, register
from rankfed.algorithms.compression import UplinkCodec
from rankfed.algorithms.lora import FedLoRU, LoraClient, LoraOptions, LoraServer, build_lora_model, warn_large_factors
from rankfed.errors import ConfigError
from rankfed.local import LocalTrainer
from rankfed.lowrank import kaiming_down_zero_up, lora_layers
from rankfed.lowrank.peft_lora import add_personal_adapter, is_peft_model
from rankfed.protocol import ClientContext, ClientHalf, RunContext, ServerHalf, client_uplink, derive_seed
from rankfed.wire import Payload

__all__ = ["PFedLoRU", "PFedLoRA", "PersonalClient"]


def _check_personal(opts) -> None:
    if opts.personal_epochs < 0:
        raise ConfigError(f"algorithm.personal_epochs = {opts.personal_epochs}: must be >= 0")


def _personal_seed(run_seed: int, client_id: int) -> int:
    return derive_seed(run_seed, client_id, 0x50455253)


def _epochs_trainer(trainer: LocalTrainer, epochs: int) -> LocalTrainer:
    return LocalTrainer(dataclasses.replace(trainer.cfg, epochs=epochs, steps=0), trainer.total_rounds, trainer.seed, trainer.task)


class PersonalClient(LoraClient):
    """A LoRA-family client with personal factors in its private state.

    ``personal`` names the personal parameters (state-dict names, live tensors);
    everything else trainable is shared. ``mode``: "alternate" (personal epochs,
    then global epochs) or "joint" (everything together).
    """

    personalized = True

    def __init__(self, wrapped: nn.Module, personal: dict[str, torch.Tensor], codec: UplinkCodec, run_seed: int, personal_epochs: int, mode: str, reinit: str = "random"):
        self.personal = personal
        for t in personal.values():
            t.requires_grad_(False)  # so LoraClient counts them out of the shared state
        super().__init__(wrapped, codec, reinit)
        self.run_seed, self.personal_epochs, self.mode = run_seed, personal_epochs, mode

    def _load_personal(self, ctx: ClientContext) -> None:
        saved = ctx.state.get("personal")
        if saved is None:  # a fresh client: each pair drawn as a wrapper draws its own (down Kaiming, up zero)
            gen = torch.Generator().manual_seed(_personal_seed(self.run_seed, ctx.client_id))
            tensors = list(self.personal.values())  # (down, up) pairs in module order
            for down, up in zip(tensors[0::2], tensors[1::2]):
                kaiming_down_zero_up(down, up, gen)
            return
        with torch.no_grad():
            for name, t in self.personal.items():
                t.copy_(saved[name])

    def _save_personal(self, ctx: ClientContext) -> None:
        ctx.state["personal"] = {n: t.detach().clone() for n, t in self.personal.items()}

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        start = ctx.replica if ctx.replica is not None else payload
        self._load(start)
        self._load_personal(ctx)
        model = self.model
        shared_params = [t for t in self.shared.values() if isinstance(t, nn.Parameter)]
        personal_params = list(self.personal.values())
        if self.mode == "joint":  # pFedLoRA(2): W, L, U together for E_per + E_global epochs
            for t in personal_params:
                t.requires_grad_(True)
            epochs = ctx.trainer.cfg.epochs + self.personal_epochs
            trainer = ctx.trainer if ctx.trainer.cfg.steps or not self.personal_epochs else _epochs_trainer(ctx.trainer, epochs)
            stats = trainer.train(model, ctx.data, ctx.round, ctx.seed, params=shared_params + personal_params)
        else:
            if self.personal_epochs:  # eq. (12) / (38): the personal pair, the shared part frozen
                for t in personal_params:
                    t.requires_grad_(True)
                for t in shared_params:
                    t.requires_grad_(False)
                # Its own batch order: the id offset only changes the seed the context derives.
                per_seed = dataclasses.replace(ctx, client_id=ctx.client_id + (1 << 40)).seed
                _epochs_trainer(ctx.trainer, self.personal_epochs).train(model, ctx.data, ctx.round, per_seed, params=personal_params)
                for t in shared_params:
                    t.requires_grad_(True)
            for t in personal_params:  # eq. (13) / (39): the shared part, the personal pair frozen
                t.requires_grad_(False)
            stats = ctx.trainer.train(model, ctx.data, ctx.round, ctx.seed, params=shared_params)
        for t in personal_params:
            t.requires_grad_(False)
        self._save_personal(ctx)
        with torch.no_grad():
            delta = {n: v.detach() - start[n].to(v.device) for n, v in self.shared.items()}
        return client_uplink(ctx, stats, self.codec.encode(delta, ctx.state, ctx.seed))

    @torch.no_grad()
    def evaluate_personal(self, payload: Payload, ctx: ClientContext) -> tuple[int, int]:
        """(correct, count) of this client's personalised model on its held-out split (per
        token for token-level outputs; (0, 0) without a split or where accuracy means nothing)."""
        data = ctx.data
        if data.num_val == 0:
            return 0, 0
        self._load(ctx.replica if ctx.replica is not None else payload)
        self._load_personal(ctx)
        was = self.model.training
        self.model.eval()
        correct = count = 0
        try:
            for x, y in data.batches(1024, split="val"):
                counts = ctx.trainer.task.correct_counts(self.model, x, y)
                if counts is None:
                    return 0, 0
                correct += int(counts[0])
                count += int(counts[1])
        finally:
            self.model.train(was)
        return correct, count


def _personal_pairs(wrapped: nn.Module, *, own_pair: bool) -> dict[str, torch.Tensor]:
    """The personal parameters by state-dict name: each wrapper's p_down/p_up, or (pFedLoRA)
    the wrapper's own down/up pair."""
    out = {}
    for name, layer in lora_layers(wrapped).items():
        down, up = (layer.down, layer.up) if own_pair else (layer.p_down, layer.p_up)
        prefix = f"{name}.{'' if own_pair else 'p_'}"
        out[f"{prefix}down.weight"] = down.weight
        out[f"{prefix}up.weight"] = up.weight
    return out


@register
@dataclass
class PFedLoRU(FedLoRU):
    """pFedLoRU (FedLoRU paper, Algorithm 2): FedLoRU's global factors, plus a personal pair per
    factorised layer that stays on each client (never in a payload).

    Args:
        personal_rank: rank of each client's personal pair L, U.
        personal_alpha: the personal scale is personal_alpha / personal_rank (0: = personal_rank).
        personal_epochs: epochs on L, U (A, B frozen) before the round's epochs on A, B.
        rank, alpha, patterns, exclude, train_bias, scale, factor_dropout, base_init, tau,
            merge_rounds, reinit, eval_before_merge, compressor: as :class:`FedLoRU` (``scale``
            applies to the personal pair too; its dropout does not).
    """

    name = "pfedloru"
    default_client_kind = "stateful"  # as FedLoRU: clients keep W and merge locally

    personal_rank: int = 8
    personal_alpha: float = 0.0
    personal_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.personal_rank < 1:
            raise ConfigError(f"algorithm.personal_rank = {self.personal_rank}: must be >= 1")
        if not 0 <= self.personal_alpha < math.inf:
            raise ConfigError(f"algorithm.personal_alpha = {self.personal_alpha}: must be >= 0 and finite (0 = personal_rank)")
        _check_personal(self)

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=False)
        warn_large_factors(wrapped)
        return LoraServer(wrapped, UplinkCodec(self), ctx.seed, **self._merge_options())

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        o = self
        wrapped = build_lora_model(model, o, ctx.seed, freeze_down=False)
        alpha = float(o.personal_alpha or o.personal_rank)
        try:
            if is_peft_model(wrapped):  # the personal pair is a second named PEFT adapter
                personal = add_personal_adapter(wrapped, o.personal_rank, alpha)
            else:
                for layer in lora_layers(wrapped).values():
                    layer.add_personal(o.personal_rank, alpha)
                personal = _personal_pairs(wrapped, own_pair=False)
        except (RuntimeError, MemoryError) as e:  # a rank so large the personal factors cannot be allocated
            raise ConfigError(
                f"algorithm.personal_rank = {o.personal_rank}: the personal factors cannot be built ({type(e).__name__}: {e})"
            ) from None
        return PersonalClient(wrapped, personal, UplinkCodec(o), ctx.seed, o.personal_epochs, "alternate", o.reinit)


@register
@dataclass
class PFedLoRA(LoraOptions, Algorithm):
    """pFedLoRA(1)/(2) (FedLoRU paper, Algorithm 4): the full model is shared and averaged; each
    client keeps a personal low-rank pair on the selected layers.

    Args:
        rank, alpha, patterns, exclude, scale, factor_dropout: the personal pair's (as
            :class:`FedLoRA`'s factors; there is no ``base_init``: W itself is shared and trains).
        variant: 1: personal epochs, then the round's epochs on the shared model; 2: both
            together for personal_epochs + the round's epochs (the paper's modified version).
        personal_epochs: E_per.
    """

    name = "pfedlora"

    variant: int = 2
    personal_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in (1, 2):
            raise ConfigError(f"algorithm.variant = {self.variant!r}: must be 1 or 2")
        _check_personal(self)

    def _wrapped(self, model: nn.Module, ctx: RunContext) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        if is_peft_model(model):
            raise ConfigError(
                "algorithm.name = 'pfedlora': pFedLoRA shares and trains the full model W, which a PEFT model freezes; "
                "use pfedloru (shared and personal PEFT adapters) or pass the plain model"
            )
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=False)
        personal = _personal_pairs(wrapped, own_pair=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for name, layer in lora_layers(wrapped).items():
            # W itself trains and is shared (unless the user froze it)
            layer.base_layer.weight.requires_grad_(f"{name}.weight" in trainable)
        return wrapped, personal

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        wrapped, personal = self._wrapped(model, ctx)
        for t in personal.values():
            t.requires_grad_(False)  # the server's pair stays at zero: never shared
        return LoraServer(wrapped, UplinkCodec(self), ctx.seed)

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        wrapped, personal = self._wrapped(model, ctx)
        mode = "joint" if self.variant == 2 else "alternate"
        return PersonalClient(wrapped, personal, UplinkCodec(self), ctx.seed, self.personal_epochs, mode)
