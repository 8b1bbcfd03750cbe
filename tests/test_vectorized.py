"""Vectorised cohort training equals sequential training up to float summation order.

Tolerance: after 2 rounds of a few dozen SGD steps, weights within 1e-4 absolute (float32
sums in another order drift by about 1e-7 per step); byte counts and sampled clients exact.
"""

import pytest
import torch

from rankfed.app.config import load_config
from rankfed.app.experiment import build_experiment, run_experiment
from rankfed.local.cohort import CohortTrainer, cohort_supported
from rankfed.sim import Simulator

# unequal client sizes (Dirichlet): padded last batches and clients that finish early
BASE = ["task.partition=dirichlet", "task.alpha=0.3", "task.model=cnn2", "federation.clients=8", "federation.participation=0.5", "federation.rounds=2", "client.batch_size=16"]
SETTINGS = {
    "sgd-momentum": ["client.momentum=0.9"],
    "nesterov-wd-clip": ["client.momentum=0.9", "client.nesterov=true", "client.weight_decay=0.01", "client.grad_clip=0.5"],
    "plain-sgd-cosine": ["client.lr_schedule=cosine", "client.epochs=2"],
    "topk-error-feedback": ["client.momentum=0.9", "algorithm.compressor=topk", "algorithm.topk_ratio=0.1", "algorithm.error_feedback=true"],
    "stateful": ["client.momentum=0.9", "federation.client_kind=stateful"],
    # MAPA: the cohort trains B through W + vec(A B); stateful (the paper's) and stateless clients
    "mapa": ["algorithm.name=mapa", "algorithm.k=32", "client.momentum=0.9", "client.grad_clip=1.0"],
    "mapa-stateless": ["algorithm.name=mapa", "algorithm.k=32", "federation.client_kind=stateless", "client.weight_decay=0.01"],
    # the LoRA family: factors trained over a frozen base shared by the cohort
    "fa_lora": ["algorithm.name=fa_lora", "algorithm.rank=2", "client.momentum=0.9"],
    "fedlora": ["algorithm.name=fedlora", "algorithm.rank=2", "client.momentum=0.9"],
    "fedloru-merge-every-round": ["algorithm.name=fedloru", "algorithm.rank=2", "algorithm.tau=1", "client.momentum=0.9"],
    "fedloru-stateless": ["algorithm.name=fedloru", "algorithm.rank=2", "algorithm.tau=1", "federation.client_kind=stateless"],
}


