"""PowerSGD, GreedyLore and the random subspace as federated *uplink* compressors (one client, one update).

A client compresses its model update alone, so the collective of the
data-parallel forms (:mod:`rankfed.compress.lowrank`) is the identity and what
it would all-reduce is sent instead. Each weight matrix (conv kernels as
(out, in*kh*kw)) with X = update + error becomes two factors A (n x r),
B (m x r) with X ~ A B^T; the server needs no state (``decompress`` is A @ B^T);
the client keeps its error X - A B^T (error feedback is part of both methods)
and the method's own memory. 1-D tensors and matrices where the factors would
not be at least 2x smaller than the matrix are sent dense.

* ``powersgd``: one power iteration from the client's previous Q (warm start):
  P = orth(X Q), Q = X^T P; A = P, B = Q.
* ``greedylore``: every ``update_gap``-th upload of a client (its first
  included) sends X dense and keeps the SVD basis U of X's smaller side; the
  other uploads pick the ``rank`` basis directions with the most energy in X
  (exact: one client has nothing to estimate) and send them with X's
  projection on them. Unlike in data-parallel training the picked directions
  travel (the server has no basis of its own), so a greedy upload costs what a
  PowerSGD one does: the two differ in which subspace they keep.
* ``random``: every upload a random orthonormal rank-r basis P of X's smaller
  side, drawn from (the upload's seed, the client's upload count, the name); R =
  P^T X and that seed (one int64) are sent, the server redraws P from it
  (rank * max(n, m) numbers); the error is X - P R.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from rankfed.compress.base import Compressor, check_tensors, low_rank_pays, matrix_dims, read_shape, shape_tensor
from rankfed.compress.lowrank import _name_seed, _step_seed, random_basis

__all__ = ["LowRankUplinkState", "powersgd_uplink", "greedylore_uplink", "random_uplink", "uplink_numbers"]


@dataclass(frozen=True)
class LowRankUplinkState:
    error: dict = field(default_factory=dict)  # name -> (n, m) residual
    q: dict = field(default_factory=dict)  # powersgd: name -> (m, r) warm start
    basis: dict = field(default_factory=dict)  # greedylore: name -> (s, k)
    uploads: int = 0


def uplink_numbers(shape, rank: int) -> int:
    """Numbers a low-rank upload of a matrix sends: the two factors, min(rank, n, m) (n + m)."""
    n, m = matrix_dims(shape)
    return min(rank, n, m) * (n + m)


def _compressible(t: torch.Tensor, rank: int) -> bool:
    """At least 2x fewer numbers than the matrix (rankfed's rule, :func:`low_rank_pays`)."""
    return t.dim() >= 2 and low_rank_pays(t.shape, uplink_numbers(t.shape, rank))


def _init(template) -> LowRankUplinkState:
    return LowRankUplinkState()


def _decompress(entries):
    out = {}
    for name, value in entries.items():
        if name.endswith((":A", ":B", ":R", ":seed", ":shape")):
            continue
        out[name] = value
    for name in {k[: -len(":A")] for k in entries if k.endswith(":A")}:
        a, b = entries[name + ":A"], entries[name + ":B"]
        out[name] = (a @ b.T).reshape(read_shape(entries[name + ":shape"]))
    for name in {k[: -len(":R")] for k in entries if k.endswith(":R")}:  # random: P redrawn from its seed
        r_, shape = entries[name + ":R"], read_shape(entries[name + ":shape"])
        n, m = matrix_dims(shape)
        p = random_basis(int(entries[name + ":seed"]), min(n, m), r_.shape[0], r_.device, r_.dtype)
        x = p @ r_
        out[name] = (x if n <= m else x.T).reshape(shape)
    return out


def _matrices(who, rank, tensors, error, entries):
    """Yield (name, original, X = matrix + error) for each compressible tensor; the others go
    into ``entries`` dense."""
    check_tensors(tensors, who)
    for name, t in tensors.items():
        if not _compressible(t, rank):
            entries[name] = t
            continue
        m = t.reshape(t.shape[0], -1)
        yield name, t, (m + error[name] if name in error else m)


def _powersgd_compress(rank, tensors, state, seed):
    entries, error, qs = {}, dict(state.error), dict(state.q)
    for name, t, x in _matrices("powersgd", rank, tensors, error, entries):
        m = x
        q = qs.get(name)
        if q is None:
            r = min(rank, *m.shape)
            q = torch.randn(m.shape[1], r, generator=torch.Generator().manual_seed(_name_seed(seed, name))).to(m)
        p, _ = torch.linalg.qr(x @ q)
        q = x.T @ p
        error[name] = x - p @ q.T
        qs[name] = q
        entries[name + ":A"], entries[name + ":B"], entries[name + ":shape"] = p, q, shape_tensor(t.shape)
    return entries, LowRankUplinkState(error, qs, state.basis, state.uploads + 1)


def _greedylore_compress(rank, update_gap, tensors, state, seed):
    entries, error, bases = {}, dict(state.error), dict(state.basis)
    refresh = state.uploads % update_gap == 0
    for name, t, x in _matrices("greedylore", rank, tensors, error, entries):
        left = x.shape[0] <= x.shape[1]
        if refresh or name not in bases:
            u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
            bases[name] = (u if left else vh.T).to(x.dtype)
            error.pop(name, None)  # sent exactly: no residual (a missing one counts as zero)
            entries[name] = x.reshape(t.shape)
            continue
        xs = x if left else x.T  # (s, l)
        basis = bases[name]
        energy = (basis.T @ xs).square().sum(1)  # ||u_i^T X||^2, exact for one client
        p = basis[:, torch.topk(energy, min(rank, basis.shape[1])).indices]  # (s, r)
        r_ = p.T @ xs  # (r, l)
        error[name] = (xs - p @ r_) if left else (xs - p @ r_).T
        a, b = (p, r_.T) if left else (r_.T, p)  # X ~ A B^T
        entries[name + ":A"], entries[name + ":B"], entries[name + ":shape"] = a, b, shape_tensor(t.shape)
    return entries, LowRankUplinkState(error, state.q, bases, state.uploads + 1)


def _random_compress(rank, tensors, state, seed):
    entries, error = {}, dict(state.error)
    for name, t, x in _matrices("random", rank, tensors, error, entries):
        left = x.shape[0] <= x.shape[1]
        xs = x if left else x.T  # (s, l)
        seed_m = _step_seed(seed, state.uploads, name)
        p = random_basis(seed_m, xs.shape[0], rank, x.device, x.dtype)  # (s, r): redrawn by the server
        r_ = p.T @ xs
        error[name] = (xs - p @ r_) if left else (xs - p @ r_).T
        entries[name + ":R"], entries[name + ":seed"], entries[name + ":shape"] = r_, seed_m, shape_tensor(t.shape)
    return entries, LowRankUplinkState(error, state.q, state.basis, state.uploads + 1)


def powersgd_uplink(rank: int = 4) -> Compressor:
    """PowerSGD as a client's uplink compressor (see the module docstring)."""
    return Compressor("powersgd", _init, partial(_powersgd_compress, rank), _decompress, {"compressor": "powersgd", "compress_rank": rank})


def greedylore_uplink(rank: int = 4, update_gap: int = 10) -> Compressor:
    """GreedyLore as a client's uplink compressor (see the module docstring)."""
    return Compressor("greedylore", _init, partial(_greedylore_compress, rank, update_gap), _decompress, {"compressor": "greedylore", "compress_rank": rank, "update_gap": update_gap})


def random_uplink(rank: int = 4) -> Compressor:
    """The random subspace as a client's uplink compressor (see the module docstring)."""
    return Compressor("random", _init, partial(_random_compress, rank), _decompress, {"compressor": "random", "compress_rank": rank})
