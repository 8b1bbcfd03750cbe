"""Top-k sparsification: send the k largest-magnitude entries of each tensor.

Per floating tensor ``w`` of shape S with d = numel(S) elements, the entries are

    w/values   (k,)    the kept values, in w's own dtype (float32 for a float32
                       update: 4k bytes; it also tells decompress the dtype)
    w/indices  (k,)    their positions in w.flatten(): int32 (int64 if d >= 2**31)
    w/shape    (ndim,) int32

so a float32 tensor costs about 8k bytes instead of 4d. Decompression scatters
the values into zeros. The choice is deterministic (ties as torch.topk breaks
them), so the seed is unused. The baseline of the MAPA paper; with error
feedback (:func:`rankfed.compress.error_feedback`) it is the classic
"deep gradient compression" uplink.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from rankfed.compress.base import (
    Compressor,
    Entries,
    decode_groups,
    empty_init,
    encode_groups,
    numel_of,
    read_shape,
    shape_tensor,
)

__all__ = ["topk", "check_ratio", "keep_count"]

_SUFFIXES = ("values", "indices", "shape")


def check_ratio(ratio: object) -> float:
    """A top-k ratio must be a number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"topk ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def keep_count(numel: int, ratio: float | None, k: int | None) -> int:
    """How many entries of a ``numel``-element tensor to keep: never more than numel, at least 1 if any."""
    if k is None:
        # round() first so that 0.07 * 100 = 7.000000000000001 keeps 7, not 8.
        k = max(1, math.ceil(round(ratio * numel, 9)))
    return min(k, numel)


def _topk_one(ratio: float | None, k: int | None, name: str, t: torch.Tensor) -> Entries:
    flat = t.reshape(-1)  # (d,), a view when t is contiguous: never written to
    n = flat.numel()
    idx = torch.topk(flat.abs(), keep_count(n, ratio, k)).indices  # (k,) int64
    return {
        f"{name}/values": flat[idx],  # (k,), a fresh copy in t's dtype
        f"{name}/indices": idx.to(torch.int32 if n < 2**31 else torch.int64),
        f"{name}/shape": shape_tensor(t.shape),
    }


def _topk_compress(
    ratio: float | None, k: int | None, tensors: dict[str, torch.Tensor], state: Any, seed: int
) -> tuple[Entries, Any]:
    return encode_groups("topk", tensors, partial(_topk_one, ratio, k), _SUFFIXES), state


def _topk_restore(group: dict[str, Any]) -> torch.Tensor:
    values, indices = group["values"], group["indices"]
    shape = read_shape(group["shape"])
    if values.dim() != 1 or indices.shape != values.shape:
        raise ValueError(
            f"topk: values {tuple(values.shape)} and indices {tuple(indices.shape)} must be equal 1-D shapes"
        )
    out = torch.zeros(numel_of(shape), dtype=values.dtype, device=values.device)
    out[indices.to(device=values.device, dtype=torch.int64)] = values
    return out.reshape(shape)


def _topk_decompress(entries: dict[str, Any]) -> dict[str, Any]:
    return decode_groups(entries, _topk_restore, _SUFFIXES)


def topk(ratio: float | None = None, k: int | None = None) -> Compressor:
    """Keep, per tensor, the ``k`` largest |values|; ``k = max(1, ceil(ratio * numel))`` when ``ratio`` is given.

    Give exactly one of ``ratio`` (in (0, 1]) and ``k`` (>= 1, capped at each
    tensor's size).
    """
    if (ratio is None) == (k is None):
        raise ValueError(f"topk needs exactly one of ratio and k, got ratio={ratio!r}, k={k!r}")
    if ratio is not None:
        ratio = check_ratio(ratio)
        name = f"topk(ratio={ratio:g})"
    else:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"topk k must be an int >= 1, got {k!r}")
        name = f"topk(k={k})"
    config = {"compressor": "topk", "topk_ratio": ratio} if ratio is not None else None
    return Compressor(name, empty_init, partial(_topk_compress, ratio, k), _topk_decompress, config)