@pytest.fixture
def cohort_calls(monkeypatch):
    calls = []
    real = CohortTrainer.train
    monkeypatch.setattr(CohortTrainer, "train", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _run_both(tmp_path, overrides):
    runs, models = {}, {}
    for mode in ("sequential", "vectorized"):
        cfg = load_config(None, [*overrides, f"federation.execution={mode!r}"])
        runs[mode] = run_experiment(cfg, tmp_path / mode)
        models[mode] = torch.load(tmp_path / mode / "model.pt")
    return runs, models


@pytest.mark.parametrize("name", list(SETTINGS))
def test_vectorized_equals_sequential(tmp_path, name, cohort_calls):
    runs, models = _run_both(tmp_path, [*BASE, *SETTINGS[name]])
    assert len(cohort_calls) == 2  # the vectorised run really trained its 2 rounds as cohorts
    assert runs["vectorized"]["cohort_rounds"] == 2 and runs["sequential"]["cohort_rounds"] == 0
    a, b = models["sequential"], models["vectorized"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=f"{name}: {k}")
    for key in ("total_uplink_bytes", "total_downlink_bytes", "uploads"):
        assert runs["vectorized"][key] == runs["sequential"][key]
    assert runs["vectorized"]["final_accuracy"] == pytest.approx(runs["sequential"]["final_accuracy"], abs=0.02)


@pytest.mark.parametrize("algorithm", ["pfedloru", "mfedloru", "fedhm"])
def test_algorithms_without_a_cohort_path_train_sequentially(tmp_path, algorithm, cohort_calls):
    with pytest.warns(UserWarning, match=f"clients train one by one .*{algorithm}"):
        runs, models = _run_both(tmp_path, [*BASE, f"algorithm.name={algorithm}", "algorithm.rank=2"])
    assert cohort_calls == [] and runs["vectorized"]["cohort_rounds"] == 0
    assert all(torch.equal(models["sequential"][k], models["vectorized"][k]) for k in models["sequential"])


def test_compiled_cohort_step_equals_sequential(tmp_path, cohort_calls):
    """torch.compile of the whole step (one graph, compiled once: the second round reuses it)."""
    base = ["task.partition=dirichlet", "task.alpha=0.3", "task.model=mlp", "federation.clients=6", "federation.participation=0.5", "federation.rounds=2", "client.batch_size=16", "client.momentum=0.9", "client.lr_schedule=cosine"]
    seq = load_config(None, [*base, "federation.execution='sequential'"])
    run_experiment(seq, tmp_path / "sequential")
    vec = load_config(None, [*base, "federation.execution='vectorized'", "federation.compile=true"])
    run_experiment(vec, tmp_path / "compiled")
    assert len(cohort_calls) == 2
    a, b = (torch.load(tmp_path / m / "model.pt") for m in ("sequential", "compiled"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_a_compile_failure_names_the_setting(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))  # no C++ compiler
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, ["task.model=mlp", "federation.clients=4", "federation.rounds=1", "client.batch_size=7", "federation.execution='vectorized'", "federation.compile=true"])
    with pytest.raises(RuntimeError, match=r"federation.compile = true: torch.compile could not compile .*set federation.compile = false"):
        run_experiment(cfg, tmp_path / "run")


def test_unsupported_settings_fall_back_to_sequential_exactly(tmp_path, cohort_calls):
    with pytest.warns(UserWarning, match="adamw"):
        _, models = _run_both(tmp_path, [*BASE, "client.optimizer=adamw", "client.lr=0.001"])
    assert cohort_calls == []
    assert all(torch.equal(models["sequential"][k], models["vectorized"][k]) for k in models["sequential"])


def test_auto_execution_is_sequential_on_cpu():
    sim = Simulator(build_experiment(load_config(None, ["task.model=cnn2"])))
    assert sim.execution == "sequential"
    sim = Simulator(build_experiment(load_config(None, ["task.model=cnn2", "federation.execution='vectorized'"])))
    assert sim.execution == "vectorized"


def test_cohort_supported_names_the_reason():
    exp = build_experiment(load_config(None, ["task.model=cnn2"]))
    assert cohort_supported(exp.model, exp.ctx.local) is None
    adam = load_config(None, ["client.optimizer=adamw"]).client
    assert "adamw" in cohort_supported(exp.model, adam)
    bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert cohort_supported(bn, exp.ctx.local) is None
    assert "momentum=None" in cohort_supported(torch.nn.Sequential(torch.nn.BatchNorm1d(2, momentum=None)), exp.ctx.local)
    other = torch.nn.Linear(2, 2)
    other.register_buffer("scale", torch.ones(2))
    assert "'scale'" in cohort_supported(other, exp.ctx.local)
    drop = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    assert "dropout" in cohort_supported(drop, exp.ctx.local)
    with pytest.raises(Exception, match="federation.execution"):
        load_config(None, ["federation.execution='parallel'"])


# federation.workers: clients trained by several threads at once, each with its own client half
# and model; every client's work is fit() alone, so the result equals one-at-a-time training up to
# the float order of kernels run on fewer threads (1e-5 after 2 rounds)
WORKER_SETTINGS = {
    "fedavg-greedylore": ["client.momentum=0.9", "algorithm.compressor=greedylore", "algorithm.compress_rank=2"],
    "mapa": ["algorithm.name=mapa", "algorithm.k=32"],
    "fedloru-merge": ["algorithm.name=fedloru", "algorithm.rank=2", "algorithm.tau=1"],
    "pfedloru": ["algorithm.name=pfedloru", "algorithm.rank=2"],
    "fedhm": ["algorithm.name=fedhm", "algorithm.rank=2"],
}


@pytest.mark.parametrize("name", list(WORKER_SETTINGS))
def test_client_threads_equal_one_at_a_time(tmp_path, name, monkeypatch):
    from rankfed.sim.simulator import Simulator

    threaded = []
    real = Simulator._fit_in_threads
    monkeypatch.setattr(Simulator, "_fit_in_threads", lambda self, *a: threaded.append(1) or real(self, *a))
    runs, models = {}, {}
    for workers in (1, 2):
        cfg = load_config(None, [*BASE, *WORKER_SETTINGS[name], "federation.execution='sequential'", f"federation.workers={workers}"])
        runs[workers] = run_experiment(cfg, tmp_path / str(workers))
        models[workers] = torch.load(tmp_path / str(workers) / "model.pt")
    assert len(threaded) == 2
    for k in models[1]:
        torch.testing.assert_close(models[2][k], models[1][k], rtol=0, atol=1e-5, msg=f"{name}: {k}")
    for key in ("total_uplink_bytes", "total_downlink_bytes", "uploads"):
        assert runs[2][key] == runs[1][key]
    if name == "pfedloru":  # personal factors kept per client, whichever thread trained it
        assert runs[2]["final_personal_accuracy"] == pytest.approx(runs[1]["final_personal_accuracy"], abs=1e-6)


def test_client_threads_are_refused_for_dropout_and_bad_counts():
    with pytest.raises(Exception, match="federation.workers"):
        load_config(None, ["federation.workers=0"])
    exp = build_experiment(load_config(None, ["task.model=mlp", "federation.workers=2"]))
    assert Simulator(exp).workers == 2
    exp.model.add_module("drop", torch.nn.Dropout(0.5))
    with pytest.warns(UserWarning, match="dropout"):
        assert Simulator(exp).workers == 1


# BatchNorm in a cohort: each client normalises with its real samples' statistics (padding left
# out: clients of 13, 20 and 7 samples in batches of 8 have partial last batches) and its running
# statistics travel in the upload, as when it trains alone
def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def _bn_simulator(algorithm: str, execution: str, batch_stats: bool = False, **options):
    from conftest import make_sim

    from rankfed.algorithms import get_algorithm
    from rankfed.local import ClientData, LocalTraining
    from rankfed.models import batch_stats_only

    g = torch.Generator().manual_seed(1)
    clients = []
    for n in (13, 20, 7):
        x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        clients.append(ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0]))
    test = (torch.randn(30, 1, 4, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    cfg = LocalTraining(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=8, epochs=2)
    model = _bn_model()
    if batch_stats:  # task.batchnorm = "batch": no running statistics, batch statistics always
        batch_stats_only(model)
    return make_sim(get_algorithm(algorithm, options), model, clients, test, cfg, rounds=2, per_round=3, execution=execution)


@pytest.mark.parametrize("algorithm,options", [("fedavg", {}), ("mapa", {"k": 16}), ("fedlora", {"rank": 2, "patterns": ["*"], "exclude": []})])
def test_batchnorm_cohorts_equal_sequential(algorithm, options):
    sims = {mode: _bn_simulator(algorithm, mode, **options) for mode in ("sequential", "vectorized")}
    for sim in sims.values():
        sim.run()
    assert sims["vectorized"].cohort_rounds == 2
    a, b = (sims[m].server.global_model_state() for m in ("sequential", "vectorized"))
    assert any("running_var" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.parametrize("algorithm,options", [("fedavg", {}), ("fedloru", {"rank": 2, "tau": 1, "patterns": ["*"], "exclude": [], "base_init": "zero"})])
def test_batch_statistics_cohorts_leave_the_padding_out_as_sequential_training_does(algorithm, options):
    sims = {mode: _bn_simulator(algorithm, mode, batch_stats=True, **options) for mode in ("sequential", "vectorized")}
    for sim in sims.values():
        sim.run()
    assert sims["vectorized"].cohort_rounds == 2
    a, b = (sims[m].server.global_model_state() for m in ("sequential", "vectorized"))
    assert not any("running" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_batchnorm_cohorts_are_not_compiled_but_still_train():
    seq, vec = _bn_simulator("fedavg", "sequential"), _bn_simulator("fedavg", "vectorized")
    vec.compile = True
    with pytest.warns(UserWarning, match="BatchNorm is not compiled"):
        vec.run()
    seq.run()
    assert vec.cohort_rounds == 2
    a, b = seq.server.global_model_state(), vec.server.global_model_state()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_a_cohort_out_of_memory_trains_the_round_one_by_one(tmp_path, monkeypatch):
    """Nothing of the failed cohort is kept: the run ends as a sequential run does, bit for bit."""
    calls = []

    def oom(self, *a, **k):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CohortTrainer, "_train", oom)
    overrides = [*BASE, "client.momentum=0.9", "algorithm.compressor=topk", "algorithm.topk_ratio=0.1", "algorithm.error_feedback=true"]
    run_experiment(load_config(None, [*overrides, "federation.execution='sequential'"]), tmp_path / "seq")
    with pytest.warns(UserWarning, match="does not fit in cpu memory.*one by one from round 1 on"):
        summary = run_experiment(load_config(None, [*overrides, "federation.execution='vectorized'"]), tmp_path / "vec")
    assert len(calls) == 1 and summary["execution"] == "sequential" and summary["cohort_rounds"] == 0
    a, b = (torch.load(tmp_path / m / "model.pt") for m in ("seq", "vec"))
    assert all(torch.equal(a[k], b[k]) for k in a)
