"""Property tests (hypothesis): config parsing, the wire format, the Flower records.

1. A random valid [task]/[federation]/[client] document parses, serialises with
   ``to_toml`` and parses back to an equal config; a random invalid value raises
   ConfigError (never another exception) naming the key.
2. ``wire.decode(wire.encode(p))`` gives ``p`` back bit for bit (every wire dtype, 0-4
   dimensions, zero-size dimensions, every scalar kind), and ``encoded_size(p) ==
   len(encode(p))``.
3. ``wire.decode`` of truncated, random or corrupted bytes raises WireError or returns
   a payload: no other exception.
4. The Flower records round trip (``payload_to_records`` / ``records_to_payload``).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rankfed import wire
from rankfed.algorithms import ALGORITHMS
from rankfed.app.config import CLIENT_ALIASES, ClientConfig, ConfigError, FederationConfig, TaskConfig, parse_config, to_toml
from rankfed.data import DATASETS, PARTITIONS
from rankfed.models import MODELS
from rankfed.wire import MAGIC, WireError, decode, encode, encoded_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_SEED = 2**32 - 1

# --------------------------------------------------------------------------- 1. config

FIELDS = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in (("task", TaskConfig), ("federation", FederationConfig), ("client", ClientConfig))}
# Old spellings still read (renamed keys): known keys, not unknown ones.
KNOWN = {name: fields | (set(CLIENT_ALIASES) if name == "client" else set()) for name, fields in FIELDS.items()}


def _ints(lo: int, hi: int = I64_MAX) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def _floats(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, exclude_min=open_lo, exclude_max=open_hi, allow_nan=False, allow_infinity=False)


_toml_scalars = st.one_of(_ints(I64_MIN), _floats(-1e300, 1e300), st.text(max_size=8), st.booleans())
_toml_tables = st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(_toml_scalars, st.lists(_ints(-1000, 1000), max_size=4)), max_size=3)

# section -> key -> strategy of valid values (lr_min and nesterov depend on lr and momentum: see _valid_doc)
VALID = {
    "task": {
        "dataset": st.sampled_from(DATASETS),
        "data_dir": st.text(max_size=20),
        "partition": st.sampled_from(PARTITIONS),
        "alpha": _floats(0, 1e6, open_lo=True),
        "classes_per_client": _ints(1),
        "holdout": _floats(0, 1, open_hi=True),
        "train_samples": _ints(0),
        "model": st.sampled_from(("", *MODELS)),
        "init_weights": st.text(max_size=20),
        "dataset_options": _toml_tables,
        "model_options": _toml_tables,
    },
    "federation": {
        "clients": _ints(1),
        "participation": _floats(0, 1, open_lo=True),
        "rounds": _ints(1),
        "seed": _ints(0, MAX_SEED),
        "eval_every": _ints(1),
        "eval_batch_size": _ints(1),
        "device": st.sampled_from(("cpu", "cuda", "auto")),
        "client_kind": st.sampled_from(("auto", "stateless", "stateful")),
        "checkpoint_every": _ints(0),
        "min_clients": _ints(1),
    },
    "client": {
        "optimizer": st.sampled_from(("sgd", "adamw")),
        "lr": _floats(0, 1e6, open_lo=True),
        "momentum": _floats(0, 1, open_hi=True),
        "weight_decay": _floats(0, 1e6),
        "betas": st.lists(_floats(0, 1, open_hi=True), min_size=2, max_size=2),
        "epochs": _ints(1),
        "steps": _ints(0),
        "batch_size": _ints(1),
        "lr_schedule": st.sampled_from(("constant", "cosine")),
        "grad_clip": _floats(0, 1e6),
    },
}

_nan_inf = st.sampled_from((math.nan, math.inf, -math.inf))


def _other_text(choices) -> st.SearchStrategy[str]:
    return st.text(max_size=12).filter(lambda s: s not in choices)


# section -> key -> strategy of out-of-range values of the right type (wrong types: _wrong_type)
OUT_OF_RANGE = {
    "task": {
        "dataset": _other_text(DATASETS),
        "partition": _other_text(PARTITIONS),
        "alpha": st.one_of(_floats(-1e300, 0), _nan_inf),
        "classes_per_client": _ints(I64_MIN, 0),
        "holdout": st.one_of(_floats(-1e300, 0, open_hi=True), _floats(1, 1e300), _nan_inf),
        "train_samples": _ints(I64_MIN, -1),
        "model": _other_text(("", *MODELS)),
    },
    "federation": {
        "clients": _ints(I64_MIN, 0),
        "participation": st.one_of(_floats(-1e300, 0), _floats(1, 1e300, open_lo=True), _nan_inf),
        "rounds": _ints(I64_MIN, 0),
        "seed": st.one_of(_ints(I64_MIN, -1), _ints(MAX_SEED + 1)),
        "eval_every": _ints(I64_MIN, 0),
        "eval_batch_size": _ints(I64_MIN, 0),
        "device": _other_text(("cpu", "cuda", "auto")),
        "client_kind": _other_text(("auto", "stateless", "stateful")),
        "checkpoint_every": _ints(I64_MIN, -1),
        "min_clients": _ints(I64_MIN, 0),
    },
    "client": {
        "optimizer": _other_text(("sgd", "adamw")).filter(lambda s: ":" not in s),  # ":" names code to import
        "lr": st.one_of(_floats(-1e300, 0), _nan_inf, st.integers(2**1024, 2**1100)),  # the last: beyond float range
        "momentum": st.one_of(_floats(-1e300, 0, open_hi=True), _floats(1, 1e300), _nan_inf),
        "weight_decay": st.one_of(_floats(-1e300, 0, open_hi=True), _nan_inf),
        "betas": st.one_of(
            st.lists(_floats(0, 0.99), max_size=5).filter(lambda b: len(b) != 2),
            st.lists(st.one_of(_floats(1, 1e300), _floats(-1e300, 0, open_hi=True), _nan_inf), min_size=2, max_size=2),
            st.lists(st.text(max_size=3), min_size=2, max_size=2),
        ),
        "epochs": _ints(I64_MIN, 0),
        "steps": _ints(I64_MIN, -1),
        "batch_size": _ints(I64_MIN, 0),
        "lr_schedule": _other_text(("constant", "cosine")),
        "lr_min": st.one_of(_floats(-1e300, 0, open_hi=True), _nan_inf, st.just("above lr")),
        "grad_clip": st.one_of(_floats(-1e300, 0, open_hi=True), _nan_inf),
    },
}


def _wrong_type(field_type: str) -> st.SearchStrategy:
    """Values TOML can hold whose type the field does not accept."""
    text, ints, floats, bools = st.text(max_size=6), _ints(I64_MIN), _floats(-1e9, 1e9), st.booleans()
    lists, tables = st.lists(ints, max_size=3), st.dictionaries(st.text(min_size=1, max_size=4), ints, max_size=2)
    return {
        "int": st.one_of(text, floats, bools, lists, tables),
        "float": st.one_of(text, bools, lists, tables),
        "str": st.one_of(ints, floats, bools, lists, tables),
        "bool": st.one_of(ints, floats, text, lists),
        "list": st.one_of(ints, floats, text, bools, tables),
        "dict": st.one_of(ints, floats, text, bools, lists),
    }[field_type]


FIELD_TYPES = {
    # an experiment file gives the optimizer (annotated Any: a class from Python) as a string
    name: {f.name: {"Any": "str"}.get(t := (f.type if isinstance(f.type, str) else f.type.__name__).split("[")[0], t) for f in dataclasses.fields(cls)}
    for name, cls in (("task", TaskConfig), ("federation", FederationConfig), ("client", ClientConfig))
}


@st.composite
def _valid_doc(draw) -> dict:
    doc: dict = {}
    for section, keys in VALID.items():
        present = sorted(k for k in keys if k in FIELDS[section])
        chosen = draw(st.lists(st.sampled_from(present), unique=True, max_size=len(present)))
        doc[section] = {k: draw(keys[k]) for k in chosen}
    client = doc["client"]
    lr = client.get("lr", ClientConfig.lr)
    if draw(st.booleans()):
        client["lr_min"] = draw(_floats(0, lr))
    if client.get("momentum", ClientConfig.momentum) > 0 and draw(st.booleans()):
        client["nesterov"] = draw(st.booleans())
    if draw(st.booleans()):
        doc["algorithm"] = {"name": draw(st.sampled_from(sorted(ALGORITHMS)))}
    return doc


def _same_value(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return float(got) == float(want)
    return got == want and type(got) is type(want)


@SETTINGS
@given(doc=_valid_doc())
def test_config_round_trips_through_toml(doc):
    cfg = parse_config(doc)
    for section, values in doc.items():
        if section in FIELDS:
            for key, value in values.items():
                assert _same_value(getattr(getattr(cfg, section), key), value), (section, key)
    text = to_toml(cfg)
    again = parse_config(tomllib.loads(text))
    assert again == cfg
    assert to_toml(again) == text


@st.composite
def _invalid_doc(draw) -> tuple[dict, str]:
    """A valid document with one value spoiled: (doc, the spoiled key's dotted name)."""
    doc = draw(_valid_doc())
    candidates = sorted((s, k) for s in FIELDS for k in FIELDS[s] if k in OUT_OF_RANGE[s] or k in FIELD_TYPES[s])
    section, key = draw(st.sampled_from(candidates))
    strategies = [_wrong_type(FIELD_TYPES[section][key])]
    if key in OUT_OF_RANGE[section]:
        strategies.append(OUT_OF_RANGE[section][key])
    value = draw(st.one_of(strategies))
    values = doc[section]
    if key == "lr_min":
        lr = values.get("lr", ClientConfig.lr)
        if value == "above lr":
            value = lr * 2 + draw(_floats(1e-6, 1e6))
    if section == "client" and key in ("lr", "momentum"):
        values.pop("lr_min", None)  # keep the spoiled key the only bad one
        values.pop("nesterov", None)
    values[key] = value
    return doc, f"{section}.{key}"


@SETTINGS
@given(case=_invalid_doc())
def test_invalid_config_value_raises_config_error_naming_the_key(case):
    doc, key = case
    with pytest.raises(ConfigError) as err:  # any other exception type fails the test
        parse_config(doc)
    assert key in str(err.value)


@SETTINGS
@given(
    section=st.sampled_from(sorted(FIELDS)),
    key=st.text(min_size=1, max_size=12),
    value=_toml_scalars,
)
def test_unknown_config_key_raises_config_error_naming_it(section, key, value):
    if key in KNOWN[section]:
        return
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    assert f"{section}.{key}" in str(err.value)


@SETTINGS
@given(section=st.text(min_size=1, max_size=12), value=st.one_of(_toml_scalars, _toml_tables))
def test_unknown_or_non_table_section_raises_config_error(section, value):
    known = {*FIELDS, "flower", "algorithm", "algorithms"}
    if section in known:
        return
    with pytest.raises(ConfigError) as err:
        parse_config({section: value})
    assert section in str(err.value)


@SETTINGS
@given(section=st.sampled_from(sorted({*FIELDS, "flower", "algorithm"})), value=st.one_of(_toml_scalars, st.lists(_ints(0, 9), max_size=3)))
def test_section_that_is_not_a_table_raises_config_error(section, value):
    with pytest.raises(ConfigError) as err:
        parse_config({section: value})
    assert section in str(err.value)


# --------------------------------------------------------------------------- 2. wire round trip

DTYPES = wire._DTYPES


@st.composite
def tensors(draw) -> torch.Tensor:
    """A tensor of any wire dtype, 0-4 dimensions of size 0-4, any bit pattern (bool: 0/1)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=dtype) if n else torch.empty(0, dtype=dtype)
    t = t.reshape(shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)  # not contiguous: encode must write it in C order all the same
    return t


scalars = st.one_of(
    st.integers(I64_MIN, I64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.booleans(),
)
names = st.text(min_size=1, max_size=12)
payloads = st.dictionaries(names, st.one_of(tensors(), scalars), max_size=6)


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def assert_same_payload(got: dict, want: dict) -> None:
    """Same keys in the same order, same dtypes and shapes, bitwise-equal values (NaNs included)."""
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), k
            assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), k
            assert _bits(g) == _bits(w), k
        else:
            assert type(g) is type(w), k
            if isinstance(w, float):
                assert struct.pack("<d", g) == struct.pack("<d", w), k
            else:
                assert g == w, k


@SETTINGS
@given(p=payloads)
@example(p={})
@example(p={"@round": 2**63 - 1, "@neg": -(2**63), "nan": math.nan, "-inf": -math.inf, "s": "", "b": False})
@example(p={"z": torch.empty(0, 3, dtype=torch.bfloat16), "0d": torch.tensor(True), "\u00e9\U0001f600": torch.zeros(2, 0, 0, 1, dtype=torch.int16)})
def test_wire_round_trip(p):
    data = encode(p)
    assert encoded_size(p) == len(data)
    back = decode(data)
    assert_same_payload(back, p)
    assert encode(back) == data


# --------------------------------------------------------------------------- 3. wire robustness


# Bytes that once made decode raise something other than WireError (found by these properties,
# fixed in src/rankfed/wire.py): a str value whose bytes are not UTF-8, and a tensor whose dims
# multiply past 2**64 (np.prod wrapped to 0, then reshape failed).
BAD_UTF8_STR = MAGIC + struct.pack("<IH", 1, 1) + b"s" + struct.pack("<BI", 3, 2) + b"\xff\xfe"
OVERFLOWING_SHAPE = MAGIC + struct.pack("<IH", 1, 1) + b"t" + struct.pack("<BBB", 0, 0, 3) + struct.pack("<3I", 2**31, 2**31, 4)
def _decode_or_wire_error(data: bytes) -> None:
    try:
        out = decode(data)
    except WireError:
        return
    assert isinstance(out, dict)


@SETTINGS
@given(p=payloads, data=st.data())
def test_truncated_payload_raises_wire_error(p, data):
    raw = encode(p)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(WireError):
        decode(raw[:cut])


@SETTINGS
@given(raw=st.binary(max_size=300), after_magic=st.booleans())
@example(raw=b"", after_magic=True)
@example(raw=struct.pack("<I", 2**32 - 1), after_magic=True)  # four billion entries announced
def test_random_bytes_raise_wire_error_or_decode(raw, after_magic):
    _decode_or_wire_error(MAGIC + raw if after_magic else raw)


@SETTINGS
@given(p=payloads, data=st.data())
def test_flipped_byte_raises_wire_error_or_decodes(p, data):
    raw = bytearray(encode(p))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    _decode_or_wire_error(bytes(raw))


def test_decode_str_value_not_utf8_is_a_wire_error():
    with pytest.raises(WireError):
        decode(BAD_UTF8_STR)


def test_decode_shape_overflowing_64_bits_is_a_wire_error():
    with pytest.raises(WireError):
        decode(OVERFLOWING_SHAPE)


def test_zero_element_tensor_whose_shape_strides_overflow_is_a_wire_error():
    # the 4-in-20,000 mutation that leaked torch's "Stride calculation overflowed": an empty
    # tensor (one dimension 0) whose other dimensions multiply past 2**63
    raw = bytearray(encode({"e": torch.empty(0, 1, 1, 1)}))
    dims_at = len(raw) - 16  # four u32 dimensions, no data
    assert struct.unpack("<4I", raw[dims_at:]) == (0, 1, 1, 1)
    raw[dims_at:] = struct.pack("<4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    with pytest.raises(WireError, match="strides overflow"):
        decode(bytes(raw))
    ok = bytearray(raw)
    ok[dims_at:] = struct.pack("<4I", 0, 2**20, 2**20, 7)  # large but representable: decodes, empty
    assert decode(bytes(ok))["e"].shape == (0, 2**20, 2**20, 7)


def _mutations(raw: bytes, rng) -> list[bytes]:
    """Bit flips, byte overwrites, truncations, insertions, deletions and splices of ``raw``."""
    out = []
    b = bytearray(raw)
    i = int(rng.integers(len(b)))
    flipped = bytearray(b)
    flipped[i] ^= 1 << int(rng.integers(8))
    out.append(bytes(flipped))
    over = bytearray(b)
    for j in rng.integers(len(b), size=int(rng.integers(1, 4))):
        over[int(j)] = int(rng.integers(256))
    out.append(bytes(over))
    out.append(bytes(b[: int(rng.integers(len(b)))]))
    at = int(rng.integers(len(b) + 1))
    out.append(bytes(b[:at] + rng.integers(256, size=int(rng.integers(1, 9))).astype("uint8").tobytes() + b[at:]))
    lo = int(rng.integers(len(b)))
    out.append(bytes(b[:lo] + b[lo + int(rng.integers(1, 9)) :]))
    out.append(bytes(b[:at] + b[int(rng.integers(len(b))) :]))  # a splice of the payload with itself
    out.append(rng.integers(256, size=int(rng.integers(0, 64))).astype("uint8").tobytes())  # random bytes
    out.append(MAGIC + rng.integers(256, size=int(rng.integers(0, 64))).astype("uint8").tobytes())
    return out


def test_mutation_fuzz_of_valid_payloads_raises_only_wire_error():
    """20,000+ mutated valid payloads (empty and small tensors of every dtype, scalars,
    strings): decode returns a payload or raises WireError, never another exception."""
    import numpy as np

    rng = np.random.default_rng(20)
    bases = [
        {"e": torch.empty(0, 3), "w": torch.ones(2, 2)},
        {"z": torch.empty(3, 0, 2, dtype=torch.bool), "i": 7, "s": "ok"},
        {"b": torch.zeros(0, dtype=torch.bfloat16), "f": 1.5, "t": True},
        {"@round": 3, "x": torch.arange(6, dtype=torch.int64).reshape(1, 2, 3), "h": torch.ones(4, dtype=torch.float16)},
        {"k": torch.empty(0, 0, 0, 0, 0, 0, 0, 0, dtype=torch.uint8)},
    ]
    raws = [encode(p) for p in bases]
    tried = 0
    for n in range(2600):
        for m in _mutations(raws[n % len(raws)], rng):
            _decode_or_wire_error(m)
            tried += 1
    assert tried >= 20000


# --------------------------------------------------------------------------- 4. Flower records

flower_payloads = st.dictionaries(names.filter(lambda n: not n.startswith("@names")), st.one_of(tensors(), scalars), max_size=6)


def _flower_round_trip(p: dict, prefix: str) -> dict:
    from flwr.app import RecordDict

    from rankfed.flower.records import payload_to_records, records_to_payload

    return records_to_payload(RecordDict(payload_to_records(p, prefix)), prefix)


def test_flower_records_round_trip():
    pytest.importorskip("flwr")

    @SETTINGS
    @given(p=flower_payloads, prefix=st.sampled_from(("up.3", "down", "x.y.z")))
    @example(p={"@round": 2**63 - 1, "nan": math.nan, "bf": torch.ones(2, dtype=torch.bfloat16), "e": torch.empty(3, 0, dtype=torch.bool)}, prefix="up.0")
    def round_trip(p, prefix):
        back = _flower_round_trip(p, prefix)
        assert_same_payload(back, p)
        assert encode(back) == encode(p)

    round_trip()


def test_flower_records_zero_size_bfloat16():
    pytest.importorskip("flwr")
    p = {"bf": torch.zeros(0, 3, dtype=torch.bfloat16)}
    assert_same_payload(_flower_round_trip(p, "up"), p)
