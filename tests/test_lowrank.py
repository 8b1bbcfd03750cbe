"""Tests for rankfed.lowrank.layers: equivalences of the low-rank wrappers.

Tolerances (float32): a single layer's outputs (entries of order 1) agree to
atol = rtol = 1e-5; a whole model's logits (cnn2, resnet18 in eval mode,
entries of order 0.1) to atol = 1e-6, rtol = 1e-5: the factored path and the
one dense kernel sum in different orders, and the observed differences are
2e-8 to 5e-8, so both bounds leave a margin of 20x or more. Unmerge is
checked against the bound of two float roundings, elementwise
|restored - w| <= eps * (|w + d| + |w|). Before anything is compared, the `up`
factors are set to random values: a fresh wrapper has up = 0, which would make
most checks vacuous.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.lowrank import (
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    apply_lora,
    dense_state_dict,
    load_lora_state,
    lora_layers,
    lora_state,
    max_rank,
    merge_all,
)
from rankfed.models import build_model

LAYER_TOL = {"atol": 1e-5, "rtol": 1e-5}
MODEL_TOL = {"atol": 1e-6, "rtol": 1e-5}

MODEL_CASES = {"cnn2": ((1, 28, 28), 10), "resnet18": ((3, 32, 32), 10)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy machine the
    threads' barriers cost more than the work (resnet18: 6 s -> 0.3 s a test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A small base layer and a matching input (batch 2)."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(7, 5), torch.randn(2, 3, 7)  # extra middle dim: LoRA acts on the last
    if kind == "conv_s2_p1":
        return nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1), torch.randn(2, 3, 9, 9)
    if kind == "conv_rect_dil":
        # Rectangular kernel, asymmetric padding, dilation, no bias.
        layer = nn.Conv2d(
            4, 5, kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=2, bias=False
        )
        return layer, torch.randn(2, 4, 11, 10)
    if kind == "conv_reflect":
        layer = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, padding_mode="reflect")
        return layer, torch.randn(2, 3, 8, 8)
    raise AssertionError(kind)


LAYER_KINDS = ("linear", "conv_s2_p1", "conv_rect_dil", "conv_reflect")


def wrap(layer: nn.Module, rank: int = 3, alpha: float = 6.0, **kwargs) -> LoRALayer:
    cls = LoRALinear if isinstance(layer, nn.Linear) else LoRAConv2d
    return cls(layer, rank, alpha, **kwargs)


@torch.no_grad()
def randomize_up(module: nn.Module, seed: int = 1) -> None:
    """Give every `up` factor random values so the pair adds a real update."""
    gen = torch.Generator().manual_seed(seed)
    layers = [module] if isinstance(module, LoRALayer) else lora_layers(module).values()
    for layer in layers:
        w = layer.up.weight
        w.copy_(0.1 * torch.randn(w.shape, generator=gen))


def plain_copy(layer: LoRALayer, weight: torch.Tensor) -> nn.Module:
    """The base layer alone, holding `weight`."""
    plain = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        plain.weight.copy_(weight)
    return plain


def apply_delta(layer: LoRALayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x through the base layer's geometry with `weight` and no bias."""
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    plain = nn.Conv2d(
        base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
        base.dilation, bias=False, padding_mode=base.padding_mode,
    )
    with torch.no_grad():
        plain.weight.copy_(weight)
    return plain(x)


# -- a single wrapper ----------------------------------------------------------


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_fresh_wrapper_computes_its_base_layer(kind):
    base, x = make_layer(kind)
    expected = base(x)
    layer = wrap(base)
    assert torch.count_nonzero(layer.up.weight) == 0
    assert torch.equal(layer(x), expected)


