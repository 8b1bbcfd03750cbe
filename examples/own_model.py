"""Your own model, data, loss and optimiser under FedAvg, FedLoRU and MAPA, from Python.

A small ResNet with BatchNorm (defined here, not in rankfed), trained on a list of torch
Datasets (one per client, label-skewed), with a label-smoothing loss and ``torch.optim.Adam``;
the three runs are written as run folders with a comparison table and plot, and ``rankfed
plot`` draws them::

    python examples/own_model.py --out runs/own_model                 # digits (no download)
    python examples/own_model.py --data fmnist --rounds 50 --out runs/own_fmnist
    rankfed plot runs/own_model --out runs/own_model/plot.png

The same model and data run from an experiment file (``examples/own_model.toml``, which names
them by import path) with ``rankfed run`` / ``rankfed flower run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import rankfed as rf


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A two-stage ResNet for small grey images (8x8 digits or 28x28 Fashion-MNIST)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def smooth_ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing 0.1 (a mean over samples, so clients may train as a vectorised cohort)."""
    return F.cross_entropy(output, target, label_smoothing=0.1)


def _images(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if data == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        return x[:1500], y[:1500], x[1500:], y[1500:]
    from rankfed.data import load_dataset  # the IDX reader (Debian's dataset-fashion-mnist)

    ds = load_dataset("fmnist")
    return ds.train_x, ds.train_y, ds.test_x, ds.test_y


def load_clients(data: str = "digits", num_clients: int = 10, alpha: float = 0.5, seed: int = 0, samples: int = 0):
    """(clients, test): ``num_clients`` torch Datasets with Dirichlet(alpha) label skew, and the test pair."""
    x, y, tx, ty = _images(data)
    if samples:
        x, y = x[:samples], y[:samples]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(int(y.max()) + 1):  # each class split over the clients by Dirichlet proportions
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    clients = [TensorDataset(x[p], y[p]) for p in parts if p]
    return clients, (tx, ty)


def main(argv: list[str] | None = None) -> rf.Comparison:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", choices=("digits", "fmnist"))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--samples", type=int, default=0, help="use only this many training samples (0 = all)")
    p.add_argument("--out", default="runs/own_model")
    args = p.parse_args(argv)
    clients, test = load_clients(args.data, args.clients, samples=args.samples)
    fed = rf.Federation(
        model=TinyResNet,
        clients=clients,
        test=test,
        local=rf.LocalTraining(optimizer=torch.optim.Adam, lr=3e-3, epochs=1, batch_size=32),
        loss=smooth_ce,
        seed=0,
    )
    comparison = rf.compare(
        fed,
        {
            "fedavg": rf.FedAvg(),
            # the convolutions of the blocks as rank-4 factors, the stem and the head in full
            "fedloru": rf.FedLoRU(rank=4, tau=5, patterns=["layer*conv*"]),
            # the whole update as one matrix: 256 numbers uplinked per client and round
            "mapa": (rf.MAPA(k=256), rf.LocalTraining(optimizer=torch.optim.Adam, lr=3e-2, epochs=1, batch_size=32)),
        },
        rounds=args.rounds,
        clients_per_round=min(args.per_round, len(clients)),
        out=args.out,
        overwrite=True,
        title=f"TinyResNet on {args.data}: FedAvg, FedLoRU, MAPA",
    )
    print(comparison.markdown())
    print(f"runs and comparison.png in {Path(args.out)}")
    return comparison


if __name__ == "__main__":
    main()
