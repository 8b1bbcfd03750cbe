"""The wire format: round trips, exact sizes, and clear errors on bad bytes."""

import struct

import numpy as np
import pytest
import torch

from rankfed.wire import MAGIC, WireError, decode, encode, encoded_size, tensor_bytes


def _payload():
    g = torch.Generator().manual_seed(0)
    return {
        "@round": 7,
        "@lr": 0.125,
        "@tag": "héllo",
        "@flag": True,
        "conv.weight": torch.randn(8, 1, 5, 5, generator=g),
        "fc.bias": torch.randn(10, generator=g).double(),
        "idx": torch.arange(5, dtype=torch.int64),
        "q": torch.randint(-128, 127, (3, 4), dtype=torch.int8, generator=g),
        "h": torch.randn(6, generator=g).half(),
        "b": torch.randn(6, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "scalar_t": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def test_round_trip_preserves_values_dtypes_shapes_and_order():
    p = _payload()
    out = decode(encode(p))
    assert list(out) == list(p)
    for k, v in p.items():
        if isinstance(v, torch.Tensor):
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
            assert torch.equal(out[k], v), k
        else:
            assert out[k] == v and type(out[k]) is type(v), k


def test_decoded_tensors_are_writable_and_independent_of_the_buffer():
    raw = encode({"w": torch.ones(3)})
    out = decode(raw)
    out["w"].add_(1)  # no warning/error about read-only memory
    assert torch.equal(decode(raw)["w"], torch.ones(3))


def test_encoded_size_matches_length_and_header_is_small():
    p = _payload()
    assert encoded_size(p) == len(encode(p))
    d = 11_274
    up = {"@num_samples": 600, "w": torch.zeros(d)}
    n = len(encode(up))
    assert tensor_bytes(up) == 4 * d
    # 4*d of data plus: magic+count (8), two names, kinds, dtype/ndim, one dim.
    assert n == 4 * d + 8 + (2 + 12 + 1 + 8) + (2 + 1 + 1 + 1 + 1 + 4)


def test_numpy_arrays_encode_as_tensors():
    out = decode(encode({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    assert out["a"].dtype == torch.float32 and out["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_non_contiguous_and_gradient_tensors_encode():
    t = torch.randn(4, 6, requires_grad=True)
    out = decode(encode({"t": t.t()}))
    assert torch.equal(out["t"], t.detach().t())


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"XXXX" + bytes(4), "bad magic"),
        (MAGIC + struct.pack("<I", 1), "truncated"),
        (encode({"w": torch.ones(4)})[:-1], "truncated"),
        (encode({"w": torch.ones(4)}) + b"\0", "trailing"),
        (MAGIC + struct.pack("<I", 1) + struct.pack("<H", 1) + b"a" + bytes([9]), "unknown entry kind 9"),
        (MAGIC + struct.pack("<I", 1) + struct.pack("<H", 1) + b"a" + struct.pack("<BBB", 0, 200, 0), "unknown dtype code 200"),
    ],
)
def test_bad_bytes_raise_wire_error(bad, message):
    with pytest.raises(WireError, match=message):
        decode(bad)


def test_duplicate_names_are_rejected():
    one = encode({"a": 1})
    body = one[8:]
    with pytest.raises(WireError, match="duplicate"):
        decode(MAGIC + struct.pack("<I", 2) + body + body)


@pytest.mark.parametrize("value", [None, [1, 2], {"x": 1}, torch.zeros(2, dtype=torch.complex64)])
def test_unsupported_values_name_the_entry(value):
    with pytest.raises(WireError, match="'bad'"):
        encode({"bad": value})
