"""The compressor interface, the identity, and ``chain``.

A compressor turns a flat dict of named tensors (a client's model update,
MAPA's k-vector, a DDP gradient bucket) into *payload entries* that
:func:`rankfed.wire.encode` can serialise, and back. It is written the way
optax writes a gradient transformation: a small factory returns a frozen
:class:`Compressor` holding pure functions, and everything the compressor
remembers between calls (an error-feedback residual) lives in an explicit,
picklable state object that ``init`` creates and ``compress`` returns anew::

    state = c.init(template)                          # once, from tensors shaped like the updates
    entries, state = c.compress(update, state, seed)  # sender, every round
    update_hat = c.decompress(entries)                # receiver: needs no state

Rules every compressor here follows:

* Floating-point tensors are compressed; every other tensor passes through
  unchanged under its own name.
* Entry names derive from the input name (``"w"`` -> ``"w/values"``,
  ``"w/indices"``, ``"w/shape"``). Input names must not start with ``"@"``
  (reserved for payload metadata), so no entry name does either.
* ``decompress`` reads nothing but the entries: shapes travel as small int32
  tensors and are counted by the wire like everything else. It restores the
  input's names, order, shapes and dtypes.
* Randomness comes only from ``torch.Generator().manual_seed(seed)``, never
  from the global RNG, so both the sender and a replaying tester get the
  same draws.
* The factories build the functions with :func:`functools.partial` over
  module-level functions, so compressors (not only their states) pickle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Union

import torch

__all__ = [
    "Compressor",
    "EmptyState",
    "Tensors",
    "Entries",
    "identity",
    "chain",
    "fold_seed",
    "matrix_dims",
    "low_rank_pays",
    "CHAINABLE",
    "LOW_RANK",
]

# rankfed's one list of compressor names. Chainable uplink compressors, joined by "+" in an
# experiment file ("topk+qsgd"), and the low-rank methods, used alone: as a client's uplink
# compressor (rankfed.compress.lowrank_uplink) and inside a data-parallel all-reduce
# (rankfed.compress.lowrank, rankfed.ddp).
CHAINABLE = ("topk", "qsgd")
LOW_RANK = ("powersgd", "greedylore", "random")

Tensors = dict[str, torch.Tensor]
Entries = dict[str, Union[torch.Tensor, int, float]]


@dataclass(frozen=True)
class Compressor:
    """Three pure functions and a name; see the module docstring for the contract.

    ``init(template) -> state``; ``compress(tensors, state, seed) -> (entries,
    new_state)``; ``decompress(entries) -> tensors``. ``config``: the experiment-file keys
    that build the same compressor (``{"compressor": "topk+qsgd", "topk_ratio": 0.01,
    "qsgd_bits": 8}``), or None when no experiment file can say it (``topk(k=5)``, a
    compressor of your own).
    """

    name: str
    init: Callable[[Tensors], Any]
    compress: Callable[[Tensors, Any, int], tuple[Entries, Any]]
    decompress: Callable[[Entries], Tensors]
    config: dict | None = field(default=None, compare=False)


def matrix_dims(shape: Iterable[int]) -> tuple[int, int] | None:
    """A tensor as the matrix low-rank methods see: (first dim, the rest) for 2-D or more
    (a conv kernel (out, in, kh, kw) is (out, in*kh*kw)); None for scalars and vectors."""
    shape = tuple(shape)
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def low_rank_pays(shape: Iterable[int], sent: int, min_saving: float = 2.0, *, strict: bool = False) -> bool:
    """rankfed's one compressibility rule: a matrix is worth sending in a low-rank form of
    ``sent`` numbers when that is ``min_saving`` times smaller than the matrix (``strict``:
    more than that many times, as PyTorch's PowerSGD hook decides). Vectors never are."""
    dims = matrix_dims(shape)
    if dims is None:
        return False
    dense = dims[0] * dims[1]
    return dense > min_saving * sent if strict else dense >= min_saving * sent


@dataclass(frozen=True)
class EmptyState:
    """The state of a compressor that remembers nothing between calls."""


def empty_init(template: Mapping[str, torch.Tensor]) -> EmptyState:
    """``init`` of every stateless compressor."""
    return EmptyState()


# --------------------------------------------------------------------------- helpers for the families


def check_tensors(tensors: Mapping[str, Any], who: str) -> None:
    """Input to ``compress``: non-empty names without the metadata prefix, tensor values."""
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{who}: tensor names must be non-empty strings, got {name!r}")
        if name.startswith("@"):
            raise ValueError(f"{who}: name {name!r} starts with '@', which is reserved for payload metadata")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{who}: entry {name!r} is a {type(value).__name__}, expected a torch.Tensor")


def shape_tensor(shape: torch.Size) -> torch.Tensor:
    """A shape as a (ndim,) int tensor on the CPU (int32; int64 only if a dim needs it).

    Kept on the CPU whatever the data's device: decompress reads it with
    ``tolist()``, which would otherwise synchronise with an accelerator.
    """
    dtype = torch.int32 if all(d < 2**31 for d in shape) else torch.int64
    return torch.tensor(list(shape), dtype=dtype)


def read_shape(t: torch.Tensor) -> torch.Size:
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"a shape entry must be a 1-D int32/int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    dims = t.tolist()
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape entry {dims}")
    return torch.Size(dims)


def numel_of(shape: torch.Size) -> int:
    return math.prod(shape)


# Floating dtypes a compressor may have to name on the wire, when nothing else
# in its entries carries the dtype. Codes are part of the format: append only.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_tensor(dtype: torch.dtype) -> torch.Tensor:
    """A floating dtype as a 0-d uint8 tensor (6 bytes + name on the wire)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot name dtype {dtype} on the wire (known: {FLOAT_DTYPES})")
    return torch.tensor(FLOAT_DTYPES.index(dtype), dtype=torch.uint8)


def read_dtype(t: torch.Tensor) -> torch.dtype:
    code = int(t.item())
    if not 0 <= code < len(FLOAT_DTYPES):
        raise ValueError(f"unknown dtype code {code} in a dtype entry")
    return FLOAT_DTYPES[code]


def parse_groups(
    names: Iterable[str], suffixes: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, dict[str, str]]:
    """Find the compressed tensors among entry names.

    A group is a base name ``b`` with every ``b/<suffix>`` present (the first
    suffix is the marker looked for); ``b/<optional>`` entries join the group
    when present. Returns ``{b: {suffix: entry name}}`` in the order the
    markers appear.
    """
    names = list(names)
    present = set(names)
    marker = "/" + suffixes[0]
    groups: dict[str, dict[str, str]] = {}
    for n in names:
        if not n.endswith(marker):
            continue
        base = n[: -len(marker)]
        if not base or base in groups:
            continue
        members = {s: f"{base}/{s}" for s in suffixes}
        if all(m in present for m in members.values()):
            members.update({s: f"{base}/{s}" for s in optional if f"{base}/{s}" in present})
            groups[base] = members
    return groups


def encode_groups(
    who: str,
    tensors: Mapping[str, torch.Tensor],
    encode_one: Callable[[str, torch.Tensor], Entries],
    suffixes: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> Entries:
    """Apply ``encode_one`` to each floating tensor, pass the others through.

    ``encode_one(name, t)`` returns entries named ``name/<suffix>``. The result
    keeps the input order (a compressed tensor's entries sit where it sat).
    Raises ``ValueError`` when the names would collide or when decompression
    could not tell the compressed tensors apart from passed-through ones by
    their names alone (e.g. an int tensor called ``"w/shape"`` beside a float
    ``"w"``).
    """
    check_tensors(tensors, who)
    out: Entries = {}
    emitted: dict[str, set[str]] = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            part = encode_one(name, t.detach())
            emitted[name] = set(part)
        else:
            part = {name: t}
        for key, value in part.items():
            if key in out:
                raise ValueError(f"{who}: entry name {key!r} is produced twice; rename the input tensors")
            out[key] = value
    parsed = parse_groups(out, suffixes, optional)
    if set(parsed) != set(emitted) or any(set(parsed[b].values()) != keys for b, keys in emitted.items()):
        odd = sorted(set(parsed) ^ set(emitted)) or sorted(b for b in emitted if set(parsed[b].values()) != emitted[b])
        raise ValueError(
            f"{who}: entry names would be ambiguous on decompression around {odd}; "
            "a passed-through tensor's name looks like a compressed tensor's entry; rename the input tensors"
        )
    return out


def decode_groups(
    entries: Mapping[str, Any],
    decode_one: Callable[[dict[str, Any]], torch.Tensor],
    suffixes: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Inverse of :func:`encode_groups`: rebuild each group, pass the rest through, keep the order."""
    groups = parse_groups(entries, suffixes, optional)
    owner = {key: base for base, members in groups.items() for key in members.values()}
    out: dict[str, Any] = {}
    for key, value in entries.items():
        base = owner.get(key)
        if base is None:
            out[key] = value
        elif base not in out:
            out[base] = decode_one({s: entries[k] for s, k in groups[base].items()})
    return out


def fold_seed(seed: int, index: int) -> int:
    """A seed for member ``index`` of a chain, derived from the call's ``seed``.

    splitmix64 of (seed, index), so two random members of one chain (e.g.
    ``qsgd`` applied twice) draw independent streams instead of the same
    uniforms. Returns a non-negative 63-bit int, valid for ``manual_seed``.
    """
    mask = (1 << 64) - 1
    z = (int(seed) + (int(index) + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


# --------------------------------------------------------------------------- identity


def _identity_compress(tensors: Mapping[str, torch.Tensor], state: Any, seed: int) -> tuple[Entries, Any]:
    check_tensors(tensors, "identity")
    return {name: t.detach() for name, t in tensors.items()}, state


def _identity_decompress(entries: Mapping[str, Any]) -> dict[str, Any]:
    return dict(entries)


def identity() -> Compressor:
    """Send every tensor as it is (the FedAvg uplink); the reference the others are measured against."""
    return Compressor("identity", empty_init, _identity_compress, _identity_decompress, {"compressor": ""})


# --------------------------------------------------------------------------- chain


def _split(entries: Mapping[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in entries.items() if not isinstance(v, torch.Tensor)}
    return tensors, scalars


def _chain_init(members: tuple[Compressor, ...], template: Mapping[str, torch.Tensor]) -> tuple:
    states = []
    current: Tensors = dict(template)
    for i, c in enumerate(members):
        state = c.init(current)
        states.append(state)
        if i + 1 < len(members):
            # Member i+1 sees member i's entries (top-k's k values, not the d
            # parameters), so learn their names and shapes by compressing the
            # template once; the output itself is thrown away.
            entries, _ = c.compress(current, state, 0)
            current, _ = _split(entries)
    return tuple(states)


def _chain_compress(
    members: tuple[Compressor, ...], tensors: Mapping[str, torch.Tensor], state: tuple, seed: int
) -> tuple[Entries, tuple]:
    if not isinstance(state, tuple) or len(state) != len(members):
        raise ValueError(
            f"chain of {len(members)} expects a tuple of {len(members)} states, got {type(state).__name__}"
        )
    current: Entries = dict(tensors)
    new_states = []
    for i, (c, s) in enumerate(zip(members, state)):
        # Only tensors go to the next member; it compresses the floating ones
        # (top-k's values) and passes the rest (its int32 indices) through.
        # Scalar entries, if a member makes any, ride along untouched.
        feed, scalars = _split(current)
        entries, s = c.compress(feed, s, fold_seed(seed, i))
        clash = set(entries) & set(scalars)
        if clash:
            raise ValueError(f"chain: member {c.name!r} produced entries {sorted(clash)} that already exist")
        current = {**entries, **scalars}
        new_states.append(s)
    return current, tuple(new_states)


def _chain_decompress(members: tuple[Compressor, ...], entries: Mapping[str, Any]) -> dict[str, Any]:
    current = dict(entries)
    for c in reversed(members):
        current = c.decompress(current)
    return current


def chain(*compressors: Compressor) -> Compressor:
    """Apply ``compressors`` in turn: each compresses the previous one's entries.

    ``chain(topk(0.01), qsgd(8))`` sends 1% of the coordinates with 8-bit
    values. Member ``i`` is called with seed ``fold_seed(seed, i)``. The state
    is the tuple of member states; decompression runs the members in reverse.
    """
    members = tuple(compressors)
    for c in members:
        if not isinstance(c, Compressor):
            raise TypeError(f"chain takes Compressor objects, got {type(c).__name__}")
    name = "+".join(c.name for c in members) or "identity"
    return Compressor(
        name,
        partial(_chain_init, members),
        partial(_chain_compress, members),
        partial(_chain_decompress, members),
        _chain_config(members),
    )


def _chain_config(members: tuple[Compressor, ...]) -> dict | None:
    """The experiment-file keys of a chain: its members' names joined by "+", when each member
    has keys of its own kind and none repeats (an experiment file has one topk_ratio)."""
    if not members:
        return {"compressor": ""}
    out: dict = {}
    names = []
    for c in members:
        cfg = c.config
        if cfg is None or not cfg.get("compressor") or "+" in cfg["compressor"] or cfg.get("error_feedback") or cfg["compressor"] in names:
            return None
        if cfg["compressor"] in LOW_RANK:
            return None  # used alone, never in a chain
        names.append(cfg["compressor"])
        out |= {k: v for k, v in cfg.items() if k != "compressor"}
    return {"compressor": "+".join(names), **out}
