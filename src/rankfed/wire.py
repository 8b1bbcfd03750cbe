"""The wire format: the one serialisation of a payload, used by every transport.

A *payload* is what crosses between the server half and the client half of an
algorithm: a flat mapping of names to tensors plus small scalars (a round
number, a seed, a sample count). Nothing else crosses. The bytes a run reports
are the lengths of :func:`encode`'s output, so this module is the single source
of truth for communication cost.

Layout (little-endian), chosen to be small, fixed and language-neutral (no pickle):

    magic   4 bytes  b"RFW1"
    count   u32      number of entries
    entry*  name_len u16, name utf-8, kind u8, body
        kind 0 tensor : dtype u8, ndim u8, dims u32 * ndim, raw data (C order)
        kind 1 int    : i64
        kind 2 float  : f64
        kind 3 str    : len u32, utf-8
        kind 4 bool   : u8

The header of a tensor entry is 2 + len(name) + 3 + 4 * ndim bytes, so a
FedAvg upload is 4*d bytes plus a few bytes per tensor, and a MAPA upload is
4*k bytes plus a few tens of bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Union

import numpy as np
import torch

from rankfed.errors import WireError

__all__ = ["Payload", "Scalar", "WireError", "encode", "decode", "encoded_size", "tensor_bytes"]

Scalar = Union[int, float, str, bool]
Payload = dict[str, Union[torch.Tensor, Scalar]]

MAGIC = b"RFW1"
_KIND_TENSOR, _KIND_INT, _KIND_FLOAT, _KIND_STR, _KIND_BOOL = range(5)

# dtype code <-> torch dtype. Codes are part of the format: append, never reorder.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _DTYPES}


def _check_name(name: object) -> bytes:
    if not isinstance(name, str) or not name:
        raise WireError(f"payload names must be non-empty strings, got {name!r}")
    raw = name.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise WireError(f"payload name too long ({len(raw)} bytes): {name[:40]!r}...")
    return raw


def _tensor_header(raw_name: bytes, t: torch.Tensor) -> bytes:
    if t.dtype not in _DTYPE_CODE:
        raise WireError(f"unsupported dtype {t.dtype} for payload entry {raw_name.decode()!r}")
    if t.dim() > 255:
        raise WireError(f"tensor {raw_name.decode()!r} has {t.dim()} dimensions (max 255)")
    return (
        struct.pack("<H", len(raw_name))
        + raw_name
        + struct.pack("<BBB", _KIND_TENSOR, _DTYPE_CODE[t.dtype], t.dim())
        + struct.pack(f"<{t.dim()}I", *t.shape)
    )


def _tensor_data(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def encode(payload: Mapping[str, object]) -> bytes:
    """Serialise a payload to bytes. Entry order is preserved."""
    parts: list[bytes] = [MAGIC, struct.pack("<I", len(payload))]
    for name, value in payload.items():
        raw = _check_name(name)
        if isinstance(value, torch.Tensor):
            parts.append(_tensor_header(raw, value))
            parts.append(_tensor_data(value))
        elif isinstance(value, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(value))
            parts.append(_tensor_header(raw, t))
            parts.append(_tensor_data(t))
        else:
            head = struct.pack("<H", len(raw)) + raw
            # bool before int: bool is a subclass of int.
            if isinstance(value, (bool, np.bool_)):
                parts.append(head + struct.pack("<BB", _KIND_BOOL, bool(value)))
            elif isinstance(value, (int, np.integer)):
                parts.append(head + struct.pack("<Bq", _KIND_INT, int(value)))
            elif isinstance(value, (float, np.floating)):
                parts.append(head + struct.pack("<Bd", _KIND_FLOAT, float(value)))
            elif isinstance(value, str):
                s = value.encode("utf-8")
                parts.append(head + struct.pack("<BI", _KIND_STR, len(s)) + s)
            else:
                raise WireError(f"payload entry {name!r} has unsupported type {type(value).__name__}")
    return b"".join(parts)


def encoded_size(payload: Mapping[str, object]) -> int:
    """Length of ``encode(payload)`` without building it (for printed formulas and checks)."""
    size = len(MAGIC) + 4
    for name, value in payload.items():
        size += 2 + len(_check_name(name)) + 1
        if isinstance(value, (torch.Tensor, np.ndarray)):
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            size += 2 + 4 * t.dim() + t.numel() * _ITEMSIZE[t.dtype]
        elif isinstance(value, (bool, np.bool_)):
            size += 1
        elif isinstance(value, (int, float, np.integer, np.floating)):
            size += 8
        elif isinstance(value, str):
            size += 4 + len(value.encode("utf-8"))
        else:
            raise WireError(f"payload entry {name!r} has unsupported type {type(value).__name__}")
    return size


def tensor_bytes(payload: Mapping[str, object]) -> int:
    """Bytes of tensor data alone (no headers): what a formula like 4*d counts."""
    return sum(v.numel() * v.element_size() for v in payload.values() if isinstance(v, torch.Tensor))


_MAX_NDIM = 64  # more dimensions than any tensor rankfed sends; torch itself refuses past 64


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview):
        self.buf = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise WireError(f"truncated payload: need {n} bytes at offset {self.pos}, have {len(self.buf) - self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def decode(data: bytes | bytearray | memoryview) -> Payload:
    """Parse bytes produced by :func:`encode`. Tensors are fresh, writable CPU tensors."""
    # One private, writable copy: tensors below are views into it (no per-tensor copy).
    r = _Reader(bytearray(data))
    if bytes(r.take(4)) != MAGIC:
        raise WireError("not a rankfed payload (bad magic)")
    (count,) = r.unpack("<I")
    out: Payload = {}
    for _ in range(count):
        (name_len,) = r.unpack("<H")
        try:
            name = bytes(r.take(name_len)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError(f"payload name is not utf-8: {e}") from None
        if name in out:
            raise WireError(f"duplicate payload entry {name!r}")
        (kind,) = r.unpack("<B")
        if kind == _KIND_TENSOR:
            code, ndim = r.unpack("<BB")
            if code >= len(_DTYPES):
                raise WireError(f"unknown dtype code {code} for entry {name!r}")
            dtype = _DTYPES[code]
            shape = r.unpack(f"<{ndim}I")
            if ndim > _MAX_NDIM:
                raise WireError(f"entry {name!r}: {ndim} dimensions (at most {_MAX_NDIM})")
            # strides multiply every non-zero dimension, even when one is 0 and the tensor empty:
            # a shape whose strides overflow int64 is refused here, before torch is asked
            if math.prod(max(d, 1) for d in shape) >= 2**63:
                raise WireError(f"entry {name!r}: shape {list(shape)} is too large (its strides overflow 64 bits)")
            numel = math.prod(shape)  # Python ints: no overflow; take() refuses what is not there
            raw = r.take(numel * _ITEMSIZE[dtype])
            if dtype == torch.bfloat16:
                t = torch.frombuffer(raw, dtype=torch.int16, count=numel).view(torch.bfloat16) if numel else torch.empty(0, dtype=dtype)
            else:
                t = torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
            try:
                out[name] = t.reshape(shape)
            except RuntimeError as e:  # anything torch still refuses is a malformed payload
                raise WireError(f"entry {name!r}: shape {list(shape)} cannot be built ({e})") from None
        elif kind == _KIND_INT:
            out[name] = r.unpack("<q")[0]
        elif kind == _KIND_FLOAT:
            out[name] = r.unpack("<d")[0]
        elif kind == _KIND_STR:
            (n,) = r.unpack("<I")
            try:
                out[name] = bytes(r.take(n)).decode("utf-8")
            except UnicodeDecodeError as e:
                raise WireError(f"payload entry {name!r}: string is not utf-8: {e}") from None
        elif kind == _KIND_BOOL:
            out[name] = bool(r.unpack("<B")[0])
        else:
            raise WireError(f"unknown entry kind {kind} for entry {name!r}")
    if r.pos != len(r.buf):
        raise WireError(f"{len(r.buf) - r.pos} trailing bytes after the last payload entry")
    return out
