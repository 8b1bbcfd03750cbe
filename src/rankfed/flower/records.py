"""Payloads as Flower records, and what a Flower message costs on the wire.

A rankfed payload (see :mod:`rankfed.wire`) crosses a Flower deployment as two
records under one prefix: ``<prefix>.arrays``, an :class:`~flwr.app.ArrayRecord`
with every tensor entry (the algorithm's own names: MAPA's ``coeffs``,
FedLoRU's ``layer.lora_down`` ...), and ``<prefix>.config``, a
:class:`~flwr.app.ConfigRecord` with the scalar entries (``@round``, a seed,
``@num_samples``) plus ``@names``, the entry order. Nothing else is added, so a
MAPA upload is k numbers and a few scalars, as the algorithm defines it.

Tensors travel as Flower's NumPy arrays; bfloat16, which NumPy lacks, travels
as its raw 2-byte words (``stype = "rankfed.raw"``).
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from rankfed.wire import Payload, WireError

__all__ = ["payload_to_records", "records_to_payload", "message_wire_bytes", "NAMES_KEY"]

NAMES_KEY = "@names"  # the payload's entry order (tensors and scalars interleaved)
_RAW = "rankfed.raw"


def _to_array(name: str, t: torch.Tensor) -> Array:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=_RAW, data=t.view(torch.int16).numpy().tobytes())
    try:
        return Array(t.numpy())
    except TypeError as e:  # a dtype NumPy has no counterpart for
        raise WireError(f"payload entry {name!r}: dtype {t.dtype} cannot travel as a Flower array ({e})") from None


def _from_array(name: str, a: Array) -> torch.Tensor:
    if a.stype == _RAW:
        if a.dtype != "bfloat16":
            raise WireError(f"payload entry {name!r}: raw array of dtype {a.dtype!r} (only bfloat16 travels raw)")
        if not a.data:  # frombuffer refuses an empty buffer
            return torch.empty(a.shape, dtype=torch.bfloat16)
        return torch.frombuffer(bytearray(a.data), dtype=torch.int16).view(torch.bfloat16).reshape(a.shape)
    return torch.from_numpy(a.numpy().copy())


def payload_to_records(payload: Payload, prefix: str) -> dict[str, ArrayRecord | ConfigRecord]:
    """``payload`` as ``{prefix.arrays: ArrayRecord, prefix.config: ConfigRecord}``."""
    arrays = ArrayRecord()
    config = ConfigRecord()
    names = []
    for name, value in payload.items():
        if name == NAMES_KEY:
            raise WireError(f"payload entry name {NAMES_KEY!r} is reserved by the Flower transport")
        names.append(name)
        if isinstance(value, torch.Tensor):
            arrays[name] = _to_array(name, value)
        elif isinstance(value, (bool, int, float, str)):
            config[name] = value
        else:
            raise WireError(f"payload entry {name!r}: {type(value).__name__} is neither a tensor nor a scalar")
    config[NAMES_KEY] = names
    return {f"{prefix}.arrays": arrays, f"{prefix}.config": config}


def records_to_payload(content: RecordDict, prefix: str) -> Payload:
    """The payload stored under ``prefix`` in ``content`` (inverse of :func:`payload_to_records`)."""
    try:
        arrays = content[f"{prefix}.arrays"]
        config = content[f"{prefix}.config"]
    except KeyError:
        raise WireError(f"message has no payload {prefix!r} (records: {', '.join(content) or 'none'})") from None
    names = config.get(NAMES_KEY)
    if names is None:
        raise WireError(f"payload {prefix!r} has no {NAMES_KEY} entry")
    out: Payload = {}
    for name in names:
        if name in arrays:
            out[name] = _from_array(name, arrays[name])
        elif name in config:
            out[name] = config[name]
        else:
            raise WireError(f"payload {prefix!r} lists entry {name!r} but carries no value for it")
    return out


def message_wire_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower moves it: the serialised length of every object in its
    tree (the message, its records, arrays and array chunks), which the SuperLink and
    SuperNodes push and pull one by one. Transport framing (HTTP, TLS) is not included."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
