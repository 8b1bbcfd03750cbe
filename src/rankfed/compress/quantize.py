"""QSGD stochastic quantisation (Alistarh et al., 2017), packed to 2, 4 or 8 bits.

Per floating tensor v with d elements and s = 2**(bits-1) - 1 levels per sign:

    r_i = |v_i| / ||v||_2 * s                 in [0, s]
    l_i = sign(v_i) * (floor(r_i) + B_i),     B_i ~ Bernoulli(r_i - floor(r_i))
    v_hat_i = ||v|| * l_i / s                 so E[v_hat_i] = v_i (unbiased)

The entries of ``v`` are

    v/norm   ()                      float32, ||v||_2
    v/q      (ceil(d * bits / 8),)   uint8: the offsets l_i + s in [0, 2s], 8/bits per byte,
                                     element j of a byte at bits [bits*j, bits*(j+1))
    v/shape  (ndim,)                 int32
    v/dtype  ()                      uint8, only when v is not float32 (decompress restores it)

so an 8-bit tensor costs about d bytes (a quarter of float32) and a 4-bit one
about d/2. The uniforms come from ``torch.Generator().manual_seed(seed)``,
drawn on the CPU in the input's order, so the result is the same on every
device and never touches the global RNG. A zero tensor has norm 0 and all
levels 0, and round-trips to zeros. Non-finite inputs are not supported.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from rankfed.compress.base import (
    Compressor,
    Entries,
    decode_groups,
    dtype_tensor,
    empty_init,
    encode_groups,
    numel_of,
    read_dtype,
    read_shape,
    shape_tensor,
)

__all__ = ["qsgd", "check_bits", "levels", "pack", "unpack", "BITS"]

BITS = (2, 4, 8)
_SUFFIXES = ("q", "norm", "shape")
_OPTIONAL = ("dtype",)


def check_bits(bits: object) -> int:
    """QSGD packs 2, 4 or 8 bits per value (whole values per byte)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"qsgd bits must be one of {BITS}, got {bits!r}")
    return bits


def levels(bits: int) -> int:
    """s, the number of quantisation levels per sign: 1, 7 or 127."""
    return 2 ** (bits - 1) - 1


def pack(offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) uint8 values < 2**bits -> (ceil(n * bits / 8),) uint8, 8/bits values per byte."""
    per = 8 // bits
    if per == 1:
        return offsets
    pad = (-offsets.numel()) % per
    if pad:
        offsets = torch.cat([offsets, offsets.new_zeros(pad)])
    cols = offsets.view(-1, per)  # (bytes, per): row = one output byte
    out = cols[:, 0].clone()
    for j in range(1, per):
        out |= cols[:, j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (ceil(n * bits / 8),) uint8 -> (n,) uint8."""
    per = 8 // bits
    if per == 1:
        return packed[:n]
    mask = (1 << bits) - 1
    cols = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(cols, dim=1).reshape(-1)[:n]


def _qsgd_one(bits: int, gen: torch.Generator, name: str, t: torch.Tensor) -> Entries:
    s = levels(bits)
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    x = t.reshape(-1).to(work)  # (d,); a copy unless t is already float32
    norm = torch.linalg.vector_norm(x).to(torch.float32)  # () what is sent
    # Scale by the norm as sent (rounded to float32) so decompression is
    # unbiased for the value it will use. A zero norm gives scale 0 (the inf
    # of s/0 is never selected), so a zero tensor maps to all-zero levels.
    n_work = norm.to(work)
    scale = torch.where(n_work > 0, s / n_work, torch.zeros((), dtype=work, device=x.device))
    r = x.abs() * scale  # (d,) in [0, s] up to rounding
    u = torch.rand(x.numel(), generator=gen, dtype=work).to(x.device)  # (d,) U[0, 1)
    low = torch.floor(r)
    mag = (low + (u < r - low).to(work)).clamp_(0, s)  # up with probability frac(r)
    signed = torch.where(x < 0, -mag, mag)  # (d,) integers in [-s, s]
    entries: Entries = {
        f"{name}/norm": norm,
        f"{name}/q": pack((signed + s).to(torch.uint8), bits),
        f"{name}/shape": shape_tensor(t.shape),
    }
    if t.dtype != torch.float32:
        entries[f"{name}/dtype"] = dtype_tensor(t.dtype)
    return entries


def _qsgd_compress(bits: int, tensors: dict[str, torch.Tensor], state: Any, seed: int) -> tuple[Entries, Any]:
    gen = torch.Generator().manual_seed(seed)  # one stream, consumed tensor by tensor in input order
    return encode_groups(f"qsgd(bits={bits})", tensors, partial(_qsgd_one, bits, gen), _SUFFIXES, _OPTIONAL), state


def _qsgd_restore(bits: int, group: dict[str, Any]) -> torch.Tensor:
    s = levels(bits)
    shape = read_shape(group["shape"])
    dtype = read_dtype(group["dtype"]) if "dtype" in group else torch.float32
    n = numel_of(shape)
    packed, norm = group["q"], group["norm"]
    expected = -(-n * bits // 8)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"qsgd(bits={bits}): expected {expected} uint8 bytes for {n} values, "
            f"got {packed.numel()} {packed.dtype} (compressed with other bits?)"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    level = unpack(packed.reshape(-1), bits, n).to(work) - s  # (d,) in [-s, s]
    return (norm.to(device=level.device, dtype=work) * level / s).to(dtype).reshape(shape)


def _qsgd_decompress(bits: int, entries: dict[str, Any]) -> dict[str, Any]:
    return decode_groups(entries, partial(_qsgd_restore, bits), _SUFFIXES, _OPTIONAL)


def qsgd(bits: int = 8) -> Compressor:
    """QSGD with ``bits`` in {2, 4, 8} bits per value; see the module docstring."""
    bits = check_bits(bits)
    return Compressor(f"qsgd(bits={bits})", empty_init, partial(_qsgd_compress, bits), partial(_qsgd_decompress, bits), {"compressor": "qsgd", "qsgd_bits": bits})
