"""A regression (float targets, MSE) under MAPA and FedAvg: loss and your metrics, no accuracy.

Each client holds samples of the same smooth function of 8 features with a client-specific
input shift (non-IID); the model is a small MLP; the metrics are the mean absolute error and
R^2 on a shared test set::

    python examples/regression.py --out runs/regression
    rankfed plot runs/regression --out runs/regression/plot.png   # test loss (MSE) against bytes
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rankfed as rf


def target(x: torch.Tensor) -> torch.Tensor:
    """The function to learn: (N, 8) -> (N, 1)."""
    return (torch.sin(x[:, :4]).sum(1, keepdim=True) + 0.5 * x[:, 4:].pow(2).sum(1, keepdim=True) / 4).float()


def make_data(num_clients: int = 8, n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(num_clients):
        x = torch.randn(n, 8, generator=g) + 0.3 * (i - num_clients / 2) / num_clients  # each client's inputs shifted
        clients.append((x, target(x) + 0.05 * torch.randn(n, 1, generator=g)))
    tx = torch.randn(1000, 8, generator=g)
    return clients, (tx, target(tx))


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs - targets).abs().mean().item()


def r2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return 1.0 - ((outputs - targets).pow(2).sum() / (targets - targets.mean()).pow(2).sum()).item()


def regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def main(argv: list[str] | None = None) -> rf.Comparison:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="runs/regression")
    args = p.parse_args(argv)
    clients, test = make_data(args.clients)
    fed = rf.Federation(regressor, clients, test, loss=F.mse_loss, metrics={"mae": mae, "r2": r2}, local=rf.LocalTraining(lr=0.05, momentum=0.9, batch_size=32), seed=0)
    comparison = rf.compare(
        fed,
        {"fedavg": rf.FedAvg(), "mapa": (rf.MAPA(k=128), rf.LocalTraining(lr=0.5, momentum=0.9, batch_size=32))},
        rounds=args.rounds,
        clients_per_round=max(1, args.clients // 2),
        out=args.out,
        overwrite=True,
        title="regression (MSE): FedAvg vs MAPA",
    )
    for label, result in comparison.results.items():
        last = result.history[-1]
        print(f"{label}: test MSE {last['loss']:.4f}, MAE {last['mae']:.4f}, R^2 {last['r2']:.3f}; uplink {result.bytes['uplink'] / 1e6:.3f} MB")
    return comparison


if __name__ == "__main__":
    main()
