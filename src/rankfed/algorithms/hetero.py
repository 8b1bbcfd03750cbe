"""mFedLoRU (FedLoRU paper, Algorithm 3): clients of different ranks through nested factors.

FedLoRU's global factors of a layer are A (the ``up`` weight, m x r) and B (the
``down`` weight, r x n; a convolution's kernel flattened to n = in*kh*kw). A
client of a *tier* with nested ranks r_A, r_B does not train A and B: it trains

    A_d (m x r_A), A_u (r_A x r)   and   B_d (r x r_B), B_u (r_B x n),

starting each round with A_d, B_d Kaiming-uniform and A_u, B_u zero (so the
products are zero), on the model W + s (A + s_A A_d A_u)(B + s_B B_d B_u)
(eq. 15; s_A = nested_alpha / r_A, likewise s_B). It sends the four nested
factors (r_A (m + r) + r_B (r + n) numbers per layer instead of r (m + n)), and
the server recovers A^(k) = A + s_A A_d A_u, B^(k) = B + s_B B_d B_u (eq. 37)
before averaging them as FedLoRU does. A rank of 0 opts that factor out of
nesting: the client trains it directly, as in FedLoRU. Everything else
(unfactorised layers, biases, merges every ``tau`` rounds) is FedLoRU's.

Tiers come from the experiment file: ``tiers = [{fraction = 0.5, rank_a = 8,
rank_b = 8}, {fraction = 0.5, rank_a = 0, rank_b = 0}]`` gives the first half of
the client ids nested rank 8, the second half plain FedLoRU. The summary
reports the uplink bytes per tier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from rankfed.algorithms.base import register
from rankfed.algorithms.compression import UplinkCodec
from rankfed.algorithms.lora import FedLoRU, LoraClient, LoraServer, build_lora_model, warn_large_factors
from rankfed.errors import ConfigError
from rankfed.local import call_model
from rankfed.lowrank import kaiming_down_zero_up, lora_layers
from rankfed.protocol import ClientContext, ClientHalf, RunContext, ServerHalf, client_uplink
from rankfed.wire import Payload

__all__ = ["MFedLoRU", "tier_of_clients", "check_tiers"]

_NESTED = (":d", ":u")  # payload suffixes of the nested factors of a factor


def check_tiers(tiers: object, keys: tuple[str, ...]) -> list[dict]:
    """Client tiers ``[{fraction, <keys>...}, ...]``: fractions in (0, 1] summing to 1, the
    other keys ints >= 0 (each error names ``algorithm.tiers[i]``)."""
    if not isinstance(tiers, list) or not tiers:
        raise ConfigError(f"algorithm.tiers = {tiers!r}: must be a non-empty list of tables")
    out = []
    for i, t in enumerate(tiers):
        if not isinstance(t, dict) or set(t) - {"fraction", *keys} or "fraction" not in t:
            raise ConfigError(f"algorithm.tiers[{i}] = {t!r}: must be a table with fraction and {', '.join(keys)}")
        frac = t["fraction"]
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1:
            raise ConfigError(f"algorithm.tiers[{i}].fraction = {frac!r}: must be in (0, 1]")
        tier = {"fraction": float(frac)}
        for k in keys:
            v = t.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"algorithm.tiers[{i}].{k} = {v!r}: must be an int >= 0")
            tier[k] = v
        out.append(tier)
    total = sum(t["fraction"] for t in out)
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise ConfigError(f"algorithm.tiers: fractions sum to {total:g}, must sum to 1")
    return out


def tier_of_clients(tiers: Sequence[dict], num_clients: int) -> list[int]:
    """The tier index of every client id: tiers take consecutive id ranges by their fractions."""
    bounds = np.round(np.cumsum([t["fraction"] for t in tiers]) * num_clients).astype(int)
    return [int(np.searchsorted(bounds, cid, side="right")) for cid in range(num_clients)]


def tier_label(tier: dict) -> str:
    if not tier["rank_a"] and not tier["rank_b"]:
        return "rank_a=0, rank_b=0 (FedLoRU)"
    return f"rank_a={tier['rank_a']}, rank_b={tier['rank_b']}"


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """A factor weight as the paper's matrix: up (m, r[,1,1]) -> (m, r); down (r, in[,kh,kw]) -> (r, n)."""
    return w.reshape(w.shape[0], -1)


