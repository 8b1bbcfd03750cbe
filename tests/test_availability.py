"""Clients that come and go: availability, sampling among the online, and catching up.

A stateful client that misses broadcasts is brought up to date when it is back: MAPA's missed
broadcasts (a seed and k numbers each) are replayed, FedAvg's (a full update each) would cost
more than the model, which is sent instead. The simulator applies each catch-up to the replica
that client last had and refuses to go on if it does not reproduce the up-to-date one, so a run
that finishes has caught every returning client up exactly; the bytes are checked against the
broadcasts each client missed.
"""

import numpy as np
import pytest
import torch

from rankfed.app.config import load_config
from rankfed.app.experiment import build_experiment
from rankfed.errors import ConfigError
from rankfed.server import Rounds
from rankfed.sim import Simulator
from rankfed.wire import encoded_size

BASE = ["task.model=mlp", "task.model_options={hidden=[16]}", "federation.clients=10", "federation.participation=0.3", "federation.rounds=8", "federation.seed=2"]
MAPA = ["algorithm.name=mapa", "algorithm.k=32"]


def _sim(*extra):
    return Simulator(build_experiment(load_config(None, [*BASE, *extra])))


def _trace(tmp_path, rounds=8, clients=10, seed=0):
    """p = 0.5 in every round but the last, where everyone is online (so everyone catches up)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(str(c) for c in range(clients) if rng.random() < 0.5) for _ in range(rounds - 1)]
    lines.append(", ".join(str(c) for c in range(clients)))
    path = tmp_path / "trace.txt"
    path.write_text("# who is online, one line per round\n" + "\n".join(lines) + "\n")
    return path, [sorted(int(c) for c in line.replace(",", " ").split()) for line in lines]


def _expected_catch_up_bytes(online, broadcast_bytes):
    """Per round: the bytes of the broadcasts each returning client missed (MAPA: replayed)."""
    last = [0] * 10
    out = []
    for rnd, ids in enumerate(online, 1):
        total = 0
        for c in ids:
            total += sum(broadcast_bytes[r - 1] for r in range(last[c] + 1, rnd))
            last[c] = rnd
        out.append(total)
    return out


def test_a_mapa_run_with_half_the_clients_online_ends_with_every_client_caught_up(tmp_path):
    path, online = _trace(tmp_path)
    sim = _sim(*MAPA, f"federation.availability_trace='{path}'")
    hist = sim.run()  # every catch-up checked against the up-to-date replica as it happens
    assert [r.online for r in hist] == [len(ids) for ids in online]
    assert all(set(r.clients) <= set(ids) for r, ids in zip(hist, online))  # sampled among the online
    assert sim.synced.tolist() == [8] * 10  # everyone online in the last round: all caught up
    assert sum(r.catch_ups for r in hist) > 5
    # replayed: each returning client is sent exactly the broadcasts it missed, and the round charges them
    assert [r.catch_up_bytes for r in hist] == _expected_catch_up_bytes(online, [r.broadcast_bytes for r in hist])
    for r in hist:
        assert r.broadcast_recipients == r.online
        assert r.downlink_bytes == r.broadcast_bytes * r.online + r.catch_up_bytes


def test_fedavg_clients_too_far_behind_to_replay_are_sent_the_model(tmp_path):
    path, online = _trace(tmp_path)
    sim = _sim("federation.client_kind=stateful", f"federation.availability_trace='{path}'")
    hist = sim.run()
    model = encoded_size(sim.server.replica_state())
    assert sim.synced.tolist() == [8] * 10
    back = [sum(1 for c in ids if c not in (online[i - 1] if i else list(range(10)))) for i, ids in enumerate(online)]
    assert [r.catch_ups for r in hist] == back and sum(back) > 5
    for r in hist:  # a broadcast is a full update: one missed already costs more than the model
        assert r.catch_up_bytes == r.catch_ups * model
        assert r.broadcast_recipients == r.online - r.catch_ups  # the model already holds this round's update


def test_a_catch_up_that_does_not_reproduce_the_replica_stops_the_run(tmp_path, monkeypatch):
    path, _ = _trace(tmp_path)
    real = Rounds.catch_up

    def lossy(self, since, rnd):
        cu = real(self, since, rnd)
        cu.raws = cu.raws[1:]  # the first missed broadcast lost
        return cu

    monkeypatch.setattr(Rounds, "catch_up", lossy)
    sim = _sim(*MAPA, f"federation.availability_trace='{path}'")
    with pytest.raises(RuntimeError, match="differs from the up-to-date one"):
        sim.run()


def test_availability_p_samples_among_the_online_and_is_seeded():
    a, b = _sim(*MAPA, "federation.availability=0.5"), _sim(*MAPA, "federation.availability=0.5")
    ha, hb = a.run(), b.run()
    assert [r.clients for r in ha] == [r.clients for r in hb]
    assert all(torch.equal(a.server.state[k], b.server.state[k]) for k in a.server.state)
    assert 0 < np.mean([r.online for r in ha]) < 10
    assert sum(r.catch_ups for r in ha) > 0


def test_stateless_clients_need_no_catching_up():
    hist = _sim("federation.availability=0.4").run()
    assert all(r.catch_ups == 0 and r.broadcast_recipients == 0 for r in hist)
    assert all(len(r.clients) <= r.online for r in hist)


def test_bad_availability_is_named(tmp_path):
    with pytest.raises(ConfigError, match="federation.availability = 0.0"):
        load_config(None, [*BASE, "federation.availability=0.0"])
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n3 12\n")
    with pytest.raises(ConfigError, match=r"line 2: client 12 is not in \[0, federation.clients = 10\)"):
        _sim(f"federation.availability_trace='{bad}'")
    short = tmp_path / "short.txt"
    short.write_text("0 1\n2\n")
    with pytest.raises(ConfigError, match="2 round\\(s\\) of availability for a run of 8 rounds"):
        _sim(f"federation.availability_trace='{short}'")
