"""Data-parallel training with N worker processes and a gradient compressor (``rankfed ddp``).

Each worker (a process, gloo on CPU or NCCL on one GPU each) trains the model that
``model_fn()`` builds on its own IID shard of the training data ``data_fn()`` returns, with
the :class:`~rankfed.local.LocalTraining` optimiser and batch size and the task's loss, for
``steps`` steps; DDP averages the gradients through the chosen hook:

    none            plain all-reduce (DDP's default)
    powersgd        rankfed's PowerSGD (rankfed.compress.lowrank)
    torch-powersgd  PyTorch's own powerSGD_hook (its bytes are counted by its documented rule)
    greedylore      rankfed's GreedyLore

Worker 0 evaluates on the test set every ``eval_every`` steps and writes the run
folder (config.toml, metrics.jsonl, summary.json) in the layout `rankfed plot`
reads: ``round`` is the step, ``cum_uplink_bytes`` the bytes each worker has put
into all-reduces so far (numbers x 4; the all-reduce returns as many, counted as
``cum_downlink_bytes``). ``model_fn`` and ``data_fn`` must pickle (module-level functions
or ``functools.partial`` of them): each worker process calls them.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rankfed._version import __version__
from rankfed.compress import LOW_RANK, low_rank_pays
from rankfed.errors import ConfigError
from rankfed.local import ClientData, LocalTraining, Task
from rankfed.server import RunFolder, dumps

__all__ = ["DdpOptions", "run_ddp", "DDP_COMPRESSORS"]

DDP_COMPRESSORS = ("none", *LOW_RANK, "torch-powersgd")


@dataclass
class DdpOptions:
    workers: int = 2
    compressor: str = "none"
    rank: int = 4
    update_gap: int = 100  # greedylore: steps between subspace refreshes
    warmup: int = 10  # dense steps first (greedylore; torch-powersgd's start_powerSGD_iter, at least 2)
    steps: int = 300
    eval_every: int = 50
    backend: str = "gloo"  # gloo (CPU) | nccl (one GPU per worker)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compressor not in DDP_COMPRESSORS:
            raise ConfigError(f"--compressor {self.compressor!r}: must be one of {', '.join(DDP_COMPRESSORS)}")
        for key in ("workers", "rank", "update_gap", "steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be >= 1")
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup}: must be >= 0")
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"--backend {self.backend!r}: must be gloo or nccl")
        if self.backend == "nccl" and torch.cuda.device_count() < self.workers:
            raise ConfigError(f"--backend nccl with {self.workers} workers needs {self.workers} GPUs, found {torch.cuda.device_count()}")


def _torch_powersgd_numbers(model: torch.nn.Module, rank: int, compressing: bool) -> int:
    """Numbers torch's powerSGD_hook all-reduces in one step, by its documented rule: a matrix
    (conv kernels flattened) is compressed when (n + m) * rank * 2 < n * m, sending (n + m) * rank;
    everything else (and every step before start_powerSGD_iter) goes dense."""
    total = 0
    for p in model.parameters():
        n = p.shape[0] if p.dim() >= 2 else 0
        m = p.numel() // n if n else 0
        if compressing and n and low_rank_pays(p.shape, (n + m) * min(rank, n, m), strict=True):
            total += (n + m) * min(rank, n, m)
        else:
            total += p.numel()
    return total


def _worker(rank: int, model_fn, data_fn, local: LocalTraining, task: Task, seed: int, opts: DdpOptions, init_file: str, out: str, result_file: str, info: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rankfed.ddp import LowRankHookState, lowrank_hook

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    dist.init_process_group(opts.backend, init_method=f"file://{init_file}", rank=rank, world_size=opts.workers)
    try:
        device = torch.device(f"cuda:{rank}") if opts.backend == "nccl" else torch.device("cpu")
        (train_x, train_y), (test_x, test_y) = data_fn()
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
        mine = perm[rank :: opts.workers]
        x, y = train_x[mine].to(device), train_y[mine].to(device)
        test = ClientData(test_x.to(device), test_y.to(device))
        torch.manual_seed(seed)
        model = model_fn().to(device)
        ddp = DDP(model, device_ids=[rank] if opts.backend == "nccl" else None)
        state = None
        if opts.compressor in ("powersgd", "greedylore"):
            extra = {"update_gap": opts.update_gap, "warmup_steps": opts.warmup} if opts.compressor == "greedylore" else {}
            state = LowRankHookState.for_model(model, opts.compressor, seed=seed, rank=opts.rank, **extra)
            ddp.register_comm_hook(state, lowrank_hook)
        elif opts.compressor == "torch-powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            tstate = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=opts.rank, start_powerSGD_iter=max(2, opts.warmup), use_error_feedback=True, warm_start=True, random_seed=seed)
            ddp.register_comm_hook(tstate, psgd.powerSGD_hook)
        c = local
        opt = local.make_optimizer(ddp.parameters())
        dense_numbers = sum(p.numel() for p in model.parameters())
        # torch's hook sends one of two amounts: dense before start_powerSGD_iter, compressed after
        torch_psgd = {on: _torch_powersgd_numbers(model, opts.rank, compressing=on) for on in (False, True)}
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        order, pos = torch.randperm(len(y), generator=gen), 0
        cum_numbers, step_times, t_start = 0, [], time.perf_counter()
        metrics = []
        params = list(model.parameters())
        diverged_at = None
        for step in range(1, opts.steps + 1):
            if pos + c.batch_size > len(order):
                order, pos = torch.randperm(len(y), generator=gen), 0
            idx = order[pos : pos + c.batch_size].to(device)
            pos += c.batch_size
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            task.batch_loss(ddp, x[idx], y[idx]).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            # The replicas are identical, so every worker takes the same decision without talking.
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
                diverged_at = step
                break
            if state is not None:
                sent = state.lowrank.stats.last_sent
            elif opts.compressor == "torch-powersgd":
                sent = torch_psgd[step >= max(2, opts.warmup)]
            else:
                sent = dense_numbers
            cum_numbers += sent
            if rank == 0 and (step % opts.eval_every == 0 or step == opts.steps):
                result = task.evaluate(model, test.batches(1024))
                acc, loss = result["accuracy"], result["loss"]
                row = {
                    "round": step,
                    "accuracy": acc,
                    "loss": loss,
                    "bytes_per_step": 4 * sent,
                    "cum_uplink_bytes": 4 * cum_numbers,
                    "cum_downlink_bytes": 4 * cum_numbers,
                    "step_s": sum(step_times[-opts.eval_every :]) / len(step_times[-opts.eval_every :]),
                    "wall_s": time.perf_counter() - t_start,
                }
                metrics.append(row)
                with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(dumps(row) + "\n")
        gathered: list = [None] * opts.workers
        dist.all_gather_object(gathered, {"mean_step_s": sum(step_times) / max(len(step_times), 1), "cum_numbers": cum_numbers})
        if rank == 0:
            scored = [r for r in metrics if r["accuracy"] is not None]
            best = max(scored, key=lambda r: r["accuracy"]) if scored else {"accuracy": None, "round": None}
            steps_done = len(step_times)
            summary = {
                "mode": "ddp",
                "algorithm": f"ddp-{opts.compressor}",
                "algorithm_options": {"compressor": opts.compressor, "rank": opts.rank, "update_gap": opts.update_gap, "warmup": opts.warmup},
                "dataset": info.get("dataset"),
                "model": info.get("model"),
                "num_parameters": dense_numbers,
                "workers": opts.workers,
                "backend": opts.backend,
                "steps": steps_done,
                "status": "completed" if diverged_at is None else "diverged",
                "diverged_at_step": diverged_at,
                "batch_size_per_worker": c.batch_size,
                "best_accuracy": best["accuracy"],
                "best_round": best["round"],
                "final_accuracy": metrics[-1]["accuracy"] if metrics and diverged_at is None else None,
                "mean_bytes_per_step": 4 * cum_numbers / max(steps_done, 1),
                "dense_bytes_per_step": 4 * dense_numbers,
                "bytes_vs_dense": cum_numbers / (dense_numbers * max(steps_done, 1)),
                "bytes_counted": "by torch's documented rule" if opts.compressor == "torch-powersgd" else "measured by the hook",
                "mean_step_s_per_worker": [g["mean_step_s"] for g in gathered],
                "device": str(device),
                "machine": platform.platform(),
                "torch": torch.__version__,
                "rankfed": __version__,
            }
            Path(result_file).write_text(json.dumps(summary))
        # Tear down in order: every worker done, DDP's reducer (which holds the group and
        # pending work) gone, then the group. Destroying the group under a live reducer
        # aborted a worker now and then ("terminate called without an active exception").
        dist.barrier()
        del ddp, opt, state
        gc.collect()
    finally:
        dist.destroy_process_group()


def run_ddp(
    model_fn,
    data_fn,
    opts: DdpOptions,
    out_dir: str | os.PathLike,
    *,
    local: LocalTraining | None = None,
    loss=None,
    seed: int = 0,
    overwrite: bool = False,
    command: str | None = None,
    config_text: str = "",
    info: dict | None = None,
) -> dict:
    """Spawn the workers, wait for them, write and return the summary.

    ``model_fn() -> nn.Module`` (called after seeding torch with ``seed``) and ``data_fn() ->
    ((train_x, train_y), (test_x, test_y))`` run in every worker process; ``local`` gives the
    optimiser (``LocalTraining``: lr, batch size, ...), ``loss(output, target)`` the loss
    (default cross-entropy)."""
    local = local or LocalTraining()
    task = Task(loss)
    folder = RunFolder(out_dir, overwrite=overwrite)
    folder.write_text("config.toml", config_text)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result = os.path.join(tmp, "init"), os.path.join(tmp, "summary.json")
        mp.spawn(_worker, args=(model_fn, data_fn, local, task, seed, opts, init_file, str(folder.path), result, dict(info or {})), nprocs=opts.workers)
        summary = json.loads(Path(result).read_text())
    summary["command"] = command
    folder.write_summary(summary)
    return summary
