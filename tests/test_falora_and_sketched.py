"""Layer-wise FA-LoRA, FedAvg with uplink compressors, and FedAvg's stateful clients."""

import torch
from torch import nn

from rankfed.algorithms import get_algorithm
from rankfed.local import LocalTraining
from rankfed.data import ClientData
from rankfed.lowrank import lora_layers
from conftest import evaluate, make_sim
from rankfed.wire import encoded_size


def _data(n_clients=4, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        x = torch.randn(n, 1, 8, 8, generator=g) + 0.3 * i
        y = torch.randint(0, 4, (n,), generator=g)
        clients.append(ClientData(x=x, y=y, val_x=x[:0], val_y=y[:0]))
    return clients, (torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 4, (50,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 4))


def _sim(algo, clients, test, cfg=None, kind="stateless", per_round=None, rounds=3):
    return make_sim(algo, _model(), clients, test, cfg or LocalTraining(lr=0.1, batch_size=8), rounds=rounds, per_round=per_round, kind=kind)


def test_fa_lora_trains_and_sends_only_up_and_biases():
    clients, test = _data()
    sim = _sim(get_algorithm("fa_lora", {"rank": 2}), clients, test)
    server_model = sim.server.model
    down_before = {n: l.down.weight.detach().clone() for n, l in lora_layers(server_model).items()}
    hist = sim.run()
    names = set(sim.server.shared)
    assert names == {"0.up.weight", "0.base_layer.bias", "3.up.weight", "3.base_layer.bias"}
    sent = {n: t for n, t in sim.server.shared.items()}
    expected = encoded_size({"@num_samples": 0, "@train_loss": 0.0, **sent})
    assert all(r.uplink_bytes_per_client == [expected] * 4 for r in hist)
    # 2 * 6 (conv up) + 6 + 2 * 4 (linear up) + 4 = 30 numbers instead of 60 + 1540 + ...
    assert sum(t.numel() for t in sent.values()) == 6 * 2 + 6 + 4 * 2 + 4
    # A (down) never moves, and the client's frozen A is the server's (same seed).
    for n, layer in lora_layers(server_model).items():
        assert torch.equal(layer.down.weight, down_before[n])
        assert torch.equal(lora_layers(sim.client.model)[n].down.weight, down_before[n])
    assert any(t.abs().max() > 0 for n, t in sent.items() if n.endswith("up.weight"))


def test_fa_lora_global_model_is_base_plus_scaled_factor_product():
    clients, test = _data()
    sim = _sim(get_algorithm("fa_lora", {"rank": 3, "alpha": 6.0}), clients, test)
    sim.run()
    dense = sim.server.global_model_state()
    for name, layer in lora_layers(sim.server.model).items():
        up, down = layer.up.weight, layer.down.weight
        if up.dim() == 2:
            product = up @ down
        else:  # conv: up (out, r, 1, 1) x down (r, in, kh, kw)
            product = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        torch.testing.assert_close(dense[f"{name}.weight"], layer.base_layer.weight + 2.0 * product)
    # The evaluation model (plain layers) computes what the wrapped server model computes.
    acc_plain, loss_plain = sim.evaluate()
    acc_wrapped, loss_wrapped = evaluate(sim.server.model, *test)
    assert acc_plain == acc_wrapped and abs(loss_plain - loss_wrapped) < 1e-5


def test_fedavg_stateful_clients_train_the_same_model_at_a_different_byte_cost():
    clients, test = _data(n_clients=5)
    runs = {kind: _sim(get_algorithm("fedavg"), clients, test, kind=kind, per_round=2, rounds=3) for kind in ("stateful", "stateless")}
    hist = {kind: sim.run() for kind, sim in runs.items()}
    for name, value in runs["stateless"].server.global_model_state().items():
        torch.testing.assert_close(runs["stateful"].server.global_model_state()[name], value, rtol=1e-5, atol=1e-6)
    model = {k: v for k, v in _model().state_dict().items()}
    full = encoded_size({"@round": 1, **model})
    assert [r.downlink_bytes for r in hist["stateless"]] == [2 * full] * 3
    # stateful: round 1's broadcast has no update yet; later ones carry the averaged update, to all 5 clients
    assert hist["stateful"][0].downlink_bytes == 5 * encoded_size({"@round": 1})
    assert [r.downlink_bytes for r in hist["stateful"][1:]] == [5 * full] * 2


def test_fedavg_topk_uplink_is_about_ratio_of_dense_and_still_learns():
    clients, test = _data()
    dense = _sim(get_algorithm("fedavg"), clients, test).run_round(1).uplink_bytes_per_client[0]
    sim = _sim(get_algorithm("fedavg", {"compressor": "topk", "topk_ratio": 0.1}), clients, test, rounds=6)
    hist = sim.run()
    up = hist[0].uplink_bytes_per_client[0]
    # values (4 bytes) + int32 indices (4 bytes) for ceil(10%) of each tensor's entries,
    # plus per tensor a shape entry and headers (at most 100 bytes per tensor)
    tensors = list(_model().state_dict().values())
    data = sum(8 * -(-t.numel() // 10) for t in tensors)
    assert data < up < data + 100 * len(tensors) + 64
    assert up < 0.3 * dense
    assert hist[-1].train_loss < hist[0].train_loss


def test_fedavg_qsgd_and_chain_sizes():
    clients, test = _data()
    dense = _sim(get_algorithm("fedavg"), clients, test).run_round(1).uplink_bytes_per_client[0]
    q8 = _sim(get_algorithm("fedavg", {"compressor": "qsgd", "qsgd_bits": 8}), clients, test).run_round(1).uplink_bytes_per_client[0]
    q4 = _sim(get_algorithm("fedavg", {"compressor": "qsgd", "qsgd_bits": 4}), clients, test).run_round(1).uplink_bytes_per_client[0]
    both = _sim(get_algorithm("fedavg", {"compressor": "topk+qsgd", "topk_ratio": 0.1}), clients, test).run_round(1).uplink_bytes_per_client[0]
    numels = [t.numel() for t in _model().state_dict().values()]
    header = 100 * len(numels) + 64  # per tensor: norm, shape and entry headers
    q8_data = sum(n for n in numels)  # one byte per entry
    q4_data = sum(-(-n // 2) for n in numels)  # two entries per byte
    both_data = sum(5 * -(-n // 10) for n in numels)  # 10%: 1-byte value + 4-byte index
    assert q8_data < q8 < q8_data + header and q8 < 0.3 * dense
    assert q4_data < q4 < q4_data + header and q4 < 0.2 * dense
    # (on this toy model the chain's headers are a third of its bytes; top-k alone is dearer)
    assert both_data < both < both_data + 2 * header and both < 0.25 * dense


def test_error_feedback_state_lives_on_the_client_between_rounds():
    clients, test = _data()
    sim = _sim(get_algorithm("fedavg", {"compressor": "topk", "topk_ratio": 0.05, "error_feedback": True}), clients, test, per_round=2, rounds=2)
    sim.run_round(1)
    assert set(sim.client_states) == set(sim.history[0].clients)  # only the sampled clients hold a residual
    sim_off = _sim(get_algorithm("fedavg", {"compressor": "topk", "topk_ratio": 0.05}), clients, test, per_round=2)
    sim_off.run_round(1)
    assert sim_off.client_states == {}  # no error feedback: nothing kept
