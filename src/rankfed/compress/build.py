"""Build a compressor from its command-line / config spelling.

``"topk+qsgd"`` means ``chain(topk(ratio=topk_ratio), qsgd(bits=qsgd_bits))``;
``""`` means :func:`identity`; ``error_feedback=True`` wraps the whole chain,
so the residual covers everything the chain dropped.
"""

from __future__ import annotations

from rankfed.compress import feedback as _feedback
from rankfed.compress.base import CHAINABLE, LOW_RANK, Compressor, chain, identity
from rankfed.compress.quantize import check_bits, qsgd
from rankfed.compress.sparsify import check_ratio, topk

__all__ = ["COMPRESSORS", "build_compressor"]

COMPRESSORS = CHAINABLE
LOWRANK = LOW_RANK  # low-rank compressors carry their own error feedback and are used alone (not in a chain)


def build_compressor(
    spec: str,
    *,
    topk_ratio: float = 0.01,
    qsgd_bits: int = 8,
    error_feedback: bool = False,
    compress_rank: int = 4,
    update_gap: int = 10,
) -> Compressor:
    """Parse ``spec`` (names from :data:`COMPRESSORS` joined by ``"+"``, applied left to right,
    or one of :data:`LOWRANK` alone).

    ``topk_ratio`` and ``qsgd_bits`` are checked even when their compressor is
    not named, so a bad config value is reported wherever it appears.
    """
    if not isinstance(spec, str):
        raise TypeError(f"compressor spec must be a string, got {type(spec).__name__}")
    ratio, bits = check_ratio(topk_ratio), check_bits(qsgd_bits)
    if isinstance(compress_rank, bool) or not isinstance(compress_rank, int) or compress_rank < 1:
        raise ValueError(f"compress_rank must be an int >= 1, got {compress_rank!r}")
    if isinstance(update_gap, bool) or not isinstance(update_gap, int) or update_gap < 1:
        raise ValueError(f"update_gap must be an int >= 1, got {update_gap!r}")
    low = spec.strip().lower()
    if low in LOWRANK:
        from rankfed.compress.lowrank_uplink import greedylore_uplink, powersgd_uplink, random_uplink

        makers = {"powersgd": lambda: powersgd_uplink(compress_rank), "greedylore": lambda: greedylore_uplink(compress_rank, update_gap), "random": lambda: random_uplink(compress_rank)}
        return makers[low]()
    if any(part.strip().lower() in LOWRANK for part in spec.split("+")):
        raise ValueError(f"compressor spec {spec!r}: {', '.join(LOWRANK)} are used alone, not in a chain")
    makers = {"topk": lambda: topk(ratio=ratio), "qsgd": lambda: qsgd(bits=bits)}
    members: list[Compressor] = []
    if spec.strip():
        for part in spec.split("+"):
            name = part.strip().lower()
            if name not in makers:
                raise ValueError(
                    f"unknown compressor {part.strip()!r} in spec {spec!r}; valid names are "
                    f"{', '.join(COMPRESSORS)} (joined by '+'), one of {', '.join(LOWRANK)} (alone), or '' for none"
                )
            members.append(makers[name]())
    if not members:
        c = identity()
    elif len(members) == 1:
        c = members[0]  # not a chain of one: same entries, same seed as the member alone
    else:
        c = chain(*members)
    return _feedback.error_feedback(c) if error_feedback else c
