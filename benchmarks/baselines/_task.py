"""The task every baseline runs, taken from rankfed itself so the work is identical.

FedAvg on Fashion-MNIST over 100 IID clients (rankfed's split: about 540 training samples each
after its 10% holdout), model cnn2 with rankfed's seeded initial weights, 1 local epoch, batch 32,
SGD(momentum 0.9) with rankfed's default lr and weight decay, a fresh optimiser per client and
round, cross-entropy loss; server = sample-weighted mean of the uploaded weights.

Used by ``flower_sim.py`` (and the Flower ClientApp in ``_flower_apps.py``, inside each Ray
worker) and by ``pfl_sim.py``. It imports only rankfed, torch and the standard library, so it
runs in either baseline venv.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_CLIENTS = 100


def overrides(participation: float, rounds: int) -> list[str]:
    """rankfed's config overrides for the benchmark task (as benchmarks/sim_speed.py has them)."""
    return [
        "task.dataset=fmnist",
        "task.model=cnn2",
        f"federation.clients={NUM_CLIENTS}",
        f"federation.participation={participation}",
        f"federation.rounds={rounds}",
        "client.momentum=0.9",
        "client.batch_size=32",
        "federation.eval_every=1000",
    ]


@lru_cache(maxsize=None)
def experiment(participation: float = 0.1, rounds: int = 5):
    """rankfed's experiment (data split over clients, seeded model): built once per process.

    The split does not depend on participation or rounds (only on clients, seed, partition and
    holdout), so a worker may build it with the defaults and get the server's split.
    """
    from rankfed.app.config import load_config
    from rankfed.app.experiment import build_experiment

    cfg = load_config(None, overrides(participation, rounds))
    return build_experiment(cfg)


def new_model():
    """A fresh cnn2 (same architecture as rankfed's); weights are loaded from the server."""
    import copy

    return copy.deepcopy(experiment().model)


def local_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, momentum: float, weight_decay: float, batch_size: int, seed: int) -> tuple[int, float]:
    """One local epoch as rankfed's LocalTrainer does it: a fresh SGD, one seeded shuffle, index
    gathers of ``batch_size`` (last batch partial), cross-entropy. Returns (samples, mean loss)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * idx.numel()
    return n, loss_sum / max(n, 1)


@torch.no_grad()
def test_accuracy(state_dict: dict[str, torch.Tensor]) -> float:
    """Accuracy of the given weights on Fashion-MNIST's test split (a sanity check; not timed)."""
    exp = experiment()
    model = new_model()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
    model.eval()
    x, y = exp.dataset.test_x, exp.dataset.test_y
    correct = 0
    for s in range(0, len(y), 2048):
        correct += int((model(x[s : s + 2048]).argmax(1) == y[s : s + 2048]).sum())
    return correct / len(y)


def result(*, engine: str, version: str, participation: float, clients_per_round: int, rounds: int, round_s: list[float], samples_per_round: float, notes: str, **extra) -> dict:
    """The output contract: median over rounds 2..R (round 1 carries warm-up), rounds/s, samples/s."""
    med = median_after_first(round_s)
    out = {
        "engine": engine,
        "version": version,
        "participation": participation,
        "clients_per_round": clients_per_round,
        "rounds": rounds,
        "median_round_s": med,
        "round_s": round_s,
        "rounds_per_s": 1.0 / med,
        "client_samples_per_s": samples_per_round / med,
        "samples_per_round": samples_per_round,
        "notes": notes,
    }
    out.update(extra)
    return out


def bare_check(bare, med: float, diff: float, interleaved: bool, load_before: list[float], load_after: list[float]) -> dict:
    """The result fields of the bare-loop check (``bare``: the Replayer, or None under --no-bare)
    and the machine's load around the run, the same for every engine."""
    bare_med = median_after_first(bare.times) if bare else float("nan")
    return {
        "bare_round_s": bare.times if bare else None,
        "bare_median_round_s": bare_med,
        "engine_over_bare": med / bare_med,
        "bare_interleaved": interleaved,
        "bare_max_abs_weight_diff": diff,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def mean_samples_per_round(samples: list[int]) -> float:
    """Client-samples per round, rounds 2..R (those the median covers)."""
    return sum(samples[1:]) / len(samples[1:]) if len(samples) > 1 else samples[0]


def emit(res: dict, json_path: str | None) -> None:
    """Print and write the result; NaN (a skipped figure) is written as null, which JSON has."""
    res = {k: (None if isinstance(v, float) and v != v else v) for k, v in res.items()}
    text = json.dumps(res, indent=2)
    print(text, flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n", encoding="utf-8")


class Replayer:
    """Bare-PyTorch FedAvg over the same clients and shuffle seeds an engine used, one round at a
    time, so the scripts can run each bare round right after the engine's round (interleaved, so
    whatever else loads the machine hits both alike) and keep it out of the engine's round time.

    ``step(cohort)`` takes the round's (client id, shuffle seed) pairs. ``state`` ends as the
    final weights (to compare with the engine's: the same work gives the same model up to float
    summation order); ``times`` holds each bare round's seconds in this process.
    """

    def __init__(self, initial_state: dict[str, torch.Tensor]):
        exp = experiment()
        self.clients = exp.clients
        self.c = exp.cfg.client
        self.model = new_model()
        self.state = {k: v.detach().clone().float() for k, v in initial_state.items()}
        self.times: list[float] = []

    def step(self, cohort: list[tuple[int, int]]) -> None:
        c = self.c
        t0 = time.perf_counter()
        acc = {k: torch.zeros_like(v) for k, v in self.state.items()}
        total = 0
        for cid, seed in cohort:
            self.model.load_state_dict(self.state)
            data = self.clients[cid]
            n, _ = local_train(self.model, data.x, data.y, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, batch_size=c.batch_size, seed=seed)
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    acc[k].add_(v, alpha=n)
            total += n
        self.state = {k: v / total for k, v in acc.items()}
        self.times.append(time.perf_counter() - t0)


def replay(initial_state: dict[str, torch.Tensor], rounds: list[list[tuple[int, int]]]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """All rounds of :class:`Replayer` at once: (final weights, seconds per round)."""
    r = Replayer(initial_state)
    for cohort in rounds:
        r.step(cohort)
    return r.state, r.times


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: a load over its core count means
    something else competed with the run)."""
    import os

    return [round(x, 2) for x in os.getloadavg()]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((torch.as_tensor(a[k]).float() - torch.as_tensor(b[k]).float()).abs().max()) for k in a)


class Stopwatch:
    """Round times: ``start()`` when a round begins, ``lap()`` when it ends (what runs between a
    lap and the next start, such as the interleaved bare round, is not counted)."""

    def __init__(self) -> None:
        self.laps: list[float] = []
        self.first_start: float | None = None
        self._t: float | None = None

    def start(self) -> None:
        self._t = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._t

    def lap(self) -> None:
        assert self._t is not None, "lap() without start()"
        self.laps.append(time.perf_counter() - self._t)
        self._t = None
