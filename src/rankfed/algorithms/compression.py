"""Uplink compression options shared by the algorithms that accept a compressor.

``compressor`` is either the experiment file's spelling, names of :mod:`rankfed.compress`
transformations joined by "+" (``"topk"``, ``"qsgd"``, ``"topk+qsgd"``; or ``"powersgd"``,
``"greedylore"`` or ``"random"`` alone) with the keys below, or a :class:`~rankfed.compress.Compressor`
object (``rf.compress.chain(rf.compress.topk(0.01), rf.compress.qsgd(8))``). An object an
experiment file can say is turned into that spelling, so both describe the run alike; any
other object (a compressor of your own) is used as it is. The client compresses the tensors
of its uplink; the server decompresses before aggregating. Error feedback, when on, is kept
on the client between the rounds it is sampled in.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rankfed.compress import Compressor, EmptyState, build_compressor
from rankfed.compress.build import LOWRANK
from rankfed.compress.lowrank_uplink import uplink_numbers
from rankfed.compress.base import low_rank_pays, matrix_dims
from rankfed.errors import ConfigError
from rankfed.wire import Payload

__all__ = ["CompressionOptions", "UplinkCodec", "describe_bytes"]


def describe_bytes(n: int) -> str:
    """``1,234,567 bytes (1.23 MB)``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.3g} {unit})"
    return f"{n:,} bytes"


@dataclass
class CompressionOptions:
    compressor: str | Compressor = ""  # "" (none), names joined by "+" ("topk+qsgd"), "powersgd", "greedylore", "random", or a Compressor
    topk_ratio: float = 0.01  # fraction of each tensor's entries top-k keeps
    qsgd_bits: int = 8  # bits per quantised entry: 2, 4 or 8
    error_feedback: bool = False  # keep what was not sent on the client, add it next time (always on for powersgd/greedylore/random)
    compress_rank: int = 4  # powersgd / greedylore / random: rank of each compressed matrix
    update_gap: int = 10  # greedylore: every update_gap-th upload of a client is dense and refreshes its basis

    def local_noise_unsupported(self) -> str | None:
        """The uplink is the plain update unless a compressor encodes it."""
        if self.compressor:
            return f"compressor = {self.compressor!r}: local DP's noise goes on the plain update (set compressor = '')"
        return None

    def __post_init__(self) -> None:
        super().__post_init__()  # the field types (Algorithm)
        if isinstance(self.compressor, Compressor) and self.compressor.config is not None:
            self._adopt(self.compressor.config)
        if isinstance(self.compressor, str):
            try:
                self.build_compressor()
            except ValueError as e:
                raise ConfigError(
                    f"algorithm.compressor = {self.compressor!r} (topk_ratio = {self.topk_ratio}, qsgd_bits = {self.qsgd_bits}, "
                    f"compress_rank = {self.compress_rank}, update_gap = {self.update_gap}): {e}"
                ) from None

    def _adopt(self, config: Mapping) -> None:
        """Take a Compressor object's experiment-file keys as this algorithm's options; an option
        also set here to another value than its default and the object's is a contradiction."""
        defaults = {f.name: f.default for f in dataclasses.fields(CompressionOptions)}
        for key, value in config.items():
            if key == "compressor":
                continue
            mine = getattr(self, key)
            if mine != defaults[key] and mine != value:
                raise ConfigError(f"algorithm.{key} = {mine!r}: the compressor {self.compressor.name!r} says {value!r}; give one of them")
            setattr(self, key, value)
        self.compressor = config["compressor"]

    def build_compressor(self) -> Compressor:
        if isinstance(self.compressor, Compressor):
            return self.compressor
        return build_compressor(
            self.compressor,
            topk_ratio=self.topk_ratio,
            qsgd_bits=self.qsgd_bits,
            error_feedback=self.error_feedback,
            compress_rank=self.compress_rank,
            update_gap=self.update_gap,
        )


def _empty(state) -> bool:
    return isinstance(state, EmptyState) or (isinstance(state, tuple) and all(_empty(s) for s in state))


class UplinkCodec:
    """Client side: compress named tensors into payload entries (state in the client's own
    storage); server side: restore the tensors from a payload."""

    STATE_KEY = "uplink_compressor"

    def __init__(self, options: CompressionOptions):
        self.options = options
        self.compressor = options.build_compressor()
        custom = isinstance(options.compressor, Compressor)
        self.enabled = custom or bool(options.compressor)
        # only error feedback and the low-rank compressors (which carry their own) remember anything;
        # a compressor of your own keeps its state unless its state is empty
        self.low_rank = not custom and options.compressor.strip().lower() in LOWRANK
        self.keeps_state = self.enabled and (custom or options.error_feedback or self.low_rank)

    def encode(self, tensors: dict[str, torch.Tensor], client_state: dict, seed: int) -> Payload:
        if not self.enabled:
            return dict(tensors)
        state = client_state.get(self.STATE_KEY)
        if state is None:
            state = self.compressor.init(tensors)
        entries, state = self.compressor.compress(tensors, state, seed)
        if self.keeps_state and not _empty(state):
            client_state[self.STATE_KEY] = state
        return dict(entries)

    def decode(self, payload: Payload) -> dict[str, torch.Tensor]:
        """The uplink's tensors (metadata entries, named "@...", are left out)."""
        entries = {k: v for k, v in payload.items() if not k.startswith("@")}
        if not self.enabled:
            return entries
        return self.compressor.decompress(entries)

    def warn_dense(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """One warning when a low-rank compressor at ``compress_rank`` sends most of the matrices
        among ``tensors`` dense (their factors would not be 2x smaller), naming them and their bytes."""
        if not self.low_rank:
            return
        rank = self.options.compress_rank
        matrices = {n: t for n, t in tensors.items() if matrix_dims(t.shape) is not None}
        dense = {n: t for n, t in matrices.items() if not low_rank_pays(t.shape, uplink_numbers(t.shape, rank))}
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        if matrices and size(dense.values()) * 2 > size(matrices.values()):
            shown = ", ".join(f"{n} {tuple(t.shape)}" for n, t in list(dense.items())[:4]) + (", ..." if len(dense) > 4 else "")
            warnings.warn(
                f"algorithm.compress_rank = {rank}: {self.options.compressor} sends {len(dense)} of {len(matrices)} matrices dense "
                f"({describe_bytes(size(dense.values()))} of {describe_bytes(size(matrices.values()))} per upload), since rank-{rank} "
                f"factors would not be 2x smaller: {shown}",
                stacklevel=3,
            )
