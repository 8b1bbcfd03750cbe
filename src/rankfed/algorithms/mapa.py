"""MAPA: Model-Agnostic Projection Adaptation (the MAPA paper, Section 3, Algorithm 1).

The whole model update, all d trainable parameters (those with ``requires_grad``; frozen
ones are neither trained nor projected) flattened in ``named_parameters()`` order, is one
vector reshaped to a ceil(d/k) x k matrix and factorised as A B with

    A  (m,)  m = ceil(d/k)  the reconstruction vector, N(0, sigma^2), rebuilt from
                            the round's seed on the server and every client, never sent
    B  (k,)                 the projection vector: starts at zero, trained by the
                            client optimiser for the local epochs; the only thing uplinked

so the model a client trains is W + vec(A B)[:d], and the server applies
W += vec(A B_bar)[:d] with B_bar the sample-weighted mean of the clients' B.
With ``fresh_a = false`` A is drawn once and frozen (the FA-LoRA-style
baseline the paper contrasts with).

How B is trained without materialising anything bigger than d: the model's
own parameters hold W + vec(A B) at all times; a step runs the ordinary
forward and backward (full gradient g, written into one flat buffer), and by
the chain rule dL/dB = A^T G with G = g reshaped (m, k) (zero-padded past d).
The optimiser steps B, and the parameters move by vec(A (B_new - B_old)).
Extra memory is O(d): the flat gradient buffer and one expansion.

Around your own training loop, :meth:`MapaClient.begin` returns the same model as a
reparametrising module (:class:`MapaModule`: W + vec(A B)[:d] through
``torch.func.functional_call``, B its only trainable parameter) and :meth:`MapaClient.end`
reads the uplink off it.

Bytes: uplink = k floats + a small header (plus float buffers such as
BatchNorm statistics, sent in full, when the model has them). Downlink for
stateful clients (the paper's assumption, the default): every client receives
the seed and the last B_bar each round. Stateless clients download the model's
trainable tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from rankfed.algorithms.aggregate import add_means_, add_present_, expect_entries
from rankfed.algorithms.base import Algorithm, register
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec
from rankfed.errors import ConfigError
from rankfed.local import TrainStats
from rankfed.protocol import ClientContext, ClientHalf, RoundSums, RunContext, ServerHalf, client_uplink, derive_seed, shared_state
from rankfed.wire import Payload

__all__ = ["MAPA", "MapaModule", "FlatLayout", "reconstruction_vector", "expand", "round_seed"]


class FlatLayout:
    """Where each trainable parameter sits in the flat d-vector (``named_parameters()`` order)."""

    def __init__(self, model: nn.Module):
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.numels = [p.numel() for _, p in trainable]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.d = self.offsets[-1]

    def views(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Slices of ``flat`` (at least d long) shaped like ``tensors``."""
        return [flat[o : o + n].view_as(t) for o, n, t in zip(self.offsets, self.numels, tensors)]

    def add_(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        """tensors += flat[:d], piece by piece."""
        torch._foreach_add_(list(tensors), self.views(flat, tensors))


def round_seed(run_seed: int, rnd: int, fresh_a: bool) -> int:
    """The seed of round ``rnd``'s reconstruction vector (round 0's when A is frozen)."""
    return derive_seed(run_seed, rnd if fresh_a else 0, 0x4D415041)  # "MAPA"


def reconstruction_vector(m: int, seed: int, sigma: float, dist: str = "gaussian", device: torch.device | str = "cpu") -> torch.Tensor:
    """A (m,): N(0, sigma^2) from ``seed`` (drawn on the CPU so every party gets the same bits)."""
    if dist == "ones":
        return torch.ones(m, device=device)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, generator=g) * sigma).to(device)


def expand(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    """vec(A B)[:d]: row i of the (m, k) product is a_i * b, flattened row-major. O(d) memory."""
    return torch.outer(a, b).reshape(-1)[:d]


class _Geometry:
    """d, k, m = ceil(d/k) and sigma for a model, with the option checks that need d."""

    def __init__(self, model: nn.Module, opts: MAPA):
        self.layout = FlatLayout(model)
        d = self.layout.d
        if d == 0:
            raise ConfigError("mapa: the model has no trainable parameters (every parameter has requires_grad = False)")
        if not 1 <= opts.k <= d:
            raise ConfigError(f"algorithm.k = {opts.k}: must be between 1 and d = {d} (the model's trainable parameter count)")
        self.d, self.k = d, opts.k
        self.m = math.ceil(d / opts.k)
        self.sigma = opts.sigma or 1.0 / math.sqrt(self.m)
        self.opts = opts

    def a(self, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return reconstruction_vector(self.m, seed, self.sigma, self.opts.a_dist, device)


def _float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if b.is_floating_point()}


class MapaModule(nn.Module):
    """A model reparametrised as MAPA trains it: ``W + vec(A B)[:d]``, computed through
    ``torch.func.functional_call`` of the wrapped model, with ``B`` (k,) its only trainable
    parameter. The wrapped model is not a submodule (its parameters stay out of
    :meth:`parameters`); its buffers (BatchNorm statistics) update as it runs."""

    def __init__(self, base: nn.Module, layout: FlatLayout, a: torch.Tensor, k: int):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.layout = layout
        self.w = {n: p.detach().clone() for n, p in base.named_parameters() if n in set(layout.names)}  # W, fixed for the round
        self.register_buffer("a", a, persistent=False)  # (m,)
        self.B = nn.Parameter(torch.zeros(k, device=a.device))  # (k,)

    def parameters_now(self) -> dict[str, torch.Tensor]:
        """W + vec(A B)[:d], by parameter name (differentiable in B)."""
        flat = expand(self.a, self.B, self.layout.d)
        return {n: self.w[n] + flat[o : o + k].view(self.w[n].shape) for n, o, k in zip(self.layout.names, self.layout.offsets, self.layout.numels)}

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.parameters_now(), args, kwargs)

    def train(self, mode: bool = True) -> MapaModule:
        super().train(mode)
        self.base.train(mode)
        return self


