"""pFedLoRU and pFedLoRA: personal factors stay private and persist; equivalences with FedLoRU and FedAvg."""

import pytest
import torch
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.protocol import ClientContext
from rankfed.errors import ConfigError
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from conftest import evaluate, make_sim
from rankfed.wire import encode


def _data(n_clients=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        n = 16 + 4 * i
        x = torch.randn(n, 2, 8, 8, generator=g) + 0.3 * i
        y = (torch.arange(n) + i) % 3  # each client its own label mix
        clients.append(ClientData(x=x[:-4], y=y[:-4], val_x=x[-4:], val_y=y[-4:]))
    return clients, (torch.randn(30, 2, 8, 8, generator=g), torch.randint(0, 3, (30,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 3))


def _sim(algo, kind, rounds=4, per_round=2):
    clients, test = _data()
    return make_sim(algo, _model(), clients, test, LocalTraining(lr=0.1, momentum=0.5, batch_size=8), rounds=rounds, per_round=per_round, kind=kind)


PFEDLORU = {"rank": 2, "tau": 2, "patterns": ["0", "2"], "personal_rank": 2, "personal_epochs": 1}


def _record_payloads(sim):
    """Wrap the halves so every payload that crosses is recorded (names only)."""
    seen = []
    for half, method in ((sim.server, "configure"), (sim.server, "broadcast"), (sim.client, "fit")):
        original = getattr(half, method)

        def wrapper(*args, _original=original, _method=method, **kwargs):
            out = _original(*args, **kwargs)
            payloads = out.values() if _method == "configure" else [out]
            for p in payloads:
                encode(p)  # it must be a wire payload
                seen.extend(p.keys())
            return out

        setattr(half, method, wrapper)
    return seen


@pytest.mark.parametrize(
    "name,options,kind,private",
    [
        ("pfedloru", PFEDLORU, "stateful", ("p_down", "p_up")),
        ("pfedloru", PFEDLORU, "stateless", ("p_down", "p_up")),
        ("pfedlora", {"rank": 2, "patterns": ["0", "2"], "variant": 1}, "stateless", (".down.", ".up.")),
        ("pfedlora", {"rank": 2, "patterns": ["0", "2"], "variant": 2}, "stateful", (".down.", ".up.")),
    ],
)
def test_personal_factors_never_appear_in_any_payload(name, options, kind, private):
    sim = _sim(get_algorithm(name, options), kind, rounds=4)
    seen = _record_payloads(sim)
    sim.run()
    assert seen and not [n for n in seen if any(p in n for p in private)]
    # ... yet every client that trained holds them, and they moved from their start
    assert sim.client_states and all("personal" in s for s in sim.client_states.values())
    trained = next(iter(sim.client_states.values()))["personal"]
    assert any(torch.count_nonzero(v) for k, v in trained.items() if k.endswith("up.weight"))


def test_personal_factors_persist_across_rounds_and_survive_not_being_sampled():
    sim = _sim(get_algorithm("pfedloru", PFEDLORU), "stateful", rounds=8, per_round=1)
    history = {}  # client -> its personal factors after its last round
    for rnd in range(1, 9):
        rec = sim.run_round(rnd)
        (cid,) = rec.clients
        for other, saved in history.items():
            if other != cid:  # not sampled this round: untouched
                for k, v in saved.items():
                    assert torch.equal(sim.client_states[other]["personal"][k], v)
        if cid in history:  # sampled again: it trained from where it stopped
            assert any(not torch.equal(sim.client_states[cid]["personal"][k], v) for k, v in history[cid].items())
        history[cid] = {k: v.clone() for k, v in sim.client_states[cid]["personal"].items()}
    assert any(len([r for r in sim.history if r.clients == [c]]) > 1 for c in history)  # some client came back

    # A sampled client starts from its saved factors: what fit loads is what the last fit stored.
    cid = next(iter(history))
    cctx = ClientContext(cid, 9, sim.worker, sim.clients[cid], sim.trainer, sim.client_states[cid], sim.replica)
    sim.client._load_personal(cctx)
    for k, t in sim.client.personal.items():
        assert torch.equal(t, history[cid][k])


def test_pfedloru_without_personal_epochs_is_fedloru():
    # The personal pair starts at zero (U = 0) and never trains: the shared model must follow
    # FedLoRU's exactly, merges included.
    a = _sim(get_algorithm("pfedloru", {**PFEDLORU, "personal_epochs": 0}), "stateful", rounds=5)
    b = _sim(get_algorithm("fedloru", {k: v for k, v in PFEDLORU.items() if not k.startswith("personal")}), "stateful", rounds=5)
    a.run()
    b.run()
    for name, value in b.server.global_model_state().items():
        torch.testing.assert_close(a.server.global_model_state()[name], value, rtol=1e-6, atol=1e-7)
    assert a.server.merges == b.server.merges == 2
    assert [r.uplink_bytes for r in a.history] == [r.uplink_bytes for r in b.history]


def test_pfedlora1_without_personal_epochs_is_fedavg():
    a = _sim(get_algorithm("pfedlora", {"rank": 2, "patterns": ["0", "2"], "variant": 1, "personal_epochs": 0}), "stateless", rounds=3)
    b = _sim(get_algorithm("fedavg"), "stateless", rounds=3)
    a.run()
    b.run()
    for name, value in b.server.global_model_state().items():
        torch.testing.assert_close(a.server.global_model_state()[name], value, rtol=1e-5, atol=1e-6)


def test_personal_accuracy_is_the_mean_of_each_clients_own_split():
    sim = _sim(get_algorithm("pfedlora", {"rank": 2, "patterns": ["0", "2"]}), "stateless")
    # Before any training every personal pair adds zero: the personalised models are the global one.
    model = _model()
    expect = sum(evaluate(model, c.val_x, c.val_y, 64)[0] for c in sim.clients) / len(sim.clients)
    assert sim.evaluate_personal(0) == pytest.approx(expect, abs=1e-9)
    rec = sim.run_round(sim.ctx.rounds)  # the last round is always evaluated
    assert rec.personal_accuracy is not None and 0 <= rec.personal_accuracy <= 1


def test_pfedloru_personalises_on_label_skewed_clients(tmp_path):
    from rankfed.app.config import parse_config
    from rankfed.app.experiment import run_experiment

    cfg = parse_config(
        {
            "task": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.1, "model": "mlp", "holdout": 0.2},
            "federation": {"clients": 6, "rounds": 8, "participation": 0.5, "eval_every": 4},
            "client": {"lr": 0.1, "momentum": 0.9, "batch_size": 16},
            "algorithm": {"name": "pfedloru", "rank": 8, "tau": 4, "patterns": ["*"], "personal_rank": 4, "personal_epochs": 1},
        }
    )
    s = run_experiment(cfg, tmp_path / "run")
    # With Dirichlet(0.1) labels a client's own model beats the shared one on its own data.
    assert s["final_personal_accuracy"] > 0.6
    assert s["final_personal_accuracy"] > s["final_accuracy"]


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="variant = 3"):
        get_algorithm("pfedlora", {"variant": 3})
    with pytest.raises(ConfigError, match="personal_rank = 0"):
        get_algorithm("pfedloru", {"personal_rank": 0})
    with pytest.raises(ConfigError, match="personal_epochs = -1"):
        get_algorithm("pfedloru", {"personal_epochs": -1})
