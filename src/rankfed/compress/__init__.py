"""Update compressors with explicit state, composable like optax transformations.

Each factory returns a :class:`Compressor` (``init``, ``compress``,
``decompress``) acting on a flat dict of named tensors; its entries are
payload entries for :mod:`rankfed.wire`, so the bytes a run reports for a
compressed update are measured, not estimated::

    c = build_compressor("topk+qsgd", topk_ratio=0.01, error_feedback=True)
    state = c.init(update)                       # residual zeros, member states
    entries, state = c.compress(update, state, seed)
    assert c.decompress(entries).keys() == update.keys()

Families: :mod:`.base` (interface, identity, chain), :mod:`.sparsify` (top-k),
:mod:`.quantize` (QSGD), :mod:`.feedback` (error feedback), :mod:`.build`
(the ``"topk+qsgd"`` spelling).
"""

from rankfed.compress.base import Compressor, EmptyState, chain, fold_seed, identity
from rankfed.compress.build import COMPRESSORS, build_compressor
from rankfed.compress.feedback import ErrorFeedbackState, error_feedback
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
    "build_compressor",
    "COMPRESSORS",
    "fold_seed",
]
