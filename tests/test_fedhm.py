"""FedHM: SVD factorisation on the server, recovery and averaging of full weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.errors import ConfigError
from rankfed.algorithms.fedhm import factor_ranks, svd_factors
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from conftest import make_sim
from rankfed.wire import encoded_size


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))


def _sim(opts, per_round=3):
    g = torch.Generator().manual_seed(0)
    clients = []
    for n in (10, 20, 30):
        x = torch.randn(n, 2, 8, 8, generator=g)
        clients.append(ClientData(x=x, y=torch.randint(0, 3, (n,), generator=g), val_x=x[:0], val_y=torch.zeros(0, dtype=torch.long)))
    test = (torch.randn(20, 2, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g))
    return make_sim(get_algorithm("fedhm", opts), _model(), clients, test, LocalTraining(lr=0.05, batch_size=8), rounds=2, per_round=per_round), clients


def test_factorise_then_recover_at_full_rank_is_the_identity():
    for w in (_model()[0].weight.detach(), _model()[2].weight.detach(), torch.randn(5, 7)):
        full = min(w.shape[0], w[0].numel())
        down, up = svd_factors(w, full)
        recovered = (up.reshape(up.shape[0], -1) @ down.reshape(full, -1)).reshape(w.shape)
        torch.testing.assert_close(recovered, w, rtol=1e-5, atol=1e-6)
    # a lower rank is the best approximation of that rank (Eckart-Young): error = tail singular values
    w = torch.randn(8, 18, dtype=torch.float64)
    down, up = svd_factors(w, 3)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.matrix_norm(w - up @ down), s[3:].norm())


def test_ranks_follow_rank_factor_and_patterns():
    assert factor_ranks(_model(), get_algorithm("fedhm", {"rank_factor": 4, "patterns": ["0", "2"]})) == {"0": 2, "2": 2}
    assert factor_ranks(_model(), get_algorithm("fedhm", {"rank_factor": 1, "patterns": ["*"]})) == {"0": 8, "2": 8, "5": 3}
    # a fixed rank for every layer, capped at each layer's full rank (the Linear "5" has 3 outputs)
    assert factor_ranks(_model(), get_algorithm("fedhm", {"rank": 5, "patterns": ["*"]})) == {"0": 5, "2": 5, "5": 3}


def test_server_averages_the_recovered_full_kernels(monkeypatch):
    sim, clients = _sim({"rank_factor": 2, "patterns": ["0", "2"]})
    replies = []
    real = type(sim.server).fold

    def spy(self, rnd, cid, payload):
        replies.append((cid, payload))
        return real(self, rnd, cid, payload)

    # on the class: the simulator folds each upload into the round as it arrives
    monkeypatch.setattr(type(sim.server), "fold", spy)
    rec = sim.run_round(1)
    sizes = torch.tensor([float(p["@num_samples"]) for _, p in replies])
    for name in ("0", "2"):
        kernels = [(p[f"{name}.up.weight"].reshape(8, -1) @ p[f"{name}.down.weight"].reshape(4, -1)).reshape(sim.server.state[f"{name}.weight"].shape) for _, p in replies]
        expect = sum(k * n for k, n in zip(kernels, sizes)) / sizes.sum()
        torch.testing.assert_close(sim.server.state[f"{name}.weight"], expect, rtol=1e-5, atol=1e-6)
        assert torch.linalg.matrix_rank(expect.reshape(8, -1)) > 4  # averaging rank-4 kernels raises the rank
    # the wire carries the factors (rank 4) and the unfactorised tensors, not the kernels
    payload = sim.server.configure(2, [0])[0]
    assert payload["0.up.weight"].shape == (8, 4, 1, 1) and payload["2.down.weight"].shape == (4, 8, 3, 3)
    assert "0.weight" not in payload and "0.base_layer.bias" in payload and "5.weight" in payload
    assert rec.downlink_bytes_per_client[0] == encoded_size({**payload, "@round": 1})


def test_tiers_get_their_own_rank_and_the_server_averages_all_recovered_kernels():
    tiers = [{"fraction": 2 / 3, "rank": 1}, {"fraction": 1 / 3, "rank": 4}]
    sim, clients = _sim({"tiers": tiers, "patterns": ["0", "2"]})
    start = {k: v.clone() for k, v in sim.server.state.items()}
    downlinks = sim.server.configure(1, [0, 1, 2])
    assert downlinks[0] is downlinks[1] and downlinks[0]["2.up.weight"].shape[1] == 1
    assert downlinks[2]["2.up.weight"].shape[1] == 4  # conv "2" is 8 -> 8: rank 4 of full 8
    replies = []
    fit = sim.client.fit
    sim.client.fit = lambda payload, ctx: replies.append((ctx.client_id, fit(payload, ctx))) or replies[-1][1]
    rec = sim.run_round(1)
    assert rec.downlink_bytes_per_client[0] < rec.downlink_bytes_per_client[2]
    sizes = [c.num_samples for c in clients]
    for name in ("0", "2"):
        w = start[f"{name}.weight"]
        full = [(p[f"{name}.up.weight"].reshape(w.shape[0], -1) @ p[f"{name}.down.weight"].reshape(p[f"{name}.down.weight"].shape[0], -1)).reshape(w.shape) for _, p in replies]
        expect = sum(sizes[cid] * f for (cid, _), f in zip(replies, full)) / sum(sizes[cid] for cid, _ in replies)
        torch.testing.assert_close(sim.server.state[f"{name}.weight"], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_base_free_layer_computes_its_factors_and_bias_without_the_dense_product(kind):
    """FedHM's layers: the same output (bitwise) and gradients (float tolerance) as the old
    zero-weight base path, and the base layer is never called."""
    from rankfed.lowrank import apply_lora, lora_layers

    torch.manual_seed(0)
    layer = nn.Linear(7, 5) if kind == "linear" else nn.Conv2d(3, 6, 3, stride=2, padding=1)
    x = torch.randn(4, 7) if kind == "linear" else torch.randn(2, 3, 9, 9)
    zero_base, base_free = nn.Sequential(copy.deepcopy(layer)), nn.Sequential(copy.deepcopy(layer))
    for m in (zero_base, base_free):
        apply_lora(m, 3, 3.0, patterns=["0"], exclude=[], generator=torch.Generator().manual_seed(1))
    a, b = lora_layers(zero_base)["0"], lora_layers(base_free)["0"]
    with torch.no_grad():
        a.up.weight.normal_(generator=torch.Generator().manual_seed(2))
        b.up.weight.copy_(a.up.weight)
        a.base_layer.weight.zero_()
    b.make_base_free()
    calls = []
    b.base_layer.register_forward_hook(lambda *args: calls.append(1))
    out_a, out_b = zero_base(x), base_free(x)
    assert torch.equal(out_a, out_b) and not calls
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for name in ("down.weight", "up.weight", "base_layer.bias"):
        ga, gb = a.get_parameter(name).grad, b.get_parameter(name).grad
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6, msg=name)


# -- factorization = "code": the FedHM code's (out*kh, in*kw) layout, a 1 x kw conv then a kh x 1 conv


def _code_kernel(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The dense kernel of a split pair, by hand: U (out*kh, r) @ V (r, in*kw) reshaped back."""
    out, r, kh, _ = up.shape
    _, cin, _, kw = down.shape
    u = up[..., 0].permute(0, 2, 1).reshape(out * kh, r)  # row o*kh + h
    v = down[:, :, 0, :].reshape(r, cin * kw)  # column i*kw + w
    return (u @ v).reshape(out, kh, cin, kw).permute(0, 2, 1, 3)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        dict(kernel_size=(2, 3), padding=0),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=1, stride=2),
    ],
    ids=["3x3", "3x3-s2", "3x5-s21-d12", "2x3-valid", "same", "1x1-s2"],
)
def test_the_split_pair_is_the_dense_conv_of_the_reshaped_low_rank_kernel(geometry):
    from rankfed.lowrank import LoRAConv2dSplit

    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, bias=False, dtype=torch.float64, **geometry)
    layer = LoRAConv2dSplit(base, 2, 2.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.up.weight.normal_(generator=torch.Generator().manual_seed(2))
    kh, kw = base.kernel_size
    assert layer.down.weight.shape == (2, 3, 1, kw) and layer.up.weight.shape == (5, 2, kh, 1)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    kernel = _code_kernel(layer.up.weight.detach(), layer.down.weight.detach())
    dense = F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
    with torch.no_grad():
        two_convs = layer.up(layer.down(x))
        torch.testing.assert_close(two_convs, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.delta_weight(), kernel, rtol=1e-12, atol=1e-12)
        assert torch.linalg.matrix_rank(kernel.permute(0, 2, 1, 3).reshape(5 * kh, 3 * kw)) == 2
        layer.make_base_free()  # FedHM's layer: the two convolutions alone (scale 1)
        torch.testing.assert_close(layer(x), dense, rtol=1e-12, atol=1e-12)


def test_code_factors_are_the_truncated_svd_of_the_code_matrix():
    from rankfed.algorithms.fedhm import _recover

    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    matrix = w.permute(0, 2, 1, 3).reshape(24, 18)
    down, up = svd_factors(w, 18, "code")  # full rank of the (out*kh, in*kw) matrix: exact
    assert down.shape == (18, 6, 1, 3) and up.shape == (8, 18, 3, 1)
    torch.testing.assert_close(_recover(up, down, w.shape, "code"), w)
    torch.testing.assert_close(_code_kernel(up, down), w)
    down, up = svd_factors(w, 4, "code")  # Eckart-Young on that matrix
    err = _recover(up, down, w.shape, "code") - w
    s = torch.linalg.svdvals(matrix)
    assert torch.allclose(torch.linalg.matrix_norm(err.permute(0, 2, 1, 3).reshape(24, 18)), s[4:].norm())
    # a different matrix than "svd" mode's (out, in*kh*kw): another approximation of the kernel
    d2, u2 = svd_factors(w, 4)
    assert not torch.allclose(_recover(u2, d2, w.shape), _recover(up, down, w.shape, "code"))


def test_code_mode_keeps_the_stem_the_first_block_and_the_shortcuts_full_rank_in_resnet18():
    from rankfed.models import build_model

    model = build_model("resnet18", (3, 32, 32), 10)
    code = get_algorithm("fedhm", {"factorization": "code", "rank_factor": 2})
    assert code.exclude == ["conv1", "layer1.0.*", "*shortcut*"]
    ranks = factor_ranks(model, code)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert sorted(ranks) == sorted(n for n in convs if n != "conv1" and not n.startswith("layer1.0.") and "shortcut" not in n)
    assert len(ranks) == 14 and ranks["layer1.1.conv1"] == 32 and ranks["layer4.1.conv2"] == 256
    assert sorted(factor_ranks(model, get_algorithm("fedhm", {"rank_factor": 2}))) == sorted(n for n in convs if n != "conv1")  # "svd": all but the stem
    # an exclude given explicitly is kept; the rank cap is the code matrix's (out*kh, in*kw)
    assert "layer1.0.conv1" in factor_ranks(model, get_algorithm("fedhm", {"factorization": "code", "exclude": ["conv1", "*shortcut*"]}))
    tiny = nn.Sequential(nn.Conv2d(1, 8, 3))  # (8*3, 1*3): rank <= 3, where "svd"'s (8, 9) allows 8
    assert factor_ranks(tiny, get_algorithm("fedhm", {"factorization": "code", "rank": 8, "patterns": ["0"]})) == {"0": 3}
    assert factor_ranks(tiny, get_algorithm("fedhm", {"rank": 8, "patterns": ["0"]})) == {"0": 8}
    with pytest.raises(ConfigError, match="algorithm.factorization = 'square'"):
        get_algorithm("fedhm", {"factorization": "square"})


def test_a_code_mode_round_sends_split_factors_and_averages_the_recovered_kernels(monkeypatch):
    sim, clients = _sim({"rank_factor": 2, "patterns": ["0", "2"], "factorization": "code"})
    payload = sim.server.configure(1, [0])[0]
    assert payload["0.down.weight"].shape == (4, 2, 1, 3) and payload["0.up.weight"].shape == (8, 4, 3, 1)
    replies = []
    real = type(sim.server).fold

    def spy(self, rnd, cid, upload):
        replies.append(upload)
        return real(self, rnd, cid, upload)

    monkeypatch.setattr(type(sim.server), "fold", spy)
    sim.run_round(1)
    sizes = torch.tensor([float(p["@num_samples"]) for p in replies])
    for name in ("0", "2"):
        kernels = [_code_kernel(p[f"{name}.up.weight"], p[f"{name}.down.weight"]) for p in replies]
        expect = sum(k * n for k, n in zip(kernels, sizes)) / sizes.sum()
        torch.testing.assert_close(sim.server.state[f"{name}.weight"], expect, rtol=1e-5, atol=1e-6)
    sim.run_round(2)
