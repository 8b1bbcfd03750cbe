"""FedHM (Yao et al. 2021): the server factorises, clients train the factors, the server recovers.

Each round the server factorises every selected layer's weight of the averaged model by
truncated SVD, keeping the top-r singular triplets, r = max(1, out // rank_factor) (or one
fixed ``rank`` for every layer, as the FedLoRU paper's Table 1 compares them at equal rank),
capped at the factorised matrix's rank. ``factorization`` says which matrix and which layers:

* ``"svd"`` (the default): a convolution's kernel W (out, in, kh, kw) as the matrix
  (out, in*kh*kw), and the factors run as FedLoRU's conv pair, a kh x kw conv to r
  channels then a 1x1 conv (the layout of the FedHM code's ``square = True`` option, which
  its ``split_conv`` does not use)::

      W ~ U_r S_r V_r^T = up @ down,  up = U_r S_r^(1/2) (out, r) -> a 1x1 conv (out, r, 1, 1)
                                      down = S_r^(1/2) V_r^T (r, in*kh*kw) -> a conv (r, in, kh, kw)

  with every layer that ``patterns`` / ``exclude`` select (default: every ``*conv*`` but the
  stem ``conv1``).
* ``"code"``: what the FedHM code does (its ``split_conv``, the default non-square layout, in
  the copy the FedLoRU authors run): the kernel as the matrix (out*kh, in*kw)
  (``W.permute(0, 2, 1, 3)``), its factors run as a 1 x kw conv to r channels (stride
  (1, s), padding (0, p)) then a kh x 1 conv (stride (s, 1), padding (p, 0)), whose
  composition is exactly the conv with the recovered kernel
  (:class:`rankfed.lowrank.LoRAConv2dSplit`)::

      W' ~ U_r S_r V_r^T,  up = U_r S_r^(1/2) (out*kh, r) -> a kh x 1 conv (out, r, kh, 1)
                           down = S_r^(1/2) V_r^T (r, in*kw) -> a 1 x kw conv (r, in, 1, kw)

  and, with ``exclude`` left at its default, ``exclude = ["conv1", "layer1.0.*",
  "*shortcut*"]``: the stem, the first residual block and every shortcut convolution stay
  full-rank, as the FedHM code keeps them for ResNet-18 (its first 8 state-dict entries and
  its ``downsample`` convolutions; the names are rankfed's ``resnet18``'s). A Linear layer
  selected by ``patterns`` is factorised as (out, in) in both modes.

The FedHM code's rank is round(out / rank_factor) where rankfed's is out // rank_factor (the
same for ResNet-18's widths and a power-of-two rank_factor).

Clients train that factorised model (the factors, and every other layer in
full) and send it back; the server multiplies each client's factors back to a
full kernel and averages the full weights (sample-weighted), then factorises
again next round. Downlink and uplink: the factors plus the unfactorised
tensors. Clients keep nothing between rounds (stateless only: the factors are
recomputed from the averaged model every round).

Heterogeneous FedHM (the mFedLoRU paper's baseline): ``tiers = [{fraction = 0.5,
rank = 8}, {fraction = 0.5, rank = 32}]`` gives consecutive client-id ranges
their own rank; each client receives the SVD factors at its tier's rank and the
server averages the recovered full kernels of all tiers alike.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rankfed.algorithms.aggregate import expect_entries
from rankfed.algorithms.base import Algorithm, register
from rankfed.algorithms.hetero import check_tiers, tier_of_clients
from rankfed.errors import ConfigError
from rankfed.local import TrainStats
from rankfed.lowrank import LoRAConv2dSplit, apply_lora, lora_layers, max_rank, split_max_rank
from rankfed.protocol import ClientContext, ClientHalf, RoundSums, RunContext, ServerHalf, client_uplink, shared_state
from rankfed.wire import Payload

__all__ = ["FedHM", "svd_factors", "factor_ranks", "FACTORIZATIONS", "CODE_EXCLUDE"]

FACTORIZATIONS = ("svd", "code")
_DEFAULT_EXCLUDE = ["conv1"]
# factorization = "code" with exclude left at its default: what the FedHM code keeps full-rank in
# its ResNet-18 (the stem, the first residual block, the shortcut convolutions), by rankfed's names
CODE_EXCLUDE = ["conv1", "layer1.0.*", "*shortcut*"]


@dataclass
class _FedHmOptions:
    rank_factor: int = 4  # rank of each factorised layer = max(1, out_channels // rank_factor)
    rank: int = 0  # > 0: this rank for every factorised layer instead (capped at the layer's full rank)
    tiers: list = field(default_factory=list)  # [{fraction, rank}, ...]: per-client ranks (heterogeneous FedHM)
    patterns: list = field(default_factory=lambda: ["*conv*"])  # module-name globs, as in fedloru
    exclude: list = field(default_factory=lambda: list(_DEFAULT_EXCLUDE))  # the stem stays full-rank, as in the FedHM code
    # "svd": kernel as (out, in*kh*kw), a kh x kw conv then 1x1; "code": the FedHM code's
    # (out*kh, in*kw), a 1 x kw conv then kh x 1, and (default exclude) CODE_EXCLUDE full-rank
    factorization: str = "svd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factorization not in FACTORIZATIONS:
            raise ConfigError(f"algorithm.factorization = {self.factorization!r}: must be one of {', '.join(FACTORIZATIONS)}")
        if self.factorization == "code" and self.exclude == _DEFAULT_EXCLUDE:
            self.exclude = list(CODE_EXCLUDE)
        if self.rank_factor < 1:
            raise ConfigError(f"algorithm.rank_factor = {self.rank_factor}: must be >= 1")
        if self.rank < 0:
            raise ConfigError(f"algorithm.rank = {self.rank}: must be >= 0 (0 = out_channels // rank_factor)")
        if self.tiers:
            self.tiers = check_tiers(self.tiers, ("rank",))
            for i, t in enumerate(self.tiers):
                if t["rank"] < 1:
                    raise ConfigError(f"algorithm.tiers[{i}].rank = {t['rank']}: must be >= 1")
        if not self.patterns or not all(isinstance(p, str) for p in self.patterns):
            raise ConfigError(f"algorithm.patterns = {self.patterns!r}: must be a non-empty list of strings")


def _code_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The FedHM code's matrix of a conv kernel: (out, in, kh, kw) -> (out*kh, in*kw)."""
    out, cin, kh, kw = weight.shape
    return weight.permute(0, 2, 1, 3).reshape(out * kh, cin * kw)


