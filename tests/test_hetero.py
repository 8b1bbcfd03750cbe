"""mFedLoRU: nested factors recovered as the paper's eq. (37); opting out is FedLoRU; tiers."""

import pytest
import torch
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.algorithms.hetero import tier_of_clients
from rankfed.errors import ConfigError
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from conftest import make_sim


def _data(n_clients=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        x = torch.randn(12 + 4 * i, 2, 8, 8, generator=g)
        clients.append(ClientData(x=x, y=torch.randint(0, 3, (len(x),), generator=g), val_x=x[:0], val_y=torch.zeros(0, dtype=torch.long)))
    return clients, (torch.randn(20, 2, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 3))


def _sim(algo, kind="stateful", rounds=4, per_round=4):
    clients, test = _data()
    return make_sim(algo, _model(), clients, test, LocalTraining(lr=0.1, momentum=0.5, batch_size=8), rounds=rounds, per_round=per_round, kind=kind)


BASE = {"rank": 4, "alpha": 8.0, "patterns": ["0", "2", "5"]}
TIERS = [{"fraction": 0.5, "rank_a": 2, "rank_b": 3}, {"fraction": 0.25, "rank_a": 0, "rank_b": 1}, {"fraction": 0.25, "rank_a": 0, "rank_b": 0}]


def test_tiers_take_consecutive_client_ids():
    assert tier_of_clients(TIERS, 4) == [0, 0, 1, 2]
    assert tier_of_clients(TIERS, 8) == [0, 0, 0, 0, 1, 1, 2, 2]


def test_server_recovers_nested_factors_by_eq_37_and_averages():
    algo = get_algorithm("mfedloru", {**BASE, "tau": 1000, "tiers": TIERS, "nested_alpha": 6.0})
    sim = _sim(algo, rounds=2)
    replies = []
    fit = sim.client.fit
    sim.client.fit = lambda payload, ctx: replies.append((ctx.client_id, fit(payload, ctx))) or replies[-1][1]
    before = {k: v.clone() for k, v in sim.server.shared.items()}
    sim.run_round(1)
    sizes = [c.num_samples for c in sim.clients]
    weights = [sizes[cid] for cid, _ in replies]
    for name, a in before.items():
        per_client = []
        for cid, p in replies:
            tier = TIERS[tier_of_clients(TIERS, 4)[cid]]
            rank = tier["rank_a"] if name.endswith("up.weight") else tier["rank_b"]
            if name + ":d" in p:
                # A^(k) = A + (alpha_A / r_A) A_d A_u, the product reshaped like A
                assert rank > 0 and name not in p
                per_client.append(a + (6.0 / rank) * (p[name + ":d"] @ p[name + ":u"]).reshape(a.shape))
            else:
                assert rank == 0 or not name.endswith(("up.weight", "down.weight"))
                per_client.append(a + p[name])
        expect = sum(w * t for w, t in zip(weights, per_client)) / sum(weights)
        torch.testing.assert_close(sim.server.shared[name], expect, rtol=1e-5, atol=1e-6)
    # the nested factors trained: the recovered A and B moved
    assert not torch.equal(sim.server.shared["0.up.weight"], before["0.up.weight"])


def test_nested_uplink_is_the_papers_count():
    algo = get_algorithm("mfedloru", {**BASE, "tau": 1000, "tiers": TIERS})
    sim = _sim(algo, rounds=1)
    replies = {}
    fit = sim.client.fit
    sim.client.fit = lambda payload, ctx: replies.setdefault(ctx.client_id, fit(payload, ctx))
    sim.run_round(1)
    # tier 0 (r_A = 2, r_B = 3) on the 6->6 3x3 conv "2" with rank 4: A is 6 x 4, B is 4 x 54
    p = replies[0]
    assert p["2.up.weight:d"].shape == (6, 2) and p["2.up.weight:u"].shape == (2, 4)
    assert p["2.down.weight:d"].shape == (4, 3) and p["2.down.weight:u"].shape == (3, 54)
    nested = sum(p[f"2.{f}.weight:{s}"].numel() for f in ("up", "down") for s in "du")
    assert nested == 2 * (6 + 4) + 3 * (4 + 54)  # r_A (m + r) + r_B (r + n)
    # tier 1 nests B only and trains A directly; tier 2 is plain FedLoRU
    assert "2.up.weight" in replies[2] and "2.down.weight:d" in replies[2]
    assert "2.up.weight" in replies[3] and "2.down.weight" in replies[3] and not any(k.endswith((":d", ":u")) for k in replies[3])


def test_clients_that_opt_out_are_fedloru():
    opt_out = [{"fraction": 1.0, "rank_a": 0, "rank_b": 0}]
    a = _sim(get_algorithm("mfedloru", {**BASE, "tau": 2, "tiers": opt_out}), rounds=5, per_round=2)
    b = _sim(get_algorithm("fedloru", {**BASE, "tau": 2}), rounds=5, per_round=2)
    a.run()
    b.run()
    for name, value in b.server.global_model_state().items():
        torch.testing.assert_close(a.server.global_model_state()[name], value, rtol=1e-6, atol=1e-7)
    assert [r.uplink_bytes for r in a.history] == [r.uplink_bytes for r in b.history]


def test_summary_reports_uplink_bytes_per_tier(tmp_path):
    from rankfed.app.config import parse_config
    from rankfed.app.experiment import run_experiment

    cfg = parse_config(
        {
            "task": {"dataset": "digits", "model": "mlp"},
            "federation": {"clients": 4, "rounds": 2},
            "algorithm": {"name": "mfedloru", "rank": 8, "patterns": ["fc1"], "tiers": [{"fraction": 0.5, "rank_a": 2, "rank_b": 2}, {"fraction": 0.5}]},
        }
    )
    s = run_experiment(cfg, tmp_path / "run")
    by_tier = s["uplink_bytes_per_upload_by_tier"]
    assert set(by_tier) == {"rank_a=2, rank_b=2", "rank_a=0, rank_b=0 (FedLoRU)"}
    assert by_tier["rank_a=2, rank_b=2"] < by_tier["rank_a=0, rank_b=0 (FedLoRU)"]


@pytest.mark.parametrize(
    "tiers,match",
    [
        ([{"fraction": 0.5, "rank_a": 2, "rank_b": 2}], "sum to 0.5"),
        ([{"fraction": 1.0, "rank_a": -1}], r"tiers\[0\].rank_a = -1"),
        ([{"fraction": 1.0, "rank_c": 2}], r"tiers\[0\]"),
        ([{"fraction": 0, "rank_a": 2}], r"fraction = 0"),
        ([], "non-empty"),
    ],
)
def test_bad_tiers_name_the_value(tiers, match):
    with pytest.raises(ConfigError, match=match):
        get_algorithm("mfedloru", {"tiers": tiers})
