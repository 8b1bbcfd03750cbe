"""The defences of the transport-neutral round: robust aggregators (against hand computations and
Flower's own strategy maths), trusted weights, update clipping, central and local differential
privacy (epsilon from Opacus's accountant), and the takeover attack they stop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankfed.algorithms.aggregate import coordinate_median, krum, krum_scores, krum_select, trimmed_mean, weighted_mean
from rankfed.app.config import load_config
from rankfed.app.experiment import build_experiment
from rankfed.errors import ConfigError, Diverged
from rankfed.protocol import ClientContext
from rankfed.server import Defences, RunOptions, resolve_noise
from rankfed.server.defence import ClipBound, DefendedSums, LocalNoise, PrivacyLedger, UploadGuard, uplink_norm
from rankfed.sim import Simulator

flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")


def _uploads(values):
    """Uploads of one entry "w" from a list of lists."""
    return [{"w": torch.tensor(v, dtype=torch.float64)} for v in values]


# -- the aggregators as pure functions ----------------------------------------------------------------
def test_aggregators_equal_hand_computations():
    ups = _uploads([[1.0, 10.0], [2.0, -4.0], [100.0, 0.0], [3.0, 2.0]])
    assert weighted_mean(ups, [1, 1, 2, 4])["w"].tolist() == [(1 + 2 + 200 + 12) / 8, (10 - 4 + 0 + 8) / 8]
    # even count: the mean of the two middle values (np.median's convention), per coordinate
    assert coordinate_median(ups)["w"].tolist() == [(2 + 3) / 2, (0 + 2) / 2]
    assert coordinate_median(ups[:3])["w"].tolist() == [2.0, 0.0]
    # beta = 0.25 of 4 cuts one value at each end: column 0 keeps {2, 3}, column 1 keeps {0, 2}
    assert trimmed_mean(ups, 0.25)["w"].tolist() == [2.5, 1.0]
    assert trimmed_mean(ups, 0.2)["w"].tolist() == weighted_mean(ups, [1] * 4)["w"].tolist()  # int(0.8) = 0 cut
    # Krum, f = 1: each score sums the squared distances to the n - f - 2 = 1 nearest other upload
    pts = _uploads([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    # squared distances: 0-1: 1, 0-2: 4, 1-2: 5, 0-3: 200, 1-3: 181, 2-3: 164
    assert krum_scores(pts, 1) == [1.0, 1.0, 4.0, 164.0]
    assert krum_select(pts, 1, 1) == [0] and krum_select(pts, 1, 3) == [0, 1, 2]
    assert krum(pts, [1, 1, 1, 1], 1)["w"].tolist() == [0.0, 0.0]
    assert krum(pts, [1, 3, 1, 1], 1, keep=2)["w"].tolist() == [0.75, 0.0]  # multi-Krum: weighted mean of the 2 best
    # f = 0 (n - 2 = 2 nearest): 0: 1 + 4, 1: 1 + 5, 2: 4 + 5, 3: 164 + 181
    assert krum_scores(pts, 0) == [5.0, 6.0, 9.0, 345.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregators_equal_flowers_strategy_maths_on_the_same_inputs(seed):
    rng = np.random.default_rng(seed)
    n = 7
    layers = [rng.normal(size=(3, 4)), rng.normal(size=(5,)), rng.normal(size=(2, 2, 2))]
    arrays = [[layer + rng.normal(scale=0.5, size=layer.shape) * (5 if i == 3 else 1) for layer in layers] for i in range(n)]
    counts = [int(c) for c in rng.integers(1, 50, size=n)]
    ups = [{f"l{j}": torch.from_numpy(a) for j, a in enumerate(arr)} for arr in arrays]
    results = list(zip(arrays, counts))

    def same(ours, theirs):
        for j, t in enumerate(theirs):
            np.testing.assert_allclose(ours[f"l{j}"].numpy(), t, rtol=1e-12, atol=1e-12)

    same(weighted_mean(ups, counts), flwr_aggregate.aggregate(results))
    same(coordinate_median(ups), flwr_aggregate.aggregate_median(results))
    same(coordinate_median(ups[:6]), flwr_aggregate.aggregate_median(results[:6]))
    for beta in (0.0, 0.15, 0.3, 0.45):
        same(trimmed_mean(ups, beta), flwr_aggregate.aggregate_trimmed_avg(results, beta))
    for f in (0, 1, 2):
        same(krum(ups, counts, f, keep=1), flwr_aggregate.aggregate_krum(results, f, 0))
        for m in (2, 4):
            same(krum(ups, counts, f, keep=m), flwr_aggregate.aggregate_krum(results, f, m))


def test_aggregators_refuse_bad_arguments_naming_them():
    ups = _uploads([[1.0], [2.0]])
    with pytest.raises(ValueError, match="beta = 0.5"):
        trimmed_mean(ups, 0.5)
    with pytest.raises(ValueError, match="keep = 3"):
        krum_select(ups, 0, 3)
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(ups, [1.0, 0.0])
    with pytest.raises(ValueError, match="no uploads"):
        coordinate_median([])


# -- the guard: weights, clipping, the round's sums -------------------------------------------------
def test_claimed_weights_are_capped_or_replaced_by_the_servers_record():
    guard = UploadGuard(Defences(max_sample_weight=100), 1, bound=None)
    assert [guard.weight(c, n) for c, n in [(0, 50), (1, 10**12), (2, 100)]] == [50.0, 100.0, 100.0]
    assert guard.weight_cut == {1: (10**12, 100.0)}
    rec = UploadGuard(Defences(sample_weights="recorded"), 1, bound=None, recorded=[30, 40, 50])
    assert [rec.weight(c, n) for c, n in [(0, 20), (1, 10**12), (2, 50)]] == [20.0, 40.0, 50.0]
    assert rec.weight_cut == {1: (10**12, 40.0)}
    uni = UploadGuard(Defences(sample_weights="uniform"), 1, bound=None)
    assert uni.weight(0, 10**12) == 1.0


def test_clipping_scales_the_upload_as_one_vector_to_the_bound():
    guard = UploadGuard(Defences(clip_norm=1.0), 1, bound=1.0)
    small = {"a": torch.tensor([0.3, 0.4]), "b": torch.tensor([0.0])}
    assert guard.clip(0, small, None) is small  # norm 0.5: unchanged
    big = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # norm 5 over both entries
    out = guard.clip(1, big, None)
    assert out["a"].tolist() == pytest.approx([0.6, 0.0]) and out["b"].tolist() == pytest.approx([0.8])
    assert uplink_norm(out) == pytest.approx(1.0, rel=1e-6) and guard.clipped == [1]  # float32 values
    assert guard.norms == pytest.approx({0: 0.5, 1: 5.0}, rel=1e-6)
    # a server half that averages models: the size is measured from the global values
    ref = {"a": torch.tensor([10.0, 10.0]), "b": torch.tensor([0.0])}
    model = {"a": torch.tensor([13.0, 10.0]), "b": torch.tensor([4.0])}
    out = guard.clip(2, model, ref)
    assert out["a"].tolist() == pytest.approx([10.6, 10.0]) and out["b"].tolist() == pytest.approx([0.8])


def test_the_adaptive_bound_is_the_quantile_of_the_last_rounds_norms():
    bound = ClipBound(Defences(clip_norm=2.0, clip_quantile=0.5, clip_window=2))
    assert bound.current() == 2.0  # before any norms: clip_norm
    bound.record([1.0, 3.0])
    assert bound.current() == 2.0
    bound.record([5.0, 7.0, 9.0])
    assert bound.current() == pytest.approx(5.0)  # median of {1, 3, 5, 7, 9}
    bound.record([100.0])
    assert bound.current() == pytest.approx(8.0)  # the window keeps 2 rounds: {5, 7, 9, 100}
    assert ClipBound(Defences(clip_quantile=0.9)).current() is None  # no initial bound: no clipping in round 1


def test_central_noise_is_gaussian_with_std_sigma_c_on_the_sum_and_seeded():
    d = Defences(dp="central", clip_norm=0.5, dp_noise=2.0)
    ups = [{"w": torch.randn(20_000, generator=torch.Generator().manual_seed(i))} for i in range(4)]

    def mean(seed):
        sums = DefendedSums(d, noise_std=d.dp_noise * d.clip_norm, seed=seed)
        for u in ups:
            sums.add(u, 1.0)
        return sums.mean("w")

    plain = sum(u["w"] for u in ups) / 4
    z = ((mean(7) - plain) * 4 / (2.0 * 0.5)).double()  # the noise on the sum, in units of sigma * C
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, rel=0.03)
    assert torch.equal(mean(7), mean(7)) and not torch.equal(mean(7), mean(8))


def test_the_privacy_ledger_equals_opacus_composition():
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger("central", 1.1, 0.25, 1e-5)
    acc = RDPAccountant()
    for _ in range(6):
        ledger.step([0, 1])
        acc.step(noise_multiplier=1.1, sample_rate=0.25)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    local = PrivacyLedger("local", 2.0, 0.25, 1e-5)
    for clients in ([0, 1], [1, 2], [1]):
        local.step(clients)
    one = RDPAccountant()
    for _ in range(3):  # client 1 uploaded in 3 rounds, with no amplification
        one.step(noise_multiplier=2.0, sample_rate=1.0)
    assert local.epsilon() == pytest.approx(one.get_epsilon(1e-5), rel=1e-12)
    assert PrivacyLedger("central", 1.0, 0.5, 1e-5).epsilon() == 0.0


def test_a_target_epsilon_gives_the_noise_that_spends_it_by_the_last_round():
    d = resolve_noise(Defences(dp="central", clip_norm=1.0, dp_epsilon=4.0), rounds=10, sample_rate=0.3)
    ledger = PrivacyLedger("central", d.dp_noise, 0.3, d.dp_delta)
    for _ in range(10):
        ledger.step([0])
    assert d.dp_noise > 0 and ledger.epsilon() <= 4.0 and ledger.epsilon() > 3.8


def test_local_noise_clips_the_uplink_and_adds_seeded_noise_on_the_client():
    class Half:
        def fit(self, payload, ctx):
            return {"@num_samples": 5, "@train_loss": 0.5, "B": torch.full((4000,), 0.1)}

    half = LocalNoise(Half(), clip=1.0, sigma=0.5)
    ctx = ClientContext(3, 2, num_samples=5, run_seed=11)
    a, b = half.fit({}, ctx), half.fit({}, ctx)
    assert a["@num_samples"] == 5 and a["@train_loss"] == 0.5 and torch.equal(a["B"], b["B"])
    clipped = torch.full((4000,), 0.1) / (0.1 * math.sqrt(4000))  # norm 6.32 -> 1
    noise = (a["B"] - clipped).double()
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)
    other = half.fit({}, ClientContext(4, 2, num_samples=5, run_seed=11))
    assert not torch.equal(other["B"], a["B"])


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, key",
    [
        ({"aggregator": "mode"}, "federation.aggregator"),
        ({"trim_beta": 0.5}, "federation.trim_beta"),
        ({"krum_keep": 0}, "federation.krum_keep"),
        ({"sample_weights": "trusted"}, "federation.sample_weights"),
        ({"max_sample_weight": -1}, "federation.max_sample_weight"),
        ({"clip_norm": -1.0}, "federation.clip_norm"),
        ({"clip_quantile": 1.0}, "federation.clip_quantile"),
        ({"dp": "global"}, "federation.dp"),
        ({"dp": "central", "dp_noise": 1.0}, "federation.clip_norm"),
        ({"dp": "central", "clip_norm": 1.0}, "federation.dp_noise"),
        ({"dp": "central", "clip_norm": 1.0, "dp_noise": 1.0, "clip_quantile": 0.5}, "federation.clip_quantile"),
        ({"dp": "central", "clip_norm": 1.0, "dp_noise": 1.0, "aggregator": "median"}, "federation.aggregator"),
        ({"dp": "local", "clip_norm": 1.0, "dp_noise": 1.0, "dp_epsilon": 2.0}, "federation.dp_epsilon"),
        ({"dp_noise": 1.0}, "federation.dp"),
    ],
)
def test_bad_defence_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunOptions(**options)


BASE = ["federation.clients=20", "federation.participation=0.5", "federation.rounds=8", "federation.eval_every=8"]


def test_local_dp_is_refused_where_the_uplink_is_not_the_averaged_update():
    for extra, what in ([["algorithm.compressor=topk"], "compressor"], [["algorithm.name=fedhm", 'algorithm.patterns=["*"]'], "fedhm"]):
        with pytest.raises(ConfigError, match=what):
            build_experiment(load_config(None, [*BASE, "federation.dp=local", "federation.clip_norm=1.0", "federation.dp_noise=1.0", *extra]))
    with pytest.raises(ConfigError, match="federation.krum_keep"):
        build_experiment(load_config(None, [*BASE, "federation.aggregator=krum", "federation.krum_keep=11"]))


# -- end to end in the simulator -----------------------------------------------------------------------
MALICIOUS = (0, 1, 2)


def _takeover(rnd, cid, upload):
    """Three clients claim 10**12 samples and send their update reversed and scaled by 5."""
    if cid not in MALICIOUS:
        return upload
    return {k: (-5 * v if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in upload.items()} | {"@num_samples": 10**12}


def _final(overrides, tamper=None):
    sim = Simulator(build_experiment(load_config(None, [*BASE, *overrides])))
    sim.tamper = tamper
    try:
        for rnd in range(1, sim.ctx.rounds + 1):
            rec = sim.run_round(rnd)
    except Diverged:
        return 0.0, None
    return rec.accuracy, sim


# within 5 points of the clean runs: the coordinate-wise aggregators, which drop the outliers
ROBUST = {
    "median": ["federation.aggregator=median"],
    "trimmed mean": ["federation.aggregator=trimmed_mean", "federation.trim_beta=0.3"],
}
# bounded influence: the takeover stopped, the model still learning, though below the clean runs
# (a clipped reversed update still pulls back; multi-Krum drops honest uploads too); see
# benchmarks/RESULTS.md for the figures
BOUNDED = {
    "recorded weights + adaptive clip": ["federation.sample_weights=recorded", "federation.clip_norm=0.3", "federation.clip_quantile=0.5"],
    "multi-krum": ["federation.aggregator=krum", "federation.krum_malicious=3", "federation.krum_keep=7"],
}
LONGER = ["federation.rounds=20", "federation.eval_every=20"]


def test_three_clients_take_over_fedavg_and_each_defence_keeps_the_model_learning():
    """The takeover of the issue on today's default (digits, FedAvg, 20 clients, half a round,
    8 rounds): at chance or diverged on every seed. Then 20 rounds (near the clean runs'
    plateau), 3 seeds: the robust aggregators' mean final accuracy within 5 points of the clean
    runs' mean; the bounded-influence defences above 50% on every seed (chance: 10%)."""
    seeds = [0, 1, 2]
    attacked = [_final([f"federation.seed={s}"], _takeover)[0] for s in seeds]
    assert max(attacked) <= 0.15, attacked  # 10 classes: chance is 0.1 (0.0 here: diverged)
    clean = [_final([f"federation.seed={s}", *LONGER])[0] for s in seeds]
    assert min(clean) > 0.6, clean
    for name, extra in ROBUST.items():
        defended = [_final([f"federation.seed={s}", *LONGER, *extra], _takeover)[0] for s in seeds]
        assert np.mean(defended) >= np.mean(clean) - 0.05, (name, defended, clean)
    for name, extra in BOUNDED.items():
        defended = [_final([f"federation.seed={s}", *LONGER, *extra], _takeover)[0] for s in seeds]
        assert min(defended) > 0.5, (name, defended, clean)


