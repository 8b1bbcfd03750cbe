"""MAPA: its algebra against references, the seeded reconstruction vector, honest bytes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.algorithms.mapa import FlatLayout, expand, reconstruction_vector, round_seed
from rankfed.errors import ConfigError
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from conftest import make_sim
from rankfed.wire import encoded_size


def _data(n_clients=3, n=24, dim=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        x = torch.randn(n, dim, generator=g) + 0.5 * i
        y = torch.randint(0, classes, (n,), generator=g)
        clients.append(ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0]))
    return clients, (torch.randn(40, dim, generator=g), torch.randint(0, classes, (40,), generator=g))


def _model(seed=0, dim=5, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 7), nn.Tanh(), nn.Linear(7, classes))  # d = 42 + 24 = 66


def _sim(algo, clients, test, cfg, kind, rounds=3, per_round=None, model=None):
    return make_sim(algo, model or _model(), clients, test, cfg, rounds=rounds, per_round=per_round, kind=kind)


def _state(sim):
    return {k: v.clone() for k, v in sim.server.global_model_state().items()}


def test_expand_is_the_row_major_outer_product_cut_to_d():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    assert expand(a, b, 5).tolist() == [10, 20, 20, 40, 30]
    assert expand(a, b, 6).tolist() == [10, 20, 20, 40, 30, 60]


def test_reconstruction_vector_is_a_function_of_the_seed():
    a1 = reconstruction_vector(1000, 123, 0.5)
    assert torch.equal(a1, reconstruction_vector(1000, 123, 0.5))
    assert not torch.equal(a1, reconstruction_vector(1000, 124, 0.5))
    assert abs(a1.std().item() - 0.5) < 0.05  # N(0, sigma^2)
    assert round_seed(0, 5, fresh_a=True) != round_seed(0, 6, fresh_a=True)
    assert round_seed(0, 5, fresh_a=False) == round_seed(0, 6, fresh_a=False)


def test_k_equal_d_with_a_of_ones_is_fedavg():
    """A = 1 and m = 1: the model is W + B, so B trains exactly as the weights do."""
    clients, test = _data()
    cfg = LocalTraining(lr=0.2, momentum=0.9, batch_size=8, epochs=2)
    d = FlatLayout(_model()).d
    mapa = _sim(get_algorithm("mapa", {"k": d, "a_dist": "ones"}), clients, test, cfg, "stateless")
    fedavg = _sim(get_algorithm("fedavg"), clients, test, cfg, "stateless")
    for rnd in (1, 2):
        mapa.run_round(rnd)
        fedavg.run_round(rnd)
    for name, value in _state(fedavg).items():
        torch.testing.assert_close(_state(mapa)[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 10, 66])
def test_one_sgd_step_on_b_matches_autograd_through_the_factorisation(k):
    """The chain-rule shortcut (dL/dB = A^T G) equals differentiating L(W + vec(A B)) directly."""
    clients, test = _data(n_clients=1)
    cfg = LocalTraining(lr=0.5, batch_size=24)  # one full-batch step of plain SGD
    model = _model()
    layout = FlatLayout(model)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sim = _sim(get_algorithm("mapa", {"k": k}), clients, test, cfg, "stateless", model=model)
    sim.run_round(1)
    got = torch.cat([sim.server.global_model_state()[n].reshape(-1) for n in layout.names])

    m = math.ceil(layout.d / k)
    a = reconstruction_vector(m, round_seed(0, 1, True), 1 / math.sqrt(m))
    b = torch.zeros(k, requires_grad=True)
    flat = w0 + expand(a, b, layout.d)
    params = dict(zip(layout.names, [flat[o : o + n].view_as(p) for o, n, p in zip(layout.offsets, layout.numels, model.parameters())]))
    loss = F.cross_entropy(torch.func.functional_call(model, params, (clients[0].x,)), clients[0].y)
    (grad_b,) = torch.autograd.grad(loss, b)
    expected = w0 + expand(a, -0.5 * grad_b, layout.d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_stateful_and_stateless_give_the_same_global_model_with_batchnorm():
    """A model with BatchNorm: its running statistics travel beside B. A stateful client that
    left them out of ``sync`` would train from stale statistics; the global models (statistics
    included) must match the stateless run's, and so must the replica the clients hold."""
    clients, test = _data(n_clients=6)
    cfg = LocalTraining(lr=0.3, momentum=0.5, batch_size=6)

    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))

    sims = {}
    for kind in ("stateful", "stateless"):
        sims[kind] = _sim(get_algorithm("mapa", {"k": 8}), clients, test, cfg, kind, rounds=4, per_round=2, model=bn_model())
        sims[kind].run()
    sf, sl = _state(sims["stateful"]), _state(sims["stateless"])
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(sl)
    start = bn_model().state_dict()
    assert not torch.allclose(sl["1.running_mean"], start["1.running_mean"])  # the statistics moved
    for name, value in sl.items():
        torch.testing.assert_close(sf[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    from rankfed.wire import decode, encode

    sim = sims["stateful"]
    sim.client.sync(decode(encode(sim.server.broadcast(5))), sim.replica)
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(sim.replica[name], sf[name], rtol=1e-5, atol=1e-6)


def test_stateful_and_stateless_train_the_same_model_and_differ_only_in_bytes():
    clients, test = _data(n_clients=6)
    cfg = LocalTraining(lr=0.3, momentum=0.5, batch_size=6)
    k = 8
    runs = {}
    for kind in ("stateful", "stateless"):
        sim = _sim(get_algorithm("mapa", {"k": k}), clients, test, cfg, kind, rounds=4, per_round=2)
        hist = sim.run()
        runs[kind] = (sim, hist)
    sf, sl = runs["stateful"], runs["stateless"]
    for name, value in _state(sl[0]).items():
        torch.testing.assert_close(_state(sf[0])[name], value, rtol=1e-5, atol=1e-6)
    # The replica every stateful client holds equals the server's model once it has
    # applied the next round's broadcast (which carries the last round's B_bar).
    from rankfed.wire import decode, encode

    sf[0].client.sync(decode(encode(sf[0].server.broadcast(5))), sf[0].replica)
    for name, value in sf[0].replica.items():
        torch.testing.assert_close(value, _state(sf[0])[name], rtol=1e-5, atol=1e-6)
    d = FlatLayout(_model()).d
    up = encoded_size({"@num_samples": 0, "@train_loss": 0.0, "B": torch.zeros(k)})
    for rec in sf[1] + sl[1]:
        assert rec.uplink_bytes_per_client == [up, up]
    # Stateful: every one of the 6 clients gets the broadcast (seed, and B_bar after round 1).
    first = encoded_size({"@round": 1, "@seed": 0})
    later = encoded_size({"@round": 2, "@seed": 0, "@prev_seed": 0, "B_prev": torch.zeros(k)})
    assert [r.downlink_bytes for r in sf[1]] == [6 * first] + [6 * later] * 3
    # Stateless: each of the 2 sampled clients downloads the whole model.
    full = encoded_size({"@round": 1, "@seed": 0, **{n: p for n, p in _model().state_dict().items()}})
    assert all(r.downlink_bytes == 2 * full for r in sl[1])
    assert full > 4 * d and later < 4 * k + 100


def test_uplink_is_k_numbers_plus_a_small_header():
    clients, test = _data()
    for k in (1, 16, 66):
        sim = _sim(get_algorithm("mapa", {"k": k}), clients, test, LocalTraining(batch_size=8), "stateful")
        rec = sim.run_round(1)
        expected = encoded_size({"@num_samples": 0, "@train_loss": 0.0, "B": torch.zeros(k)})
        assert rec.uplink_bytes_per_client == [expected] * 3
        # header: magic+count 8, "@num_samples" 2+12+1+8, "@train_loss" 2+11+1+8, "B" 2+1+1+1+1+4
        assert expected == 4 * k + 63


def test_frozen_a_keeps_one_subspace():
    """With fresh_a = false every round's update lies in the span of the same A's blocks."""
    clients, test = _data()
    k = 6
    model = _model()
    layout = FlatLayout(model)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sim = _sim(get_algorithm("mapa", {"k": k, "fresh_a": False}), clients, test, LocalTraining(lr=0.1, batch_size=8), "stateful", rounds=3, model=model)
    sim.run()
    w = torch.cat([sim.server.global_model_state()[n].reshape(-1) for n in layout.names])
    m = math.ceil(layout.d / k)
    a = reconstruction_vector(m, round_seed(0, 0, False), 1 / math.sqrt(m))
    # W - W0 = vec(A (B1 + B2 + B3)): solve for the summed B and check it explains the whole change.
    delta = torch.zeros(m * k)
    delta[: layout.d] = w - w0
    b_sum = (a @ delta.view(m, k)) / (a @ a)
    torch.testing.assert_close(expand(a, b_sum, layout.d), w - w0, rtol=1e-4, atol=1e-6)
    assert (w - w0).abs().max() > 1e-4  # and it did move


def test_k_out_of_range_names_k_and_d():
    clients, test = _data()
    with pytest.raises(ConfigError, match=r"algorithm\.k = 67: must be between 1 and d = 66"):
        _sim(get_algorithm("mapa", {"k": 67}), clients, test, LocalTraining(), "stateful")
    with pytest.raises(ConfigError, match=r"algorithm\.k = 0"):
        get_algorithm("mapa", {"k": 0})


def test_mapa_followed_by_8_bit_quantisation_of_b():
    clients, test = _data()
    k = 40
    sim = _sim(get_algorithm("mapa", {"k": k, "compressor": "qsgd", "qsgd_bits": 8}), clients, test, LocalTraining(lr=0.3, batch_size=8), "stateful", rounds=5)
    hist = sim.run()
    plain = encoded_size({"@num_samples": 0, "@train_loss": 0.0, "B": torch.zeros(k)})
    assert all(b < plain - 2 * k for r in hist for b in r.uplink_bytes_per_client)  # ~1 byte per entry instead of 4
    assert hist[-1].train_loss < hist[0].train_loss


def test_mapa_learns_digits_end_to_end(tmp_path):
    from rankfed.app.config import parse_config
    from rankfed.app.experiment import run_experiment

    cfg = parse_config(
        {
            "task": {"dataset": "digits", "partition": "iid", "model": "mlp", "model_options": {"hidden": [32]}},
            "federation": {"clients": 5, "rounds": 15, "eval_every": 5},
            "client": {"lr": 0.5, "batch_size": 32},
            "algorithm": {"name": "mapa", "k": 128},
        }
    )
    s = run_experiment(cfg, tmp_path / "run")
    assert s["client_kind"] == "stateful"
    assert s["best_accuracy"] > 0.5
    assert s["uplink_vs_fedavg"] < 0.1  # 128 of 2,410 parameters