class MapaServer(ServerHalf):
    def __init__(self, model: nn.Module, geo: _Geometry, run_seed: int, codec: UplinkCodec):
        self.geo, self.run_seed, self.codec = geo, run_seed, codec
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.params = [self.state[n] for n in geo.layout.names]  # views into self.state
        self.shared = list(shared_state(model))  # the trainable parameters and float buffers: a stateless downlink
        self.buffer_names = list(_float_buffers(model))
        self.last: Payload = {}  # the last round's (seed, B_bar, buffer means) for stateful clients
        self._b_shape = torch.empty(geo.k, device="meta")  # the shape an upload's B must have

    def _seed(self, rnd: int) -> int:
        return round_seed(self.run_seed, rnd, self.geo.opts.fresh_a)

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd, "@seed": self._seed(rnd), **{k: self.state[k] for k in self.shared}}
        return {cid: payload for cid in client_ids}

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, "@seed": self._seed(rnd), **self.last}

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        """B (k,) and the buffers' updates."""
        return expect_entries(self.codec.decode(payload), {"B": self._b_shape, **{n: self.state[n] for n in self.buffer_names}})

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        if not sums.count:
            self.last = {}
            return {"clients": 0}
        seed = self._seed(rnd)
        b_bar = sums.mean("B", like=self.params[0])
        a = self.geo.a(seed, b_bar.device)
        with torch.no_grad():
            self.geo.layout.add_(self.params, expand(a, b_bar, self.geo.d))  # W += vec(A B_bar)[:d]
        buffer_means = add_means_(self.state, sums, self.buffer_names)
        self.last = {"@prev_seed": seed, "B_prev": b_bar, **buffer_means}
        return {"clients": sums.count, "train_loss": sums.train_loss}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def replica_state(self) -> Payload:
        return {k: self.state[k] for k in self.shared}


