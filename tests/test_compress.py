"""Update compressors: round trips, QSGD's unbiasedness and grid, measured byte
sizes, chain == the steps by hand, error feedback's conservation, state."""

import math
import pickle

import pytest
import torch

from rankfed.compress import (
    COMPRESSORS,
    Compressor,
    ErrorFeedbackState,
    build_compressor,
    chain,
    error_feedback,
    fold_seed,
    identity,
    qsgd,
    topk,
)
from rankfed.wire import decode, encode


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 7, generator=g).double(),
        "fc.bias": torch.randn(10, generator=g).half(),
        "scale": torch.tensor(2.5),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def _roundtrip(c: Compressor, u: dict, seed: int = 0) -> tuple[dict, dict]:
    entries, _ = c.compress(u, c.init(u), seed)
    return entries, c.decompress(decode(encode(entries)))  # through the real wire


ALL = [
    identity(),
    topk(ratio=0.3),
    topk(k=2),
    qsgd(2),
    qsgd(4),
    qsgd(8),
    chain(topk(ratio=0.5), qsgd(4)),
    error_feedback(chain(topk(ratio=0.5), qsgd(8))),
]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("c", ALL, ids=lambda c: c.name)
def test_names_shapes_dtypes_restored_and_ints_pass_through(c):
    u = _update()
    entries, out = _roundtrip(c, u)
    assert list(out) == list(u)
    for name, t in u.items():
        assert out[name].shape == t.shape and out[name].dtype == t.dtype, name
        if not t.is_floating_point():
            assert torch.equal(out[name], t) and torch.equal(entries[name], t), name
    assert not any(k.startswith("@") for k in entries)


def test_identity_and_topk_ratio_one_are_exact():
    u = _update()
    for c in (identity(), topk(ratio=1.0)):
        _, out = _roundtrip(c, u)
        for name, t in u.items():
            assert torch.equal(out[name], t), (c.name, name)


def test_topk_keeps_exactly_the_k_largest_and_zeros_the_rest():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 5, generator=g)  # continuous: no ties
    c = topk(ratio=0.07)  # 0.07 * 100 = 7.000000000000001 in floating point: must keep 7
    entries, out = _roundtrip(c, {"w": w})
    kept = out["w"] != 0
    assert int(kept.sum()) == 7 and entries["w/values"].numel() == 7
    threshold = w.abs().flatten().sort(descending=True).values[6]
    assert torch.equal(kept, w.abs() >= threshold)
    assert torch.equal(out["w"][kept], w[kept]) and torch.all(out["w"][~kept] == 0)
    assert entries["w/indices"].dtype == torch.int32 and entries["w/values"].dtype == torch.float32
    assert entries["w/shape"].dtype == torch.int32 and entries["w/shape"].tolist() == [20, 5]
    # k given directly, capped at the tensor's size; at least one kept for tiny ratios
    assert topk(k=3).compress({"w": w}, None, 0)[0]["w/values"].numel() == 3
    assert topk(k=500).compress({"w": w}, None, 0)[0]["w/values"].numel() == 100
    assert topk(ratio=1e-6).compress({"w": w}, None, 0)[0]["w/values"].numel() == 1


def test_zero_dim_and_empty_tensors_round_trip():
    u = {"s": torch.tensor(-1.5), "e": torch.empty(0, 3)}
    for c in (topk(ratio=0.5), qsgd(4), chain(topk(k=1), qsgd(2))):
        _, out = _roundtrip(c, u)
        assert out["s"].shape == () and out["e"].shape == (0, 3), c.name
    assert _roundtrip(topk(k=1), u)[1]["s"].item() == -1.5


