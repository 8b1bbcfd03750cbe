"""FedAvg (McMahan et al., 2017): the baseline every byte count is measured against.

Downlink (stateless clients): the global model's floating-point state
(parameters and float buffers such as BatchNorm statistics), about 4*d bytes
to each sampled client. Stateful clients instead all receive the last round's
averaged update (about 4*d bytes to each of the K clients).
Uplink: the client's update (local - global) for the same entries, plus the
client's sample count, about 4*d bytes; or its compressed form when a
``compressor`` is set ("Sparse" and "Quantize" baselines of the MAPA paper).
Server: W += sum_i n_i * delta_i / sum_i n_i (the sample-weighted mean, which
equals averaging the clients' models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankfed.algorithms.aggregate import add_present_, apply_mean_update, mean_train_loss, sample_weights
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec
from rankfed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientHalf,
    RunContext,
    ServerHalf,
    client_uplink,
    cohort_supported,
    float_state,
    register,
    train_cross_entropy,
)
from rankfed.wire import Payload

__all__ = ["FedAvg", "load_weights"]


def load_weights(model: nn.Module, payload: Payload) -> None:
    """Copy every floating-point state entry of ``model`` from ``payload`` (all must be there)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, dst in state.items():
            if not dst.is_floating_point():
                continue
            src = payload.get(name)
            if not isinstance(src, torch.Tensor):
                raise KeyError(f"downlink payload lacks model entry {name!r}")
            dst.copy_(src)


@dataclass
class FedAvgOptions(CompressionOptions):
    """FedAvg's own options are its uplink compressor (client training is set in [client])."""


class FedAvgServer(ServerHalf):
    def __init__(self, model: nn.Module, codec: UplinkCodec):
        # The global model, as a state dict (int buffers kept but never sent).
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.codec = codec
        self.last_update: dict[str, torch.Tensor] = {}  # what stateful clients have not applied yet

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd}
        payload.update({k: v for k, v in self.state.items() if v.is_floating_point()})
        return {cid: payload for cid in client_ids}  # one object: every client gets the same bytes

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, **self.last_update}

    def aggregate(self, rnd: int, replies: Sequence[tuple[int, Payload]]) -> dict[str, float]:
        if not replies:
            self.last_update = {}
            return {"clients": 0}
        weights = sample_weights(replies)
        deltas = (self.codec.decode(p) for _, p in replies)  # one client's dense update at a time
        floats = [n for n, v in self.state.items() if v.is_floating_point()]
        self.last_update = apply_mean_update(self.state, deltas, weights, floats)
        return {"clients": len(replies), "train_loss": mean_train_loss(replies, weights)}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.state


class FedAvgClient(ClientHalf):
    def __init__(self, codec: UplinkCodec):
        self.codec = codec

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        add_present_(replica, payload)  # round 1's broadcast carries no update yet

    def fit(self, payload: Payload, ctx: ClientContext) -> Payload:
        model = ctx.model
        start = ctx.replica if ctx.replica is not None else payload
        load_weights(model, start)
        stats = train_cross_entropy(model, ctx, list(model.parameters()))
        with torch.no_grad():
            delta = {name: value - start[name].to(value.device) for name, value in float_state(model).items()}
        return client_uplink(ctx, stats, self.codec.encode(delta, ctx.state, ctx.seed))

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        model, cfg = ctxs[0].model, ctxs[0].trainer.cfg
        if cohort_supported(model, cfg) is not None:
            return None
        names = list(float_state(model))  # parameters and BatchNorm statistics
        starts = [ctx.replica if ctx.replica is not None else p for p, ctx in zip(payloads, ctxs)]
        cohort = self.cohort_trainer(model, cfg, compile=compile)
        trained, stats = cohort.train([{n: s[n] for n in names} for s in starts], {}, [c.data for c in ctxs], [c.seed for c in ctxs], ctxs[0].trainer, ctxs[0].round)
        out = []
        with torch.no_grad():
            for start, params, st, ctx in zip(starts, trained, stats, ctxs):
                delta = {name: params[name] - start[name].to(params[name].device) for name in names}
                out.append(client_uplink(ctx, st, self.codec.encode(delta, ctx.state, ctx.seed)))
        return out


@register
class FedAvg(Algorithm):
    name = "fedavg"
    Options = FedAvgOptions

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        return FedAvgServer(model, UplinkCodec(self.options))

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        return FedAvgClient(UplinkCodec(self.options))
