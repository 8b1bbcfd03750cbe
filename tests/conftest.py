"""Shared test helpers: small synthetic clients and a simulator built through the public API."""

from __future__ import annotations

import pytest
import torch

import rankfed as rf
from rankfed.local import ClientData


def blobs(n_clients: int, sizes, shape=(6,), classes: int = 3, seed: int = 0, shift: float = 1.0, test_size: int = 50, holdout: int = 0):
    """``n_clients`` clients of Gaussian inputs shaped ``shape`` (client i shifted by i * shift)
    with random integer labels, and a test pair; the last ``holdout`` samples of each client are
    its held-out split."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        n = sizes[i] if not isinstance(sizes, int) else sizes
        x = torch.randn(n + holdout, *shape, generator=g) + shift * i
        y = torch.randint(0, classes, (n + holdout,), generator=g)
        clients.append(ClientData(x[:n], y[:n], x[n:], y[n:]))
    test = (torch.randn(test_size, *shape, generator=g), torch.randint(0, classes, (test_size,), generator=g))
    return clients, test


# A user's own module (model, data loader, loss) for the import-path and Flower tests, written to a temp folder.
USER_CODE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.body(x)


def load_clients(seed=0, num_clients=4):
    g = torch.Generator().manual_seed(seed)
    clients = [TensorDataset(torch.randn(20, 6, generator=g) + i, torch.randint(0, 3, (20,), generator=g)) for i in range(num_clients)]
    return clients, (torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g))


def smooth(output, target):
    return torch.nn.functional.cross_entropy(output, target, label_smoothing=0.1)
'''


def make_sim(algo, model, clients, test, local=None, *, rounds: int = 1, per_round: int | None = None, seed: int = 0, kind: str = "stateless", loss=None, **options):
    """A :class:`rankfed.sim.Simulator` of ``algo`` on these clients, built as a user would
    (``rf.Federation(...).simulator(...)``)."""
    fed = rf.Federation(model, clients, test, algorithm=algo, local=local or rf.LocalTraining(), loss=loss, seed=seed)
    return fed.simulator(rounds, per_round, client_kind=kind, **options)


@pytest.fixture
def strict_json():
    """A JSON reader that refuses NaN and infinities (what every metrics file must be)."""
    import json

    def parse_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return lambda text: json.loads(text, parse_constant=parse_constant)


def evaluate(model, x, y, batch_size: int = 1024):
    """(accuracy, mean loss) of ``model`` on ``(x, y)`` with the default task (cross-entropy)."""
    result = rf.Task().evaluate(model, ClientData(x, y).batches(batch_size))
    return result["accuracy"], result["loss"]
