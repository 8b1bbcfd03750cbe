"""FedAvg (McMahan et al., 2017): the baseline every byte count is measured against.

What travels is the model's *shared* state (:func:`~rankfed.protocol.shared_state`): its
trainable parameters and floating-point buffers (BatchNorm statistics). Parameters the user
froze are the seeded initial model's on every party and are never sent, so a fine-tuning run's
"vs FedAvg" figures compare against a FedAvg that sends what it trains.

Downlink (stateless clients): the shared state, about 4*d bytes to each sampled client (d the
trainable parameters). Stateful clients instead all receive the last round's averaged update
(about 4*d bytes to each of the K clients).
Uplink: the client's update (local - global) of the same entries, plus the client's sample
count, about 4*d bytes; or its compressed form when a ``compressor`` is set ("Sparse" and
"Quantize" baselines of the MAPA paper).
Server: W += sum_i n_i * delta_i / sum_i n_i (the sample-weighted mean, which equals
averaging the clients' models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankfed.algorithms.aggregate import add_means_, add_present_, expect_entries
from rankfed.algorithms.base import Algorithm, register
from rankfed.algorithms.compression import CompressionOptions, UplinkCodec
from rankfed.local import TrainStats
from rankfed.protocol import ClientContext, ClientHalf, RoundSums, RunContext, ServerHalf, client_uplink, shared_state
from rankfed.wire import Payload

__all__ = ["FedAvg", "load_weights"]


def load_weights(model: nn.Module, payload: Payload, names: Sequence[str]) -> None:
    """Copy the state entries ``names`` of ``model`` from ``payload`` (all must be there)."""
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            src = payload.get(name)
            if not isinstance(src, torch.Tensor):
                raise KeyError(f"downlink payload lacks model entry {name!r}")
            state[name].copy_(src)


class FedAvgServer(ServerHalf):
    def __init__(self, model: nn.Module, codec: UplinkCodec):
        # The global model, as a state dict (frozen parameters and int buffers kept, never sent).
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.names = list(shared_state(model))  # what travels
        self.codec = codec
        self.last_update: dict[str, torch.Tensor] = {}  # what stateful clients have not applied yet

    def configure(self, rnd: int, client_ids: Sequence[int]) -> dict[int, Payload]:
        payload: Payload = {"@round": rnd, **{k: self.state[k] for k in self.names}}
        return {cid: payload for cid in client_ids}  # one object: every client gets the same bytes

    def broadcast(self, rnd: int) -> Payload:
        return {"@round": rnd, **self.last_update}

    def fold(self, rnd: int, cid: int, payload: Payload) -> dict[str, torch.Tensor]:
        return expect_entries(self.codec.decode(payload), {n: self.state[n] for n in self.names})  # the dense update

    def finish(self, rnd: int, sums: RoundSums) -> dict[str, float]:
        if not sums.count:
            self.last_update = {}
            return {"clients": 0}
        self.last_update = add_means_(self.state, sums, self.names)
        return {"clients": sums.count, "train_loss": sums.train_loss}

    def global_model_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def replica_state(self) -> Payload:
        return {k: self.state[k] for k in self.names}


class FedAvgClient(ClientHalf):
    def __init__(self, model: nn.Module, codec: UplinkCodec):
        self.codec = codec
        self.names = list(shared_state(model))

    def sync(self, payload: Payload, replica: dict[str, torch.Tensor]) -> None:
        add_present_(replica, payload)  # round 1's broadcast carries no update yet

    def _start(self, payload: Payload, ctx: ClientContext) -> Payload:
        return ctx.replica if ctx.replica is not None else payload

    def begin(self, payload: Payload, ctx: ClientContext) -> nn.Module:
        """``ctx.model`` holding the global model (its trainable parameters are trained)."""
        start = self._start(payload, ctx)
        load_weights(ctx.model, start, self.names)
        self._remember_start(ctx, start)
        return ctx.model

    def end(self, module: nn.Module, ctx: ClientContext, stats: TrainStats) -> Payload:
        start = self._start_of(ctx)
        state = module.state_dict()
        with torch.no_grad():
            delta = {n: state[n] - start[n].to(state[n].device) for n in self.names}
        return client_uplink(ctx, stats, self.codec.encode(delta, ctx.state, ctx.seed))

    def fit_cohort(self, payloads: Sequence[Payload], ctxs: Sequence[ClientContext], compile: bool = False) -> list[Payload] | None:
        model, trainer = ctxs[0].model, ctxs[0].trainer
        starts = [self._start(p, ctx) for p, ctx in zip(payloads, ctxs)]
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        cohort = self.cohort_trainer(model, trainer, compile=compile)
        trained, stats = cohort.train([{n: s[n] for n in self.names} for s in starts], frozen, [c.data for c in ctxs], [c.seed for c in ctxs], trainer, ctxs[0].round)
        out = []
        with torch.no_grad():
            for start, params, st, ctx in zip(starts, trained, stats, ctxs):
                delta = {name: params[name] - start[name].to(params[name].device) for name in self.names}
                out.append(client_uplink(ctx, st, self.codec.encode(delta, ctx.state, ctx.seed)))
        return out


@register
@dataclass
class FedAvg(CompressionOptions, Algorithm):
    """FedAvg: clients train the whole (trainable) model; the server averages their updates.

    Args:
        compressor: an uplink compressor: ``""`` (none), ``"topk"``, ``"qsgd"``, a chain
            ``"topk+qsgd"`` (with ``topk_ratio``, ``qsgd_bits``, ``error_feedback``),
            ``"powersgd"`` / ``"greedylore"`` / ``"random"`` (``compress_rank``, ``update_gap``;
            their own error feedback), or a :class:`rankfed.compress.Compressor` object.
    """

    name = "fedavg"

    def make_server(self, model: nn.Module, ctx: RunContext) -> ServerHalf:
        codec = UplinkCodec(self)
        codec.warn_dense(shared_state(model))
        return FedAvgServer(model, codec)

    def make_client(self, model: nn.Module, ctx: RunContext) -> ClientHalf:
        return FedAvgClient(model, UplinkCodec(self))
