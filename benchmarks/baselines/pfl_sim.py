"""Baseline: the rankfed benchmark task on Apple's pfl-research simulator (pfl, PyTorch).

FedAvg, Fashion-MNIST over 100 IID clients (rankfed's split and seeded initial cnn2), 1 local
epoch, batch 32, SGD momentum 0.9, rankfed's lr. pfl's pieces: ``PyTorchModel`` (local optimiser
``SGD(momentum=0.9)``, central optimiser ``SGD(lr=1)`` so the update is the weighted mean of the
clients' weights), ``FederatedAveraging``, ``SimulatedBackend`` with ``WeightByDatapoints``,
``FederatedDataset`` over rankfed's clients, pfl's own local SGD loop.

Run in the pfl venv (``bash benchmarks/baselines/setup.sh pfl``)::

    .bench-venvs/pfl/bin/python benchmarks/baselines/pfl_sim.py --participation 0.1 --rounds 5 --json out.json

Round time = time between pfl's ``after_central_iteration`` callbacks (the first measured from
``on_train_begin``); median over rounds 2..R.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402

import _task  # noqa: E402


class PflNet(torch.nn.Module):
    """rankfed's cnn2 with the ``loss`` and ``metrics`` methods pfl's PyTorchModel requires."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y):
        self.train()
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x, y):
        self.eval()
        return {"loss": Weighted(float(F.cross_entropy(self.net(x), y, reduction="sum")), len(y))}


class DistinctRandomSampler:
    """Seeded user sampler: walks random permutations of the clients, so each cohort of a size
    dividing 100 (10 or 100) is that many distinct clients. (pfl's 'random' samples with
    replacement; its 'minimize_reuse' cycles in a fixed order.)"""

    def __init__(self, ids, seed: int = 0):
        self.ids = list(ids)
        self.rng = np.random.default_rng(seed)
        self.buf: list[int] = []

    def __call__(self) -> int:
        if not self.buf:
            self.buf = [int(i) for i in self.rng.permutation(self.ids)]
        return self.buf.pop()


