"""Update compressors with explicit state, composable like optax transformations.

Each factory returns a :class:`Compressor` (``init``, ``compress``,
``decompress``) acting on a flat dict of named tensors; its entries are
payload entries for :mod:`rankfed.wire`, so the bytes a run reports for a
compressed update are measured, not estimated::

    c = build_compressor("topk+qsgd", topk_ratio=0.01, error_feedback=True)
    state = c.init(update)                       # residual zeros, member states
    entries, state = c.compress(update, state, seed)
    assert c.decompress(entries).keys() == update.keys()

Families: :mod:`.base` (interface, identity, chain, the compressibility rule),
:mod:`.sparsify` (top-k), :mod:`.quantize` (QSGD), :mod:`.feedback` (error feedback),
:mod:`.lowrank_uplink` (PowerSGD, GreedyLore and the random subspace as a client's uplink
compressor), :mod:`.lowrank` (the same three inside a data-parallel all-reduce), :mod:`.build` (the
``"topk+qsgd"`` spelling of an experiment file). Compressors are algorithm options too::

    rf.FedAvg(compressor=rf.compress.chain(rf.compress.topk(0.01), rf.compress.qsgd(8)))
"""

from rankfed.compress.base import CHAINABLE, LOW_RANK, Compressor, EmptyState, chain, fold_seed, identity, low_rank_pays, matrix_dims
from rankfed.compress.build import COMPRESSORS, build_compressor
from rankfed.compress.feedback import ErrorFeedbackState, error_feedback
from rankfed.compress.lowrank_uplink import greedylore_uplink, powersgd_uplink, random_uplink
from rankfed.compress.quantize import qsgd
from rankfed.compress.sparsify import topk

__all__ = [
    "Compressor",
    "EmptyState",
    "ErrorFeedbackState",
    "chain",
    "identity",
    "topk",
    "qsgd",
    "error_feedback",
    "powersgd_uplink",
    "greedylore_uplink",
    "random_uplink",
    "build_compressor",
    "COMPRESSORS",
    "CHAINABLE",
    "LOW_RANK",
    "fold_seed",
    "low_rank_pays",
    "matrix_dims",
]
