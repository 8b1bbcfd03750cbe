"""Low-rank gradient compression for data-parallel training: PowerSGD and GreedyLore.

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
gradients every worker uses, identical on all of them. Weight matrices (conv
kernels flattened to (out, in*kh*kw)) are compressed; 1-D tensors and matrices
where compression would not send at least 2x fewer numbers are all-reduced
dense. ``state.stats`` counts the numbers all-reduced and what dense would have.

PowerSGD (Vogels et al. 2019): M = g + e; P = avg(M Q); orthonormalise P;
Q = avg(M^T P); the gradient is P Q^T and e = M - P Q^T; Q is kept (warm start).

GreedyLore (Chen et al. 2025, as ../shared/DESIGN.md records it): dense steps
for the first ``warmup_steps``; every ``update_gap`` steps after that a
*refresh*: X = g + e is all-reduced dense, the SVD of the average gives the
orthonormal basis U of its smaller side (kept on every worker, never sent),
and the error is reset (everything was sent). On the other steps X = g + e;
each direction u_i is scored by its energy in the averaged X, estimated as
avg(u_i^T X z_i)^2 with a shared-seed Gaussian z_i (min(n, m) numbers
all-reduced); the top ``rank`` directions P are taken greedily; R = P^T X is
all-reduced (rank * max(n, m) numbers); the gradient is P avg(R) and the
error becomes X - P R.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rankfed.compress.base import LOW_RANK, low_rank_pays, matrix_dims

__all__ = ["allreduce_many", "AllReduce", "CompressionStats", "LowRankState", "powersgd", "greedylore", "dense", "ThreadGroup", "LOWRANK_COMPRESSORS"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CompressionStats:
    """Numbers all-reduced so far (x4 for float32 bytes), against a dense all-reduce of the same gradients."""

    steps: int = 0
    sent: int = 0
    dense: int = 0
    last_sent: int = 0  # in the last completed step
    pending: int = 0  # in the step under way (a DDP step reduces several buckets)

    @property
    def ratio(self) -> float:
        return self.sent / self.dense if self.dense else 1.0


@dataclass
class LowRankState:
    """Everything a worker remembers; plain tensors and ints, so it pickles."""

    step: int = 0
    error: dict[str, torch.Tensor] = field(default_factory=dict)  # e, per compressed matrix
    q: dict[str, torch.Tensor] = field(default_factory=dict)  # PowerSGD's warm-start Q
    basis: dict[str, torch.Tensor] = field(default_factory=dict)  # GreedyLore's U (smaller side)
    stats: CompressionStats = field(default_factory=CompressionStats)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _name_seed(seed: int, name: str) -> int:
    """A seed from the run seed and a tensor name, the same in every process (no str hash)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _Base:
    name = "none"

    def __init__(self, rank: int = 4, min_saving: float = 2.0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not min_saving >= 0:
            raise ValueError(f"min_saving must be >= 0, got {min_saving!r}")
        self.rank, self.min_saving = rank, float(min_saving)

    def init(self, shapes: Mapping[str, torch.Size] | None = None) -> LowRankState:
        return LowRankState()

    def compressed(self, name: str, shape: torch.Size) -> bool:
        """2-D or more, and the compressed all-reduce sends ``min_saving`` times fewer numbers
        than dense (counted as rank * (n + m) + min(n, m), an upper bound for both methods;
        rankfed's one rule, :func:`~rankfed.compress.base.low_rank_pays`)."""
        dims = matrix_dims(shape)
        if self.name == "none" or dims is None:
            return False
        n, m = dims
        return low_rank_pays(shape, self.rank * (n + m) + min(n, m), self.min_saving)

    def reduce(self, grads: Mapping[str, torch.Tensor], state: LowRankState, allreduce: AllReduce, seed: int = 0, count_step: bool = True) -> tuple[dict[str, torch.Tensor], LowRankState]:
        """This worker's gradients in, the gradients all workers use out (and the new state).

        ``count_step=False`` when more gradients of the same step follow (DDP's buckets):
        the step counter (warm-up, refresh period, probe seeds) moves on the last call."""
        return self._reduce(grads, state, allreduce, seed, dense_only=False, count_step=count_step)

    def _reduce(self, grads, state, allreduce, seed, dense_only: bool, count_step: bool = True):
        matrices = {n: g for n, g in grads.items() if not dense_only and self.compressed(n, g.shape)}
        rest = [n for n in grads if n not in matrices]
        out: dict[str, torch.Tensor] = dict(zip(rest, allreduce_many([grads[n] for n in rest], allreduce)))  # one all-reduce
        sent = sum(grads[n].numel() for n in rest)
        if matrices:
            reduced, n_sent = self._reduce_matrices(matrices, state, allreduce, seed)
            out.update(reduced)
            sent += n_sent
        out = {n: out[n] for n in grads}  # the caller's order
        st = state.stats
        st.sent, st.dense, st.pending = st.sent + sent, st.dense + sum(g.numel() for g in grads.values()), st.pending + sent
        if count_step:
            state.step += 1
            st.steps, st.last_sent, st.pending = st.steps + 1, st.pending, 0
        return out, state

    def _reduce_matrices(self, grads: dict[str, torch.Tensor], state: LowRankState, allreduce: AllReduce, seed: int) -> tuple[dict[str, torch.Tensor], int]:
        """The compressed matrices of one call, with as few all-reduces as the method needs."""
        raise NotImplementedError


def allreduce_many(tensors: list[torch.Tensor], allreduce: AllReduce) -> list[torch.Tensor]:
    """All-reduce several tensors as one flat buffer (one collective), shapes restored."""
    if not tensors:
        return []
    flat = allreduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def dense(rank: int = 1, **_: object) -> _Base:
    """Plain all-reduce of everything (the reference)."""
    return _Base(rank)


class _PowerSGD(_Base):
    name = "powersgd"

    def _reduce_matrices(self, grads, state, allreduce, seed):
        xs, qs = {}, {}
        for name, g in grads.items():
            m = _as_matrix(g)
            e = state.error.get(name)
            xs[name] = m + e if e is not None else m.clone()
            q = state.q.get(name)
            if q is None:  # the same random start on every worker (shared seed)
                r = min(self.rank, *m.shape)
                gen = torch.Generator().manual_seed(_name_seed(seed, name))
                q = torch.randn(m.shape[1], r, generator=gen).to(device=m.device, dtype=m.dtype)
            qs[name] = q
        names = list(grads)
        ps = allreduce_many([xs[n] @ qs[n] for n in names], allreduce)  # (n, r) each, one all-reduce
        ps = [torch.linalg.qr(p)[0] for p in ps]  # orthonormal columns
        qs_new = allreduce_many([xs[n].T @ p for n, p in zip(names, ps)], allreduce)  # (m, r) each
        out, sent = {}, 0
        for n, p, q in zip(names, ps, qs_new):
            approx = p @ q.T
            state.error[n] = xs[n] - approx
            state.q[n] = q
            out[n] = approx.reshape(grads[n].shape)
            sent += p.numel() + q.numel()
        return out, sent


def powersgd(rank: int = 4, min_saving: float = 2.0, **_: object) -> _Base:
    """PowerSGD with error feedback and warm start (one power iteration per step)."""
    return _PowerSGD(rank, min_saving)


class _GreedyLore(_Base):
    name = "greedylore"

    def __init__(self, rank: int = 4, update_gap: int = 100, warmup_steps: int = 0, min_saving: float = 2.0, exact_scores: bool = False):
        super().__init__(rank, min_saving)
        self.exact_scores = bool(exact_scores)  # all-reduce U^T X (k * l numbers) instead of k probes
        if isinstance(update_gap, bool) or not isinstance(update_gap, int) or update_gap < 1:
            raise ValueError(f"update_gap must be an int >= 1, got {update_gap!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.update_gap, self.warmup_steps = update_gap, warmup_steps

    def reduce(self, grads, state, allreduce, seed=0, count_step=True):
        # dense warm-up: plain all-reduce of everything for the first warmup_steps
        return self._reduce(grads, state, allreduce, seed, dense_only=state.step < self.warmup_steps, count_step=count_step)

    def _reduce_matrices(self, grads, state, allreduce, seed):
        xs = {}
        for name, g in grads.items():
            m = _as_matrix(g)
            e = state.error.get(name)
            xs[name] = m + e if e is not None else m.clone()
        since = state.step - self.warmup_steps
        refresh = [n for n in grads if n not in state.basis or since % self.update_gap == 0]
        lazy = [n for n in grads if n not in refresh]
        out, sent = {}, 0
        # Semi-lazy refresh: X sent dense (one all-reduce), the basis of the average's smaller side kept.
        for n, avg in zip(refresh, allreduce_many([xs[n] for n in refresh], allreduce)):
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
            return out, sent
        # Score every direction by its energy in the averaged X: u_i^T X z_i with a shared Gaussian
        # z_i per direction, averaged over workers (one all-reduce of k numbers per matrix) and squared.
        xss, probes = {}, []
        for n in lazy:
            x = xs[n]
            xss[n] = x if x.shape[0] <= x.shape[1] else x.T  # (s, l): project on the smaller side
            basis = state.basis[n]
            if self.exact_scores:
                probes.append(basis.T @ xss[n])  # (k, l): averaged, its squared row norms are the energies
                continue
            gen = torch.Generator().manual_seed(_name_seed(seed + state.step, n))
            z = torch.randn(basis.shape[1], xss[n].shape[1], generator=gen).to(device=x.device, dtype=x.dtype)
            probes.append(((basis.T @ xss[n]) * z).sum(1))
        scores = allreduce_many(probes, allreduce)
        if self.exact_scores:
            sent += sum(p.numel() - p.shape[0] for p in probes)  # beyond the k counted below
            scores = [p.square().sum(1).sqrt() for p in scores]
        ps, r_local = {}, []
        for n, score in zip(lazy, scores):
            basis = state.basis[n]
            top = torch.topk(score.square(), min(self.rank, basis.shape[1])).indices
            ps[n] = basis[:, top]  # (s, r): the greedy pick
            r_local.append(ps[n].T @ xss[n])  # (r, l)
            sent += basis.shape[1]
        for n, r_mine, r_avg in zip(lazy, r_local, allreduce_many(r_local, allreduce)):
            p = ps[n]
            approx, err = p @ r_avg, xss[n] - p @ r_mine
            if xss[n] is not xs[n]:  # projected on the right side: transpose back
                approx, err = approx.T, err.T
            state.error[n] = err
            out[n] = approx.reshape(grads[n].shape)
            sent += r_avg.numel()
        return out, sent


def greedylore(rank: int = 4, update_gap: int = 100, warmup_steps: int = 0, min_saving: float = 2.0, exact_scores: bool = False) -> _Base:
    """GreedyLore: greedy top-r directions of a lazily refreshed SVD basis, with error feedback.
    ``exact_scores`` all-reduces U^T X (k * max side numbers) for the exact energies (a diagnostic)."""
    return _GreedyLore(rank, update_gap, warmup_steps, min_saving, exact_scores)


LOWRANK_COMPRESSORS = {"none": dense, **dict(zip(LOW_RANK, (powersgd, greedylore)))}


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