class Timer(TrainingProcessCallback):
    """Round boundaries from pfl's callbacks; after each round, the same round in a bare loop
    (untimed for pfl) when ``bare`` is given."""

    def __init__(self, watch: _task.Stopwatch, cohorts, bare: _task.Replayer | None):
        self.watch, self.cohorts, self.bare = watch, cohorts, bare

    def on_train_begin(self, *, model) -> Metrics:
        self.watch.start()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.watch.lap()
        if self.bare is not None:
            self.bare.step(self.cohorts(central_iteration))
        self.watch.start()
        return False, Metrics()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--participation", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-interleave", action="store_true", help="replay the bare rounds after the run, not between pfl's rounds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (pfl and the bare loop); 0 = torch's default")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-loop check and reference (saves time at full participation)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    np.random.seed(0)  # pfl draws its per-iteration seeds from numpy's global generator
    exp = _task.experiment(args.participation, args.rounds)
    cfg = exp.cfg
    k = cfg.federation.clients_per_round
    initial = {k_: v.detach().clone() for k_, v in exp.model.state_dict().items()}

    # A user's dataset, made when pfl samples the user: rankfed's tensors in a fresh seeded
    # shuffle (pfl's Dataset.iter slices in order and does not shuffle), so the minibatches are
    # the ones rankfed's LocalTrainer would draw with the same seed.
    calls: list[tuple[int, int]] = []
    seed_rng = np.random.default_rng(1)

    def make_dataset(uid: int) -> Dataset:
        seed = int(seed_rng.integers(2**31))
        calls.append((uid, seed))
        d = exp.clients[uid]
        perm = torch.randperm(len(d.y), generator=torch.Generator().manual_seed(seed))
        return Dataset(raw_data=[d.x[perm], d.y[perm]], user_id=str(uid))

    fed_data = FederatedDataset(make_dataset, DistinctRandomSampler(range(_task.NUM_CLIENTS), seed=0))
    backend = SimulatedBackend(training_data=fed_data, val_data=fed_data, postprocessors=[WeightByDatapoints()])

    net = PflNet(_task.new_model())
    net.net.load_state_dict(initial)
    model = PyTorchModel(
        model=net,
        local_optimizer_create=functools.partial(torch.optim.SGD, momentum=cfg.client.momentum, weight_decay=cfg.client.weight_decay),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    algo_params = NNAlgorithmParams(
        central_num_iterations=args.rounds,
        evaluation_frequency=10**9,  # pfl still evaluates each user at iteration 0 (0 % f == 0): round 1 only
        train_cohort_size=k,
        val_cohort_size=0,
    )
    train_params = NNTrainHyperParams(local_num_epochs=cfg.client.epochs, local_learning_rate=cfg.client.lr, local_batch_size=cfg.client.batch_size)
    eval_params = NNEvalHyperParams(local_batch_size=1024)

    watch = _task.Stopwatch()
    bare = None if (args.no_interleave or args.no_bare) else _task.Replayer(initial)
    load_before = _task.load_average()
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=algo_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        model_eval_params=eval_params,
        callbacks=[Timer(watch, lambda it: calls[it * k : (it + 1) * k], bare)],
    )
    total = time.perf_counter() - t0
    load_after = _task.load_average()
    round_s = watch.laps
    if len(round_s) != args.rounds or len(calls) != args.rounds * k:
        raise SystemExit(f"unexpected run: {len(round_s)} rounds timed, {len(calls)} users trained")
    cohorts = [calls[r * k : (r + 1) * k] for r in range(args.rounds)]
    distinct = all(len({u for u, _ in c}) == k for c in cohorts)
    samples = [sum(len(exp.clients[u].y) for u, _ in c) for c in cohorts]
    final = {k_: v.detach().clone() for k_, v in net.net.state_dict().items()}
    acc = _task.test_accuracy(final)
    interleaved = bare is not None
    if bare is None and not args.no_bare:
        bare = _task.Replayer(initial)
        for cohort in cohorts:
            bare.step(cohort)
    diff = _task.max_abs_diff(bare.state, final) if bare else float("nan")
    bare_med = _task.median_after_first(bare.times) if bare else float("nan")
    med = _task.median_after_first(round_s)
    pfl_version = version("pfl")
    notes = (
        f"pfl {pfl_version} SimulatedBackend, single process (no worker processes, no Horovod), "
        f"{torch.get_num_threads()} torch threads; FederatedAveraging + PyTorchModel (local SGD momentum "
        f"{cfg.client.momentum}, fresh per user; central SGD lr 1.0) + WeightByDatapoints. Client data: rankfed's "
        f"split held in memory (cached for the whole run); each sampled user's Dataset is built on sampling as a "
        f"seeded permutation copy of its tensors (pfl does not shuffle), which is inside the round time. Cohorts of "
        f"{k} {'distinct' if distinct else 'NOT all distinct'} clients from a seeded permutation sampler. pfl evaluates "
        f"each user before and after training at central iteration 0 (round 1 only, excluded from the median). "
        f"Round time = gap between after_central_iteration callbacks; median over rounds 2..R. Whole run {total:.1f} s. "
        f"Test accuracy after {args.rounds} rounds: {acc:.4f}. " + ("No bare-loop check (--no-bare). " if bare is None else f"Check: a bare PyTorch loop over the same clients and "
        f"shuffles ({'interleaved with' if interleaved else 'after'} pfl's rounds, same process) ends {diff:.1e} (max abs "
        f"weight difference) from pfl's model and took a median {bare_med:.3f} s/round: pfl/bare = {med / bare_med:.2f}x. ") + f"Load average before/after: {load_before} / {load_after} on {os.cpu_count()} cores."
    )
    res = _task.result(
        engine="pfl-research",
        version=pfl_version,
        participation=args.participation,
        clients_per_round=k,
        rounds=args.rounds,
        round_s=round_s,
        samples_per_round=_task.mean_samples_per_round(samples),
        notes=notes,
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        total_s=total,
        test_accuracy=acc,
        **_task.bare_check(bare, med, diff, interleaved, load_before, load_after),
    )
    _task.emit(res, args.json)


if __name__ == "__main__":
    main()