def test_random_init_is_torch_default_kaiming_uniform():
    base, _ = make_layer("conv_s2_p1")
    layer = wrap(base, generator=torch.Generator().manual_seed(5))
    reference = torch.empty(3, 3, 3, 3)
    nn.init.kaiming_uniform_(reference, a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(layer.down.weight, reference)
    assert torch.count_nonzero(layer.up.weight) == 0


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_is_base_plus_delta_weight(kind):
    base, x = make_layer(kind)
    layer = wrap(base, rank=3, alpha=6.0)
    randomize_up(layer)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape
    assert layer.scaling == 2.0
    with torch.no_grad():
        out = layer(x)
        # The factored path equals one layer with the dense delta as its weight ...
        torch.testing.assert_close(out - base(x), apply_delta(layer, x, delta), **LAYER_TOL)
        # ... and the wrapper equals a plain layer holding base.weight + delta.
        torch.testing.assert_close(out, plain_copy(layer, base.weight + delta)(x), **LAYER_TOL)
        torch.testing.assert_close(
            layer.scaling * layer.up(layer.down(x)), apply_delta(layer, x, delta), **LAYER_TOL
        )


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_keeps_function_and_unmerge_restores_base_weight(kind):
    base, x = make_layer(kind)
    layer = wrap(base)
    randomize_up(layer)
    w0 = base.weight.detach().clone()
    delta = layer.delta_weight().detach()
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert layer.merged and layer.accumulated == 1
        torch.testing.assert_close(base.weight, w0 + delta, **LAYER_TOL)
        torch.testing.assert_close(layer(x), y0, **LAYER_TOL)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()

        layer.unmerge()
        assert not layer.merged and layer.accumulated == 0
        bound = torch.finfo(w0.dtype).eps * ((w0 + delta).abs() + w0.abs())
        assert torch.all((base.weight - w0).abs() <= bound)
        torch.testing.assert_close(layer(x), y0, **LAYER_TOL)
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_then_random_reset_keeps_function_and_accumulates(kind):
    base, x = make_layer(kind)
    layer = wrap(base)
    w0 = base.weight.detach().clone()
    down0 = layer.down.weight.detach().clone()
    with torch.no_grad():
        randomize_up(layer, seed=1)
        d1 = layer.delta_weight()
        y1 = layer(x)
        layer.merge()
        layer.reset_factors("random")
        # New phase: up = 0, down re-drawn, function unchanged, merge made permanent.
        assert not layer.merged and layer.accumulated == 1
        assert torch.count_nonzero(layer.up.weight) == 0
        assert not torch.equal(layer.down.weight, down0)
        torch.testing.assert_close(layer(x), y1, **LAYER_TOL)
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()

        # A second phase: eq. (11), W_T = W_0 + sum of the merged deltas.
        randomize_up(layer, seed=2)
        d2 = layer.delta_weight()
        y2 = layer(x)
        layer.merge_and_reinit("random")
        assert layer.accumulated == 2
        torch.testing.assert_close(base.weight, w0 + d1 + d2, **LAYER_TOL)
        torch.testing.assert_close(layer(x), y2, **LAYER_TOL)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_momentum_keeps_factors_and_counts_delta_twice(kind):
    base, x = make_layer(kind)
    layer = wrap(base)
    randomize_up(layer)
    w0 = base.weight.detach().clone()
    down0 = layer.down.weight.detach().clone()
    up0 = layer.up.weight.detach().clone()
    with torch.no_grad():
        delta = layer.delta_weight()
        y0 = layer(x)
        layer.merge_and_reinit("momentum")
        # The base absorbed delta once; the factors are kept bit for bit and stay live.
        assert not layer.merged and layer.accumulated == 1
        assert torch.equal(layer.down.weight, down0) and torch.equal(layer.up.weight, up0)
        torch.testing.assert_close(base.weight, w0 + delta, **LAYER_TOL)
        torch.testing.assert_close(layer.delta_weight(), delta)
        # So the layer now computes with W0 + 2 * delta: the function changed.
        out = layer(x)
        torch.testing.assert_close(out, plain_copy(layer, w0 + 2 * delta)(x), **LAYER_TOL)
        assert not torch.allclose(out, y0, **LAYER_TOL)


def test_bad_reset_mode_and_grouped_conv_and_bad_alpha():
    layer = wrap(nn.Linear(4, 4), rank=2)
    with pytest.raises(ValueError, match="'sideways'"):
        layer.reset_factors("sideways")
    with pytest.raises(ValueError, match="groups=2"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1.0)
    with pytest.raises(ValueError, match="alpha.*-1"):
        LoRALinear(nn.Linear(4, 4), 2, -1.0)
    assert max_rank(nn.Conv2d(1, 8, 5)) == 8
    assert max_rank(nn.Conv2d(2, 64, 3)) == 18  # min(2*3*3, 64)
    assert max_rank(nn.Linear(7, 5)) == 5


# -- whole models --------------------------------------------------------------


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    shape, classes = MODEL_CASES[name]
    return build_model(name, shape, classes).eval()


def model_input(name: str) -> torch.Tensor:
    shape, _ = MODEL_CASES[name]
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(MODEL_CASES))
@pytest.mark.parametrize("patterns", [("*conv*",), ("*",)])
def test_dense_state_dict_loads_into_plain_model_with_same_outputs(name, patterns):
    model = build(name)
    plain = copy.deepcopy(model)
    original = plain.state_dict()
    x = model_input(name)
    wrapped = apply_lora(model, rank=4, alpha=8.0, patterns=patterns)
    if patterns == ("*",):
        assert "fc" in wrapped
    else:
        assert "fc" not in wrapped and all("conv" in n for n in wrapped)
    randomize_up(model)
    with torch.no_grad():
        y = model(x)
        state = dense_state_dict(model)
        assert list(state) == list(original)  # the plain model's keys, in its order
        for n in wrapped:  # every wrapped weight really moved (the check is not vacuous)
            assert (state[f"{n}.weight"] - original[f"{n}.weight"]).abs().max() > 1e-3, n
        plain.load_state_dict(state, strict=True)
        torch.testing.assert_close(plain(x), y, **MODEL_TOL)
        # Merged (delta in the base weight, factor path off): the same dense state.
        merge_all(model, reinit=None)
        merged_state = dense_state_dict(model)
        differ = [k for k in state if not torch.allclose(merged_state[k], state[k], **LAYER_TOL)]
        assert differ == []


