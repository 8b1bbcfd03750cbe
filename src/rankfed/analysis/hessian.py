"""The stable rank of a loss Hessian, without forming the Hessian.

FedLoRU's Section 3.1 compares ``srank(H) = ||H||_F^2 / ||H||_2^2`` of the loss
Hessian on a small dataset (a client's) with that on a large one (the server's)
and proves (Theorem 3.3) that the smaller dataset's is higher in the limit.
For a real network H is d x d with d in the thousands to millions, so:

* ``H v`` comes from autograd (forward-over-reverse: ``torch.func.jvp`` of
  ``torch.func.grad``), one product costing about two backward passes;
* ``||H||_2`` = the largest |eigenvalue|, from Lanczos with full
  reorthogonalisation (the extreme Ritz values of an m-step Krylov space);
* ``||H||_F^2 = tr(H^2) = E[||H v||^2]`` for Rademacher ``v`` (Hutchinson), with
  the probes' standard error giving a confidence interval.

The model is evaluated in ``eval()`` mode (no dropout; BatchNorm with its running
statistics) so the loss is a fixed function of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from rankfed.local import Task, call_model

__all__ = ["HessianOperator", "lanczos_extremes", "hutchinson_frobenius_sq", "StableRank", "stable_rank", "model_hessian"]

Vector = torch.Tensor  # flat, float64 or float32


class HessianOperator:
    """``v -> H v`` for the Hessian of ``loss(theta)`` at ``theta0`` (flat vectors).

    ``loss`` maps a flat parameter vector to a scalar. Products are computed in the
    dtype of ``theta0``.
    """

    def __init__(self, loss: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor):
        self.loss, self.theta0 = loss, theta0.detach()
        self.dim = theta0.numel()
        self._grad = grad(loss)
        self.calls = 0

    def __call__(self, v: Vector) -> Vector:
        self.calls += 1
        return jvp(self._grad, (self.theta0,), (v.to(self.theta0.dtype),))[1].detach()


def model_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 0, task: Task | None = None) -> HessianOperator:
    """The Hessian of the task's mean loss (default cross-entropy) of ``model`` on ``(x, y)``
    w.r.t. its trainable parameters (buffers fixed). ``batch_size`` > 0 evaluates the loss in
    chunks of that many samples (same value, less memory)."""
    task = task if task is not None else Task()
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    n = len(y)
    chunk = batch_size if batch_size > 0 else n

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        p = {name: t.view(shape) for name, t, shape in zip(names, parts, shapes)}
        total = theta.new_zeros(())
        count = 0
        for s in range(0, n, chunk):
            out = call_model(lambda *a, **k: functional_call(model, {**p, **buffers}, a, k), x[s : s + chunk])
            part, c = task.loss_sum(out, y[s : s + chunk])
            total, count = total + part, count + c
        return total / count

    return HessianOperator(loss, theta0)


def lanczos_extremes(hvp: Callable[[Vector], Vector], dim: int, steps: int = 30, *, seed: int = 0, dtype=torch.float64) -> tuple[float, float, dict]:
    """(smallest, largest) eigenvalue estimates of the symmetric operator ``hvp`` from ``steps``
    Lanczos iterations with full reorthogonalisation, plus diagnostics (``steps`` taken and the
    residual bound ``|beta_m * s_m|`` of the Ritz pair of largest magnitude)."""
    steps = min(steps, dim)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    q /= q.norm()
    Q = [q]
    alphas, betas = [], []
    beta = 0.0
    for j in range(steps):
        w = hvp(Q[j]).to(dtype)
        alpha = float(w @ Q[j])
        alphas.append(alpha)
        w = w - alpha * Q[j] - (beta * Q[j - 1] if j > 0 else 0.0)
        basis = torch.stack(Q)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10 * max(1.0, max(abs(a) for a in alphas)):
            break
        betas.append(beta)
        Q.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=dtype))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=dtype)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    top = int(torch.argmax(evals.abs()))
    residual = abs(beta * float(evecs[-1, top]))
    return float(evals[0]), float(evals[-1]), {"steps": k, "residual": residual}


def hutchinson_frobenius_sq(hvp: Callable[[Vector], Vector], dim: int, probes: int = 100, *, seed: int = 0, dtype=torch.float64) -> tuple[float, float]:
    """(estimate, standard error) of ``||H||_F^2 = tr(H^2)`` from ``probes`` Rademacher vectors:
    the mean of ``||H v||^2`` and its sample standard deviation over sqrt(probes)."""
    if probes < 2:
        raise ValueError(f"probes = {probes}: need at least 2 for a standard error")
    gen = torch.Generator().manual_seed(seed + 0x48A7)
    vals = []
    for _ in range(probes):
        v = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(dtype) * 2 - 1
        vals.append(float(hvp(v).to(dtype).pow(2).sum()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(probes))


@dataclass
class StableRank:
    """One stable-rank estimate. ``ci_low``/``ci_high``: the ``confidence`` interval from the
    Hutchinson probes' standard error (normal approximation), taking ``spectral_norm`` as exact
    (Lanczos converges to it far faster than the probes average; ``lanczos_residual`` says how
    far it is from converged)."""

    stable_rank: float
    ci_low: float
    ci_high: float
    frobenius_sq: float
    frobenius_sq_se: float
    spectral_norm: float
    lambda_max: float
    lambda_min: float
    probes: int
    lanczos_steps: int
    lanczos_residual: float
    hvp_calls: int
    confidence: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def stable_rank(hvp: HessianOperator | Callable[[Vector], Vector], dim: int | None = None, *, probes: int = 100, lanczos_steps: int = 30, seed: int = 0, confidence: float = 0.95) -> StableRank:
    """Estimate ``srank(H) = ||H||_F^2 / ||H||_2^2`` of the operator ``hvp`` (see the module)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1)")
    dim = dim if dim is not None else hvp.dim  # type: ignore[union-attr]
    calls0 = getattr(hvp, "calls", 0)
    lo, hi, diag = lanczos_extremes(hvp, dim, lanczos_steps, seed=seed)
    spec = max(abs(lo), abs(hi))
    if spec == 0.0:
        raise ValueError("the Hessian is zero here (spectral norm 0): its stable rank is undefined")
    fro, se = hutchinson_frobenius_sq(hvp, dim, probes, seed=seed)
    z = _z(confidence)
    s2 = spec * spec
    return StableRank(
        stable_rank=fro / s2,
        ci_low=max(fro - z * se, 0.0) / s2,
        ci_high=(fro + z * se) / s2,
        frobenius_sq=fro,
        frobenius_sq_se=se,
        spectral_norm=spec,
        lambda_max=hi,
        lambda_min=lo,
        probes=probes,
        lanczos_steps=diag["steps"],
        lanczos_residual=diag["residual"],
        hvp_calls=getattr(hvp, "calls", 0) - calls0,
        confidence=confidence,
    )
