"""Data-parallel training with N worker processes and a gradient compressor (``rankfed ddp``).

Each worker (a process, gloo on CPU or NCCL on one GPU each) trains the model that
``model_fn()`` builds on its own IID shard of the training data ``data_fn()`` returns, with
the :class:`~rankfed.local.LocalTraining` optimiser (``"sgd"`` with or without momentum,
``"adamw"``, ...) and batch size and the task's loss, for ``steps`` steps; DDP averages the
gradients through the chosen hook:

    none            plain all-reduce (DDP's default)
    powersgd        rankfed's PowerSGD (rankfed.compress.lowrank)
    greedylore      rankfed's GreedyLore
    random          a random orthonormal subspace per step (the randomised baseline)
    torch-powersgd  PyTorch's own powerSGD_hook (its bytes are counted by its documented rule)

rankfed's three compressors all-reduce embeddings and the output head dense by default
(``dense_patterns``, ``dense_head``: see :class:`DdpOptions`) and run ``warmup`` dense steps
first. Worker 0 evaluates on the test set every ``eval_every`` steps and writes the run
folder in the layout `rankfed plot` reads:

* ``config.toml``, ``summary.json`` and, once completed, ``model.pt`` (worker 0's weights);
* ``metrics.jsonl``: one line per evaluated step (``round`` = the step, ``accuracy``,
  ``loss``, ``bytes_per_step``, ``cum_uplink_bytes`` = the bytes each worker has put into
  all-reduces so far (numbers x 4; the all-reduce returns as many, counted as
  ``cum_downlink_bytes``), ``step_s``, ``wall_s``) and, with rankfed's compressors, one line
  per ``diagnostics_every`` steps with ``captured_fraction`` and ``residual_ratio`` (worker 0's
  :class:`~rankfed.compress.lowrank.CompressionStats` diagnostics) and the bytes; a step
  that is both has one line with everything, other lines have no ``accuracy``;
* ``resume/``: while running, the last resume point (every ``checkpoint_every`` steps):
  ``latest.json`` names it, ``step-N/shared.pt`` holds the model, the optimiser and the
  metrics rows, ``step-N/worker-R.pt`` each worker's own state (hook state with its error
  buffers, data order and position, RNG states, counters). ``run_ddp(..., resume=True)`` /
  ``rankfed ddp --resume RUN_DIR`` continue from it and end exactly as the uninterrupted run.

``model_fn`` and ``data_fn`` must pickle (module-level functions or ``functools.partial`` of
them): each worker process calls them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
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

__all__ = ["DdpOptions", "run_ddp", "DDP_COMPRESSORS", "RESUME_DIR"]

DDP_COMPRESSORS = ("none", *LOW_RANK, "torch-powersgd")
RESUME_DIR = "resume"
_RESUME_FORMAT = 1
# options a resumed run may change: how often it saves, and how long it runs
_RESUMABLE_CHANGES = ("steps", "checkpoint_every")


@dataclass
class DdpOptions:
    """The options of ``rankfed ddp`` (the same names as its flags); defaults follow the
    orders of magnitude of GreedyLore's experiments (dense warm-ups of 500-4000 steps, refresh
    every 200-1200 steps, ranks 8-64; rank stays 4 here, for small models).

    Args:
        workers: worker processes.
        compressor: one of :data:`DDP_COMPRESSORS`.
        rank: rank of each compressed matrix.
        update_gap: greedylore: steps between subspace refreshes (default 200).
        warmup: dense all-reduce for the first this many steps, for every compressor (default
            500; torch-powersgd's ``start_powerSGD_iter``, at least 2).
        steps: training steps (default 2000).
        eval_every: evaluate (worker 0, the test set) every this many steps and after the last.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per worker).
        probes: greedylore: Gaussian probes per direction for the scores (default 1, the
            paper's; K > 1 is not in the paper, see :func:`~rankfed.compress.lowrank.greedylore`).
        dense_patterns: ``fnmatch`` patterns of parameter names all-reduced dense (None, the
            default: :data:`~rankfed.compress.lowrank.DEFAULT_DENSE_PATTERNS`, the embeddings
            and language-model heads; ``[]``: none).
        dense_head: also all-reduce the output head dense (the last ``nn.Linear`` in module
            order, :func:`rankfed.ddp.output_head`; default True, as the authors' code).
        diagnostics_every: write the compressor's ``captured_fraction`` / ``residual_ratio`` every this many
            steps to metrics.jsonl (None, the default: 1 with rankfed's compressors, 0 = off;
            other compressors have none).
        checkpoint_every: write a resume point every this many steps (None, the default: every
            ``eval_every`` steps; 0 = never). torch-powersgd runs write none.
    """

    workers: int = 2
    compressor: str = "none"
    rank: int = 4
    update_gap: int = 200  # greedylore: steps between subspace refreshes
    warmup: int = 500  # dense steps first (every compressor; torch-powersgd's start_powerSGD_iter, at least 2)
    steps: int = 2000
    eval_every: int = 100
    backend: str = "gloo"  # gloo (CPU) | nccl (one GPU per worker)
    extra: dict = field(default_factory=dict)
    probes: int = 1  # greedylore: Gaussian probes per direction (1: the paper's estimator)
    dense_patterns: list | None = None  # None: DEFAULT_DENSE_PATTERNS
    dense_head: bool = True  # the output head dense too
    diagnostics_every: int | None = None  # None: 1 with rankfed's compressors
    checkpoint_every: int | None = None  # None: eval_every; 0: no resume points

    def __post_init__(self) -> None:
        if self.compressor not in DDP_COMPRESSORS:
            raise ConfigError(f"--compressor {self.compressor!r}: must be one of {', '.join(DDP_COMPRESSORS)}")
        for key in ("workers", "rank", "update_gap", "steps", "eval_every", "probes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{key.replace('_', '-')} {value!r}: must be an int >= 1")
        for key in ("warmup", "diagnostics_every", "checkpoint_every"):
            value = getattr(self, key)
            if (value is not None or key == "warmup") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"--{key.replace('_', '-')} {value!r}: must be an int >= 0")
        if self.dense_patterns is not None and (isinstance(self.dense_patterns, str) or not all(isinstance(p, str) for p in self.dense_patterns)):
            raise ConfigError(f"dense_patterns {self.dense_patterns!r}: must be a list of fnmatch patterns (strings)")
        if self.dense_patterns is not None:
            self.dense_patterns = list(self.dense_patterns)
        if self.diagnostics_every and self.compressor not in LOW_RANK:
            raise ConfigError(f"--diagnostics-every {self.diagnostics_every}: {self.compressor} has no diagnostics (rankfed's {', '.join(LOW_RANK)} have)")
        if self.checkpoint_every and self.compressor == "torch-powersgd":
            raise ConfigError(
                f"--checkpoint-every {self.checkpoint_every}: torch-powersgd runs cannot be resumed (PyTorch's PowerSGDState keys its "
                "error and Q memories by DDP bucket index, which a restarted DDP may number differently); use --compressor powersgd"
            )
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"--backend {self.backend!r}: must be gloo or nccl")
        if self.backend == "nccl" and torch.cuda.device_count() < self.workers:
            raise ConfigError(f"--backend nccl with {self.workers} workers needs {self.workers} GPUs, found {torch.cuda.device_count()}")

    @property
    def diagnostics_interval(self) -> int:
        """``diagnostics_every`` resolved: 1 by default with rankfed's compressors, else 0 (off)."""
        if self.diagnostics_every is not None:
            return self.diagnostics_every
        return 1 if self.compressor in LOW_RANK else 0

    @property
    def checkpoint_interval(self) -> int:
        """``checkpoint_every`` resolved: ``eval_every`` by default, 0 for torch-powersgd."""
        if self.compressor == "torch-powersgd":
            return 0
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every


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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _replica_digest(params) -> str:
    """A hash of the weights' bytes: equal on every worker when the replicas are bitwise equal."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, model_fn, data_fn, local: LocalTraining, task: Task, seed: int, opts: DdpOptions, init_file: str, out: str, result_file: str, info: dict, resume_step: int, stop_after: int | None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rankfed.ddp import LowRankHookState, lowrank_hook

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.workers))
    dist.init_process_group(opts.backend, init_method=f"file://{init_file}", rank=rank, world_size=opts.workers)
    try:
        device = torch.device(f"cuda:{rank}") if opts.backend == "nccl" else torch.device("cpu")
        (train_x, train_y), (test_x, test_y) = data_fn()
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
        shard = perm[rank :: opts.workers]
        x, y = train_x[shard].to(device), train_y[shard].to(device)
        test = ClientData(test_x.to(device), test_y.to(device))
        torch.manual_seed(seed)
        model = model_fn().to(device)
        saved_dir = Path(out) / RESUME_DIR / f"step-{resume_step:08d}" if resume_step else None
        saved = torch.load(saved_dir / f"worker-{rank}.pt", map_location=device, weights_only=False) if saved_dir else None  # this run's own files
        shared = torch.load(saved_dir / "shared.pt", map_location=device, weights_only=False) if saved_dir else None
        if shared is not None:
            model.load_state_dict(shared["model"])
        ddp = DDP(model, device_ids=[rank] if opts.backend == "nccl" else None)
        state = None
        if opts.compressor in LOW_RANK:
            extra = {"update_gap": opts.update_gap, "probes": opts.probes} if opts.compressor == "greedylore" else {}
            state = LowRankHookState.for_model(
                model, opts.compressor, seed=seed, rank=opts.rank, warmup_steps=opts.warmup, dense_patterns=opts.dense_patterns, dense_head=opts.dense_head, **extra
            )  # fmt: skip
            if saved is not None:
                state.load_state_dict(saved["hook"])
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
        cum_numbers, step_times, wall_before = 0, [], 0.0
        metrics: list[dict] = []
        if saved is not None:
            opt.load_state_dict(shared["optimizer"])
            gen.set_state(saved["gen"].cpu())
            order, pos, cum_numbers, step_times, wall_before = saved["order"].cpu(), saved["pos"], saved["cum_numbers"], list(saved["step_times"]), saved["wall_s"]
            torch.set_rng_state(saved["torch_rng"].cpu())
            if device.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
            metrics = list(shared["metrics"])
            if rank == 0:  # the lines of the steps after the resume point (or cut short by a kill) go
                _atomic_text(Path(out) / "metrics.jsonl", "".join(dumps(r) + "\n" for r in metrics))
            del shared
        t_start = time.perf_counter() - wall_before
        params = list(model.parameters())
        diverged_at, stopped = None, False
        diag_every, ckpt_every = opts.diagnostics_interval if state is not None else 0, opts.checkpoint_interval
        for step in range(resume_step + 1, opts.steps + 1):
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
            evaluate = step % opts.eval_every == 0 or step == opts.steps
            diagnose = bool(diag_every) and step % diag_every == 0
            if rank == 0 and (evaluate or diagnose):
                row: dict = {"round": step}
                if evaluate:
                    result = task.evaluate(model, test.batches(1024))
                    row |= {"accuracy": result["accuracy"], "loss": result["loss"]}
                row |= {"bytes_per_step": 4 * sent, "cum_uplink_bytes": 4 * cum_numbers, "cum_downlink_bytes": 4 * cum_numbers}
                if evaluate:
                    recent = step_times[-opts.eval_every :]
                    row |= {"step_s": sum(recent) / len(recent), "wall_s": time.perf_counter() - t_start}
                if diagnose:
                    stats = state.lowrank.stats
                    row |= {"captured_fraction": stats.last_captured, "residual_ratio": stats.last_residual}
                metrics.append(row)
                with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(dumps(row) + "\n")
            stopped = step == stop_after
            if stopped or (ckpt_every and step % ckpt_every == 0 and step < opts.steps):
                own = {
                    "hook": state.state_dict() if state is not None else None,
                    "gen": gen.get_state(), "order": order, "pos": pos,
                    "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "cum_numbers": cum_numbers, "step_times": list(step_times), "wall_s": time.perf_counter() - t_start,
                }  # fmt: skip
                _save_resume_point(Path(out), step, rank, opts, seed, own, {"model": model.state_dict(), "optimizer": opt.state_dict(), "metrics": metrics} if rank == 0 else None)
            if stopped:
                break
        gathered: list = [None] * opts.workers
        dist.all_gather_object(gathered, {"mean_step_s": sum(step_times) / max(len(step_times), 1), "cum_numbers": cum_numbers, "digest": _replica_digest(params)})
        if rank == 0:
            status = "diverged" if diverged_at is not None else "stopped" if stopped else "completed"
            scored = [r for r in metrics if r.get("accuracy") is not None]
            evaluated = [r for r in metrics if "accuracy" in r]
            best = max(scored, key=lambda r: r["accuracy"]) if scored else {"accuracy": None, "round": None}
            steps_done = len(step_times)
            options = {"compressor": opts.compressor, "rank": opts.rank, "update_gap": opts.update_gap, "warmup": opts.warmup}
            if opts.compressor == "greedylore":
                options["probes"] = opts.probes
            if opts.compressor in LOW_RANK:
                options["dense_head"] = opts.dense_head
            summary = {
                "mode": "ddp",
                "algorithm": f"ddp-{opts.compressor}",
                "algorithm_options": options,
                "dataset": info.get("dataset"),
                "model": info.get("model"),
                "num_parameters": dense_numbers,
                "workers": opts.workers,
                "backend": opts.backend,
                "optimizer": c.optimizer if isinstance(c.optimizer, str) else getattr(c.optimizer, "__name__", repr(c.optimizer)),
                "steps": steps_done,
                "status": status,
                "diverged_at_step": diverged_at,
                "resumed_from_step": resume_step or None,
                "batch_size_per_worker": c.batch_size,
                "best_accuracy": best["accuracy"],
                "best_round": best["round"],
                "final_accuracy": evaluated[-1]["accuracy"] if evaluated and status == "completed" else None,
                "mean_bytes_per_step": 4 * cum_numbers / max(steps_done, 1),
                "dense_bytes_per_step": 4 * dense_numbers,
                "bytes_vs_dense": cum_numbers / (dense_numbers * max(steps_done, 1)),
                "bytes_counted": "by torch's documented rule" if opts.compressor == "torch-powersgd" else "measured by the hook",
                "dense_patterns": state.options["dense_patterns"] if state is not None else None,
                "dense_matrices": [n for n, p in model.named_parameters() if p.dim() >= 2 and not state._comp.compressed(n, p.shape)] if state is not None else None,
                "replicas_identical": len({g["digest"] for g in gathered}) == 1,
                "mean_step_s_per_worker": [g["mean_step_s"] for g in gathered],
                "device": str(device),
                "machine": platform.platform(),
                "torch": torch.__version__,
                "rankfed": __version__,
            }
            if status == "completed":
                _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(out) / "model.pt")
            Path(result_file).write_text(json.dumps(summary))
        # Tear down in order: every worker done, DDP's reducer (which holds the group and
        # pending work) gone, then the group. Destroying the group under a live reducer
        # aborted a worker now and then ("terminate called without an active exception").
        dist.barrier()
        del ddp, opt, state
        gc.collect()
    finally:
        dist.destroy_process_group()


def _save_resume_point(out: Path, step: int, rank: int, opts: DdpOptions, seed: int, own: dict, shared: dict | None) -> None:
    """Every worker writes its file into resume/step-N/, worker 0 also the shared one; after a
    barrier worker 0 points resume/latest.json at it (atomically) and removes older points. A
    kill at any moment leaves the last complete point named by latest.json."""
    d = out / RESUME_DIR / f"step-{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save(own, d / f"worker-{rank}.pt")
    if shared is not None:
        _atomic_save(shared, d / "shared.pt")
    dist.barrier()
    if rank == 0:
        latest = {"format": _RESUME_FORMAT, "step": step, "workers": opts.workers, "seed": seed, "options": dataclasses.asdict(opts), "rankfed": __version__}
        _atomic_text(out / RESUME_DIR / "latest.json", json.dumps(latest, indent=2) + "\n")
        for old in (out / RESUME_DIR).glob("step-*"):
            if old.is_dir() and old.name < d.name:  # zero-padded: older points sort first
                shutil.rmtree(old, ignore_errors=True)


def read_resume_point(out_dir: str | os.PathLike) -> dict:
    """``resume/latest.json`` of a run folder: ``step``, ``workers``, ``seed``, ``options``
    (the :class:`DdpOptions` as a dict); a clear error when there is nothing to resume."""
    path = Path(out_dir)
    latest = path / RESUME_DIR / "latest.json"
    if not latest.is_file():
        if (path / "summary.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is a finished run (no {RESUME_DIR}/ left): there is nothing to resume")
        raise FileNotFoundError(f"{str(path)!r} has no resume point ({RESUME_DIR}/latest.json; checkpoint_every = 0, or stopped before the first one): start it again with --overwrite")
    try:
        saved = json.loads(latest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{latest}: not a readable resume point ({e})") from None
    if saved.get("format") != _RESUME_FORMAT:
        raise ConfigError(f"{latest}: written by another rankfed version (format {saved.get('format')!r}); cannot resume it")
    return saved


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
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Spawn the workers, wait for them, write and return the summary.

    ``model_fn() -> nn.Module`` (called after seeding torch with ``seed``) and ``data_fn() ->
    ((train_x, train_y), (test_x, test_y))`` run in every worker process; ``local`` gives the
    optimiser (``LocalTraining``: ``optimizer="sgd"`` (``momentum``) or ``"adamw"``, lr, batch
    size, ...), ``loss(output, target)`` the loss (default cross-entropy).

    ``resume=True`` continues the run in ``out_dir`` from its last resume point (written every
    ``opts.checkpoint_every`` steps); give the same ``model_fn``, ``data_fn``, ``local``,
    ``loss``, ``seed`` and ``opts`` (``opts.steps`` may be raised, ``opts.checkpoint_every``
    changed): the finished run then equals the uninterrupted one (bitwise on CPU: the same
    weights and metrics rows but for their timings). ``stop_after=N`` stops after step N as if
    killed there, with a resume point written at N and no summary.json (the returned summary
    has ``status = "stopped"``): a test hook, and a way to train in pieces.
    """
    local = local or LocalTraining()
    task = Task(loss)
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or not 1 <= stop_after < opts.steps):
        raise ValueError(f"stop_after {stop_after!r}: must be an int in [1, steps = {opts.steps})")
    if stop_after is not None and opts.compressor == "torch-powersgd":
        raise ConfigError("stop_after: torch-powersgd runs cannot be resumed, so cannot be stopped for it")
    resume_step = 0
    if resume:
        if opts.compressor == "torch-powersgd":
            raise ConfigError("resume: torch-powersgd runs cannot be resumed (PyTorch's PowerSGDState keys its memories by DDP bucket index); use --compressor powersgd")
        folder = RunFolder.existing(out_dir)
        saved = read_resume_point(folder.path)
        given = dataclasses.asdict(opts)
        differ = [k for k in given if k not in _RESUMABLE_CHANGES and saved["options"].get(k) != given[k]]
        if differ:
            raise ConfigError(f"resume {str(folder.path)!r}: options differ from the saved run's: " + ", ".join(f"{k} = {given[k]!r} (saved {saved['options'].get(k)!r})" for k in differ))
        if saved["seed"] != seed:
            raise ConfigError(f"resume {str(folder.path)!r}: seed {seed} differs from the saved run's {saved['seed']}")
        resume_step = int(saved["step"])
        if opts.steps <= resume_step:
            raise ConfigError(f"resume {str(folder.path)!r}: steps = {opts.steps} but the resume point is already at step {resume_step}")
        if stop_after is not None and stop_after <= resume_step:
            raise ValueError(f"stop_after {stop_after}: the run resumes after step {resume_step}")
        (folder.path / "summary.json").unlink(missing_ok=True)
    else:
        folder = RunFolder(out_dir, overwrite=overwrite)
        shutil.rmtree(folder.path / RESUME_DIR, ignore_errors=True)
        folder.write_text("config.toml", config_text)
    if opts.compressor != "none" and opts.warmup >= opts.steps:
        warnings.warn(f"warmup = {opts.warmup} >= steps = {opts.steps}: every step is a dense warm-up step, {opts.compressor} compresses nothing (lower --warmup)", stacklevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result = os.path.join(tmp, "init"), os.path.join(tmp, "summary.json")
        args = (model_fn, data_fn, local, task, seed, opts, init_file, str(folder.path), result, dict(info or {}), resume_step, stop_after)
        mp.spawn(_worker, args=args, nprocs=opts.workers)
        summary = json.loads(Path(result).read_text())
    summary["command"] = command
    if summary["status"] == "stopped":
        return summary
    if summary["status"] in ("completed", "diverged"):
        shutil.rmtree(folder.path / RESUME_DIR, ignore_errors=True)  # finished: nothing to resume
    folder.write_summary(summary)
    return summary
