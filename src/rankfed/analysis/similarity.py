"""How alike clients' gradients are, in full and at low rank.

The FedLoRU TMLR abstract: "low-rank approximations of the clients' gradients
have greater similarity". For each client, the gradient of its local loss at
the same global weights; per layer (each weight matrix; a conv kernel as
``out x (in * kh * kw)``), the mean pairwise cosine similarity of the clients'
full gradients and of their best rank-r approximations (truncated SVD). All
layers together: the same over the concatenation of the layers' (full or
rank-r) gradients.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rankfed.local import ClientData, Task, call_model

__all__ = ["client_gradient", "low_rank", "mean_pairwise_cosine", "GradientSimilarity", "gradient_similarity"]


def client_gradient(model: nn.Module, data: ClientData, batch_size: int = 1024, task: Task | None = None) -> dict[str, torch.Tensor]:
    """The gradient of the task's mean loss (default cross-entropy) on all of ``data`` (eval
    mode), by parameter name."""
    task = task if task is not None else Task()
    model.eval()
    model.zero_grad(set_to_none=True)
    count = max(sum(task.count(y) for _, y in data.batches(batch_size)), 1)
    for x, y in data.batches(batch_size):  # each chunk's share of the mean, backpropagated alone
        s, _ = task.loss_sum(call_model(model, x), y)
        (s / count).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def low_rank(g: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``g`` viewed as a matrix (first dim x the rest),
    in ``g``'s shape (Eckart-Young: the top singular triplets)."""
    m = g.reshape(g.shape[0], -1)
    if rank >= min(m.shape):
        return g.clone()
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(g.dtype).reshape(g.shape)


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float:
    """Mean cosine similarity over all pairs (vectors flattened)."""
    if len(vectors) < 2:
        raise ValueError(f"need at least 2 clients for a pairwise similarity, got {len(vectors)}")
    flat = [v.reshape(-1).double() for v in vectors]
    sims = [float(F.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(flat, 2)]
    return sum(sims) / len(sims)


@dataclass
class GradientSimilarity:
    rank: int
    clients: list[int]
    full: float  # all layers together
    low_rank: float
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> {"full", "low_rank", "shape"}


def gradient_similarity(model: nn.Module, clients: dict[int, ClientData], rank: int, task: Task | None = None) -> GradientSimilarity:
    """Mean pairwise cosine similarity of the ``clients``' gradients (of the task's loss) at
    ``model``'s weights, in full and at rank ``rank``, per layer (weights with 2 or more
    dimensions) and over all of them."""
    if rank < 1:
        raise ValueError(f"rank = {rank}: must be >= 1")
    grads = {cid: client_gradient(model, d, task=task) for cid, d in clients.items()}
    names = [n for n, g in next(iter(grads.values())).items() if g.dim() >= 2]
    if not names:
        raise ValueError("the model has no weight matrices (parameters with 2 or more dimensions)")
    per_layer = {}
    full_all: dict[int, list[torch.Tensor]] = {cid: [] for cid in grads}
    low_all: dict[int, list[torch.Tensor]] = {cid: [] for cid in grads}
    for name in names:
        full = [grads[cid][name] for cid in grads]
        low = [low_rank(g, rank) for g in full]
        for cid, f, lr_ in zip(grads, full, low):
            full_all[cid].append(f.reshape(-1))
            low_all[cid].append(lr_.reshape(-1))
        per_layer[name] = {"full": mean_pairwise_cosine(full), "low_rank": mean_pairwise_cosine(low), "shape": list(full[0].shape)}
    return GradientSimilarity(
        rank=rank,
        clients=list(grads),
        full=mean_pairwise_cosine([torch.cat(v) for v in full_all.values()]),
        low_rank=mean_pairwise_cosine([torch.cat(v) for v in low_all.values()]),
        per_layer=per_layer,
    )
