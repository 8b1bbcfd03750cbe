"""Vectorised cohort training: the round's clients train together in one batched computation.

Each sampled client keeps its own copy of the trained tensors, stacked along a leading
client dimension, and every local step is one ``torch.func.vmap`` of ``torch.func.grad``
over the cohort (tensors every client shares, such as a frozen base, are passed once,
unbatched). Clients keep the minibatch order :class:`~rankfed.local.loop.LocalTrainer`
gives them (the same seeded generator), so the result equals sequential training up to
float summation order. Steps are aligned by index: a client with a smaller last batch is
padded (padded samples weigh 0), and a client with fewer steps sits the remaining steps
out (its tensors and momentum unchanged).

What is trained need not be the model's parameters: an algorithm passes ``build(trained,
shared) -> parameters`` (MAPA trains one vector B and the parameters are W + vec(A B)).
Applies to SGD (momentum, Nesterov, weight decay, gradient clipping) on in-memory data, on
models without dropout (its randomness would differ under vmap) and without buffers other
than BatchNorm statistics, with the task's loss formed sample by sample (cross-entropy, or a
user loss that is a mean over samples: :meth:`Task.decomposable` checks it on a batch);
BatchNorm layers normalise with the statistics of each client's real samples (padding left
out) and their running statistics, where they keep them, are carried per client.
:func:`cohort_supported` says whether a model, settings, task and data apply. With ``compile=True`` the whole step
(gradients, clipping, momentum, update) is one ``torch.compile`` graph, compiled once per
process and cohort shape.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from rankfed.local.data import ClientData, concat_inputs
from rankfed.local.loop import LocalTrainer, TrainStats
from rankfed.local.task import Task, call_model
from rankfed.local.training import LocalTraining

__all__ = ["CohortOutOfMemory", "CohortTrainer", "cohort_supported", "has_dropout"]

Tensors = dict[str, torch.Tensor]
Build = Callable[[Tensors, Tensors], Tensors]


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has an active dropout layer (its masks come from torch's global RNG)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def cohort_supported(model: nn.Module, cfg: LocalTraining, task: Task | None = None, data: ClientData | None = None) -> str | None:
    """Why the model, client settings, task or data cannot train as a vectorised cohort (None
    if they can). With ``data`` (a client's), the task's loss is tried sample by sample on its
    first minibatch."""
    if not cfg.plain_sgd:
        shown = cfg.optimizer if isinstance(cfg.optimizer, str) else cfg.optimizer_name
        why = "optimizer_options are not modelled" if cfg.optimizer_name == "sgd" else "vectorised training implements sgd"
        return f"client.optimizer = {shown!r} ({why})"
    owners = _buffer_owners(model)
    for name, _ in model.named_buffers():
        bn = owners.get(name)
        if bn is None:
            return f"the model has buffer {name!r}, which is not a BatchNorm statistic"
        if bn.momentum is None:
            return f"BatchNorm with momentum=None (a cumulative average) at {name!r}"
    if task is not None and task.model_loss(model):
        return "the model computes its own loss from labels (a Hugging Face model)"
    if has_dropout(model):
        return "the model has dropout (its randomness would differ under vmap)"
    if data is not None and not data.in_memory:
        return "the client data is streamed from a Dataset (a cohort gathers its minibatches from tensors in memory)"
    if task is not None and not task.default_loss and data is not None and data.num_samples:
        x, y = data.batch(torch.arange(min(data.num_samples, cfg.batch_size), device=data.device))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = call_model(model, x)
        finally:
            model.train(was)
        return task.decomposable(out, y)
    return None


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CohortOutOfMemory(RuntimeError):
    """The cohort's stacked tensors and activations do not fit the device (raised before any
    client's state or upload is touched, so the round can be trained one client at a time)."""


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _tracking_batchnorms(model: nn.Module) -> dict[nn.Module, str]:
    """The BatchNorm layers that keep running statistics, with their module names."""
    return {m: name for name, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}


def _batchnorms(model: nn.Module) -> dict[nn.Module, str]:
    """Every BatchNorm layer (with running statistics or without), with its module name."""
    return {m: name for name, m in model.named_modules() if isinstance(m, _BN)}


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _buffer_owners(model: nn.Module) -> dict[str, nn.Module]:
    """Buffer name -> its BatchNorm module, for the buffers of tracking BatchNorm layers."""
    return {_qualified(prefix, b): m for m, prefix in _tracking_batchnorms(model).items() for b, _ in m.named_buffers(recurse=False)}


class _MaskedBatchNorm:
    """While a cohort trains, the model's BatchNorm layers normalise with the statistics of
    the valid (unpadded) samples only, and those that keep running statistics report their new
    ones here instead of updating buffers in place (vmap carries them as per-client tensors).
    A layer without running statistics (``track_running_stats = False``) normalises with the
    batch's statistics in eval() too; in training it is masked the same way."""

    def __init__(self, model: nn.Module):
        self.layers = _batchnorms(model)
        self.mask: torch.Tensor | None = None
        self.updates: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for m in self.layers:
            m.forward = self._forward_of(m)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            del m.forward  # back to the class's forward
        return False

    def _forward_of(self, m: nn.Module):
        prefix = self.layers[m]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not m.training:
                return type(m).forward(m, x)
            w = self.mask  # (B,): 1 for a real sample, 0 for padding
            dims = [0, *range(2, x.dim())]
            per_sample = x[0, 0].numel()  # positions per channel and sample
            shape = (1, -1, *[1] * (x.dim() - 2))
            mw = w.view(-1, *[1] * (x.dim() - 1))
            n = w.sum() * per_sample
            mean = (x * mw).sum(dims) / n.clamp_min(1.0)
            var = ((x - mean.view(shape)).square() * mw).sum(dims) / n.clamp_min(1.0)
            out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
            if m.affine:
                out = out * m.weight.view(shape) + m.bias.view(shape)
            if not m.track_running_stats:
                return out
            mom = m.momentum
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            self.updates[_qualified(prefix, "running_mean")] = (1 - mom) * m.running_mean + mom * mean.detach()
            self.updates[_qualified(prefix, "running_var")] = (1 - mom) * m.running_var + mom * unbiased
            self.updates[_qualified(prefix, "num_batches_tracked")] = m.num_batches_tracked + 1
            return out

        return forward


def _is_compile_error(e: BaseException) -> bool:
    """Whether ``e`` comes from torch.compile (Dynamo or Inductor: no C++ compiler, an
    unsupported op), not from the model."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "InductorError" in type(e).__name__ or "BackendCompilerFailed" in type(e).__name__


def _per_client(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (clients,) mask shaped to broadcast over ``like`` (clients, ...)."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def _default_build(trained: Tensors, shared: Tensors) -> Tensors:
    return {**shared, **trained}


class CohortTrainer:
    """Trains cohorts of clients for one model and one ``[client]`` configuration.

    ``build(trained, shared)`` maps one client's trained tensors and the shared tensors to
    the mapping :func:`torch.func.functional_call` gets (default: the two merged, i.e. the
    trained tensors are model parameters). Keep one instance per client half: with
    ``compile=True`` it holds the compiled step.
    """

    def __init__(self, model: nn.Module, cfg: LocalTraining, build: Build | None = None, compile: bool = False, task: Task | None = None):
        self.model, self.cfg = model, cfg
        self.task = task if task is not None else Task()
        self.build = build or _default_build
        self.compile = compile
        self.buffer_names = [n for n, _ in model.named_buffers()]  # BatchNorm statistics (cohort_supported)
        self._bn = _MaskedBatchNorm(model) if _batchnorms(model) else None
        self._step_fn = None

    # -- the step, as one pure function of tensors ------------------------------------------
    def _loss(self, trained: Tensors, stats: Tensors, shared: Tensors, x, y: torch.Tensor, w: torch.Tensor):
        if self._bn is not None:
            self._bn.mask, self._bn.updates = w, {}
        params = {**self.build(trained, shared), **stats}
        output = call_model(lambda *a, **k: functional_call(self.model, params, a, k), x)
        sums, counts = self.task.sample_terms(output, y)  # (B,) each: padding weighs 0
        loss = (sums * w).sum() / (counts * w).sum().clamp_min(1.0)
        new_stats = {n: self._bn.updates.get(n, v) for n, v in stats.items()} if self._bn is not None else {}
        return loss, (loss.detach(), new_stats)

    def _step(self, trained: Tensors, bufs: Tensors, stats: Tensors, shared: Tensors, x, y, w, active, lr):
        cfg = self.cfg
        g, (losses, new_stats) = vmap(grad(self._loss, has_aux=True), in_dims=(0, 0, None, 0, 0, 0))(trained, stats, shared, x, y, w)
        c = active.shape[0]
        stats = {n: torch.where(_per_client(active, v), new_stats[n], v) for n, v in stats.items()}
        if cfg.grad_clip > 0:  # per client, as clip_grad_norm_ over that client's trained tensors
            norms = torch.sqrt(sum(v.reshape(c, -1).pow(2).sum(1) for v in g.values()))
            coef = (cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            g = {n: v * _per_client(coef, v) for n, v in g.items()}
        new_trained, new_bufs = {}, {}
        for n, p in trained.items():
            mask = _per_client(active, p)
            d = g[n] + cfg.weight_decay * p if cfg.weight_decay else g[n]
            if cfg.momentum:
                buf = cfg.momentum * bufs[n] + d
                new_bufs[n] = torch.where(mask, buf, bufs[n])
                d = d + cfg.momentum * buf if cfg.nesterov else buf
            new_trained[n] = torch.where(mask, p - lr * d, p)
        return new_trained, new_bufs, stats, losses

    def _stepper(self):
        if self._step_fn is None:
            if self.compile and self._bn is not None:  # inductor fails on it ("Cannot access storage of TensorWrapper")
                warnings.warn("federation.compile = true: the cohort step of a model with BatchNorm is not compiled (torch.compile cannot trace it); running it eagerly", stacklevel=3)
                self.compile = False
            self._step_fn = torch.compile(self._step, dynamic=False) if self.compile else self._step
        return self._step_fn

    # -- a round ------------------------------------------------------------------------------
    def train(
        self,
        starts: Sequence[Tensors],
        shared: Tensors,
        datas: Sequence[ClientData],
        seeds: Sequence[int],
        trainer: LocalTrainer,
        rnd: int,
    ) -> tuple[list[Tensors], list[TrainStats]]:
        """Train client i's tensors from ``starts[i]`` on ``datas[i]`` with minibatch seed
        ``seeds[i]``; ``shared`` are the tensors every client reads but none trains. Returns
        each client's trained tensors and its :class:`TrainStats`. Raises
        :class:`CohortOutOfMemory` when the cohort does not fit the device."""
        try:
            return self._train(starts, shared, datas, seeds, trainer, rnd)
        except Exception as e:
            if not _is_out_of_memory(e):
                raise
            device = datas[0].device
            err = f"a cohort of {len(datas)} clients does not fit in {device.type} memory ({type(e).__name__})"
        if device.type == "cuda":  # outside the except block: the failed step's tensors are released
            torch.cuda.empty_cache()
        raise CohortOutOfMemory(err)

    def _train(self, starts, shared, datas, seeds, trainer, rnd):
        device = datas[0].device
        c, bs = len(datas), trainer.cfg.batch_size
        names = [n for n in starts[0] if n not in self.buffer_names]
        with torch.no_grad():
            trained = {n: torch.stack([s[n].detach().to(device) for s in starts]) for n in names}
            # each client's BatchNorm statistics: from its start where given, else the model's
            own = dict(self.model.named_buffers())
            stats = {n: torch.stack([(s[n] if n in s else own[n]).detach().to(device) for s in starts]) for n in self.buffer_names}
        shared = {n: v.detach() for n, v in shared.items()}
        # Every client's minibatches in LocalTrainer's order, as indices into the cohort's
        # concatenated data: one gather per step.
        plans = []
        for data, seed in zip(datas, seeds):
            gen = torch.Generator().manual_seed(seed)
            plans.append(list(trainer.batches(data.num_samples, gen, torch.device("cpu"))) if data.num_samples else [])
        steps = max((len(p) for p in plans), default=0)
        xs = concat_inputs([d.x for d in datas])
        ys = torch.cat([d.y for d in datas])
        index = torch.zeros((steps, c, bs), dtype=torch.long)  # built on the CPU, moved once
        weight = torch.zeros((steps, c, bs))
        offset = 0
        for i, plan in enumerate(plans):
            for s, idx in enumerate(plan):
                index[s, i, : idx.numel()] = idx + offset
                weight[s, i, : idx.numel()] = 1.0
            offset += datas[i].num_samples
        index, weight = index.to(device), weight.to(device)
        active = weight.sum(2) > 0  # (steps, c)
        bufs = {n: torch.zeros_like(v) for n, v in trained.items()} if trainer.cfg.momentum else {}
        lr = torch.tensor(trainer.lr_at(rnd), device=device)  # a tensor: a new lr does not recompile
        step = self._stepper()
        loss_sum = torch.zeros(c, device=device)
        for s in range(steps):
            x = {k: v[index[s]] for k, v in xs.items()} if isinstance(xs, dict) else xs[index[s]]
            y = ys[index[s]]
            try:
                with self._bn if self._bn is not None else contextlib.nullcontext():
                    trained, bufs, stats, losses = step(trained, bufs, stats, shared, x, y, weight[s], active[s], lr)
            except Exception as e:  # noqa: BLE001 - only a compile failure is translated
                if not self.compile or not _is_compile_error(e):
                    raise
                first = "; ".join(line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith("raised:"))[:300]
                raise RuntimeError(f"federation.compile = true: torch.compile could not compile the cohort step ({type(e).__name__}: {first}); set federation.compile = false") from e
            loss_sum += losses.detach() * weight[s].sum(1)
        samples = weight.sum((0, 2))
        out = [{**{n: trained[n][i].detach() for n in names}, **{n: stats[n][i] for n in self.buffer_names}} for i in range(c)]
        stats = [
            TrainStats(steps=len(plans[i]), samples=int(samples[i]), mean_loss=float(loss_sum[i] / samples[i]) if samples[i] > 0 else float("nan"))
            for i in range(c)
        ]
        return out, stats