def test_merge_all_random_keeps_model_function():
    model = build("cnn2")
    x = model_input("cnn2")
    apply_lora(model, rank=4, alpha=8.0, patterns=("*",))
    randomize_up(model)
    with torch.no_grad():
        y = model(x)
        names = merge_all(model, reinit="random", generator=torch.Generator().manual_seed(3))
        assert names == ["conv1", "conv2", "fc"]
        torch.testing.assert_close(model(x), y, **MODEL_TOL)
    for layer in lora_layers(model).values():
        assert layer.accumulated == 1 and not layer.merged
        assert torch.count_nonzero(layer.up.weight) == 0


def test_generator_makes_factor_init_reproducible():
    a, b = build("cnn2"), build("cnn2")
    apply_lora(a, 4, 8.0, generator=torch.Generator().manual_seed(11))
    apply_lora(b, 4, 8.0, generator=torch.Generator().manual_seed(11))
    sa, sb = lora_state(a), lora_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_draws_the_same_factors_on_cuda():
    cpu, gpu = build("cnn2"), build("cnn2").cuda()
    apply_lora(cpu, 4, 8.0, generator=torch.Generator().manual_seed(11))
    apply_lora(gpu, 4, 8.0, generator=torch.Generator().manual_seed(11))
    sc, sg = lora_state(cpu), lora_state(gpu)
    assert all(sg[k].is_cuda and torch.equal(sc[k], sg[k].cpu()) for k in sc)


