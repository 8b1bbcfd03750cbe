"""Low-rank gradient compression for data-parallel training: PowerSGD, GreedyLore and a random subspace.

Unlike the uplink compressors of this package (one client compresses, the
server decompresses), these run on every worker at once and communicate
through an *all-reduce* they are handed as a function::

    allreduce(t: Tensor) -> Tensor   # the mean of t over the workers (a new tensor)

so the same code runs inside a DDP comm hook (``dist.all_reduce`` then divide)
and in a single-process test whose workers are threads (:class:`ThreadGroup`).
Each compressor is a small object with an explicit, picklable state::

    comp = greedylore(rank=4, update_gap=50, warmup_steps=10)
    state = comp.init({name: grad.shape for ...})            # per worker
    averaged, state = comp.reduce(grads, state, allreduce, seed)

``reduce`` takes this worker's gradients (a dict of tensors) and returns the
gradients every worker uses, identical on all of them. ``state.stats`` counts
the numbers all-reduced and what dense would have, and keeps two diagnostics
of the last step (:class:`CompressionStats`).

**Which tensors are compressed.** Weight matrices (conv kernels flattened to
(out, in*kh*kw)); everything else is all-reduced dense, in one collective:

* 1-D tensors (biases, norms);
* parameters whose name matches one of ``dense_patterns`` (``fnmatch`` patterns,
  case-sensitive; default none here, but :meth:`rankfed.ddp.LowRankHookState.for_model`
  and ``rankfed ddp`` default to :data:`DEFAULT_DENSE_PATTERNS` plus the model's
  output head, as GreedyLore's authors' code never compresses embeddings or heads);
* matrices where compression would not send ``min_saving`` (default 2) times fewer
  numbers than dense, counted as ``rank * (n + m) + min(n, m)`` for every method
  (:func:`~rankfed.compress.base.low_rank_pays`, rankfed's one rule). The authors' code
  compresses when ``2 * rank * max(n, m) < n * m``; rankfed's rule is stricter (an
  upper bound on what either PowerSGD or GreedyLore sends, so both compress the same
  matrices): a square n x n matrix needs n >= 4 rank + 2 here against n > 2 rank
  there. ``min_saving=0`` compresses every matrix. The number of GreedyLore probes
  does not enter the rule.

**Dense warm-up.** Every method all-reduces everything dense for its first
``warmup_steps`` steps (default 0).

PowerSGD (Vogels et al. 2019): M = g + e; P = avg(M Q); orthonormalise P;
Q = avg(M^T P); the gradient is P Q^T and e = M - P Q^T; Q is kept (warm start).

GreedyLore (Chen et al. 2025, as ../shared/DESIGN.md records it): every
``update_gap`` steps after the warm-up a *refresh*: X = g + e is all-reduced
dense, the SVD of the average gives the orthonormal basis U of its smaller
side (kept on every worker, never sent), and the error is reset (everything
was sent). On the other steps X = g + e; each direction u_i is scored by its
energy in the averaged X, estimated as avg(u_i^T X z_i)^2 with a shared-seed
Gaussian z_i (min(n, m) numbers all-reduced); the top ``rank`` directions P
are taken greedily; R = P^T X is all-reduced (rank * max(n, m) numbers); the
gradient is P avg(R) and the error becomes X - P R. ``probes=K`` (not in the
paper) draws K Gaussians per direction and averages the K squared estimates,
which lowers the variance of the score for K * min(n, m) numbers.

Random subspace (the randomised-projection baseline GreedyLore's abstract
compares against): every step a random orthonormal ``rank``-dimensional
subspace P of the smaller side, drawn from (run seed, step, parameter name) on
every worker alike and never sent; R = P^T X is all-reduced (rank * max(n, m)
numbers), the gradient is P avg(R) and the error X - P R.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch

from rankfed.compress.base import LOW_RANK, fold_seed, low_rank_pays, matrix_dims

__all__ = [
    "allreduce_many",
    "AllReduce",
    "CompressionStats",
    "LowRankState",
    "powersgd",
    "greedylore",
    "random_subspace",
    "dense",
    "ThreadGroup",
    "LOWRANK_COMPRESSORS",
    "DEFAULT_DENSE_PATTERNS",
]

AllReduce = Callable[[torch.Tensor], torch.Tensor]

# Parameter names all-reduced dense by default in rankfed ddp and LowRankHookState.for_model:
# embeddings (rankfed's CharLSTM/CharTransformer "embed", "pos_embed"; Hugging Face "embed_tokens",
# GPT-2 "wte"/"wpe") and language-model heads; the output head found by module order is added to them.
DEFAULT_DENSE_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*lm_head*")


@dataclass
class CompressionStats:
    """Numbers all-reduced so far (x4 for float32 bytes), against a dense all-reduce of the same
    gradients, and two diagnostics of the last completed step.

    Diagnostics, over the matrices compressed in that step (None when there were none: a dense
    warm-up step, or a model with no compressible matrix), from *this worker's* tensors, with
    X = g + e (its gradient plus its error buffer before the step), no communication:

    * :attr:`last_captured` = ||P P^T X||^2 / ||X||^2, the share of X's energy in the
      subspace P that was sent (GreedyLore's and the random subspace's P R with R = P^T X;
      PowerSGD's orthonormalised P; a GreedyLore refresh sends X whole: 1), clamped to
      [0, 1] against rounding;
    * :attr:`last_residual` = ||e|| / ||g||, the error buffer after the step over the gradient.
    """

    steps: int = 0
    sent: int = 0
    dense: int = 0
    last_sent: int = 0  # in the last completed step
    pending: int = 0  # in the step under way (a DDP step reduces several buckets)
    # float64 (||P P^T X||^2, ||X||^2, ||e||^2, ||g||^2) summed over the compressed matrices
    last_sums: torch.Tensor | None = field(default=None, compare=False)  # of the last completed step
    pending_sums: torch.Tensor | None = field(default=None, compare=False)  # of the step under way

    @property
    def ratio(self) -> float:
        return self.sent / self.dense if self.dense else 1.0

    @property
    def last_captured(self) -> float | None:
        if self.last_sums is None:
            return None
        cap, x2 = (float(v) for v in self.last_sums[:2].tolist())
        return min(1.0, max(0.0, cap / x2)) if x2 > 0 else None

    @property
    def last_residual(self) -> float | None:
        if self.last_sums is None:
            return None
        e2, g2 = (float(v) for v in self.last_sums[2:].tolist())
        return math.sqrt(e2 / g2) if g2 > 0 else None

    def state_dict(self) -> dict:
        sums = {k: None if v is None else v.detach().clone() for k, v in (("last_sums", self.last_sums), ("pending_sums", self.pending_sums))}
        return {"steps": self.steps, "sent": self.sent, "dense": self.dense, "last_sent": self.last_sent, "pending": self.pending, **sums}

    @classmethod
    def from_state_dict(cls, d: Mapping) -> CompressionStats:
        sums = {k: None if d.get(k) is None else d[k].detach().clone() for k in ("last_sums", "pending_sums")}
        return cls(int(d["steps"]), int(d["sent"]), int(d["dense"]), int(d["last_sent"]), int(d["pending"]), **sums)


@dataclass
class LowRankState:
    """Everything a worker remembers; plain tensors and ints, so it pickles."""

    step: int = 0
    error: dict[str, torch.Tensor] = field(default_factory=dict)  # e, per compressed matrix
    q: dict[str, torch.Tensor] = field(default_factory=dict)  # PowerSGD's warm-start Q
    basis: dict[str, torch.Tensor] = field(default_factory=dict)  # GreedyLore's U (smaller side)
    stats: CompressionStats = field(default_factory=CompressionStats)

    def state_dict(self) -> dict:
        """Plain ints, dicts and tensors (clones): ``step``, ``error``, ``q``, ``basis``, ``stats``."""
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()}  # noqa: E731
        return {"step": self.step, "error": clone(self.error), "q": clone(self.q), "basis": clone(self.basis), "stats": self.stats.state_dict()}

    @classmethod
    def from_state_dict(cls, d: Mapping) -> LowRankState:
        clone = lambda x: {k: v.detach().clone() for k, v in x.items()}  # noqa: E731
        return cls(int(d["step"]), clone(d["error"]), clone(d["q"]), clone(d["basis"]), CompressionStats.from_state_dict(d["stats"]))


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _name_seed(seed: int, name: str) -> int:
    """A seed from the run seed and a tensor name, the same in every process (no str hash)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _step_seed(seed: int, step: int, name: str) -> int:
    """A seed from (run seed, step, tensor name): the random subspace's, the same on every worker."""
    return fold_seed(_name_seed(seed, "random:" + name), step)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """||t||^2 as a float64 scalar tensor (on t's device: no synchronisation)."""
    return torch.linalg.vector_norm(t).double().square()


def _total(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=like.device)


def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def _check_patterns(patterns: Iterable[str] | None) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        raise ValueError(f"dense_patterns must be a list of fnmatch patterns, got the string {patterns!r} (write [{patterns!r}])")
    out = tuple(patterns)
    if not all(isinstance(p, str) for p in out):
        raise ValueError(f"dense_patterns must be a list of strings, got {list(out)!r}")
    return out


class _Base:
    """The common part: what is compressed, the dense warm-up, the counting (see the module docstring).

    Args:
        rank: rank of each compressed matrix (an int >= 1).
        min_saving: compress a matrix only if that sends this many times fewer numbers
            (``rank * (n + m) + min(n, m)`` against ``n * m``; 0 compresses every matrix).
        warmup_steps: all-reduce everything dense for the first this many steps.
        dense_patterns: ``fnmatch`` patterns of parameter names all-reduced dense.
    """

    name = "none"

    def __init__(self, rank: int = 4, min_saving: float = 2.0, warmup_steps: int = 0, dense_patterns: Iterable[str] | None = ()):
        self.rank = _check_int("rank", rank, 1)
        if not min_saving >= 0:
            raise ValueError(f"min_saving must be >= 0, got {min_saving!r}")
        self.min_saving = float(min_saving)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.dense_patterns = _check_patterns(dense_patterns)

    def init(self, shapes: Mapping[str, torch.Size] | None = None) -> LowRankState:
        return LowRankState()

    def compressed(self, name: str, shape: torch.Size) -> bool:
        """2-D or more, not matched by ``dense_patterns``, and the compressed all-reduce sends
        ``min_saving`` times fewer numbers than dense (counted as rank * (n + m) + min(n, m), an
        upper bound for every method; rankfed's one rule, :func:`~rankfed.compress.base.low_rank_pays`)."""
        dims = matrix_dims(shape)
        if self.name == "none" or dims is None or any(fnmatchcase(name, p) for p in self.dense_patterns):
            return False
        n, m = dims
        return low_rank_pays(shape, self.rank * (n + m) + min(n, m), self.min_saving)

    def reduce(self, grads: Mapping[str, torch.Tensor], state: LowRankState, allreduce: AllReduce, seed: int = 0, count_step: bool = True) -> tuple[dict[str, torch.Tensor], LowRankState]:
        """This worker's gradients in, the gradients all workers use out (and the new state).

        ``count_step=False`` when more gradients of the same step follow (DDP's buckets):
        the step counter (warm-up, refresh period, probe seeds) moves on the last call."""
        return self._reduce(grads, state, allreduce, seed, dense_only=state.step < self.warmup_steps, count_step=count_step)

    def _reduce(self, grads, state, allreduce, seed, dense_only: bool, count_step: bool = True):
        matrices = {n: g for n, g in grads.items() if not dense_only and self.compressed(n, g.shape)}
        rest = [n for n in grads if n not in matrices]
        out: dict[str, torch.Tensor] = dict(zip(rest, allreduce_many([grads[n] for n in rest], allreduce)))  # one all-reduce
        sent = sum(grads[n].numel() for n in rest)
        st = state.stats
        if matrices:
            reduced, n_sent, (captured, x2) = self._reduce_matrices(matrices, state, allreduce, seed)
            out.update(reduced)
            sent += n_sent
            like = next(iter(matrices.values()))
            e2 = _total([_sq(state.error[n]) for n in matrices if n in state.error], like)
            g2 = _total([_sq(g) for g in matrices.values()], like)
            sums = torch.stack([captured, x2, e2, g2])
            st.pending_sums = sums if st.pending_sums is None else st.pending_sums + sums.to(st.pending_sums.device)
        out = {n: out[n] for n in grads}  # the caller's order
        st.sent, st.dense, st.pending = st.sent + sent, st.dense + sum(g.numel() for g in grads.values()), st.pending + sent
        if count_step:
            state.step += 1
            st.steps, st.last_sent, st.pending = st.steps + 1, st.pending, 0
            st.last_sums, st.pending_sums = st.pending_sums, None
        return out, state

    def _reduce_matrices(self, grads: dict[str, torch.Tensor], state: LowRankState, allreduce: AllReduce, seed: int) -> tuple[dict[str, torch.Tensor], int, tuple[torch.Tensor, torch.Tensor]]:
        """The compressed matrices of one call, with as few all-reduces as the method needs:
        (reduced gradients, numbers sent, (sum of ||P P^T X||^2, sum of ||X||^2) as float64 scalars)."""
        raise NotImplementedError


def allreduce_many(tensors: list[torch.Tensor], allreduce: AllReduce) -> list[torch.Tensor]:
    """All-reduce several tensors as one flat buffer (one collective), shapes restored."""
    if not tensors:
        return []
    flat = allreduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def dense(rank: int = 1, **_: object) -> _Base:
    """Plain all-reduce of everything (the reference); other keywords are ignored."""
    return _Base(rank)


def _with_error(g: torch.Tensor, state: LowRankState, name: str) -> torch.Tensor:
    """X = g + e as a matrix (a new tensor)."""
    m = _as_matrix(g)
    e = state.error.get(name)
    return m + e if e is not None else m.clone()


class _PowerSGD(_Base):
    name = "powersgd"

    def _reduce_matrices(self, grads, state, allreduce, seed):
        xs, qs = {}, {}
        for name, g in grads.items():
            m = xs[name] = _with_error(g, state, name)
            q = state.q.get(name)
            if q is None:  # the same random start on every worker (shared seed)
                r = min(self.rank, *m.shape)
                gen = torch.Generator().manual_seed(_name_seed(seed, name))
                q = torch.randn(m.shape[1], r, generator=gen).to(device=m.device, dtype=m.dtype)
            qs[name] = q
        names = list(grads)
        ps = allreduce_many([xs[n] @ qs[n] for n in names], allreduce)  # (n, r) each, one all-reduce
        ps = [torch.linalg.qr(p)[0] for p in ps]  # orthonormal columns
        q_local = [xs[n].T @ p for n, p in zip(names, ps)]  # (m, r): this worker's P^T X, transposed
        captured = _total([_sq(q) for q in q_local], ps[0])
        qs_new = allreduce_many(q_local, allreduce)  # (m, r) each
        out, sent = {}, 0
        for n, p, q in zip(names, ps, qs_new):
            approx = p @ q.T
            state.error[n] = xs[n] - approx
            state.q[n] = q
            out[n] = approx.reshape(grads[n].shape)
            sent += p.numel() + q.numel()
        return out, sent, (captured, _total([_sq(xs[n]) for n in names], ps[0]))


def powersgd(rank: int = 4, min_saving: float = 2.0, warmup_steps: int = 0, dense_patterns: Iterable[str] | None = (), **_: object) -> _Base:
    """PowerSGD with error feedback and warm start (one power iteration per step).

    ``warmup_steps`` dense steps first (default 0); ``dense_patterns``: parameter names sent
    dense; ``min_saving``: the compressibility rule (module docstring). Other keywords (another
    compressor's ``update_gap``, ``probes``) are ignored, so one set of options serves all."""
    return _PowerSGD(rank, min_saving, warmup_steps, dense_patterns)


class _GreedyLore(_Base):
    name = "greedylore"

    def __init__(self, rank: int = 4, update_gap: int = 100, warmup_steps: int = 0, min_saving: float = 2.0, exact_scores: bool = False, probes: int = 1, dense_patterns: Iterable[str] | None = ()):
        super().__init__(rank, min_saving, warmup_steps, dense_patterns)
        self.exact_scores = bool(exact_scores)  # all-reduce U^T X (k * l numbers) instead of k probes
        self.update_gap = _check_int("update_gap", update_gap, 1)
        self.probes = _check_int("probes", probes, 1)

    def _reduce_matrices(self, grads, state, allreduce, seed):
        xs = {name: _with_error(g, state, name) for name, g in grads.items()}
        x2 = _total([_sq(x) for x in xs.values()], next(iter(xs.values())))
        since = state.step - self.warmup_steps
        refresh = [n for n in grads if n not in state.basis or since % self.update_gap == 0]
        lazy = [n for n in grads if n not in refresh]
        out, sent, captured = {}, 0, []
        # Semi-lazy refresh: X sent dense (one all-reduce), the basis of the average's smaller side kept.
        for n, avg in zip(refresh, allreduce_many([xs[n] for n in refresh], allreduce)):
            captured.append(_sq(xs[n]))  # all of X was sent
            if not bool(torch.isfinite(avg).all()):
                # Training diverged: pass the non-finite average through (the caller's finiteness check
                # stops the run) rather than raise inside a DDP hook; the basis is left as it was.
                out[n] = avg.reshape(grads[n].shape)
                sent += avg.numel()
                state.basis.setdefault(n, torch.eye(min(avg.shape), dtype=avg.dtype, device=avg.device))
                continue
            u, _, vh = torch.linalg.svd(avg.double(), full_matrices=False)
            state.basis[n] = (u if avg.shape[0] <= avg.shape[1] else vh.T).to(avg.dtype)  # (smaller side, k)
            state.error[n] = torch.zeros_like(avg)
            out[n] = avg.reshape(grads[n].shape)
            sent += avg.numel()
        if not lazy:
            return out, sent, (_total(captured, x2), x2)
        # Score every direction by its energy in the averaged X: u_i^T X z_i with `probes` shared
        # Gaussians z_i per direction, averaged over workers (one all-reduce of probes * k numbers per
        # matrix), squared and averaged over the probes.
        xss, probes = {}, []
        for n in lazy:
            x = xs[n]
            xss[n] = x if x.shape[0] <= x.shape[1] else x.T  # (s, l): project on the smaller side
            basis = state.basis[n]
            proj = basis.T @ xss[n]  # (k, l)
            if self.exact_scores:
                probes.append(proj)  # (k, l): averaged, its squared row norms are the energies
                continue
            gen = torch.Generator().manual_seed(_name_seed(seed + state.step, n))
            z = torch.randn(self.probes, basis.shape[1], xss[n].shape[1], generator=gen).to(device=x.device, dtype=x.dtype)
            probes.append(torch.stack([(proj * z[j]).sum(1) for j in range(self.probes)]))  # (probes, k)
        scores = allreduce_many(probes, allreduce)
        if self.exact_scores:
            sent += sum(p.numel() - p.shape[0] for p in probes)  # beyond the k counted below
            energies = [p.square().sum(1) for p in scores]
        else:
            energies = [p.square().mean(0) for p in scores]  # (k,): the probes' squared estimates, averaged
        ps, r_local = {}, []
        for n, energy in zip(lazy, energies):
            basis = state.basis[n]
            top = torch.topk(energy, min(self.rank, basis.shape[1])).indices
            ps[n] = basis[:, top]  # (s, r): the greedy pick
            r_local.append(ps[n].T @ xss[n])  # (r, l)
            sent += basis.shape[1] * (1 if self.exact_scores else self.probes)
            captured.append(_sq(r_local[-1]))
        for n, r_mine, r_avg in zip(lazy, r_local, allreduce_many(r_local, allreduce)):
            p = ps[n]
            approx, err = p @ r_avg, xss[n] - p @ r_mine
            if xss[n] is not xs[n]:  # projected on the right side: transpose back
                approx, err = approx.T, err.T
            state.error[n] = err
            out[n] = approx.reshape(grads[n].shape)
            sent += r_avg.numel()
        return out, sent, (_total(captured, x2), x2)


def greedylore(
    rank: int = 4,
    update_gap: int = 100,
    warmup_steps: int = 0,
    min_saving: float = 2.0,
    exact_scores: bool = False,
    probes: int = 1,
    dense_patterns: Iterable[str] | None = (),
) -> _Base:
    """GreedyLore: greedy top-r directions of a lazily refreshed SVD basis, with error feedback.

    Args:
        rank: directions sent per matrix (the paper: 8-64).
        update_gap: steps between subspace refreshes, counted from the end of the warm-up
            (default 100; the paper: 200-1200).
        warmup_steps: dense steps first (default 0; the paper: 500-4000, as ``rankfed ddp``'s default 500).
        min_saving: the compressibility rule (module docstring).
        exact_scores: all-reduce U^T X (k * max side numbers) for the exact energies (a diagnostic).
        probes: K >= 1 shared-seed Gaussian probes per direction, their squared estimates averaged
            (NOT in the paper: it lowers the variance of the score for K * min(n, m) numbers a
            matrix instead of min(n, m); K = 1 is the paper's estimator).
        dense_patterns: ``fnmatch`` patterns of parameter names all-reduced dense.
    """
    return _GreedyLore(rank, update_gap, warmup_steps, min_saving, exact_scores, probes, dense_patterns)


def random_basis(seed: int, side: int, rank: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """An orthonormal (side, min(rank, side)) basis from one seed: a Gaussian drawn on the CPU,
    orthonormalised by QR in float64, the same wherever it is drawn (the random subspace's; its
    seed is ``_step_seed(run seed, step, name)``)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(side, min(rank, side), generator=gen, dtype=torch.float64)
    return torch.linalg.qr(g)[0].to(device=device, dtype=dtype)


class _Random(_Base):
    name = "random"

    def _reduce_matrices(self, grads, state, allreduce, seed):
        xs, xss, ps, r_local = {}, {}, {}, []
        for name, g in grads.items():
            x = xs[name] = _with_error(g, state, name)
            xss[name] = x if x.shape[0] <= x.shape[1] else x.T  # (s, l): the smaller side first
            ps[name] = random_basis(_step_seed(seed, state.step, name), xss[name].shape[0], self.rank, x.device, x.dtype)  # (s, r), never sent
            r_local.append(ps[name].T @ xss[name])  # (r, l)
        like = r_local[0]
        out, sent = {}, 0
        for n, r_mine, r_avg in zip(grads, r_local, allreduce_many(r_local, allreduce)):
            p = ps[n]
            approx, err = p @ r_avg, xss[n] - p @ r_mine
            if xss[n] is not xs[n]:
                approx, err = approx.T, err.T
            state.error[n] = err
            out[n] = approx.reshape(grads[n].shape)
            sent += r_avg.numel()
        return out, sent, (_total([_sq(r) for r in r_local], like), _total([_sq(x) for x in xs.values()], like))


def random_subspace(rank: int = 4, min_saving: float = 2.0, warmup_steps: int = 0, dense_patterns: Iterable[str] | None = (), **_: object) -> _Base:
    """The random-subspace baseline ("random"): a fresh random orthonormal rank-r subspace of each
    matrix's smaller side every step (from the run seed, the step and the name: identical on every
    worker, never sent), R = P^T X all-reduced (r * max(n, m) numbers), the gradient P avg(R) and
    the error X - P R. Options as :func:`powersgd`'s; other keywords are ignored."""
    return _Random(rank, min_saving, warmup_steps, dense_patterns)


LOWRANK_COMPRESSORS = {"none": dense, "powersgd": powersgd, "greedylore": greedylore, "random": random_subspace}
assert set(LOWRANK_COMPRESSORS) == {"none", *LOW_RANK}, "rankfed.compress.base.LOW_RANK and LOWRANK_COMPRESSORS disagree"


class ThreadGroup:
    """N simulated workers as threads sharing an all-reduce (mean), for tests and the simulator.

    ``run(fn)`` calls ``fn(rank, allreduce)`` on N threads and returns their results in
    rank order; every worker must call ``allreduce`` the same number of times, in the
    same order, with tensors of one shape (as in a real collective).
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[torch.Tensor | None] = [None] * size
        self._result: torch.Tensor | None = None

    def _allreduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self._slots[rank] = t.detach().clone()
        if self._barrier.wait() == 0:  # one thread sums, in rank order (deterministic)
            total = self._slots[0].clone()
            for s in self._slots[1:]:
                total += s
            self._result = total / self.size
        self._barrier.wait()
        out = self._result.clone()
        self._barrier.wait()  # nobody reuses the slots before all have read
        return out

    def run(self, fn: Callable[[int, AllReduce], object]) -> list:
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, lambda t: self._allreduce(rank, t))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