def test_the_defences_are_counted_in_the_round_records(tmp_path):
    acc, sim = _final(["federation.seed=0", "federation.sample_weights=recorded", "federation.clip_quantile=0.5"], _takeover)
    recs = sim.history
    assert all(r.defence["aggregator"] == "mean" for r in recs)
    sampled_bad = [sorted(set(r.clients) & set(MALICIOUS)) for r in recs]
    assert [sorted(int(c) for c in r.defence["weights_cut_clients"]) for r in recs] == sampled_bad
    assert all(r.defence["weights_cut_clients"][str(c)] == {"claimed": 10**12, "used": float(sim.clients[c].num_samples)} for r in recs for c in set(r.clients) & set(MALICIOUS))
    assert recs[0].defence["clip_bound"] is None and recs[0].defence["clipped"] == 0  # no bound before norms are known
    later = [r for r in recs[1:] if set(r.clients) & set(MALICIOUS)]
    assert later and all(set(r.clients) & set(MALICIOUS) <= set(r.defence["clipped_clients"]) for r in later)
    line, rounds_line = recs[1].metrics_line(), recs[1].rounds_line()
    assert line["clipped"] == recs[1].defence["clipped"] and "clipped_clients" not in line
    assert rounds_line["clipped_clients"] == recs[1].defence["clipped_clients"]
    _, krum_sim = _final(["federation.seed=0", "federation.aggregator=krum", "federation.krum_malicious=3", "federation.krum_keep=7"], _takeover)
    for r in krum_sim.history:
        assert len(r.defence["krum_selected"]) == 7 and not set(r.defence["krum_selected"]) & set(MALICIOUS)