@pytest.mark.parametrize(
    ("freeze_down", "train_bias"), [(False, True), (True, True), (False, False)]
)
def test_only_factors_and_chosen_biases_train(freeze_down, train_bias):
    model = build("cnn2")
    model.fc.bias.requires_grad_(False)  # not wrapped: must stay as it was
    apply_lora(model, 4, 8.0, patterns=("*conv*",), freeze_down=freeze_down, train_bias=train_bias)
    randomize_up(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"fc.weight"}
    for name in ("conv1", "conv2"):
        expected.add(f"{name}.up.weight")
        if not freeze_down:
            expected.add(f"{name}.down.weight")
        if train_bias:
            expected.add(f"{name}.base_layer.bias")
    assert trainable == expected

    model(model_input("cnn2")).square().mean().backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_freeze_down_survives_random_reset():
    model = build("cnn2")
    apply_lora(model, 4, 8.0, freeze_down=True)
    randomize_up(model)
    merge_all(model, reinit="random")
    for layer in lora_layers(model).values():
        assert not layer.down.weight.requires_grad and layer.up.weight.requires_grad
        assert not layer.base_layer.weight.requires_grad


def test_lora_state_round_trip():
    source, target = build("cnn2", seed=0), build("cnn2", seed=0)
    apply_lora(source, 4, 8.0, generator=torch.Generator().manual_seed(1))
    apply_lora(target, 4, 8.0, generator=torch.Generator().manual_seed(2))
    randomize_up(source)
    state = lora_state(source)
    assert set(state) == {f"conv{i}.{f}.weight" for i in (1, 2) for f in ("down", "up")}
    full = source.state_dict()
    assert all(torch.equal(state[k], full[k]) for k in state)  # the module's own keys
    state["conv1.up.weight"] += 1.0  # a copy: the model is not touched
    assert not torch.equal(state["conv1.up.weight"], source.conv1.up.weight)

    load_lora_state(target, lora_state(source))
    x = model_input("cnn2")
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), **LAYER_TOL)

    with pytest.raises(KeyError, match="conv2.up.weight"):
        load_lora_state(target, {k: v for k, v in state.items() if k != "conv2.up.weight"})
    with pytest.raises(ValueError, match="conv1.down.weight"):
        load_lora_state(target, {**state, "conv1.down.weight": torch.zeros(1)})


# -- apply_lora errors -----------------------------------------------------------


def test_apply_lora_without_match_names_patterns():
    model = build("cnn2")
    with pytest.raises(ValueError, match=r"\*attn\*"):
        apply_lora(model, 4, 8.0, patterns=("*attn*",))
    with pytest.raises(ValueError, match="exclude"):
        apply_lora(model, 4, 8.0, patterns=("conv1",), exclude=("conv*",))
    assert not lora_layers(model)


@pytest.mark.parametrize("rank", [0, -1])
def test_apply_lora_bad_rank_names_value_and_layer(rank):
    model = build("cnn2")
    with pytest.raises(ValueError, match=rf"'conv1'.*got {rank}$"):
        apply_lora(model, rank, 8.0, patterns=("*conv*",))
    assert not lora_layers(model)  # checked before anything was replaced


def test_rank_above_full_rank_is_allowed_and_merges_exactly():
    # conv1 of cnn2 is 1->8 with a 5x5 kernel: full rank min(1*5*5, 8) = 8. A rank-12 pair
    # (as the FedLoRU paper's ResNet-18 at rank 128 has on its 64-channel layers) is legal.
    torch.manual_seed(0)
    model = build("cnn2")
    apply_lora(model, 12, 8.0, patterns=("conv1",), generator=torch.Generator().manual_seed(1))
    layer = model.conv1
    assert tuple(layer.down.weight.shape) == (12, 1, 5, 5) and tuple(layer.up.weight.shape) == (8, 12, 1, 1)
    with torch.no_grad():
        layer.up.weight.normal_()
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    merge_all(model, reinit="random", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_apply_lora_no_rewrap():
    model = build("cnn2")
    assert apply_lora(model, 4, 8.0, patterns=("*",), exclude=("fc",)) == ["conv1", "conv2"]
    # A second call never wraps a wrapper's own base_layer / down / up.
    assert apply_lora(model, 4, 8.0, patterns=("*",)) == ["fc"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(model, 4, 8.0, patterns=("*",))
    assert list(lora_layers(model)) == ["conv1", "conv2", "fc"]