# --------------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_unbiased(bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, generator=g)
    c, trials = qsgd(bits), 3000
    mean = torch.stack([c.decompress(c.compress({"x": x}, None, seed)[0])["x"] for seed in range(trials)]).mean(0)
    # Per element v_hat = norm/s * (floor(r) + Bernoulli(frac(r))): std of the
    # mean is norm/s * sqrt(f(1-f)/trials); allow 5 of those (+ float slack).
    # Round-to-nearest would be off by min(f, 1-f) * norm/s, far outside.
    s, norm = 2 ** (bits - 1) - 1, x.norm()
    f = (x.abs() / norm * s).frac()
    tol = 5 * norm / s * (f * (1 - f) / trials).sqrt() + 1e-5
    assert torch.all((mean - x).abs() <= tol), (mean - x).abs().max()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_values_on_the_grid_bytes_and_determinism(bits):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 3, generator=g)  # 111 elements: not a multiple of 8/bits
    c, s = qsgd(bits), 2 ** (bits - 1) - 1
    entries, _ = c.compress({"x": x}, None, 11)
    assert entries["x/q"].dtype == torch.uint8
    assert entries["x/q"].numel() == math.ceil(111 * bits / 8)
    assert entries["x/norm"].dtype == torch.float32 and entries["x/norm"].shape == ()
    norm = entries["x/norm"]
    assert torch.allclose(norm, x.norm())
    out = c.decompress(entries)["x"]
    level = out * s / norm
    assert torch.allclose(level, level.round(), atol=1e-4)
    level = level.round()
    assert level.abs().max() <= s
    # each level is one of the two neighbours of r = |x|/norm * s, with x's sign
    r = x.abs() / norm * s
    assert torch.all((level.abs() == r.floor()) | (level.abs() == r.ceil()))
    assert torch.all((level == 0) | (level.sign() == x.sign()))
    # same seed -> same bytes; another seed -> other draws
    again, _ = c.compress({"x": x}, None, 11)
    other, _ = c.compress({"x": x}, None, 12)
    assert encode(again) == encode(entries)
    assert not torch.equal(other["x/q"], entries["x/q"])