def _nested_shapes(w: torch.Tensor, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (d, u) with d @ u shaped like the factor's matrix."""
    rows, cols = _matrix(w).shape
    return (rows, rank), (rank, cols)


def _scale(alpha: float, rank: int) -> float:
    return (alpha or rank) / rank


class MFedLoruServer(LoraServer):
    """FedLoRU's server; each reply's nested factors are recovered into A^(k), B^(k) first."""

    def __init__(self, wrapped: nn.Module, options: MFedLoRU, num_clients: int, run_seed: int):
        super().__init__(wrapped, UplinkCodec(options), run_seed, **options._merge_options())
        self.options = options
        self.tier_of = tier_of_clients(options.tiers, num_clients)

    def recover(self, cid: int, payload: Payload) -> Payload:
        """The reply as FedLoRU's (deltas of every shared tensor): for a nested factor,
        A^(k) - A = s_A A_d A_u (eq. 37), reshaped like A."""
        tier = self.options.tiers[self.tier_of[cid]]
        out = {k: v for k, v in payload.items() if not k.endswith(_NESTED)}
        for name, value in self.shared.items():
            if name in out:
                continue
            rank = tier["rank_a"] if name.endswith("up.weight") else tier["rank_b"]
            d, u = payload[name + ":d"], payload[name + ":u"]
            out[name] = (_scale(self.options.nested_alpha, rank) * (d @ u)).reshape(value.shape)
        return out

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        return super().fold(rnd, cid, self.recover(cid, payload))


class MFedLoruClient(LoraClient):
    def __init__(self, wrapped: nn.Module, options: MFedLoRU, num_clients: int, run_seed: int):
        super().__init__(wrapped, UplinkCodec(options), options.reinit)
        self.options, self.run_seed = options, run_seed
        self.tier_of = tier_of_clients(options.tiers, num_clients)
        # the factor weights (A = up, B = down) of every wrapper, by state-dict name
        self.factors = {}
        for lname, layer in lora_layers(wrapped).items():
            self.factors[f"{lname}.up.weight"] = layer.up.weight
            self.factors[f"{lname}.down.weight"] = layer.down.weight

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        tier = self.options.tiers[self.tier_of[ctx.client_id]]
        start = ctx.replica if ctx.replica is not None else payload
        self._load(start)
        model = self.model
        gen = torch.Generator().manual_seed(ctx.seed)
        nested: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # factor name -> (d, u, scale)
        for name, w in self.factors.items():
            rank = tier["rank_a"] if name.endswith("up.weight") else tier["rank_b"]
            if not rank:
                continue  # opted out: this factor trains directly, as in FedLoRU
            (dr, dc), (ur, uc) = _nested_shapes(w, rank)
            d, u = torch.empty(dr, dc, device=w.device), torch.empty(ur, uc, device=w.device)
            kaiming_down_zero_up(d, u, gen)  # d Kaiming-uniform, u zero: d @ u = 0
            d.requires_grad_(True)
            u.requires_grad_(True)
            nested[name] = (d, u, _scale(self.options.nested_alpha, rank))
        direct = [t for n, t in self.shared.items() if isinstance(t, nn.Parameter) and n not in nested]
        for name in nested:
            self.factors[name].requires_grad_(False)
        params = direct + [t for d, u, _ in nested.values() for t in (d, u)]

        task = ctx.trainer.task

        def loss_fn(x, y: torch.Tensor) -> torch.Tensor:
            # eq. (15): each nested factor enters as A + s_A A_d A_u, shaped like A
            over = {n: self.factors[n] + (s * (d @ u)).reshape(self.factors[n].shape) for n, (d, u, s) in nested.items()}
            return task.compute_loss(call_model(lambda *a, **k: functional_call(model, over, a, k), x), y)

        model.train()
        try:
            stats = ctx.trainer.run(params, loss_fn, ctx.data, rnd=ctx.round, seed=ctx.seed)
        finally:
            for name in nested:
                self.factors[name].requires_grad_(True)
        with torch.no_grad():
            out = {n: v.detach() - start[n].to(v.device) for n, v in self.shared.items() if n not in nested}
            for n, (d, u, _) in nested.items():
                out[n + ":d"], out[n + ":u"] = d.detach(), u.detach()
        return client_uplink(ctx, stats, out)


@register
@dataclass
class MFedLoRU(FedLoRU):
    """mFedLoRU (FedLoRU paper, Algorithm 3): FedLoRU where each client tier trains nested factors
    of its own ranks (clients of different capabilities).

    Args:
        tiers: ``[{fraction, rank_a, rank_b}, ...]``: consecutive client-id ranges by fraction;
            a tier with nested ranks r_A, r_B trains A + s_A A_d A_u and B + s_B B_d B_u; rank 0
            trains that factor directly (FedLoRU).
        nested_alpha: nested scale s_A = nested_alpha / r_A (likewise B); 0: scale 1.
        rank, alpha, patterns, exclude, train_bias, scale, factor_dropout, base_init, tau,
            merge_rounds, reinit, eval_before_merge: as :class:`FedLoRU` (no compressor; the
            nested scale stays nested_alpha / r_A whatever ``scale`` says).
    """

    name = "mfedloru"
    default_client_kind = "stateful"  # as FedLoRU

    tiers: list = field(default_factory=lambda: [{"fraction": 1.0, "rank_a": 0, "rank_b": 0}])
    nested_alpha: float = 0.0

    def local_noise_unsupported(self) -> str | None:
        return "its uplink carries nested factors that the server expands, not the update it averages"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tiers = check_tiers(self.tiers, ("rank_a", "rank_b"))
        if not 0 <= self.nested_alpha < math.inf:
            raise ConfigError(f"algorithm.nested_alpha = {self.nested_alpha}: must be >= 0 and finite (0 = the nested rank)")
        if self.compressor:
            raise ConfigError(f"algorithm.compressor = {self.compressor!r}: mfedloru sends nested factors, not compressed updates")

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=False)
        warn_large_factors(wrapped)
        return MFedLoruServer(wrapped, self, ctx.num_clients, ctx.seed)

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        wrapped = build_lora_model(model, self, ctx.seed, freeze_down=False)
        return MFedLoruClient(wrapped, self, ctx.num_clients, ctx.seed)

    def client_tiers(self, num_clients: int) -> list[str]:
        """Each client's tier label (the summary's bytes per tier)."""
        labels = [tier_label(t) for t in self.tiers]
        return [labels[i] for i in tier_of_clients(self.tiers, num_clients)]
