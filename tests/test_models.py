"""Tests for rankfed.models: parameter counts, shapes, gradients, errors, determinism."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from rankfed.models import MODELS, build_model, count_parameters
from rankfed.models.text import EncoderBlock

TEXT_MODELS = ("char_lstm", "transformer")

# One matching input per model: (input_shape, num_classes, options).
CASES: dict[str, tuple[tuple[int, ...], int, dict]] = {
    "logreg": ((1, 28, 28), 10, {}),
    "mlp": ((60,), 10, {}),
    "cnn2": ((1, 28, 28), 10, {}),
    "cnn3": ((3, 32, 32), 10, {}),
    "resnet18": ((3, 32, 32), 10, {}),
    "wrn16_4": ((3, 32, 32), 100, {}),
    "char_lstm": ((80,), 80, {}),
    "transformer": ((80,), 80, {}),
}


def make_input(
    name: str, input_shape: tuple[int, ...], num_classes: int, batch: int = 2
) -> torch.Tensor:
    if name in TEXT_MODELS:
        return torch.randint(0, num_classes, (batch, *input_shape), dtype=torch.uint8)
    return torch.randn(batch, *input_shape)


def test_model_names_match_contract():
    assert MODELS == (
        "logreg", "mlp", "cnn2", "cnn3", "resnet18", "wrn16_4", "char_lstm", "transformer"
    )
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "options", "expected"),
    [
        # 784 * 10 + 10
        ("logreg", (1, 28, 28), 10, {}, 7_850),
        # FedAvg 2NN: (784*200 + 200) + (200*200 + 200) + (200*10 + 10)
        ("mlp", (1, 28, 28), 10, {}, 199_210),
        # conv1 8*1*25 + 8 = 208; conv2 16*8*25 + 16 = 3,216; fc 784*10 + 10 = 7,850
        ("cnn2", (1, 28, 28), 10, {}, 11_274),
        # conv 64*3*25+64 = 4,864; 128*64*25+128 = 204,928; 128*128*25+128 = 409,728;
        # fc1 2048*256+256 = 524,544; fc2 256*10+10 = 2,570
        ("cnn3", (3, 32, 32), 10, {}, 1_146_634),
        ("resnet18", (3, 32, 32), 10, {}, 11_173_962),
        # GroupNorm has the same affine parameters as BatchNorm (BN's running stats are buffers).
        ("resnet18", (3, 32, 32), 10, {"norm": "group"}, 11_173_962),
        # fc grows by 90 * (512 + 1)
        ("resnet18", (3, 32, 32), 100, {}, 11_220_132),
        # WRN-16-4, bias-free convs, norm = 2*C affine parameters:
        #   stem conv 3->16: 432
        #   group 1 (16->64):   block0 32 + 9,216 + 128 + 36,864 + 1x1 1,024 = 47,264
        #                       block1 128 + 36,864 + 128 + 36,864 = 73,984
        #   group 2 (64->128):  block0 128 + 73,728 + 256 + 147,456 + 8,192 = 229,760
        #                       block1 256 + 147,456 + 256 + 147,456 = 295,424
        #   group 3 (128->256): block0 256 + 294,912 + 512 + 589,824 + 32,768 = 918,272
        #                       block1 512 + 589,824 + 512 + 589,824 = 1,180,672
        #   final norm 512; total without fc 2,746,320; fc 256*K + K
        ("wrn16_4", (3, 32, 32), 10, {}, 2_746_320 + 2_570),  # 2,748,890
        ("wrn16_4", (3, 32, 32), 100, {}, 2_746_320 + 25_700),  # 2,772,020
        # embed 80*8 = 640
        # LSTM layer = 4*h*(i+h) + 8*h (two bias vectors of 4h):
        #   layer 1: 4*256*(8+256) + 2,048 = 272,384; layer 2: 4*256*(256+256) + 2,048 = 526,336
        # fc 256*80 + 80 = 20,560
        ("char_lstm", (80,), 80, {}, 819_920),
        # embed 80*128 = 10,240; pos_embed 80*128 = 10,240
        # per block: 2 LayerNorms 512 + q/k/v/out 4*(128*128+128) = 66,048
        #            + ff1 128*512+512 = 66,048 + ff2 512*128+128 = 65,664
        #            = 198,272, x2 blocks = 396,544
        # final norm 256; fc 128*80 + 80 = 10,320
        ("transformer", (80,), 80, {}, 427_600),
    ],
)
def test_parameter_counts(name, input_shape, num_classes, options, expected):
    assert count_parameters(build_model(name, input_shape, num_classes, **options)) == expected


def test_count_parameters_trainable_only():
    model = build_model("cnn2", (1, 28, 28), 10)
    model.fc.requires_grad_(False)
    assert count_parameters(model) == 11_274
    assert count_parameters(model, trainable_only=True) == 11_274 - 7_850


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "options"),
    [
        *((name, *case) for name, case in CASES.items()),
        ("mlp", (1, 8, 8), 10, {"hidden": (32,)}),
        ("cnn2", (1, 8, 8), 10, {}),
        ("resnet18", (3, 32, 32), 10, {"norm": "group"}),
        ("wrn16_4", (3, 32, 32), 10, {"norm": "group", "dropout": 0.3}),
        ("transformer", (16,), 50, {"dropout": 0.1, "n_layers": 1}),
    ],
)
def test_forward_shape_and_finite_gradients(name, input_shape, num_classes, options):
    torch.manual_seed(0)
    model = build_model(name, input_shape, num_classes, **options)
    logits = model(make_input(name, input_shape, num_classes))
    assert logits.shape == (2, num_classes)
    assert logits.dtype == torch.float32
    logits.logsumexp(dim=1).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


def test_text_models_accept_int64_and_shorter_windows():
    for name in TEXT_MODELS:
        model = build_model(name, (20,), 30).eval()
        ids = torch.randint(0, 30, (3, 20))
        assert torch.equal(model(ids), model(ids.to(torch.uint8)))
        assert model(ids[:, :5]).shape == (3, 30)


def test_transformer_rejects_longer_windows():
    model = build_model("transformer", (8,), 30)
    with pytest.raises(ValueError, match="8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_weights(name):
    input_shape, num_classes, options = CASES[name]
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build_model(name, input_shape, num_classes, **options).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("name", MODELS)
def test_layers_are_plain_conv_and_linear(name):
    input_shape, num_classes, options = CASES[name]
    model = build_model(name, input_shape, num_classes, **options)
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert type(module) is nn.Conv2d, module_name
        if isinstance(module, nn.Linear):
            assert type(module) is nn.Linear, module_name
        assert not isinstance(module, nn.MultiheadAttention), module_name


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("cnn2", "conv*", ["conv1", "conv2"]),
        ("cnn3", "fc*", ["fc1", "fc2"]),
        ("mlp", "fc*", ["fc1", "fc2", "fc3"]),
        ("resnet18", "layer1.0.conv*", ["layer1.0.conv1", "layer1.0.conv2"]),
        ("resnet18", "*.shortcut.conv", [f"layer{g}.0.shortcut.conv" for g in (2, 3, 4)]),
        ("resnet18", "fc", ["fc"]),
        ("wrn16_4", "*shortcut", [f"layer{g}.0.shortcut" for g in (1, 2, 3)]),
        ("transformer", "*.attn.*_proj",
         [f"blocks.{i}.attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "out")]),
    ],
)
def test_module_names_are_globbable(name, pattern, expected):
    input_shape, num_classes, options = CASES[name]
    model = build_model(name, input_shape, num_classes, **options)
    matched = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, pattern)]
    assert sorted(matched) == sorted(expected)


def test_encoder_block_matches_torch_encoder_layer():
    torch.manual_seed(0)
    d_model, n_heads, ff = 32, 4, 64
    ours = EncoderBlock(d_model, n_heads, ff, dropout=0.0).eval()
    ref = nn.TransformerEncoderLayer(
        d_model, n_heads, ff, dropout=0.0, batch_first=True, norm_first=True
    ).eval()
    with torch.no_grad():
        attn = ours.attn
        # nn.MultiheadAttention packs q, k, v projections row-wise into in_proj.
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        ref.self_attn.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
        ref.self_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
        ref.linear1.load_state_dict(ours.ff1.state_dict())
        ref.linear2.load_state_dict(ours.ff2.state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(3, 7, d_model)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_unknown_name():
    with pytest.raises(ValueError, match="'vgg16'") as info:
        build_model("vgg16", (3, 32, 32), 10)
    assert "resnet18" in str(info.value)  # lists the valid choices


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [
        ("cnn2", (3, 32, 32)),
        ("cnn2", (1, 30, 30)),
        ("cnn3", (1, 28, 28)),
        ("cnn3", (784,)),
        ("resnet18", (784,)),
        ("wrn16_4", (1, 1, 28, 28)),
        ("char_lstm", (3, 32, 32)),
        ("transformer", (1, 28, 28)),
    ],
)
def test_bad_input_shape(name, input_shape):
    with pytest.raises(ValueError) as info:
        build_model(name, input_shape, 10)
    message = str(info.value)
    assert repr(name) in message
    assert str(input_shape) in message
    assert "expects" in message


@pytest.mark.parametrize("input_shape", [(), (0, 28), (1, -28, 28), (1.0, 28, 28), "abc"])
def test_malformed_input_shape(input_shape):
    with pytest.raises(ValueError, match="input_shape"):
        build_model("logreg", input_shape, 10)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("logreg", (10,), num_classes)


def test_unknown_option():
    with pytest.raises(TypeError, match="'width'") as info:
        build_model("cnn2", (1, 28, 28), 10, width=2)
    assert "none" in str(info.value)
    with pytest.raises(TypeError, match="'depth'.*dropout, norm"):
        build_model("wrn16_4", (3, 32, 32), 10, depth=28)


@pytest.mark.parametrize(
    ("name", "input_shape", "options", "bad"),
    [
        ("resnet18", (3, 32, 32), {"norm": "layer"}, "'layer'"),
        ("wrn16_4", (3, 32, 32), {"dropout": 1.5}, "1.5"),
        ("mlp", (60,), {"hidden": 200}, "200"),
        ("mlp", (60,), {"hidden": (200, 0)}, r"\(200, 0\)"),
        ("char_lstm", (80,), {"hidden": 0}, "hidden.*0"),
        ("transformer", (80,), {"d_model": 100, "n_heads": 3}, "d_model=100.*n_heads=3"),
    ],
)
def test_bad_option_value(name, input_shape, options, bad):
    with pytest.raises(ValueError, match=bad):
        build_model(name, input_shape, 80, **options)
