"""Uplink compression options shared by the algorithms that accept a compressor.

``compressor`` names a chain of :mod:`rankfed.compress` transformations
("topk", "qsgd", "topk+qsgd", ...) applied by the client to the tensors of its
uplink; the server decompresses before aggregating. Error feedback, when on,
is kept on the client between the rounds it is sampled in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankfed.compress import Compressor, build_compressor
from rankfed.config import ConfigError
from rankfed.wire import Payload

__all__ = ["CompressionOptions", "UplinkCodec"]


@dataclass
class CompressionOptions:
    compressor: str = ""  # "" (none) or names joined by "+", e.g. "topk", "qsgd", "topk+qsgd"
    topk_ratio: float = 0.01  # fraction of each tensor's entries top-k keeps
    qsgd_bits: int = 8  # bits per quantised entry: 2, 4 or 8
    error_feedback: bool = False  # keep what was not sent on the client, add it next time (always on for powersgd/greedylore)
    compress_rank: int = 4  # powersgd / greedylore: rank of each compressed matrix
    update_gap: int = 10  # greedylore: every update_gap-th upload of a client is dense and refreshes its basis

    def __post_init__(self) -> None:
        try:
            self.build_compressor()
        except ValueError as e:
            raise ConfigError(
                f"algorithm.compressor = {self.compressor!r} (topk_ratio = {self.topk_ratio}, qsgd_bits = {self.qsgd_bits}, "
                f"compress_rank = {self.compress_rank}, update_gap = {self.update_gap}): {e}"
            ) from None

    def build_compressor(self) -> Compressor:
        return build_compressor(
            self.compressor,
            topk_ratio=self.topk_ratio,
            qsgd_bits=self.qsgd_bits,
            error_feedback=self.error_feedback,
            compress_rank=self.compress_rank,
            update_gap=self.update_gap,
        )


class UplinkCodec:
    """Client side: compress named tensors into payload entries (state in the client's own
    storage); server side: restore the tensors from a payload."""

    STATE_KEY = "uplink_compressor"

    def __init__(self, options: CompressionOptions):
        self.enabled = bool(options.compressor)
        # only error feedback (and the low-rank compressors, which carry their own) remembers anything
        self.keeps_state = self.enabled and (options.error_feedback or options.compressor.strip().lower() in ("powersgd", "greedylore"))
        self.compressor = options.build_compressor()

    def encode(self, tensors: dict[str, torch.Tensor], client_state: dict, seed: int) -> Payload:
        if not self.enabled:
            return dict(tensors)
        state = client_state.get(self.STATE_KEY)
        if state is None:
            state = self.compressor.init(tensors)
        entries, state = self.compressor.compress(tensors, state, seed)
        if self.keeps_state:
            client_state[self.STATE_KEY] = state
        return dict(entries)

    def decode(self, payload: Payload) -> dict[str, torch.Tensor]:
        """The uplink's tensors (metadata entries, named "@...", are left out)."""
        entries = {k: v for k, v in payload.items() if not k.startswith("@")}
        if not self.enabled:
            return entries
        return self.compressor.decompress(entries)
