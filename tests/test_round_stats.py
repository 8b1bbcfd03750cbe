"""The round's statistics: the training loss is a sample-weighted mean over the clients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankfed as rf
from rankfed.algorithms import get_algorithm


def _clients():
    g = torch.Generator().manual_seed(3)
    small = (torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))
    big_x = 6 * torch.randn(30, 4, generator=g)  # larger inputs: a far larger loss
    big = (big_x, torch.randint(0, 3, (30,), generator=g))
    return [small, big]


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


@pytest.mark.parametrize("algorithm", ["fedavg", "mapa"])
def test_round_train_loss_is_weighted_by_samples_not_by_clients(algorithm):
    clients = _clients()
    # one batch holding a client's whole data and a vanishing lr: each client's reported
    # training loss is its initial model's mean loss on its own data
    fed = rf.Federation(_model, clients, algorithm=get_algorithm(algorithm, {"k": 8} if algorithm == "mapa" else {}), local=rf.LocalTraining(lr=1e-9, batch_size=64))
    res = fed.run(1)
    with torch.no_grad():
        start = fed.initial_model()
        losses = [F.cross_entropy(start(x), y).item() for x, y in clients]
    by_sample = (10 * losses[0] + 30 * losses[1]) / 40
    by_client = (losses[0] + losses[1]) / 2
    assert abs(by_sample - by_client) > 0.1 * by_sample  # the two means are far apart here
    assert res.records[0].train_loss == pytest.approx(by_sample, rel=1e-4)