@pytest.mark.parametrize("extra", [["federation.aggregator=median"], ["federation.aggregator=trimmed_mean"], ["federation.dp=central", "federation.clip_norm=0.3", "federation.dp_noise=0.3"]])
@pytest.mark.parametrize("alg", [["algorithm.name=mapa", "algorithm.k=256"], ["algorithm.name=fedloru", "algorithm.rank=4", 'algorithm.patterns=["*"]', "algorithm.tau=4"]])
def test_low_rank_algorithms_aggregate_their_uploads_robustly(alg, extra):
    """MAPA's B and FedLoRU's factor updates go through the same aggregators; the run stays
    finite and its model is a function of the seed."""
    short = ["federation.seed=3", "federation.rounds=3", "federation.eval_every=3", *alg]
    a = _final([*short, *extra])[1]
    b = _final([*short, *extra])[1]
    sa, sb = a.server.global_model_state(), b.server.global_model_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(bool(torch.isfinite(v).all()) for v in sa.values() if v.is_floating_point())
    plain = _final(short)[1].server.global_model_state()
    assert any(not torch.equal(sa[k], plain[k]) for k in sa if sa[k].is_floating_point())


def test_dp_runs_report_the_accountants_epsilon_every_round():
    for mode, q in (("central", 0.5), ("local", 1.0)):
        _, sim = _final(["federation.seed=0", f"federation.dp={mode}", "federation.clip_norm=0.3", "federation.dp_epsilon=8"])
        eps = [r.defence["epsilon"] for r in sim.history]
        assert all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] <= 8.0, (mode, eps)
        sigma = sim.history[-1].defence["dp_noise"]
        ledger = PrivacyLedger(mode, sigma, 0.5, 1e-5)
        for r in sim.history:
            ledger.step(r.clients)
            assert r.defence["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-12)
        if mode == "central":
            assert eps[-1] > 7.5  # the target is spent by the last round


def test_a_local_dp_run_resumes_to_the_uninterrupted_runs_model(tmp_path):
    """The client half inside LocalNoise, the adaptive bound and the privacy ledger survive a
    resume point (saved with torch.save, loaded into a fresh simulator) bitwise."""
    overrides = [*BASE, "federation.seed=0", "federation.rounds=4", "federation.eval_every=4", "federation.dp=local", "federation.clip_norm=0.3", "federation.dp_noise=0.5"]
    whole = Simulator(build_experiment(load_config(None, overrides)))
    for rnd in range(1, 5):
        whole.run_round(rnd)
    first = Simulator(build_experiment(load_config(None, overrides)))
    for rnd in (1, 2):
        first.run_round(rnd)
    torch.save(first.state_dict("config", 0.0), tmp_path / "resume.pt")
    second = Simulator(build_experiment(load_config(None, overrides)))
    second.load_state_dict(torch.load(tmp_path / "resume.pt", weights_only=False))
    assert isinstance(second.client, LocalNoise) and second.client.sigma == 0.5
    for rnd in (3, 4):
        rec = second.run_round(rnd)
    a, b = whole.server.global_model_state(), second.server.global_model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rec.defence["epsilon"] == whole.history[-1].defence["epsilon"] > 0
