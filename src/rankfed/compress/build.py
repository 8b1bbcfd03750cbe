"""Build a compressor from its command-line / config spelling.

``"topk+qsgd"`` means ``chain(topk(ratio=topk_ratio), qsgd(bits=qsgd_bits))``;
``""`` means :func:`identity`; ``error_feedback=True`` wraps the whole chain,
so the residual covers everything the chain dropped.
"""

from __future__ import annotations

from rankfed.compress import feedback as _feedback
from rankfed.compress.base import Compressor, chain, identity
from rankfed.compress.quantize import check_bits, qsgd
from rankfed.compress.sparsify import check_ratio, topk

__all__ = ["COMPRESSORS", "build_compressor"]

COMPRESSORS = ("topk", "qsgd")


def build_compressor(
    spec: str, *, topk_ratio: float = 0.01, qsgd_bits: int = 8, error_feedback: bool = False
) -> Compressor:
    """Parse ``spec`` (names from :data:`COMPRESSORS` joined by ``"+"``, applied left to right).

    ``topk_ratio`` and ``qsgd_bits`` are checked even when their compressor is
    not named, so a bad config value is reported wherever it appears.
    """
    if not isinstance(spec, str):
        raise TypeError(f"compressor spec must be a string, got {type(spec).__name__}")
    ratio, bits = check_ratio(topk_ratio), check_bits(qsgd_bits)
    makers = {"topk": lambda: topk(ratio=ratio), "qsgd": lambda: qsgd(bits=bits)}
    members: list[Compressor] = []
    if spec.strip():
        for part in spec.split("+"):
            name = part.strip().lower()
            if name not in makers:
                raise ValueError(
                    f"unknown compressor {part.strip()!r} in spec {spec!r}; valid names are "
                    f"{', '.join(COMPRESSORS)} (joined by '+'), or '' for none"
                )
            members.append(makers[name]())
    if not members:
        c = identity()
    elif len(members) == 1:
        c = members[0]  # not a chain of one: same entries, same seed as the member alone
    else:
        c = chain(*members)
    return _feedback.error_feedback(c) if error_feedback else c
