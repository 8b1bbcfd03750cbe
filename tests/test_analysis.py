"""The Hessian stable-rank estimator and the gradient-similarity analysis.

Tolerances: Lanczos extreme eigenvalues to 1e-6 relative (1e-4 on a float32
model) when the Krylov space can hold the spectrum's extremes; Hutchinson's
||H||_F^2 (and so the stable rank) to within 4% with 2,000 probes; the 95%
interval covering the exact value in at least 34 of 40 seeds.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from rankfed.app.analyze import analyze_gradient_similarity, analyze_stable_rank, find_checkpoints
from rankfed.analysis.hessian import HessianOperator, hutchinson_frobenius_sq, lanczos_extremes, model_hessian, stable_rank
from rankfed.analysis.similarity import gradient_similarity, low_rank, mean_pairwise_cosine
from rankfed.app.config import load_config, to_toml
from rankfed.data import ClientData
from rankfed.app.experiment import run_experiment


def _quadratic(d=60, seed=0):
    """0.5 * theta^T A theta with a known spectrum (a separated top, negative eigenvalues too)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([10.0, -6.0], dtype=torch.float64), torch.linspace(-2.0, 3.0, d - 2, dtype=torch.float64)])
    a = q @ torch.diag(lam) @ q.T
    return HessianOperator(lambda th: 0.5 * th @ a @ th, torch.randn(d, generator=g, dtype=torch.float64)), a, lam


def test_hvp_of_a_quadratic_is_the_matrix_product():
    op, a, _ = _quadratic()
    v = torch.randn(60, dtype=torch.float64)
    torch.testing.assert_close(op(v), a @ v, rtol=1e-10, atol=1e-10)


def test_lanczos_finds_both_ends_of_the_spectrum():
    op, _, lam = _quadratic()
    lo, hi, diag = lanczos_extremes(op, 60, steps=40)
    assert lo == pytest.approx(float(lam.min()), rel=1e-6)
    assert hi == pytest.approx(float(lam.max()), rel=1e-6)
    assert diag["residual"] < 1e-6


def test_stable_rank_of_a_quadratic_matches_the_exact_value():
    op, a, lam = _quadratic()
    exact = float((lam**2).sum() / lam.abs().max() ** 2)  # ||A||_F^2 / ||A||_2^2
    est = stable_rank(op, probes=2000, lanczos_steps=40, seed=1)
    assert est.spectral_norm == pytest.approx(10.0, rel=1e-6)
    assert est.stable_rank == pytest.approx(exact, rel=0.04)
    assert est.ci_low <= exact <= est.ci_high
    assert est.frobenius_sq == pytest.approx(float((a**2).sum()), rel=0.04)


def test_hutchinson_standard_error_shrinks_like_one_over_root_probes():
    op, _, _ = _quadratic()
    _, se100 = hutchinson_frobenius_sq(op, 60, probes=100, seed=3)
    _, se1600 = hutchinson_frobenius_sq(op, 60, probes=1600, seed=3)
    assert se1600 == pytest.approx(se100 / 4, rel=0.35)


def _mlp_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(40, 4)
    y = torch.randint(0, 3, (40,))
    return model, x, y


def test_model_hessian_matches_the_dense_autograd_hessian():
    model, x, y = _mlp_and_data()
    op = model_hessian(model, x, y, batch_size=16)  # chunked loss: the same function
    dense = torch.autograd.functional.hessian(op.loss, op.theta0)
    for _ in range(3):
        v = torch.randn(op.dim)
        torch.testing.assert_close(op(v), dense @ v, rtol=1e-4, atol=1e-6)
    eig = torch.linalg.eigvalsh(dense.double())
    exact = float((eig**2).sum() / eig.abs().max() ** 2)
    est = stable_rank(op, probes=2000, lanczos_steps=op.dim, seed=0)
    assert est.spectral_norm == pytest.approx(float(eig.abs().max()), rel=1e-4)
    assert est.stable_rank == pytest.approx(exact, rel=0.04)


def test_the_confidence_interval_covers_the_truth_about_as_often_as_it_says():
    """Over 40 seeds, the 95% interval of ||H||_F^2 (100 probes each) holds the exact value in
    at least 34 (a binomial(40, 0.95) draw falls below 34 with probability < 1%)."""
    op, a, _ = _quadratic()
    exact = float((a**2).sum())
    covered = 0
    for s in range(40):
        f, se = hutchinson_frobenius_sq(op, 60, probes=100, seed=s)
        covered += abs(f - exact) <= 1.959964 * se
    assert covered >= 34


def test_stable_rank_rejects_a_zero_hessian():
    op = HessianOperator(lambda th: th.sum() * 0.0, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="spectral norm 0"):
        stable_rank(op, probes=4, lanczos_steps=3)


