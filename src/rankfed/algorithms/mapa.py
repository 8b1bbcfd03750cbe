"""MAPA: Model-Agnostic Projection Adaptation (the MAPA paper, Section 3, Algorithm 1).

The whole model update, all d parameters flattened in ``named_parameters()``
order, is one vector reshaped to a ceil(d/k) x k matrix and factorised as
A B with

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

Bytes: uplink = k floats + a small header (plus float buffers such as
BatchNorm statistics, sent in full, when the model has them). Downlink for
stateful clients (the paper's assumption, the default): every client receives
the seed and the last B_bar each round. Stateless clients download the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankfed.algorithms.base import Algorithm, ClientContext, ClientHalf, RunContext, ServerHalf, client_uplink, cohort_supported, register, train_cross_entropy
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec
from rankfed.algorithms.aggregate import add_present_, apply_mean_update, mean_train_loss, sample_weights, weighted_mean
from rankfed.config import ConfigError
from rankfed.wire import Payload

__all__ = ["Mapa", "MapaOptions", "FlatLayout", "reconstruction_vector", "expand", "round_seed"]


@dataclass
class MapaOptions(CompressionOptions):
    k: int = 64  # length of the trained projection vector B (and of the uplink)
    sigma: float = 0.0  # std of A's entries; 0 = 1/sqrt(ceil(d/k)), so E||A||^2 = 1
    fresh_a: bool = True  # a new A every round (MAPA) or one A for the whole run (frozen)
    a_dist: str = "gaussian"  # gaussian | ones (A = 1: for checking the algebra)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"algorithm.k = {self.k}: must be >= 1")
        if not 0 <= self.sigma < math.inf:
            raise ConfigError(f"algorithm.sigma = {self.sigma}: must be >= 0 and finite (0 = 1/sqrt(ceil(d/k)))")
        if self.a_dist not in ("gaussian", "ones"):
            raise ConfigError(f"algorithm.a_dist = {self.a_dist!r}: must be one of gaussian, ones")


class FlatLayout:
    """Where each parameter sits in the flat d-vector (``named_parameters()`` order)."""

    def __init__(self, model: nn.Module):
        self.names = [n for n, _ in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.offsets = [0, *np.cumsum(self.numels).tolist()]
        self.d = self.offsets[-1]

    def views(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Slices of ``flat`` (at least d long) shaped like ``tensors``."""
        return [flat[o : o + n].view_as(t) for o, n, t in zip(self.offsets, self.numels, tensors)]

    def add_(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        """tensors += flat[:d], piece by piece."""
        torch._foreach_add_(list(tensors), self.views(flat, tensors))


def round_seed(run_seed: int, rnd: int, fresh_a: bool) -> int:
    """The seed of round ``rnd``'s reconstruction vector (round 0's when A is frozen)."""
    ss = np.random.SeedSequence([run_seed, rnd if fresh_a else 0, 0x4D415041])  # "MAPA"
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


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

    def __init__(self, model: nn.Module, opts: MapaOptions):
        self.layout = FlatLayout(model)
        d = self.layout.d
        if not 1 <= opts.k <= d:
            raise ConfigError(f"algorithm.k = {opts.k}: must be between 1 and d = {d} (the model's parameter count)")
        self.d, self.k = d, opts.k
        self.m = math.ceil(d / opts.k)
        self.sigma = opts.sigma or 1.0 / math.sqrt(self.m)
        self.opts = opts

    def a(self, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return reconstruction_vector(self.m, seed, self.sigma, self.opts.a_dist, device)


def _float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if b.is_floating_point()}


class MapaServer(ServerHalf):
    def __init__(self, model: nn.Module, geo: _Geometry, run_seed: int, codec: UplinkCodec):
        self.geo, self.run_seed, self.codec = geo, run_seed, codec
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.params = [self.state[n] for n in geo.layout.names]  # views into self.state
        self.buffer_names = list(_float_buffers(model))
        self.last: Payload = {}  # the last round's (seed, B_bar, buffer means) for stateful clients

    def _seed(self, rnd: int) -> int:
        return round_seed(self.run_seed, rnd, self.geo.opts.fresh_a)

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd, "@seed": self._seed(rnd)}
        payload.update({k: v for k, v in self.state.items() if v.is_floating_point()})
        return {cid: payload for cid in client_ids}

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, "@seed": self._seed(rnd), **self.last}

    def aggregate(self, rnd: int, replies: Sequence[tuple[int, Payload]]) -> dict[str, float]:
        if not replies:
            self.last = {}
            return {"clients": 0}
        weights = sample_weights(replies)
        ups = [self.codec.decode(p) for _, p in replies]
        b_bar = weighted_mean([u["B"] for u in ups], weights)
        seed = self._seed(rnd)
        a = self.geo.a(seed, b_bar.device)
        with torch.no_grad():
            self.geo.layout.add_(self.params, expand(a, b_bar, self.geo.d))  # W += vec(A B_bar)[:d]
        buffer_means = apply_mean_update(self.state, ups, weights, self.buffer_names)
        self.last = {"@prev_seed": seed, "B_prev": b_bar, **buffer_means}
        return {"clients": len(replies), "train_loss": mean_train_loss(replies, weights)}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.state


