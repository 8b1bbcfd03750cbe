"""FedAvg and the simulator: equivalences with hand-written references, bytes, determinism."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.protocol import ClientContext, float_state
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from rankfed.server import sample_clients
from conftest import make_sim
from rankfed.local import LocalTrainer
from rankfed.wire import encode, encoded_size


def _blobs(n_clients, sizes, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        n = sizes[i]
        x = torch.randn(n, dim, generator=g) + i
        y = torch.randint(0, classes, (n,), generator=g)
        clients.append(ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0]))
    test_x = torch.randn(50, dim, generator=g)
    test_y = torch.randint(0, classes, (50,), generator=g)
    return clients, (test_x, test_y)


def _model(dim=6, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, classes))


def _sim(clients, test, client_cfg, rounds=1, per_round=None, seed=0, model=None):
    return make_sim(get_algorithm("fedavg"), model or _model(), clients, test, client_cfg, rounds=rounds, per_round=per_round, seed=seed)


def test_one_client_one_full_batch_step_equals_centralised_sgd():
    clients, test = _blobs(1, [40])
    cfg = LocalTraining(optimizer="sgd", lr=0.3, momentum=0.9, weight_decay=1e-3, batch_size=40, epochs=1)
    model = _model()
    ref = copy.deepcopy(model)
    sim = _sim(clients, test, cfg, model=model)
    sim.run_round(1)

    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    F.cross_entropy(ref(clients[0].x), clients[0].y).backward()
    opt.step()
    got = sim.server.global_model_state()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


def test_server_state_is_sample_weighted_mean_of_client_models():
    clients, test = _blobs(3, [10, 30, 60])
    cfg = LocalTraining(lr=0.1, batch_size=8, epochs=2)
    model = _model()
    sim = _sim(clients, test, cfg, model=model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sim.run_round(1)

    # Re-run each client's local work by hand from the same start and seed.
    algo = get_algorithm("fedavg")
    trainer = LocalTrainer(cfg, total_rounds=1, seed=0)
    local_models = []
    for cid, data in enumerate(clients):
        m = _model()
        m.load_state_dict(start)
        ctx = ClientContext(cid, 1, m, data, trainer)
        algo.make_client(m, sim.ctx).fit({"@round": 1, **{k: v.clone() for k, v in start.items()}}, ctx)
        local_models.append(m.state_dict())
    total = 100.0
    for name in start:
        expect = sum(lm[name] * (c.num_samples / total) for lm, c in zip(local_models, clients))
        torch.testing.assert_close(sim.server.global_model_state()[name], expect, rtol=1e-5, atol=1e-6)


def test_uplink_and_downlink_bytes_are_the_serialised_lengths():
    clients, test = _blobs(4, [20, 20, 20, 20])
    model = _model()
    d = sum(p.numel() for p in model.parameters())
    sim = _sim(clients, test, LocalTraining(batch_size=10), per_round=2, model=model)
    rec = sim.run_round(1)
    expected_up = encoded_size({"@num_samples": 0, "@train_loss": 0.0, **float_state(model)})
    expected_down = encoded_size({"@round": 1, **float_state(model)})
    assert rec.uplink_bytes_per_client == [expected_up] * 2
    assert rec.downlink_bytes_per_client == [expected_down] * 2
    assert rec.uplink_bytes == 2 * expected_up and rec.cum_downlink_bytes == 2 * expected_down
    # About 4*d bytes: the header is a few bytes per tensor.
    assert 4 * d < expected_up < 4 * d + 30 * 4 + 64


def test_bytes_are_measured_from_the_wire_not_computed(monkeypatch):
    """Charging goes through encode(): a fatter encoding shows up in the counts."""
    import rankfed.sim.simulator as simmod

    clients, test = _blobs(2, [10, 10])
    sim = _sim(clients, test, LocalTraining(batch_size=10))
    base = sim.run_round(1).uplink_bytes
    monkeypatch.setattr(simmod, "encode", lambda p: encode(p) + b"")  # same bytes
    sim2 = _sim(clients, test, LocalTraining(batch_size=10))
    assert sim2.run_round(1).uplink_bytes == base
    monkeypatch.setattr(simmod, "encode", lambda p: encode({**p, "@pad": "x" * 100}))
    sim3 = _sim(clients, test, LocalTraining(batch_size=10))
    assert sim3.run_round(1).uplink_bytes == base + 2 * (2 + 4 + 1 + 4 + 100)


def test_same_seed_same_metrics_different_seed_different():
    clients, test = _blobs(6, [15] * 6)
    cfg = LocalTraining(lr=0.1, momentum=0.5, batch_size=4)

    def run(seed):
        sim = _sim(clients, test, cfg, rounds=4, per_round=3, seed=seed, model=_model(seed=seed))
        return [(r.clients, r.accuracy, r.loss, r.train_loss, r.uplink_bytes) for r in sim.run()]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampling_is_seeded_sized_and_varies_by_round():
    a = sample_clients(0, 1, 100, 10)
    assert a == sample_clients(0, 1, 100, 10)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert a != sample_clients(0, 2, 100, 10)
    assert a != sample_clients(1, 1, 100, 10)
    counts = torch.zeros(100)
    for rnd in range(1, 501):
        counts[sample_clients(0, rnd, 100, 10)] += 1
    assert counts.min() > 20 and counts.max() < 85  # each client picked ~50 times out of 500 rounds


def test_cosine_schedule_and_step_counts():
    t = LocalTrainer(LocalTraining(lr=1.0, lr_schedule="cosine", lr_min=0.1), total_rounds=11)
    assert t.lr_at(1) == pytest.approx(1.0)
    assert t.lr_at(6) == pytest.approx(0.55)
    assert t.lr_at(11) == pytest.approx(0.1)
    assert LocalTrainer(LocalTraining(lr=0.3), 10).lr_at(7) == 0.3
    t = LocalTrainer(LocalTraining(batch_size=32, epochs=2), 1)
    assert t.num_steps(600) == 2 * math.ceil(600 / 32)
    assert LocalTrainer(LocalTraining(steps=5), 1).num_steps(600) == 5


def test_local_steps_visit_every_sample_once_per_epoch():
    t = LocalTrainer(LocalTraining(batch_size=7, epochs=3), 1)
    batches = list(t.batches(20, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert [len(b) for b in batches] == [7, 7, 6] * 3
    for e in range(3):
        assert sorted(torch.cat(batches[3 * e : 3 * e + 3]).tolist()) == list(range(20))


def test_adamw_client_trains_and_lowers_loss():
    clients, test = _blobs(2, [64, 64])
    cfg = LocalTraining(optimizer="adamw", lr=0.01, weight_decay=0.01, batch_size=16, epochs=3)
    sim = _sim(clients, test, cfg, rounds=5)
    hist = sim.run()
    assert hist[-1].train_loss < hist[0].train_loss