def test_qsgd_uses_its_own_generator_and_zero_tensor_round_trips():
    x = torch.randn(50, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, _ = qsgd(4).compress({"x": x}, None, 5)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(123)
    b, _ = qsgd(4).compress({"x": x}, None, 5)
    assert torch.equal(a["x/q"], b["x/q"])
    for bits in (2, 4, 8):
        out = qsgd(bits).decompress(qsgd(bits).compress({"z": torch.zeros(5, 4)}, None, 0)[0])["z"]
        assert torch.equal(out, torch.zeros(5, 4)), bits


def test_qsgd_rejects_entries_made_with_other_bits():
    entries, _ = qsgd(4).compress({"x": torch.randn(100)}, None, 0)
    with pytest.raises(ValueError, match="bits=8"):
        qsgd(8).decompress(entries)


# --------------------------------------------------------------------------- measured bytes


def test_encoded_sizes_are_what_the_formulas_say():
    x = {"w": torch.randn(10_000, generator=torch.Generator().manual_seed(5))}
    header = 100  # magic+count (8) + per entry 2 + len(name) + 3 + 4*ndim: 55-63 bytes here
    sizes = {}
    for c, data in [(topk(ratio=0.1), 1_000 * (4 + 4)), (qsgd(8), 10_000), (qsgd(4), 5_000), (qsgd(2), 2_500)]:
        n = len(encode(c.compress(x, None, 0)[0]))
        sizes[c.name] = n
        assert data < n <= data + header, (c.name, n)
    assert sizes == {"topk(ratio=0.1)": 8063, "qsgd(bits=8)": 10055, "qsgd(bits=4)": 5055, "qsgd(bits=2)": 2555}
    assert len(encode(identity().compress(x, None, 0)[0])) == 40_000 + 8 + 2 + 1 + 3 + 4


# --------------------------------------------------------------------------- chain


def test_chain_equals_the_steps_by_hand():
    u = _update(6)
    t, q = topk(ratio=0.1), qsgd(8)
    c = chain(t, q)
    state = c.init(u)
    assert isinstance(state, tuple) and len(state) == 2
    seed = 42
    entries, new_state = c.compress(u, state, seed)
    assert isinstance(new_state, tuple) and len(new_state) == 2

    by_hand, _ = t.compress(u, state[0], fold_seed(seed, 0))
    floats = {k: v for k, v in by_hand.items() if v.is_floating_point()}
    others = {k: v for k, v in by_hand.items() if not v.is_floating_point()}
    quantised, _ = q.compress(floats, state[1], fold_seed(seed, 1))
    assert set(entries) == set(quantised) | set(others)
    for k, v in {**quantised, **others}.items():
        assert torch.equal(entries[k], v), k
    # top-k's int indices were passed through, its values quantised
    assert torch.equal(entries["fc.bias/indices"], by_hand["fc.bias/indices"])
    assert "fc.bias/values/q" in entries and "fc.bias/values" not in entries

    out = c.decompress(entries)
    hand_out = t.decompress(q.decompress(entries))
    assert list(out) == list(hand_out) == list(u)
    for k in u:
        assert torch.equal(out[k], hand_out[k]), k


def test_chain_of_two_quantisers_draws_independent_streams_and_decodes():
    x = {"x": torch.randn(64, generator=torch.Generator().manual_seed(7))}
    c = chain(qsgd(2), qsgd(8))  # the second quantises the first's float32 norm
    entries, _ = c.compress(x, c.init(x), 0)
    assert set(entries) == {"x/q", "x/shape", "x/norm/q", "x/norm/norm", "x/norm/shape"}
    out = c.decompress(decode(encode(entries)))["x"]
    assert out.shape == (64,) and torch.isfinite(out).all()
    assert fold_seed(0, 0) != fold_seed(0, 1)


def test_chain_init_gives_later_members_the_shapes_they_will_see():
    # error feedback on top-k's values: its residual must be shaped like the k
    # values, not like the d parameters
    c = chain(topk(k=2), error_feedback(qsgd(8)))
    x = {"w": torch.randn(5, 4, generator=torch.Generator().manual_seed(12))}
    state = c.init(x)
    assert {k: tuple(v.shape) for k, v in state[1].residual.items()} == {"w/values": (2,)}
    entries, state = c.compress(x, state, 0)
    assert c.decompress(entries)["w"].shape == (5, 4) and state[1].residual["w/values"].shape == (2,)


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_residual_is_what_was_not_sent_and_nothing_is_lost():
    inner = chain(topk(ratio=0.2), qsgd(4))
    c = error_feedback(inner)
    g = torch.Generator().manual_seed(8)
    steps = [
        {"w": torch.randn(6, 5, generator=g), "b": torch.randn(4, generator=g), "i": torch.arange(3)} for _ in range(6)
    ]
    state = c.init(steps[0])
    assert isinstance(state, ErrorFeedbackState) and state.residual["w"].dtype == torch.float32
    assert set(state.residual) == {"w", "b"} and not state.residual["w"].any()
    e_ref = {k: torch.zeros_like(v) for k, v in state.residual.items()}
    inner_state = inner.init(steps[0])
    total_sent = {k: torch.zeros_like(v) for k, v in e_ref.items()}
    for step, u in enumerate(steps):
        entries, state = c.compress(u, state, step)
        x = {k: u[k] + e_ref[k] for k in e_ref}
        ref_entries, inner_state = inner.compress({**x, "i": u["i"]}, inner_state, step)
        sent = inner.decompress(ref_entries)
        for k in e_ref:
            e_ref[k] = x[k] - sent[k]
            assert torch.equal(state.residual[k], e_ref[k]), (step, k)  # exactly (u + e) - D(C(u + e))
            total_sent[k] += c.decompress(entries)[k]
        assert torch.equal(entries["i"], u["i"])
    assert state.residual["w"].abs().sum() > 0  # top-k really dropped something
    for k in e_ref:
        inputs = sum(u[k] for u in steps)
        assert torch.allclose(total_sent[k] + state.residual[k], inputs, atol=1e-5), k


def test_error_feedback_with_identity_keeps_a_zero_residual():
    c = error_feedback(identity())
    g = torch.Generator().manual_seed(9)
    state = c.init({"w": torch.zeros(3, 3)})
    for step in range(3):
        u = {"w": torch.randn(3, 3, generator=g)}
        entries, state = c.compress(u, state, step)
        assert torch.equal(c.decompress(entries)["w"], u["w"])
        assert torch.equal(state.residual["w"], torch.zeros(3, 3))


# --------------------------------------------------------------------------- state and purity


@pytest.mark.parametrize("c", ALL + [error_feedback(topk(k=3))], ids=lambda c: c.name)
def test_state_pickles_inputs_are_untouched_and_old_state_is_not_mutated(c):
    u = _update(10)
    copy = {k: v.clone() for k, v in u.items()}
    state = c.init(u)
    pickle.dumps(state)
    first, state1 = c.compress(u, state, 3)
    snapshot = pickle.dumps(state1)
    _, state2 = c.compress(u, state1, 4)
    pickle.dumps(state2)
    for k in u:
        assert torch.equal(u[k], copy[k]), k
    assert pickle.dumps(state1) == snapshot  # compress returned a new state
    # the compressor itself pickles (partials of module functions) and behaves the same
    again = pickle.loads(pickle.dumps(c))
    assert encode(again.compress(u, again.init(u), 3)[0]) == encode(first)


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="reserved"):
        topk(k=1).compress({"@round": torch.ones(3)}, None, 0)
    with pytest.raises(ValueError, match="ambiguous|twice"):
        # an int tensor named like top-k's own shape entry for "w"
        topk(k=1).compress({"w": torch.ones(3), "w/shape": torch.tensor([3], dtype=torch.int32)}, None, 0)
    with pytest.raises(ValueError, match="ambiguous"):
        # three int tensors that would read as a compressed tensor "v"
        ints = {f"v/{s}": torch.zeros(1, dtype=torch.int32) for s in ("values", "indices", "shape")}
        topk(k=1).compress({"w": torch.ones(3), **ints}, None, 0)