def test_low_rank_is_the_svd_truncation():
    g = torch.randn(8, 3, 2, 2)
    r2 = low_rank(g, 2)
    assert r2.shape == g.shape
    assert int(torch.linalg.matrix_rank(r2.reshape(8, -1))) == 2
    s = torch.linalg.svdvals(g.reshape(8, -1))
    # Eckart-Young: the error is the energy of the dropped singular values
    assert float((g - r2).pow(2).sum()) == pytest.approx(float(s[2:].pow(2).sum()), rel=1e-4)
    torch.testing.assert_close(low_rank(g, 12), g)


def test_mean_pairwise_cosine():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert mean_pairwise_cosine([a, a, a]) == pytest.approx(1.0)
    assert mean_pairwise_cosine([a, b]) == pytest.approx(0.0)
    assert mean_pairwise_cosine([a, b, a]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine([a])


def test_low_rank_gradients_agree_more_when_clients_share_a_low_rank_direction():
    """Gradients = a shared rank-1 signal + each client's full-rank noise: truncating to rank 1
    keeps the signal and drops most noise, so the approximations agree more than the gradients."""
    torch.manual_seed(0)
    model = nn.Linear(30, 20, bias=False)
    target = torch.randn(20, 1) @ torch.randn(1, 30)  # the shared direction, through the data
    clients = {}
    for cid in range(4):
        x = torch.randn(64, 30)
        y = (x @ target.T + 2.0 * torch.randn(64, 20)).argmax(1)  # labels from signal + client noise
        clients[cid] = ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0])
    res = gradient_similarity(model, clients, rank=1)
    assert set(res.per_layer) == {"weight"}
    assert res.low_rank > res.full


def _tiny_run(tmp_path, rounds=4, every=2):
    cfg = load_config(None, ["task.model=mlp", "task.model_options={hidden=[16]}", "federation.clients=4", f"federation.rounds={rounds}", f"federation.checkpoint_every={every}"])
    run_experiment(cfg, tmp_path / "run")
    return tmp_path / "run", cfg


def test_checkpoints_every_n_rounds_and_the_analyses_read_them(tmp_path):
    run, _ = _tiny_run(tmp_path, rounds=5, every=2)
    assert [r for r, _ in find_checkpoints(run)] == [0, 2, 4, 5]
    rows = analyze_stable_rank(run, (20, 200), subsets=2, probes=20, lanczos_steps=10, rounds=[0, 5], out=tmp_path / "a")
    assert [(r["round"], r["size"]) for r in rows] == [(0, 20), (0, 20), (0, 200), (0, 200), (5, 20), (5, 20), (5, 200), (5, 200)]
    assert all(r["stable_rank"] >= 1 - 1e-9 and r["ci_low"] <= r["stable_rank"] <= r["ci_high"] for r in rows)
    for f in ("stable_rank.json", "stable_rank.md", "stable_rank.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    sims = analyze_gradient_similarity(run, clients=3, rank=2, out=tmp_path / "b")
    assert [s["round"] for s in sims] == [0, 2, 4, 5] and len(sims[0]["clients"]) == 3
    assert all(-1 <= s["full"] <= 1 and -1 <= s["low_rank"] <= 1 for s in sims)
    assert set(sims[0]["per_layer"]) == {"fc1.weight", "fc2.weight"}
    saved = json.loads((tmp_path / "b" / "gradient_similarity.json").read_text())
    assert saved[0]["full"] == pytest.approx(sims[0]["full"])


def test_analyze_command_trains_an_experiment_file_then_analyses_it(tmp_path):
    cfg = load_config(None, ["task.model=mlp", "task.model_options={hidden=[16]}", "federation.clients=4", "federation.rounds=2"])
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(cfg))
    args = [sys.executable, "-m", "rankfed", "-q", "analyze", "stable-rank", str(path), "--sizes", "10,100", "--subsets", "1", "--probes", "10", "--lanczos-steps", "8", "--out", str(tmp_path / "o")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r for r, _ in find_checkpoints(tmp_path / "o" / "run")] == [0, 1, 2]
    assert "srank, n = 10" in proc.stdout and (tmp_path / "o" / "stable_rank.png").exists()


def test_analyze_errors_name_the_problem(tmp_path):
    cfg = load_config(None, ["federation.rounds=1"])
    run_experiment(cfg, tmp_path / "nock")
    for args, needle in [
        (["stable-rank", str(tmp_path / "nock")], "has no checkpoints"),
        (["stable-rank", str(tmp_path / "missing")], "no such run folder"),
        (["stable-rank", str(tmp_path / "nock"), "--sizes", "5,x"], "--sizes '5,x'"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "rankfed", "analyze", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run, _ = _tiny_run(tmp_path / "t", rounds=2, every=1)
    with pytest.raises(Exception, match="no checkpoint for round"):
        analyze_stable_rank(run, (10,), rounds=[7])
    with pytest.raises(Exception, match="--clients 9"):
        analyze_gradient_similarity(run, clients=9)