class MapaClient(ClientHalf):
    def __init__(self, model: nn.Module, geo: _Geometry, codec: UplinkCodec):
        self.geo, self.codec = geo, codec
        self.shared = list(shared_state(model))

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        """Apply the last round's update: W += vec(A_prev B_prev)[:d] (and buffer means)."""
        if "B_prev" not in payload:  # round 1: nothing aggregated yet
            return
        b = payload["B_prev"]
        a = self.geo.a(int(payload["@prev_seed"]), b.device)
        params = [replica[n] for n in self.geo.layout.names]
        with torch.no_grad():
            self.geo.layout.add_(params, expand(a, b, self.geo.d).to(params[0].device))
        add_present_({n: v for n, v in replica.items() if n not in self.geo.layout.names}, payload)  # buffer means

    def _load(self, payload: Payload, ctx: ClientContext) -> Payload:
        start = ctx.replica if ctx.replica is not None else payload
        state = ctx.model.state_dict()
        with torch.no_grad():
            for name in self.shared:
                state[name].copy_(start[name])
        return start

    def begin(self, payload: Payload, ctx: ClientContext) -> MapaModule:
        """The round's model as a :class:`MapaModule` (train its one parameter, B)."""
        start = self._load(payload, ctx)
        self._remember_start(ctx, start)
        device = next(ctx.model.parameters()).device
        return MapaModule(ctx.model, self.geo.layout, self.geo.a(int(payload["@seed"]), device), self.geo.k)

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        start = self._start_of(ctx)
        tensors = {"B": module.B.detach().clone()}
        with torch.no_grad():
            for name, buf in _float_buffers(module.base).items():
                tensors[name] = buf - start[name].to(buf.device)
        return client_uplink(ctx, stats, self.codec.encode(tensors, ctx.state, ctx.seed))

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        """As :meth:`begin`, the loop, :meth:`end`, without the reparametrised forward: the model's
        own parameters hold W + vec(A B) and the chain rule maps their gradient to B's."""
        geo, model = self.geo, ctx.model
        start = self._load(payload, ctx)
        named = dict(model.named_parameters())
        params = [named[n] for n in geo.layout.names]
        device = params[0].device
        a = geo.a(int(payload["@seed"]), device)  # (m,)
        b = nn.Parameter(torch.zeros(geo.k, device=device))  # (k,)
        b_applied = torch.zeros(geo.k, device=device)  # the B the parameters currently include
        # One flat gradient buffer, padded to m*k; the parameters' .grad are views into it,
        # so backward writes g straight into G without a copy.
        grad_flat = torch.zeros(geo.m * geo.k, device=device)
        for p, g in zip(params, geo.layout.views(grad_flat, params)):
            p.grad = g
        grad_matrix = grad_flat.view(geo.m, geo.k)  # G (m, k)

        def after_backward() -> None:
            b.grad = a @ grad_matrix  # dL/dB = A^T G, (k,)
            grad_flat.zero_()

        def after_step() -> None:
            with torch.no_grad():
                geo.layout.add_([p.data for p in params], expand(a, b - b_applied, geo.d))
                b_applied.copy_(b)

        stats = ctx.trainer.train(model, ctx.data, ctx.round, ctx.seed, params=[b], after_backward=after_backward, after_step=after_step)
        for p in params:
            p.grad = None
        tensors = {"B": b.detach().clone()}
        with torch.no_grad():
            for name, buf in _float_buffers(model).items():
                tensors[name] = buf - start[name].to(buf.device)
        return client_uplink(ctx, stats, self.codec.encode(tensors, ctx.state, ctx.seed))

    def _build(self, trained: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters one client trains through: W + vec(A B)[:d] (for the cohort trainer)."""
        layout = self.geo.layout
        flat = expand(shared["@a"], trained["B"], self.geo.d)
        return {n: shared[n] + flat[o : o + k].view(shared[n].shape) for n, o, k in zip(layout.names, layout.offsets, layout.numels)}

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        """Every client of the cohort trains its own B through the same W and A."""
        geo, model, trainer = self.geo, ctxs[0].model, ctxs[0].trainer
        starts = [ctx.replica if ctx.replica is not None else p for p, ctx in zip(payloads, ctxs)]
        if any(s is not starts[0] for s in starts) or any(p is not payloads[0] for p in payloads):
            return None
        start = starts[0]
        device = ctxs[0].data.device
        shared = {n: start[n].to(device) for n in geo.layout.names}
        shared["@a"] = geo.a(int(payloads[0]["@seed"]), device)
        cohort = self.cohort_trainer(model, trainer, build=self._build, compile=compile)
        buffers = list(_float_buffers(model))  # BatchNorm statistics, uploaded as deltas
        first = {"B": torch.zeros(geo.k, device=device), **{n: start[n] for n in buffers}}
        trained, stats = cohort.train([first] * len(ctxs), shared, [c.data for c in ctxs], [c.seed for c in ctxs], trainer, ctxs[0].round)
        out = []
        with torch.no_grad():
            for t, st, ctx in zip(trained, stats, ctxs):
                tensors = {"B": t["B"].clone(), **{n: t[n] - start[n].to(t[n].device) for n in buffers}}
                out.append(client_uplink(ctx, st, self.codec.encode(tensors, ctx.state, ctx.seed)))
        return out


@register
@dataclass
class MAPA(CompressionOptions, Algorithm):
    """MAPA: the whole trainable update as one (ceil(d/k), k) matrix A B; only B's k numbers travel.

    Args:
        k: length of the trained projection vector B (and of the uplink), 1 to d.
        sigma: std of A's entries; 0 = 1/sqrt(ceil(d/k)) (so E||A||^2 = 1).
        fresh_a: a new A from each round's seed (MAPA), or one A for the run (frozen).
        a_dist: ``"gaussian"``, or ``"ones"`` (A = 1, for checking the algebra).
        compressor, ...: an uplink compressor applied to B (see :class:`FedAvg`).
    """

    name = "mapa"
    default_client_kind = "stateful"  # the paper broadcasts a seed and B_bar to every client

    k: int = 64
    sigma: float = 0.0
    fresh_a: bool = True
    a_dist: str = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"algorithm.k = {self.k}: must be >= 1")
        if not 0 <= self.sigma < math.inf:
            raise ConfigError(f"algorithm.sigma = {self.sigma}: must be >= 0 and finite (0 = 1/sqrt(ceil(d/k)))")
        if self.a_dist not in ("gaussian", "ones"):
            raise ConfigError(f"algorithm.a_dist = {self.a_dist!r}: must be one of gaussian, ones")

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        return MapaServer(model, _Geometry(model, self), ctx.seed, UplinkCodec(self))

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        return MapaClient(model, _Geometry(model, self), UplinkCodec(self))