# --------------------------------------------------------------------------- build_compressor


def test_build_compressor_parses_specs():
    x = {"w": torch.randn(200, generator=torch.Generator().manual_seed(11))}
    assert build_compressor("").name == "identity"
    assert build_compressor("topk", topk_ratio=0.05).name == "topk(ratio=0.05)"
    assert build_compressor(" qsgd ", qsgd_bits=4).name == "qsgd(bits=4)"
    c = build_compressor("topk+qsgd", topk_ratio=0.1, qsgd_bits=2)
    assert c.name == "topk(ratio=0.1)+qsgd(bits=2)"
    ref = chain(topk(ratio=0.1), qsgd(2))
    assert encode(c.compress(x, c.init(x), 1)[0]) == encode(ref.compress(x, ref.init(x), 1)[0])
    ef = build_compressor("topk+qsgd", error_feedback=True)
    assert ef.name == "ef(topk(ratio=0.01)+qsgd(bits=8))"
    assert isinstance(ef.init(x), ErrorFeedbackState) and isinstance(ef.init(x).inner, tuple)
    assert COMPRESSORS == ("topk", "qsgd")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spec="topk+svd"), r"'svd'.*topk, qsgd"),
        (dict(spec="topk+"), r"''.*topk, qsgd"),
        (dict(spec="topk", topk_ratio=0.0), r"\(0, 1\], got 0.0"),
        (dict(spec="topk", topk_ratio=1.5), r"got 1.5"),
        (dict(spec="qsgd", qsgd_bits=3), r"\(2, 4, 8\), got 3"),
        (dict(spec="qsgd", qsgd_bits=16), r"got 16"),
    ],
)
def test_build_compressor_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_compressor(**kwargs)


def test_factory_errors():
    with pytest.raises(ValueError, match="exactly one"):
        topk()
    with pytest.raises(ValueError, match="exactly one"):
        topk(ratio=0.1, k=3)
    with pytest.raises(ValueError, match="got 0"):
        topk(k=0)
    with pytest.raises(TypeError):
        chain(topk(k=1), "qsgd")
