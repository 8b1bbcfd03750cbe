"""Bad uploads: every algorithm's server drops them with a reason and aggregates the rest.

For each algorithm and each kind of fault, client 1's round-1 upload is corrupted
on its way to the server. The round must record the rejection, and the global
model must be exactly the one the server builds when that upload is simply
lost (the same uploads aggregated in the same order). A fuzz test throws random
mutations of honest uploads, and random payloads, at the server: nothing but a
recorded rejection may come of them.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankfed.server.validate import aggregate_checked, check_upload
from rankfed.app.config import load_config
from rankfed.app.experiment import build_experiment
from rankfed.sim import Simulator
from rankfed.errors import Diverged

BASE = ["task.model=mlp", "task.model_options={hidden=[16]}", "federation.clients=4", "federation.participation=1.0", "federation.rounds=3", "federation.seed=1"]
ALGORITHMS = {
    "fedavg": [],
    "fedavg+topk": ["algorithm.compressor=topk", "algorithm.topk_ratio=0.2", "algorithm.error_feedback=true"],
    "fedavg+qsgd": ["algorithm.compressor=qsgd"],
    "fedavg+powersgd": ["algorithm.compressor=powersgd", "algorithm.compress_rank=2"],
    "fedavg+greedylore": ["algorithm.compressor=greedylore", "algorithm.compress_rank=2"],
    "fedavg-stateful": ["federation.client_kind=stateful"],
    "mapa": ["algorithm.name=mapa", "algorithm.k=32"],
    "fa_lora": ["algorithm.name=fa_lora", "algorithm.rank=2"],
    "fedlora": ["algorithm.name=fedlora", "algorithm.rank=2", 'algorithm.patterns=["*"]'],
    "fedloru": ["algorithm.name=fedloru", "algorithm.rank=2", "algorithm.tau=1", 'algorithm.patterns=["*"]'],
    "fedhm": ["algorithm.name=fedhm", 'algorithm.patterns=["*"]', "algorithm.tiers=[{fraction=0.5,rank=2},{fraction=0.5,rank=4}]"],
    "pfedloru": ["algorithm.name=pfedloru", "algorithm.rank=2", "algorithm.personal_rank=2", 'algorithm.patterns=["*"]'],
    "pfedlora": ["algorithm.name=pfedlora", "algorithm.rank=2", 'algorithm.patterns=["*"]'],
    "mfedloru": ["algorithm.name=mfedloru", "algorithm.rank=4", 'algorithm.patterns=["*"]', "algorithm.tiers=[{fraction=0.5,rank_a=2,rank_b=2},{fraction=0.5,rank_a=0,rank_b=0}]"],
}


def _sim(label):
    return Simulator(build_experiment(load_config(None, [*BASE, *ALGORITHMS[label]])))


def _first_tensor(p):
    """The first tensor entry with more than one element (any dtype: QSGD sends uint8 codes)."""
    return next(k for k, v in p.items() if isinstance(v, torch.Tensor) and v.numel() > 1)


def _first_float(p):
    return next(k for k, v in p.items() if isinstance(v, torch.Tensor) and v.is_floating_point())


# fault name -> (corruption of an honest upload, words its reason must contain)
FAULTS = {
    "missing entry": (lambda p: {k: v for k, v in p.items() if k != _first_tensor(p)}, "could not use it"),
    "wrong shape": (lambda p: {**p, _first_tensor(p): p[_first_tensor(p)].reshape(-1)[:-1]}, "could not use it"),
    "NaN": (lambda p: {**p, _first_float(p): p[_first_float(p)] * float("nan")}, "non-finite"),
    "infinity": (lambda p: {**p, _first_float(p): p[_first_float(p)] + float("inf")}, "non-finite"),
    "no sample count": (lambda p: {k: v for k, v in p.items() if k != "@num_samples"}, "@num_samples"),
    "zero samples": (lambda p: {**p, "@num_samples": 0}, "@num_samples"),
    "text sample count": (lambda p: {**p, "@num_samples": "many"}, "@num_samples"),
    "text loss": (lambda p: {**p, "@train_loss": "low"}, "@train_loss"),
    "tensor replaced by text": (lambda p: {**p, _first_tensor(p): "weights"}, "could not use it"),
    "oversized": (lambda p: {**p, "padding": torch.zeros(3_000_000)}, "over the limit"),
}


@pytest.mark.parametrize("label", list(ALGORITHMS))
def test_each_fault_is_dropped_and_the_rest_aggregated(label):
    for fault, (corrupt, words) in FAULTS.items():
        bad, lost = _sim(label), _sim(label)
        bad.tamper = lambda rnd, cid, p, corrupt=corrupt: corrupt(p) if (rnd, cid) == (1, 1) else p
        lost.tamper = lambda rnd, cid, p: None if (rnd, cid) == (1, 1) else p
        rec = bad.run_round(1)
        lost.run_round(1)
        assert list(rec.rejected) == [1] and words in rec.rejected[1], (label, fault, rec.rejected)
        assert not rec.skipped
        got, want = bad.server.global_model_state(), lost.server.global_model_state()
        assert all(torch.equal(got[k], want[k]) for k in want), (label, fault)
        rec2 = bad.run_round(2)  # and the run goes on
        assert rec2.rejected == {} and math.isfinite(rec2.train_loss), (label, fault)


@pytest.mark.parametrize("label", ["fedavg", "mapa", "fedloru", "fedavg-stateful"])
def test_too_few_valid_uploads_skip_the_round_and_keep_the_model(label):
    sim = Simulator(build_experiment(load_config(None, [*BASE, *ALGORITHMS[label], "federation.min_clients=3"])))
    before = {k: v.clone() for k, v in sim.server.global_model_state().items()}
    sim.tamper = lambda rnd, cid, p: {**p, "@num_samples": -1} if (rnd, cid) in ((1, 0), (1, 2)) else p
    rec = sim.run_round(1)
    assert rec.skipped and sorted(rec.rejected) == [0, 2]
    after = sim.server.global_model_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    sim.tamper = None
    rec2 = sim.run_round(2)  # a stateful broadcast after a skipped round carries no stale update
    assert not rec2.skipped and rec2.rejected == {}
    ref = Simulator(build_experiment(load_config(None, [*BASE, *ALGORITHMS[label], "federation.min_clients=3"])))
    ref.tamper = lambda rnd, cid, p: None if rnd == 1 else p  # round 1 lost entirely
    ref.run_round(1)
    ref.run_round(2)
    want = ref.server.global_model_state()
    assert all(torch.equal(sim.server.global_model_state()[k], want[k]) for k in want)


def test_every_upload_non_finite_means_the_run_diverged():
    sim = _sim("fedavg")
    sim.tamper = lambda rnd, cid, p: {**p, _first_float(p): p[_first_float(p)] * float("nan")}
    with pytest.raises(Diverged, match="every client's upload"):
        sim.run_round(1)


def test_check_upload_passes_an_honest_upload():
    sim = _sim("fedloru")
    seen = []
    sim.tamper = lambda rnd, cid, p: seen.append(p) or p
    sim.run_round(1)
    assert seen and all(check_upload(p, sim.rounds.max_upload_bytes) is None for p in seen)


_FUZZ_SIMS = {}


def _fuzz_sim(label):
    if label not in _FUZZ_SIMS:
        sim = _sim(label)
        honest = []
        sim.tamper = lambda rnd, cid, p: honest.append((cid, p)) or p
        sim.run_round(1)
        _FUZZ_SIMS[label] = (sim, honest)
    return _FUZZ_SIMS[label]


tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.int8, torch.bool]),
    st.floats(allow_nan=True, allow_infinity=True, width=16),
)
scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=5), st.booleans())
values = st.one_of(tensors, scalars)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    label=st.sampled_from(["fedavg+topk", "mapa", "fedloru", "fedhm", "mfedloru", "fedavg+greedylore"]),
    edits=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["delete", "replace", "add", "reshape"]), st.integers(0, 50), values), max_size=4),
    random_payload=st.dictionaries(st.text(min_size=1, max_size=8), values, max_size=5),
    replace_all=st.booleans(),
)
def test_fuzzed_uploads_never_crash_the_server(label, edits, random_payload, replace_all):
    sim, honest = _fuzz_sim(label)
    uploads = [(cid, dict(p)) for cid, p in honest]
    if replace_all:
        uploads[0] = (uploads[0][0], random_payload)
    for who, op, pick, value in edits:
        cid, p = uploads[who % len(uploads)]
        names = list(p) or ["x"]
        name = names[pick % len(names)]
        if op == "delete":
            p.pop(name, None)
        elif op == "replace":
            p[name] = value
        elif op == "add":
            p[f"extra{pick}"] = value
        elif op == "reshape" and isinstance(p.get(name), torch.Tensor) and p[name].numel() > 1:
            p[name] = p[name].reshape(-1)[1:]
    res = aggregate_checked(sim.server, 2, uploads, max_bytes=sim.rounds.max_upload_bytes)
    assert set(res.accepted) | set(res.rejected) <= {cid for cid, _ in uploads}
    assert not set(res.accepted) & set(res.rejected)
    state = res.server.global_model_state()
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# -- streaming aggregation: each upload folded in as it arrives ---------------------------------
def _at_once(server):
    """A server half that only has ``aggregate`` (the uploads of a round at once), around an
    algorithm's own: what a user's server half without fold/finish gets."""
    from rankfed.protocol import ServerHalf

    class AtOnce(ServerHalf):
        def __init__(self, inner):
            self.inner = inner

        def configure(self, rnd, client_ids):
            return self.inner.configure(rnd, client_ids)

        def broadcast(self, rnd):
            return self.inner.broadcast(rnd)

        def aggregate(self, rnd, replies):
            return type(self.inner).aggregate(self.inner, rnd, replies)  # the inner's fold/finish, all at once

        def global_model_state(self):
            return self.inner.global_model_state()

    return AtOnce(server)


@pytest.mark.parametrize("label", ["fedavg", "fedavg+topk", "mapa", "fedloru", "fedhm", "mfedloru"])
def test_streaming_equals_aggregating_the_round_at_once(label):
    """The same uploads in the same order give bitwise the same model folded one at a time or
    aggregated at once (a server half without fold), bad uploads dropped with the same reasons."""
    stream, at_once = _sim(label), _sim(label)
    at_once.server = _at_once(at_once.server)
    assert stream.server.streams and not at_once.server.streams
    corrupt, _ = FAULTS["wrong shape"]
    for sim in (stream, at_once):
        sim.tamper = lambda rnd, cid, p: corrupt(p) if (rnd, cid) == (2, 3) else p
    for rnd in (1, 2, 3):
        a, b = stream.run_round(rnd), at_once.run_round(rnd)
        assert a.rejected.keys() == b.rejected.keys() == ({3} if rnd == 2 else set())
        assert a.train_loss == b.train_loss
    got, want = stream.server.global_model_state(), at_once.server.global_model_state()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("label", ["fedavg", "mapa", "fedloru", "fedhm"])
def test_the_simulator_keeps_no_upload_once_it_is_folded_in(label, monkeypatch):
    """A round holds O(model) beyond the upload in hand: when client i's upload is folded in,
    no earlier client's upload is alive any more (weak references to its tensors are dead)."""
    import gc
    import weakref

    sim = Simulator(build_experiment(load_config(None, [*BASE, *ALGORITHMS[label], "federation.clients=6"])))
    cls = type(sim.server)
    real, seen, alive_at_fold = cls.fold, [], []

    def spy(self, rnd, cid, payload):
        gc.collect()
        alive_at_fold.append(sum(ref() is not None for ref in seen))
        seen.extend(weakref.ref(v) for v in payload.values() if isinstance(v, torch.Tensor))
        return real(self, rnd, cid, payload)

    monkeypatch.setattr(cls, "fold", spy)
    rec = sim.run_round(1)
    assert len(rec.clients) == 6 and not rec.rejected
    assert alive_at_fold == [0] * 6