@torch.no_grad()
def svd_factors(weight: torch.Tensor, rank: int, factorization: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-``rank`` approximation of ``weight``'s matrix,
    shaped as the weights of the layer pair: ``"svd"``, the matrix (out, -1), a conv's down
    (r, in, kh, kw) and up (out, r, 1, 1); ``"code"`` (a conv only), the matrix
    (out*kh, in*kw), down (r, in, 1, kw) and up (out, r, kh, 1)."""
    code = factorization == "code" and weight.dim() == 4
    matrix = _code_matrix(weight) if code else weight.reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(weight.dtype)  # (rows, r)
    down = (root[:, None] * vh[:rank]).to(weight.dtype)  # (r, cols)
    if code:
        out, cin, kh, kw = weight.shape
        # up[o*kh + h, r] -> (out, r, kh, 1); down[r, i*kw + w] -> (r, in, 1, kw)
        return down.reshape(rank, cin, 1, kw), up.reshape(out, kh, rank).permute(0, 2, 1)[..., None].contiguous()
    if weight.dim() == 4:
        return down.reshape(rank, *weight.shape[1:]), up[:, :, None, None]
    return down, up


def _full_rank(module: nn.Module, factorization: str) -> int:
    if factorization == "code" and isinstance(module, nn.Conv2d):
        return split_max_rank(module)
    return max_rank(module)


def factor_ranks(model: nn.Module, opts: FedHM, rank: int | None = None) -> dict[str, int]:
    """The rank of every layer FedHM factorises (``rank``, or out // rank_factor; at most the
    rank of its matrix, which ``factorization`` chooses). Layers whose weight the user froze are
    not factorised (they neither train nor travel)."""
    ranks = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or not module.weight.requires_grad:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in opts.patterns) and not any(fnmatch.fnmatchcase(name, p) for p in opts.exclude):
            out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            wanted = rank or opts.rank or out // opts.rank_factor
            ranks[name] = max(1, min(wanted, _full_rank(module, opts.factorization)))
    if not ranks:
        raise ConfigError(f"algorithm.patterns = {opts.patterns}: no Conv2d/Linear layer of the model matches")
    return ranks


def _factorised_model(model: nn.Module, ranks: dict[str, int], factorization: str = "svd") -> nn.Module:
    """A copy whose selected layers compute only up(down(x)) + bias: base-free factors (the base
    weight is zero and never multiplied); ``"code"``: a conv's pair is :class:`LoRAConv2dSplit`."""
    wrapped = copy.deepcopy(model)
    for name, rank in ranks.items():
        module = wrapped.get_submodule(name)
        if factorization == "code" and isinstance(module, nn.Conv2d):
            parent, _, child = name.rpartition(".")
            setattr(wrapped.get_submodule(parent), child, LoRAConv2dSplit(module, rank, float(rank)))  # scale 1
        else:
            apply_lora(wrapped, rank, float(rank), patterns=[name])  # scale alpha / rank = 1
    for layer in lora_layers(wrapped).values():
        layer.make_base_free()
    return wrapped


class FedHmServer(ServerHalf):
    def __init__(self, model: nn.Module, ranks: dict[str, int], tier_ranks: Sequence[dict[str, int]] = (), tier_of: Sequence[int] = (), factorization: str = "svd"):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.factorization = factorization
        self.ranks = ranks  # which layers are factorised (and, without tiers, at what rank)
        self.tier_ranks, self.tier_of = list(tier_ranks), list(tier_of)
        # What travels besides the factors: every trainable or buffer entry that is not a factorised kernel.
        self.others = [k for k in shared_state(model) if k[: -len(".weight")] not in ranks]

    def _payload(self, rnd: int, ranks: dict[str, int]) -> Payload:
        payload: Payload = {"@round": rnd}
        for name, rank in ranks.items():
            down, up = svd_factors(self.state[f"{name}.weight"], rank, self.factorization)
            payload[f"{name}.down.weight"], payload[f"{name}.up.weight"] = down, up
        for key in self.others:
            payload[_wrapped_name(key, self.ranks)] = self.state[key]
        return payload

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        if not self.tier_ranks:
            payload = self._payload(rnd, self.ranks)
            return {cid: payload for cid in client_ids}
        by_tier: dict[int, Payload] = {}  # one payload object per tier: serialised once
        for cid in client_ids:
            tier = self.tier_of[cid]
            if tier not in by_tier:
                by_tier[tier] = self._payload(rnd, self.tier_ranks[tier])
        return {cid: by_tier[self.tier_of[cid]] for cid in client_ids}

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        """Each factorised layer's full kernel up @ down (the client's rank, any tier) and the
        other trained tensors, by the plain model's names."""
        out = {}
        with torch.no_grad():
            for name in self.ranks:
                kernel = self.state[f"{name}.weight"]
                out[f"{name}.weight"] = _recover(payload[f"{name}.up.weight"], payload[f"{name}.down.weight"], kernel.shape, self.factorization)
        others = expect_entries(payload, {_wrapped_name(k, self.ranks): self.state[k] for k in self.others})
        out.update({k: others[_wrapped_name(k, self.ranks)] for k in self.others})
        return out

    def fold_reference(self) -> dict[str, torch.Tensor]:
        """FedHM averages models (the recovered kernels and the other trained tensors): an
        upload's size is measured from the global ones."""
        return {**{f"{name}.weight": self.state[f"{name}.weight"] for name in self.ranks}, **{k: self.state[k] for k in self.others}}

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        if not sums.count:
            return {"clients": 0}
        with torch.no_grad():
            for key in sums.sums:  # the averaged models (kernels and the rest) replace the global ones
                self.state[key].copy_(sums.mean(key, like=self.state[key]))
        return {"clients": sums.count, "train_loss": sums.train_loss}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.state


def _wrapped_name(plain: str, ranks: dict[str, int]) -> str:
    layer, _, leaf = plain.rpartition(".")
    return f"{layer}.base_layer.{leaf}" if layer in ranks else plain


def _recover(up: torch.Tensor, down: torch.Tensor, shape: torch.Size, factorization: str = "svd") -> torch.Tensor:
    """up @ down back to the kernel's shape: ``"svd"``, (out, r[,1,1]) x (r, in[,kh,kw]) ->
    (out, in[,kh,kw]); ``"code"`` (a conv), (out, r, kh, 1) x (r, in, 1, kw) -> (out, in, kh, kw)."""
    if factorization == "code" and len(shape) == 4:
        if up.dim() != 4 or down.dim() != 4:
            raise ValueError(f"factors of shapes {tuple(up.shape)}, {tuple(down.shape)} are not a split conv pair")
        return torch.einsum("orh,riw->oihw", up[..., 0], down[:, :, 0, :]).reshape(shape)
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


class FedHmClient(ClientHalf):
    def __init__(self, wrapped: nn.Module):
        self.model = wrapped
        self.trained = shared_state(wrapped)

    def begin(self, payload: Payload, ctx: ClientContext) -> nn.Module:
        """The factorised model (factors and unfactorised layers trainable) loaded from the downlink."""
        with torch.no_grad():
            for name, value in self.trained.items():
                value.copy_(payload[name])
        return self.model

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        return client_uplink(ctx, stats, {n: v.detach().clone() for n, v in self.trained.items()})


class TieredFedHmClient(ClientHalf):
    """One factorised model per tier; each client trains its tier's."""

    def __init__(self, model: nn.Module, tier_ranks: Sequence[dict[str, int]], tier_of: Sequence[int], factorization: str = "svd"):
        self.model, self.tier_ranks, self.tier_of = model, list(tier_ranks), list(tier_of)
        self.factorization = factorization
        self.halves: dict[int, FedHmClient] = {}

    def _half(self, ctx: ClientContext) -> FedHmClient:
        tier = self.tier_of[ctx.client_id]
        if tier not in self.halves:
            self.halves[tier] = FedHmClient(_factorised_model(self.model, self.tier_ranks[tier], self.factorization))
        return self.halves[tier]

    def begin(self, payload: Payload, ctx: ClientContext) -> nn.Module:
        return self._half(ctx).begin(payload, ctx)

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        return self._half(ctx).end(module, ctx, stats)


@register
@dataclass
class FedHM(_FedHmOptions, Algorithm):
    """FedHM (Yao et al. 2021): the server factorises each selected layer by truncated SVD every
    round, clients train the factors, the server multiplies them back and averages.

    Args:
        rank_factor: rank = max(1, out_channels // rank_factor) per layer.
        rank: > 0: this one rank for every factorised layer instead (capped at its full rank).
        tiers: ``[{fraction, rank}, ...]``: heterogeneous FedHM, consecutive client-id ranges
            with their own rank.
        patterns, exclude: module-name globs of the layers to factorise (the stem ``conv1``
            stays full-rank by default).
        factorization: ``"svd"`` (a kernel as (out, in*kh*kw): a kh x kw conv to r channels,
            then 1x1) or ``"code"`` (the FedHM code: (out*kh, in*kw), a 1 x kw conv then a
            kh x 1 conv; with the default exclude, the stem, ``layer1.0`` and the shortcuts
            stay full-rank). See the module docstring.
    """

    name = "fedhm"

    def _tiers(self, model: nn.Module, num_clients: int) -> tuple[list[dict[str, int]], list[int]]:
        return [factor_ranks(model, self, t["rank"]) for t in self.tiers], tier_of_clients(self.tiers, num_clients)

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        tier_ranks, tier_of = self._tiers(model, ctx.num_clients) if self.tiers else ([], [])
        return FedHmServer(model, factor_ranks(model, self), tier_ranks, tier_of, self.factorization)

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        if self.tiers:
            return TieredFedHmClient(copy.deepcopy(model), *self._tiers(model, ctx.num_clients), self.factorization)
        return FedHmClient(_factorised_model(model, factor_ranks(model, self), self.factorization))

    def client_tiers(self, num_clients: int) -> list[str] | None:
        """Each client's tier label (the summary's bytes per tier); None without ``tiers``."""
        if not self.tiers:
            return None
        labels = [f"rank={t['rank']}" for t in self.tiers]
        return [labels[i] for i in tier_of_clients(self.tiers, num_clients)]