class MapaClient(ClientHalf):
    def __init__(self, geo: _Geometry, codec: UplinkCodec):
        self.geo, self.codec = geo, codec

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

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        geo, model = self.geo, ctx.model
        start = ctx.replica if ctx.replica is not None else payload
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    value.copy_(start[name])
        params = [p for _, p in model.named_parameters()]
        device = params[0].device
        a = geo.a(int(payload["@seed"]), device)  # (m,)
        b = nn.Parameter(torch.zeros(geo.k, device=device))  # (k,)
        b_applied = torch.zeros(geo.k, device=device)  # the B the parameters currently include
        # One flat gradient buffer, padded to m*k; the parameters' .grad are views into it,
        # so backward writes g straight into G without a copy.
        grad_flat = torch.zeros(geo.m * geo.k, device=device)
        for p, g in zip(params, geo.layout.views(grad_flat, params)):
            p.requires_grad_(True)
            p.grad = g
        grad_matrix = grad_flat.view(geo.m, geo.k)  # G (m, k)

        def after_backward() -> None:
            b.grad = a @ grad_matrix  # dL/dB = A^T G, (k,)
            grad_flat.zero_()

        def after_step() -> None:
            with torch.no_grad():
                geo.layout.add_([p.data for p in params], expand(a, b - b_applied, geo.d))
                b_applied.copy_(b)

        stats = train_cross_entropy(model, ctx, [b], after_backward=after_backward, after_step=after_step)
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
        geo, model, cfg = self.geo, ctxs[0].model, ctxs[0].trainer.cfg
        starts = [ctx.replica if ctx.replica is not None else p for p, ctx in zip(payloads, ctxs)]
        if cohort_supported(model, cfg) is not None or any(s is not starts[0] for s in starts) or any(p is not payloads[0] for p in payloads):
            return None
        start = starts[0]
        device = ctxs[0].data.x.device
        shared = {n: start[n].to(device) for n in geo.layout.names}
        shared["@a"] = geo.a(int(payloads[0]["@seed"]), device)
        cohort = self.cohort_trainer(model, cfg, build=self._build, compile=compile)
        buffers = list(_float_buffers(model))  # BatchNorm statistics, uploaded as deltas
        first = {"B": torch.zeros(geo.k, device=device), **{n: start[n] for n in buffers}}
        trained, stats = cohort.train([first] * len(ctxs), shared, [c.data for c in ctxs], [c.seed for c in ctxs], ctxs[0].trainer, ctxs[0].round)
        out = []
        with torch.no_grad():
            for t, st, ctx in zip(trained, stats, ctxs):
                tensors = {"B": t["B"].clone(), **{n: t[n] - start[n].to(t[n].device) for n in buffers}}
                out.append(client_uplink(ctx, st, self.codec.encode(tensors, ctx.state, ctx.seed)))
        return out


@register
class Mapa(Algorithm):
    name = "mapa"
    Options = MapaOptions
    default_client_kind = "stateful"  # the paper broadcasts a seed and B_bar to every client

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        return MapaServer(model, _Geometry(model, self.options), ctx.seed, UplinkCodec(self.options))

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        return MapaClient(_Geometry(model, self.options), UplinkCodec(self.options))
